"""Merkle tree over a host's receipts for one period.

* Leaf hash: ``SHA-256(0x00 || data)``; node hash: ``SHA-256(0x01 || left ||
  right)``. The prefixes keep a leaf from ever being read as a node (second
  preimage by re-interpreting an inner node as a leaf).
* Odd rule: a level with an odd number of nodes carries its last node up to
  the next level *unchanged* (no duplication, so ``[a, b, c]`` and
  ``[a, b, c, c]`` have different roots; Bitcoin's duplication rule gives them
  the same one, CVE-2012-2459).
* The published root binds the leaf count: ``SHA-256(0x02 || count:u64 ||
  top)``, where ``top`` is the hash the levels reduce to (for no leaves the
  root is ``SHA-256(0x02 || 0:u64)``). With the carry-up rule the top alone
  would not fix the count (a 3-leaf top equals a 4-leaf one whose last pair
  is replaced by the third leaf's hash), so a proof could claim a wrong
  count.
* A proof of leaf ``index`` in a tree of ``count`` leaves is the list of
  sibling hashes from the leaf up, skipping levels where the node is carried
  up alone; left/right follow from ``index`` and ``count``, so the proof
  carries no direction bits and ``count`` is part of what it proves.

Leaves are whatever bytes identify a receipt; ``receipt_leaf`` fixes the
convention the hub and hosts use: the receipt's request id (32 hex characters)
and the SHA-256 of its signed encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["EMPTY_ROOT", "leaf_hash", "merkle_root", "node_hash", "prove", "receipt_leaf", "verify_proof"]

EMPTY_ROOT = hashlib.sha256(b"\x02" + bytes(8)).digest()


def _seal(count: int, top: bytes) -> bytes:
    return hashlib.sha256(b"\x02" + count.to_bytes(8, "big") + top).digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def receipt_leaf(request_id: str, receipt_bytes: bytes) -> bytes:
    """Leaf data for one receipt: its request id and the hash of its signed encoding."""
    return request_id.encode("ascii") + hashlib.sha256(receipt_bytes).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    level = [leaf_hash(bytes(d)) for d in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    return _seal(len(leaves), _levels(leaves)[-1][0])


def prove(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf ``index`` up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} outside a tree of {len(leaves)}")
    proof = []
    for level in _levels(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        index //= 2
    return proof


def verify_proof(root: bytes, data: bytes, index: int, count: int, proof: Sequence[bytes]) -> bool:
    """Whether ``data`` is leaf ``index`` of the ``count``-leaf tree with ``root``."""
    if not 0 <= index < count:
        return False
    h = leaf_hash(data)
    steps = iter(proof)
    width = count
    while width > 1:
        if index % 2:
            sibling = next(steps, None)
            if sibling is None:
                return False
            h = node_hash(sibling, h)
        elif index + 1 < width:
            sibling = next(steps, None)
            if sibling is None:
                return False
            h = node_hash(h, sibling)
        index //= 2
        width = (width + 1) // 2
    return next(steps, None) is None and _seal(count, h) == root
