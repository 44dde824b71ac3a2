"""Messages over a libp2p stream: framing, deadlines, clean errors.

Every receive takes a deadline from its caller: a stuck peer can delay a
request by at most that long, never hang it.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import TypeVar

import trio
from gpunexus.protocol.codec import Message, decode
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.framing import FrameDecoder, encode_frame
from libp2p.network.stream.exceptions import (
    StreamClosed,
    StreamEOF,
    StreamError,
    StreamReset,
)
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    YamuxStream,
)

from . import yamux_tuning  # noqa: F401  (measured yamux tweaks, see its docstring)

M = TypeVar("M", bound=Message)

READ_SIZE = 65536
STREAM_ERRORS = (StreamEOF, StreamReset, StreamClosed, StreamError, trio.BrokenResourceError, trio.ClosedResourceError)


class PeerGone(Exception):
    """The stream ended or broke before the expected message arrived."""


_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
_MAX_DATA = MAX_MESSAGE_SIZE - HEADER_SIZE
_READABLE = (StreamState.OPEN, StreamState.CLOSE_WRITE)


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
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._ready: deque[bytes] = deque()
        muxed = getattr(stream, "muxed_stream", None)
        self._yamux = muxed if type(stream) is NetStream and type(muxed) is YamuxStream else None

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode_frame(msg))

    def _direct_frame(self, data: bytes) -> bytes | None:
        """The yamux DATA frame for ``data`` with its window taken, if the fast path applies."""
        y = self._yamux
        n = len(data)
        if (
            y is None
            or self.stream._state is not StreamState.OPEN
            or y.send_closed
            or y.closed
            or not 0 < n <= _MAX_DATA
            or n > y.send_window
            or y.rw_lock._writer_lock.value == 0
        ):
            return None
        y.send_window -= n
        return _HEADER.pack(0, TYPE_DATA, 0, y.stream_id, n) + data

    async def send_raw(self, frame: bytes) -> None:
        direct = self._direct_frame(frame)
        try:
            if direct is not None:
                await self._yamux.conn._write_frame(direct)
            else:
                await self.stream.write(frame)
        except STREAM_ERRORS as exc:
            raise PeerGone(f"stream closed while sending: {type(exc).__name__}") from None
        except Exception as exc:  # the connection under a direct write broke
            if direct is None:
                raise
            self.stream._state = StreamState.ERROR
            raise PeerGone(f"stream broke while sending: {type(exc).__name__}") from None

    async def _read_direct(self) -> bytes | None:
        """Bytes from yamux's buffer for this stream (waiting for them if need be), or None for the full path."""
        y = self._yamux
        if y is None:
            return None
        conn = y.conn
        sid = y.stream_id
        waited = False
        while True:
            if (
                self.stream._state not in _READABLE
                or conn.event_shutting_down.is_set()
                or y.reset_received
                or y.closed
                or sid not in conn.streams
            ):
                return None
            buffer = conn.stream_buffers.get(sid)
            if buffer is None:
                return None
            if buffer:
                data = bytes(buffer)
                buffer.clear()
                await y._auto_tune_and_send_window_update(bytes_read=len(data))
                if not waited:
                    await trio.lowlevel.checkpoint()
                return data
            if y.recv_closed:
                return None
            event = conn.stream_events.get(sid)
            if event is None:
                return None
            if event.is_set():
                # A wake-up for bytes already taken (or for state checked above): arm a fresh one.
                event = conn.stream_events[sid] = trio.Event()
            await event.wait()
            waited = True

    async def receive(self) -> Message:
        """The next message; PeerGone at end of stream, ProtocolError on garbage."""
        while not self._ready:
            try:
                data = await self._read_direct()
                if data is None:
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
