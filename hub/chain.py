"""The settled-receipt log: hub-signed entries, each naming the previous one's hash.

An entry is a canonical msgpack array, so the auditor recomputes exactly the
bytes the hub hashed. The hub signs the entry's SHA-256 (domain-separated),
and the next entry embeds that hash: dropping, reordering or editing any
entry breaks every link after it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.signing import Signer, verify_signature

FORMAT = "gpunexus/receipt-log/1"
_SIG_PREFIX = (FORMAT + "\n").encode()
GENESIS = bytes(32)
"""The previous hash of the first entry."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One settled receipt: who paid (``client``), who earned (``host``), how much."""

    seq: int
    prev_hash: bytes
    receipt: bytes
    client: str
    host: str
    cost: int
    host_amount: int
    fee: int
    fee_bps: int
    settled_at: float

    def encode(self) -> bytes:
        return msgpack.packb(
            [FORMAT, self.seq, self.prev_hash, self.receipt, self.client, self.host,
             self.cost, self.host_amount, self.fee, self.fee_bps, self.settled_at],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> LogEntry:
        try:
            v = msgpack.unpackb(data, raw=False, use_list=True)
            if not isinstance(v, list) or len(v) != 11 or v[0] != FORMAT:
                raise ValueError("not a log entry")
            entry = cls(*v[1:])
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"malformed log entry: {exc}") from None
        types = (int, bytes, bytes, str, str, int, int, int, int, float)
        if any(not isinstance(getattr(entry, f), t) for f, t in zip(cls.__slots__, types, strict=True)):
            raise ProtocolError("log entry field of the wrong type")
        return entry


def entry_hash(encoded: bytes) -> bytes:
    return hashlib.sha256(encoded).digest()


def sign_hash(signer: Signer, digest: bytes) -> bytes:
    return signer.sign(_SIG_PREFIX + digest)


def verify_hash(hub_id: str, digest: bytes, sig: bytes) -> None:
    verify_signature(hub_id, _SIG_PREFIX + digest, sig)


def log_lines(hub_id: str, rows: list[tuple[int, bytes, bytes, bytes]], account: str | None = None) -> Iterator[str]:
    """The export as JSON lines: a header naming the hub, then one entry per line.

    With ``account``, the rows are an *extract*: only the entries that
    account paid or earned (what the dashboard lets a user download). The
    header names the account, and ``gpunexus audit`` then checks each entry
    and the chain links between consecutive ones, and that every entry
    names the account (see :func:`gpunexus.hub.audit.audit_file`).
    """
    header = {"format": FORMAT, "hub_id": hub_id, "entries": len(rows)}
    if account is not None:
        header["account"] = account
    yield json.dumps(header) + "\n"
    for seq, entry, digest, sig in rows:
        yield json.dumps({"seq": seq, "entry": base64.b64encode(entry).decode(),
                          "hash": digest.hex(), "sig": base64.b64encode(sig).decode()}) + "\n"


def write_log(path: str, hub_id: str, rows: list[tuple[int, bytes, bytes, bytes]]) -> int:
    """Export every entry to ``path`` (:func:`log_lines`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(log_lines(hub_id, rows))
    return len(rows)
