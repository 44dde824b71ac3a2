"""The session wire format: many requests on one stream between a gateway and a host.

A ``/gpunexus/session/1`` stream lives as long as the gateway keeps sending
a host work, and carries every request between the two. Each frame is the
usual 4-byte length and msgpack body (:mod:`.framing`); the body is a
*batch*, an array of entries ``[request, op, body]``:

* ``request``: the gateway's id for the request, a positive integer it never
  reuses on the session (each new request's id is above every earlier one,
  so a host can tell a new request from a finished one);
* ``op``: :data:`MESSAGE` (``body`` is one encoded protocol message: the
  order, a chunk, a receipt, an error), :data:`END` (the sender is done with
  the request; ``body`` empty) or :data:`RESET` (the sender abandons it: a
  client went away, a reader fell too far behind);
* the messages inside are the same typed, signed messages a per-request
  ``/gpunexus/infer/1`` stream carries, in the same order, so the host and
  gateway logic is one for both.

Why a batch: a request's messages are tiny (a chunk is often one token),
and each frame on its own stream pays yamux, Noise and a syscall in Python
on both peers. One frame holding every request's ready messages pays that
once (bench/relay.py). Request 0 is the session itself: an :class:`Error`
there says why the peer is about to drop the session.

Decoding trusts nothing: the frame size is bounded before the body is read,
the entry count and every entry's shape are checked here, and each body is
decoded and validated by :func:`.codec.decode` when its request reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgpack

from .errors import ProtocolError
from .limits import MAX_FRAME_BYTES

SESSION_PROTOCOL = "/gpunexus/session/1"

MESSAGE = 0
END = 1
RESET = 2
_OPS = (MESSAGE, END, RESET)

SESSION_REQUEST = 0
"""The request id of the session itself (a peer's last word before it drops the session)."""

MAX_BATCH_ENTRIES = 8192
"""Most entries in one frame: far above any real batch (one per request with something ready)."""
MAX_SESSION_FRAME_BYTES = MAX_FRAME_BYTES + 64 * 1024
"""A session frame holds one largest message plus the batch's own bytes."""
MAX_REQUEST_ID = 2**63 - 1

_ENTRY_OVERHEAD = 16
"""Upper bound of the msgpack bytes an entry adds around its body (array header, id, op, bin header)."""


class Entry(NamedTuple):
    request: int
    op: int
    body: bytes = b""


def encode_frames(entries: Iterable[Entry]) -> Iterator[bytes]:
    """Length-prefixed frames holding ``entries`` in order, each within the frame limit.

    Every entry fits a frame alone (a body is one message, itself within the
    message frame limit), so a long batch only ever splits between entries.
    """
    batch: list[Entry] = []
    size = 8
    for entry in entries:
        cost = len(entry.body) + _ENTRY_OVERHEAD
        if batch and (size + cost > MAX_SESSION_FRAME_BYTES or len(batch) == MAX_BATCH_ENTRIES):
            yield _frame(batch)
            batch, size = [], 8
        batch.append(entry)
        size += cost
    if batch:
        yield _frame(batch)


def _frame(batch: list[Entry]) -> bytes:
    body = msgpack.packb(batch, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def decode_batch(body: bytes) -> list[Entry]:
    """A frame body's entries, checked for shape; ProtocolError on anything else."""
    try:
        value = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True, ext_hook=_no_ext,
                                max_array_len=MAX_BATCH_ENTRIES)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise ProtocolError(f"malformed session frame: {type(exc).__name__}") from None
    if type(value) is not tuple:
        raise ProtocolError("a session frame is an array of entries")
    entries = []
    for item in value:
        if type(item) is not tuple or len(item) != 3:
            raise ProtocolError("a session entry is [request, op, body]")
        request, op, data = item
        if type(request) is not int or not 0 <= request <= MAX_REQUEST_ID:
            raise ProtocolError("session entry: bad request id")
        if op not in _OPS or type(op) is not int:
            raise ProtocolError(f"session entry: unknown op {op!r}")
        if type(data) is not bytes or (op == MESSAGE and not data):
            raise ProtocolError("session entry: bad body")
        entries.append(Entry(request, op, data))
    return entries


def _no_ext(code: int, data: bytes) -> None:
    raise ProtocolError("msgpack extension types are not allowed")
