"""Compact activation commitments (TOPLOC-style, arXiv 2501.16007).

A host feeds ``CommitmentBuilder`` the final hidden state of every token it
generates; for each block of ``block_size`` generated tokens it keeps the
top-``k`` entries, by magnitude, of the block's *last* hidden state, rounded
to float16 with their indices. A verifier that runs one prefill over prompt +
output gets the same hidden states (up to float noise) and compares them with
``check_commitment``.

Which hidden state
    ``GeneratedToken.hidden`` / ``Session.prefill_all``'s second result: the
    last layer's state *after* the final RMSNorm, i.e. the vector the output
    head multiplies (Hugging Face's last ``hidden_states``, what TOPLOC
    commits). Output token ``i`` is drawn from hidden state ``i`` (the state of
    the sequence position just before it), so block ``j`` covering output
    indices ``[j*B, min((j+1)*B, n))`` commits hidden state
    ``min((j+1)*B, n) - 1``. The final, possibly partial, block is committed
    too, so every output of n >= 1 tokens has ``ceil(n / B)`` blocks.

Byte layout (all integers big-endian)
    header, 12 bytes::

        b"TL"  version:u8 (=1)  index_bytes:u8 (1 if dim <= 256 else 2)
        k:u16  block_size:u16  n_tokens:u32

    then ``ceil(n_tokens / block_size)`` blocks of ``k * (index_bytes + 2)``
    bytes each: ``k`` indices (ascending, ``index_bytes`` each), then the
    ``k`` values at those indices as IEEE float16, little-endian, same order.

    Bytes per token = ``(12 + ceil(n/B) * k * (index_bytes + 2)) / n``. With the
    defaults for the tiny reference model (dim 128, k = 32, B = 32: 96 bytes
    per block) that is 3.0 bytes/token plus the header (3.4 at n = 32); a
    dim-4096 model with TOPLOC's k = 128 would take 512 bytes per 32 tokens,
    16 bytes/token (TOPLOC's polynomial encoding of the index/value pairs gets
    that to ~258 bytes; not implemented here).

The check, per block (TOPLOC's, on the committed indices)
    For each committed index the verifier takes *its own* value at that index
    (whether or not it is in its own top-k) and compares float16 exponents and
    mantissas: the block passes if at least ``min_exponent_match`` of the k
    exponents agree and, over those that agree, the absolute mantissa
    difference (in float16 ulps, 10-bit mantissa) has mean <=
    ``max_mantissa_mean`` and median <= ``max_mantissa_median``. It also
    requires ``min_index_overlap`` of the committed indices to be in the
    verifier's own top-k (a host cannot commit the right values at the wrong
    places). A commitment passes if every block passes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_K",
    "TINY_THRESHOLDS",
    "BlockStats",
    "Calibration",
    "CommitmentBuilder",
    "CommitmentCheck",
    "CommitmentError",
    "DecodedCommitment",
    "Thresholds",
    "bytes_per_token",
    "calibrate",
    "check_commitment",
    "commit",
    "decode_commitment",
]

_MAGIC = b"TL"
_VERSION = 1
_HEADER = struct.Struct(">2sBBHHI")
DEFAULT_K = 32
DEFAULT_BLOCK_SIZE = 32


class CommitmentError(ValueError):
    """Bytes that are not a well-formed commitment."""


@dataclass(frozen=True)
class Thresholds:
    """Pass limits per block (fractions are of k)."""

    min_exponent_match: float = 90 / 128  # TOPLOC's default: 90 of 128 exponents
    max_mantissa_mean: float = 10.0
    max_mantissa_median: float = 8.0
    min_index_overlap: float = 0.5


# Calibrated for the "tiny" reference model (dim 128, k 32, block 32) with
# ``calibrate`` on an honest float16 host decoding token by token against the
# float32 verifier's one prefill (bench/verify.py: 1,000 requests, 1,944
# blocks, temperatures 0.7-1.3, top_p/top_k mixed; plus 148 blocks of outputs
# up to 400 tokens). Worst honest block: exponent agreement 0.938 (30/32),
# mantissa error mean 2.31 ulps, median 2.0, index overlap 0.969. ``calibrate``
# turns that into exp >= 0.787, mean <= 5.8, median <= 5.0, overlap >= 0.769;
# the shipped limits round those. Cheats, per block, against these limits:
# int8-rounded weights mean >= 7.7 ulps (0 of 112 blocks passes), int4
# mean >= 104 ulps and exponent agreement down to 0.47, another weight seed
# exponent agreement <= 0.34. TOPLOC's published defaults (90/128, mean 10,
# median 8) would let some int8 blocks through on this model.
TINY_THRESHOLDS = Thresholds(
    min_exponent_match=0.78,
    max_mantissa_mean=6.0,
    max_mantissa_median=5.0,
    min_index_overlap=0.75,
)


def _index_bytes(dim: int) -> int:
    if dim <= 256:
        return 1
    if dim <= 65536:
        return 2
    raise ValueError(f"hidden size {dim} too large for a commitment")


def _top_k(hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) of the k largest |values|, and those values as float16."""
    if k >= hidden.shape[0]:
        idx = np.arange(hidden.shape[0])
    else:
        idx = np.sort(np.argpartition(np.abs(hidden), -k)[-k:])
    return idx, hidden[idx].astype(np.float16)


class CommitmentBuilder:
    """Host side: feed one final hidden state per generated token, then ``finish``.

    Cheap by design: one top-k of ``dim`` floats per ``block_size`` tokens,
    nothing else per token but keeping a copy of the latest state. Accepts any
    array-like of shape (dim,) (convert GPU tensors to host memory first).
    """

    def __init__(self, dim: int, k: int = DEFAULT_K, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if not 1 <= k <= min(dim, 65535):
            raise ValueError(f"k must be in [1, min(dim, 65535)], got {k}")
        if not 1 <= block_size <= 65535:
            raise ValueError(f"block_size must be in [1, 65535], got {block_size}")
        self.dim, self.k, self.block_size = dim, k, block_size
        self._index_bytes = _index_bytes(dim)
        self._index_dtype = ">u1" if self._index_bytes == 1 else ">u2"
        self._parts: list[bytes] = []
        self._count = 0
        self._last: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return self._count

    def add(self, hidden: np.ndarray) -> None:
        hidden = np.asarray(hidden, dtype=np.float32)
        if hidden.shape != (self.dim,):
            raise ValueError(f"expected a hidden state of shape ({self.dim},), got {hidden.shape}")
        self._count += 1
        if self._count % self.block_size == 0:
            self._seal(hidden)
            self._last = None
        else:
            self._last = np.array(hidden, dtype=np.float32)  # a copy: backends may reuse their buffers

    def _seal(self, hidden: np.ndarray) -> None:
        idx, values = _top_k(hidden, self.k)
        self._parts.append(idx.astype(self._index_dtype).tobytes() + values.astype("<f2").tobytes())

    def finish(self) -> bytes:
        """The commitment bytes; the builder may not be fed afterwards."""
        if self._last is not None:
            self._seal(self._last)
            self._last = None
        header = _HEADER.pack(_MAGIC, _VERSION, self._index_bytes, self.k, self.block_size, self._count)
        return header + b"".join(self._parts)


def commit(hidden_states: Iterable[np.ndarray], dim: int, k: int = DEFAULT_K, block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    """Commitment over a sequence of hidden states (one per output token) in one call."""
    builder = CommitmentBuilder(dim, k, block_size)
    for hidden in hidden_states:
        builder.add(np.asarray(hidden))
    return builder.finish()


def bytes_per_token(n_tokens: int, dim: int, k: int = DEFAULT_K, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    blocks = math.ceil(n_tokens / block_size)
    return (_HEADER.size + blocks * min(k, dim) * (_index_bytes(dim) + 2)) / n_tokens


@dataclass(frozen=True)
class DecodedCommitment:
    k: int
    block_size: int
    n_tokens: int
    indices: np.ndarray  # (blocks, k) int
    values: np.ndarray  # (blocks, k) float16

    @property
    def committed_positions(self) -> list[int]:
        """Output index of the hidden state each block commits."""
        b, n = self.block_size, self.n_tokens
        return [min((j + 1) * b, n) - 1 for j in range(len(self.indices))]


def decode_commitment(data: bytes) -> DecodedCommitment:
    if len(data) < _HEADER.size:
        raise CommitmentError("commitment shorter than its header")
    magic, version, ib, k, block, n = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise CommitmentError("not a version-1 activation commitment")
    if ib not in (1, 2) or k < 1 or block < 1:
        raise CommitmentError("bad commitment header")
    blocks = math.ceil(n / block)
    size = k * (ib + 2)
    if len(data) != _HEADER.size + blocks * size:
        raise CommitmentError(f"commitment of {len(data)} bytes, expected {_HEADER.size + blocks * size}")
    body = np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size).reshape(blocks, size)
    indices = body[:, : k * ib].copy().view(">u1" if ib == 1 else ">u2").astype(np.int64).reshape(blocks, k)
    values = body[:, k * ib :].copy().view("<f2").reshape(blocks, k)
    return DecodedCommitment(k, block, n, indices, values)


@dataclass(frozen=True)
class BlockStats:
    position: int  # output index of the committed hidden state
    exponent_match: float  # fraction of k
    mantissa_mean: float  # ulps, over exponent-matching entries (inf if none)
    mantissa_median: float
    index_overlap: float  # fraction of committed indices in the verifier's own top-k


@dataclass(frozen=True)
class CommitmentCheck:
    passed: bool
    reason: str  # "" when passed
    blocks: tuple[BlockStats, ...] = field(default=())

    @property
    def worst(self) -> BlockStats | None:
        if not self.blocks:
            return None
        return BlockStats(
            -1,
            min(b.exponent_match for b in self.blocks),
            max(b.mantissa_mean for b in self.blocks),
            max(b.mantissa_median for b in self.blocks),
            min(b.index_overlap for b in self.blocks),
        )


def _block_stats(position: int, indices: np.ndarray, committed: np.ndarray, reference: np.ndarray) -> BlockStats:
    k = len(indices)
    if indices.max(initial=0) >= reference.shape[0]:
        return BlockStats(position, 0.0, math.inf, math.inf, 0.0)
    mine = reference[indices].astype(np.float16)
    a, b = committed.view(np.uint16), mine.view(np.uint16)
    # Sign and exponent together: a flipped sign is as wrong as a wrong exponent.
    same = (a >> 10) == (b >> 10)
    diffs = np.abs((a & 0x3FF).astype(np.int32) - (b & 0x3FF).astype(np.int32))[same]
    own, _ = _top_k(reference, k)
    overlap = len(np.intersect1d(own, indices, assume_unique=True)) / k
    if len(diffs) == 0:
        return BlockStats(position, 0.0, math.inf, math.inf, overlap)
    return BlockStats(position, float(same.mean()), float(diffs.mean()), float(np.median(diffs)), overlap)


def check_commitment(
    commitment: bytes, hidden_states: np.ndarray, thresholds: Thresholds = TINY_THRESHOLDS
) -> CommitmentCheck:
    """Compare a host's commitment with the verifier's hidden states.

    ``hidden_states`` is (n_output_tokens, dim): the reference hidden state
    each output token was drawn from (``generate.replay(...).hidden``, or
    rows ``len(prompt) - 1 ...`` of ``prefill_all(prompt + output[:-1])``).
    """
    try:
        decoded = decode_commitment(commitment)
    except CommitmentError as exc:
        return CommitmentCheck(False, f"commitment unreadable: {exc}")
    n = len(hidden_states)
    if decoded.n_tokens != n:
        return CommitmentCheck(False, f"commitment covers {decoded.n_tokens} tokens, the output has {n}")
    if n == 0:
        return CommitmentCheck(True, "")
    if decoded.k > hidden_states.shape[1]:
        return CommitmentCheck(False, f"commitment k={decoded.k} exceeds the hidden size {hidden_states.shape[1]}")
    blocks = tuple(
        _block_stats(pos, decoded.indices[j], decoded.values[j], np.asarray(hidden_states[pos], np.float32))
        for j, pos in enumerate(decoded.committed_positions)
    )
    t = thresholds
    for b in blocks:
        problems = []
        if b.exponent_match < t.min_exponent_match:
            problems.append(f"exponents agree on {b.exponent_match:.2f} < {t.min_exponent_match:.2f}")
        if b.mantissa_mean > t.max_mantissa_mean:
            problems.append(f"mantissa error mean {b.mantissa_mean:.1f} > {t.max_mantissa_mean}")
        if b.mantissa_median > t.max_mantissa_median:
            problems.append(f"mantissa error median {b.mantissa_median:.1f} > {t.max_mantissa_median}")
        if b.index_overlap < t.min_index_overlap:
            problems.append(f"top-k index overlap {b.index_overlap:.2f} < {t.min_index_overlap:.2f}")
        if problems:
            return CommitmentCheck(False, f"activations differ at output token {b.position}: " + "; ".join(problems), blocks)
    return CommitmentCheck(True, "", blocks)


@dataclass(frozen=True)
class Calibration:
    """Honest spread measured by ``calibrate`` and the thresholds derived from it."""

    blocks: int
    worst: BlockStats
    p999: BlockStats  # the 0.1% tail (0.999 quantile of each statistic, worst side)
    thresholds: Thresholds


def calibrate(
    block_stats: Sequence[BlockStats],
    *,
    exponent_margin: float = 0.15,
    mantissa_factor: float = 2.5,
    overlap_margin: float = 0.2,
) -> Calibration:
    """Thresholds from honest blocks: the worst honest block plus a margin.

    Feed it ``CommitmentCheck.blocks`` from honest runs that differ in
    arithmetic from the verifier (float16 token-by-token decode vs float32
    prefill; for a GPU host, its real kernels). Exponent agreement and index
    overlap limits sit ``*_margin`` below the worst honest block, mantissa
    limits ``mantissa_factor`` times above it (at least 1 ulp). ``p999`` is
    reported to show how far the tail is from the worst block.
    """
    if not block_stats:
        raise ValueError("calibrate needs at least one honest block")
    exp = np.array([b.exponent_match for b in block_stats])
    # A block with no agreeing exponent has infinite mantissa error; keep quantiles finite.
    mean = np.minimum([b.mantissa_mean for b in block_stats], 1e9)
    med = np.minimum([b.mantissa_median for b in block_stats], 1e9)
    ovl = np.array([b.index_overlap for b in block_stats])
    worst = BlockStats(-1, float(exp.min()), float(mean.max()), float(med.max()), float(ovl.min()))
    p999 = BlockStats(
        -1,
        float(np.quantile(exp, 0.001)),
        float(np.quantile(mean, 0.999)),
        float(np.quantile(med, 0.999)),
        float(np.quantile(ovl, 0.001)),
    )
    thresholds = Thresholds(
        min_exponent_match=max(0.0, round(worst.exponent_match - exponent_margin, 3)),
        max_mantissa_mean=max(1.0, round(worst.mantissa_mean * mantissa_factor, 1)),
        max_mantissa_median=max(1.0, round(worst.mantissa_median * mantissa_factor, 1)),
        min_index_overlap=max(0.0, round(worst.index_overlap - overlap_margin, 3)),
    )
    return Calibration(len(block_stats), worst, p999, thresholds)
