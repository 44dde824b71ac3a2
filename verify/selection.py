"""Which receipts get audited, chosen after the host committed to them.

The order of events for one period:

1. The hub picks a random ``secret`` and publishes ``secret_commitment(secret)``.
2. Each host publishes the signed Merkle root of its receipts for the period
   (``merkle.merkle_root``); after that it cannot add, drop or change one.
3. The hub reveals ``secret``. Receipt ``r`` of a host whose root is ``root``
   is audited iff ``SHA-256(domain || len(secret):u16 || secret || root || r) < rate * 2**256``
   (``is_selected``), where ``rate`` is that host's audit rate
   (``reputation.audit_rate``, higher for suspects).

Anyone holding the secret, the root and the rate can recheck the choice
(``check_reveal`` + ``is_selected``); the host cannot know which receipts
will be opened while it can still change them, and the hub cannot pick them
after seeing the root (the secret was fixed before), so audits are of real
traffic, not synthetic challenges that could be recognised.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from fractions import Fraction

__all__ = ["check_reveal", "is_selected", "new_secret", "secret_commitment", "select", "selection_threshold"]

_SECRET_DOMAIN = b"gpunexus-audit-secret/1\0"
_SELECT_DOMAIN = b"gpunexus-audit-select/1\0"


def new_secret() -> bytes:
    import secrets

    return secrets.token_bytes(32)


def secret_commitment(secret: bytes) -> bytes:
    return hashlib.sha256(_SECRET_DOMAIN + secret).digest()


def check_reveal(commitment: bytes, secret: bytes) -> bool:
    return hmac.compare_digest(secret_commitment(secret), commitment)


def selection_threshold(rate: float) -> int:
    """``floor(rate * 2**256)`` computed exactly from the float (so every checker agrees)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"audit rate must be in [0, 1], got {rate}")
    return int(Fraction(rate) * 2**256)


def _score(secret: bytes, root: bytes, receipt_id: bytes | str) -> int:
    rid = receipt_id.encode() if isinstance(receipt_id, str) else receipt_id
    # Lengths are fixed (32-byte secret and root) or last, so the concatenation is unambiguous.
    digest = hashlib.sha256(_SELECT_DOMAIN + len(secret).to_bytes(2, "big") + secret + root + rid).digest()
    return int.from_bytes(digest, "big")


def is_selected(secret: bytes, root: bytes, receipt_id: bytes | str, rate: float) -> bool:
    return _score(secret, root, receipt_id) < selection_threshold(rate)


def select(secret: bytes, root: bytes, receipt_ids: Iterable[bytes | str], rate: float) -> list[bytes | str]:
    threshold = selection_threshold(rate)
    return [r for r in receipt_ids if _score(secret, root, r) < threshold]
