"""Messages over a libp2p stream: framing, deadlines, clean errors.

Every receive takes a deadline from its caller: a stuck peer can delay a
request by at most that long, never hang it.
"""

from __future__ import annotations

from collections import deque
from typing import TypeVar

import trio
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset

from gpunexus.protocol.codec import Message, decode
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.framing import FrameDecoder, encode_frame

from . import yamux_tuning  # noqa: F401  (measured yamux tweaks, see its docstring)

M = TypeVar("M", bound=Message)

READ_SIZE = 65536
STREAM_ERRORS = (StreamEOF, StreamReset, StreamClosed, StreamError, trio.BrokenResourceError, trio.ClosedResourceError)


class PeerGone(Exception):
    """The stream ended or broke before the expected message arrived."""


class FramedStream:
    """A libp2p stream that sends and receives whole protocol messages."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._ready: deque[bytes] = deque()

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_frame(msg))

    async def send_raw(self, frame: bytes) -> None:
        try:
            await self.stream.write(frame)
        except STREAM_ERRORS as exc:
            raise PeerGone(f"stream closed while sending: {type(exc).__name__}") from None

    async def receive(self) -> Message:
        """The next message; PeerGone at end of stream, ProtocolError on garbage."""
        while not self._ready:
            try:
                data = await self.stream.read(READ_SIZE)
            except STREAM_ERRORS as exc:
                raise PeerGone(f"stream ended: {type(exc).__name__}") from None
            if not data:
                raise PeerGone("stream ended")
            self._ready.extend(self._decoder.feed(data))
        return decode(self._ready.popleft())

    def receive_ready(self) -> Message | None:
        """The next message if it already arrived (no I/O, no wait), else None.

        Lets a relay forward everything that came in one read as one piece.
        """
        if not self._ready:
            return None
        return decode(self._ready.popleft())

    async def receive_as(self, cls: type[M]) -> M:
        msg = await self.receive()
        if not isinstance(msg, cls):
            raise ProtocolError(f"expected {cls.TYPE}, got {msg.TYPE}")
        return msg

    async def close(self) -> None:
        # Shielded: a close or reset usually runs while its caller is being
        # cancelled (a client went away), and must still reach the peer.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.close()
            except STREAM_ERRORS:
                pass

    async def reset(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.reset()
            except STREAM_ERRORS:
                pass
