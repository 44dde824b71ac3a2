"""Embeddings from the reference model's hidden states, and their check by a verifier.

The vector of a text is the mean over its positions of the final hidden
state (after the last RMSNorm: what the output head reads), L2-normalised:
real, deterministic, computed by the same model that generates, and one
prefill to recompute. The prompt is the completion prompt (BOS + bytes), so
``tokens_in`` is counted exactly as for a completion.

Float noise: an honest float16 host's vector differs from the float32
reference by rounding only; ``MIN_COSINE`` leaves room for that and none
for a different text or model (whose cosines sit far lower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .model import ContextOverflowError, ReferenceModel

__all__ = ["MIN_COSINE", "embed", "vector_problem"]

MIN_COSINE = 0.999


def embed(model: ReferenceModel, ids: Sequence[int]) -> np.ndarray:
    """The unit-length float32 embedding of the token ids ``ids`` (BOS included)."""
    if not ids:
        raise ValueError("nothing to embed")
    if len(ids) > model.config.max_seq_len:
        raise ContextOverflowError(f"an input of {len(ids)} tokens exceeds the context of {model.config.max_seq_len}")
    _, hidden = model.new_session().prefill_all(list(ids))
    pooled = hidden.astype(np.float64).mean(axis=0)
    return (pooled / max(np.linalg.norm(pooled), 1e-12)).astype("<f4")


def vector_problem(model: ReferenceModel, ids: Sequence[int], vector: bytes) -> str:
    """Why ``vector`` (float32 little-endian bytes) is not the embedding of ``ids`` ('' if it is)."""
    if len(vector) != 4 * model.config.dim:
        return f"the vector has {len(vector) // 4} dimensions, the model {model.config.dim}"
    claimed = np.frombuffer(vector, dtype="<f4").astype(np.float64)
    if not np.all(np.isfinite(claimed)):
        return "the vector is not finite"
    reference = embed(model, ids).astype(np.float64)
    cosine = float(claimed @ reference / max(np.linalg.norm(claimed), 1e-12))
    if cosine < MIN_COSINE:
        return f"cosine {cosine:.4f} to the reference embedding, below {MIN_COSINE}"
    return ""
