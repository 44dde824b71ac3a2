"""Ed25519 signing keys and signature checks by peer id.

The same 32-byte seed gives a node both its libp2p identity and the key that
signs its offers and receipts, so the two can never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import ProtocolError
from .ids import peer_id_from_public_key, public_key_from_peer_id

SEED_BYTES = 32


class Signer:
    """An Ed25519 private key together with the peer id it proves."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(os.urandom(SEED_BYTES))

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load the seed at ``path``, creating it (mode 0600) on first use."""
        if path.exists():
            return cls(path.read_bytes())
        path.parent.mkdir(parents=True, exist_ok=True)
        signer = cls.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.seed)
        return signer

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


_verifier_cache: dict[str, Ed25519PublicKey] = {}


def verify_signature(peer_id: str, data: bytes, signature: bytes) -> None:
    """Raise ProtocolError unless ``signature`` over ``data`` is ``peer_id``'s."""
    key = _verifier_cache.get(peer_id)
    if key is None:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        if len(_verifier_cache) > 10_000:
            _verifier_cache.clear()
        _verifier_cache[peer_id] = key
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise ProtocolError(f"bad signature from {peer_id}") from None
