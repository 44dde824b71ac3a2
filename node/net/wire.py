"""Messages over a libp2p stream: framing, deadlines, clean errors.

Every receive takes a deadline from its caller: a stuck peer can delay a
request by at most that long, never hang it.
"""

from __future__ import annotations

from collections import deque
from typing import TypeVar

import trio
from gpunexus.protocol.codec import Message, decode
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.framing import FrameDecoder, encode_frame
from gpunexus.protocol.limits import MAX_FRAME_BYTES
from libp2p.network.stream.exceptions import (
    StreamClosed,
    StreamEOF,
    StreamError,
    StreamReset,
)

from .libp2p_compat import (
    direct_data_frame,
    fast_yamux,
    install_yamux_tweaks,
    mark_broken,
    read_buffered,
    write_direct,
)

install_yamux_tweaks()  # measured yamux/Noise/TCP tweaks, see node/net/libp2p_compat.py

M = TypeVar("M", bound=Message)

READ_SIZE = 65536
STREAM_ERRORS = (StreamEOF, StreamReset, StreamClosed, StreamError, trio.BrokenResourceError, trio.ClosedResourceError)


class PeerGone(Exception):
    """The stream ended or broke before the expected message arrived."""


class FramedStream:
    """A libp2p stream that sends and receives whole protocol messages.

    On a yamux stream in the common state (open, window available, nobody
    else holding its locks) a frame goes straight to the connection and
    buffered bytes are taken straight from yamux's buffer: py-libp2p 0.8.1's
    ``NetStream``/``YamuxStream`` layers take three to five trio locks per
    read or write, each a scheduler round trip even uncontended, and that was
    a large share of the relay's CPU per token (bench/relay.py). Everything
    else (a closed, reset or contended stream, a full window, a large frame)
    takes the full upstream path, so errors and flow control are upstream's.
    The upstream locks need not be taken here: trio runs one task at a time,
    the fast paths do not await between checking and updating yamux's state,
    and every upstream update of that state (window, buffer, flags) is itself
    made without an await in the middle, so no half-made update can be seen.
    The fast paths live in :mod:`gpunexus.node.net.libp2p_compat` with the rest
    of what reaches into py-libp2p's private parts.
    """

    def __init__(self, stream, *, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()
        self._yamux = fast_yamux(stream)

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_frame(msg))

    async def send_raw(self, frame: bytes) -> None:
        direct = direct_data_frame(self.stream, self._yamux, frame)
        try:
            if direct is not None:
                await write_direct(self._yamux, direct)
            else:
                await self.stream.write(frame)
        except STREAM_ERRORS as exc:
            raise PeerGone(f"stream closed while sending: {type(exc).__name__}") from None
        except Exception as exc:  # the connection under a direct write broke
            if direct is None:
                raise
            mark_broken(self.stream)
            raise PeerGone(f"stream broke while sending: {type(exc).__name__}") from None

    async def receive(self) -> Message:
        """The next message; PeerGone at end of stream, ProtocolError on garbage."""
        return decode(await self.receive_body())

    async def receive_body(self) -> bytes:
        """The next frame's body, undecoded (a session's batch); PeerGone at end of stream."""
        while not self._ready:
            try:
                data = await read_buffered(self.stream, self._yamux)
                if data is None:
                    data = await self.stream.read(READ_SIZE)
            except STREAM_ERRORS as exc:
                raise PeerGone(f"stream ended: {type(exc).__name__}") from None
            if not data:
                raise PeerGone("stream ended")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

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
