"""Peer ids and request ids.

A gpunexus peer id *is* a libp2p peer id: the base58btc identity multihash of
the protobuf-encoded Ed25519 public key (``12D3KooW...``). Because the key is
inlined in the id, anyone can check a signature from the id alone, with no
key directory: the peer id in an offer and the key that signs a receipt are
the same thing.
"""

import secrets

from .errors import ProtocolError

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}

# identity multihash (0x00), length 36, protobuf PublicKey{Type: Ed25519, Data: 32 bytes}
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    n = 0
    raw = text.encode("ascii", "replace")
    for c in raw:
        if c not in _B58_INDEX:
            raise ProtocolError(f"not base58: {text[:64]!r}")
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    pad = len(raw) - len(raw.lstrip(b"1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return b58encode(_ED25519_PEER_ID_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inlined in a peer id, or ProtocolError."""
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 64:
        raise ProtocolError("peer id is not an Ed25519 libp2p peer id")
    raw = b58decode(peer_id)
    if len(raw) != 38 or not raw.startswith(_ED25519_PEER_ID_PREFIX):
        raise ProtocolError("peer id is not an Ed25519 libp2p peer id")
    return raw[len(_ED25519_PEER_ID_PREFIX):]


def new_request_id() -> str:
    """A fresh 128-bit request id, hex encoded: unguessable and collision-free."""
    return secrets.token_hex(16)
