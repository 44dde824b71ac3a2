"""Simulated hosts, honest and cheating, for the honesty tests and bench.

Every cheat produces what a host would hand over for an audit: the output
token ids, its finish reason, its token counts and its activation commitment.
Nothing here changes the reference model; the cheaper copies are new
``ReferenceModel`` objects whose weights are swapped after construction.

* ``honest``: token-by-token decode (pass a float16 model for a host whose
  arithmetic differs from the verifier's float32 prefill), commitment built
  from its own hidden states.
* ``other_model``: the same architecture with another weight seed, claiming
  the right model's hash.
* ``quantized_copy``: the right weights rounded to ``bits`` bits per output
  channel (symmetric, int4-style by default), claiming the right hash.
* ``random_tokens``: tokens drawn at random (no model), with a *valid*
  commitment from an honest prefill over them.
* wrong seed / replayed answer / inflated count / early stop: built from
  honest outputs in ``bench/verify.py`` and the tests.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .commitment import DEFAULT_BLOCK_SIZE, DEFAULT_K, CommitmentBuilder, commit
from .generate import generate
from .model import ReferenceModel, _Layer
from .sampler import SamplingParams
from .tokenizer import ByteTokenizer

__all__ = ["HostOutput", "honest", "other_model", "quantized_copy", "random_tokens", "reference_hidden"]


@dataclass(frozen=True)
class HostOutput:
    """What a host claims for one request."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    finish_reason: str
    commitment: bytes
    tokens_in: int
    tokens_out: int


def honest(
    model: ReferenceModel,
    tokenizer: ByteTokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    first_draw: int = 0,
    *,
    k: int = DEFAULT_K,
    block_size: int = DEFAULT_BLOCK_SIZE,
    with_commitment: bool = True,
) -> HostOutput:
    """Generate as an honest host does, building the commitment as it goes."""
    builder = CommitmentBuilder(model.config.dim, k, block_size) if with_commitment else None
    ids, finish = [], "length"
    for tok in generate(model, tokenizer, prompt_ids, params, first_draw):
        ids.append(tok.token_id)
        if builder is not None:
            builder.add(tok.hidden)
        if tok.finish_reason is not None:
            finish = tok.finish_reason
    commitment = builder.finish() if builder is not None else b""
    return HostOutput(tuple(prompt_ids), tuple(ids), finish, commitment, len(prompt_ids), len(ids))


def reference_hidden(model: ReferenceModel, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> np.ndarray:
    """(n, dim) hidden states each output token is drawn from, in one prefill."""
    prompt, output = list(prompt_ids), list(output_ids)
    _, hidden = model.new_session().prefill_all(prompt + output[:-1])
    return hidden[len(prompt) - 1 :]


def random_tokens(
    model: ReferenceModel,
    tokenizer: ByteTokenizer,
    prompt_ids: Sequence[int],
    n: int,
    rng: np.random.Generator,
    *,
    k: int = DEFAULT_K,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> HostOutput:
    """Printable random bytes, no model run, but a commitment that an honest
    prefill over exactly those tokens would produce (the strongest version)."""
    output = [int(t) for t in rng.integers(0x20, 0x7F, size=n)]
    commitment = commit(reference_hidden(model, prompt_ids, output), model.config.dim, k, block_size)
    return HostOutput(tuple(prompt_ids), tuple(output), "length", commitment, len(prompt_ids), n)


def other_model(model: ReferenceModel, tokenizer: ByteTokenizer, weight_seed: int) -> ReferenceModel:
    """Same architecture and tokenizer, different weights (a cheaper or wrong model)."""
    config = dataclasses.replace(model.config, weight_seed=weight_seed)
    return ReferenceModel(config, tokenizer, dtype=model.dtype)


def _quantize(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric per-channel rounding to ``bits`` bits along ``axis`` (the reduced axis)."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=axis, keepdims=True) / top
    scale[scale == 0] = 1
    return (np.clip(np.round(w / scale), -top - 1, top) * scale).astype(np.float32)


def quantized_copy(model: ReferenceModel, bits: int = 4) -> ReferenceModel:
    """The same model with every matrix rounded to ``bits`` bits per output channel.

    A shallow copy whose arrays are replaced: the original is untouched and
    ``model_hash`` (cached from the float32 weights) is what the cheat claims.
    """
    _ = model.model_hash  # cache the honest hash on the original, which the copy inherits
    q = copy.copy(model)
    r = model._round
    q._embed = r(_quantize(model._embed, bits, axis=1))  # per token row
    q._layers = [
        _Layer(
            layer.attn_norm,
            r(_quantize(layer.wqkv, bits, axis=0)),  # x @ W: one scale per output column
            r(_quantize(layer.wo, bits, axis=0)),
            layer.mlp_norm,
            r(_quantize(layer.w13, bits, axis=0)),
            r(_quantize(layer.w2, bits, axis=0)),
        )
        for layer in model._layers
    ]
    q._head = r(_quantize(model._head, bits, axis=0))
    return q
