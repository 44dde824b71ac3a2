"""The session wire format: batches split only between entries, and garbage is refused by shape."""

from __future__ import annotations

import msgpack
import pytest

from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.framing import FrameDecoder
from gpunexus.protocol.session import END, MAX_SESSION_FRAME_BYTES, MESSAGE, RESET, Entry, decode_batch, encode_frames


def test_entries_round_trip_in_order_and_long_batches_split_between_entries():
    big = b"x" * (1024 * 1024)
    entries = [Entry(1, MESSAGE, b"order"), *(Entry(i, MESSAGE, big) for i in range(2, 12)), Entry(2, END), Entry(3, RESET)]
    frames = list(encode_frames(entries))
    assert len(frames) > 1
    assert all(len(f) - 4 <= MAX_SESSION_FRAME_BYTES for f in frames)
    decoder = FrameDecoder(MAX_SESSION_FRAME_BYTES)
    back = [e for f in frames for body in decoder.feed(f) for e in decode_batch(body)]
    assert back == entries


@pytest.mark.parametrize("value", [
    {"a": 1},                      # not an array
    [[1, MESSAGE]],                # too short an entry
    [[-1, MESSAGE, b"x"]],         # negative request id
    [[True, MESSAGE, b"x"]],       # a boolean is not an id
    [[1, 7, b"x"]],                # unknown op
    [[1, MESSAGE, "text"]],        # body must be bytes
    [[1, MESSAGE, b""]],           # a message entry carries a message
])
def test_garbage_batches_are_refused(value):
    with pytest.raises(ProtocolError):
        decode_batch(msgpack.packb(value, use_bin_type=True))


def test_bytes_that_are_not_msgpack_are_refused():
    with pytest.raises(ProtocolError):
        decode_batch(b"\xc1\xc1\xc1")
