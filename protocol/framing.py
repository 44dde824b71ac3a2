"""Length-prefixed frames: a 4-byte big-endian length, then one msgpack message.

:class:`FrameDecoder` is sans-I/O (feed bytes, take frames), so it works on a
libp2p stream, a socket or a test buffer alike, and it refuses an oversize
length *before* buffering the body.
"""

from __future__ import annotations

import struct

from .codec import Message
from .errors import ProtocolError
from .limits import MAX_FRAME_BYTES

_LEN = struct.Struct(">I")


def encode_frame(msg: Message) -> bytes:
    body = msg.encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError("message larger than the frame limit")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Accumulates stream bytes and yields complete frame bodies."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max} byte limit")
            if len(self._buf) < 4 + size:
                break
            frames.append(bytes(self._buf[4 : 4 + size]))
            del self._buf[: 4 + size]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)
