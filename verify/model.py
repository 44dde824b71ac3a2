"""A small Llama-shaped transformer in numpy, with weights derived from a seed.

It is the embedded inference backend (it really computes, on any CPU) and the
verifier's reference scorer, so two properties matter more than quality:

* Anyone can rebuild the exact weights from a ``ModelConfig``. They come from
  SHAKE-256 of (seed, tensor name), not from numpy's random Generator, whose
  distributions may change between numpy releases; ``model_hash`` pins the
  config, the weight bytes and the tokenizer together.
* Decoding token by token through the KV cache gives the same logits as one
  batched pass over the whole sequence (``Session.prefill_all``), which is how
  a verifier scores a host's output.

``dtype=np.float16`` emulates an honest half-precision host: weights and
activations are rounded to float16 at every op boundary while matmuls
accumulate in float32, as GPU tensor cores do (numpy's own float16 matmul has
no BLAS path and is two orders of magnitude slower). The model id does not
depend on the dtype: it names the weights, not the arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .tokenizer import ByteTokenizer

__all__ = ["ContextOverflowError", "ModelConfig", "ReferenceModel", "Session", "StepOutput"]

_HASH_DOMAIN = b"gpunexus-reference-model/1\0"
_WEIGHT_DOMAIN = b"gpunexus-reference-weights/1\0"
# Queries per attention block during prefill: bounds the (heads x block x
# context) score matrix at a few MiB even for a full-context verifier pass,
# and each block scores only the keys up to its own end, so a long prefill
# skips most of the masked upper triangle (128: the fastest on one core,
# 17% less time than 256 for a 286-token verifier pass, 29% for 600).
_PREFILL_BLOCK = 128

# Init scales. Random weights at standard init give near-uniform next-token
# distributions over mostly invalid UTF-8; these scales give peaked but
# context-dependent logits (temperature-1 text varies, greedy text keeps
# moving), and the output prior below makes the bytes mostly printable text.
_EMBED_STD = 0.1  # small against the layers' outputs, so context, not just the last token, drives the logits
_LOGIT_STD = 3.0
_PRIOR_LOWERCASE = 2.0  # lowercase letters and space: the bulk of prose
_PRIOR_OTHER_BYTE = -8.0  # control bytes and lone UTF-8 fragments
_PRIOR_STOP = 2.0  # EOS and end-of-turn: temperature-1 answers run ~50-300 tokens
_PRIOR_MARKER = -30.0  # BOS and role markers never belong in an answer


class ContextOverflowError(ValueError):
    """A sequence would not fit in the model's context window."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the weights, hashed into the model id."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    weight_seed: int
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("dim must divide into n_heads, and n_heads into n_kv_heads groups")
        if self.head_dim % 2:
            raise ValueError(f"head dimension must be even for rotary embeddings, got {self.head_dim}")
        seed = self.weight_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"weight_seed must be in [0, 2**64), got {self.weight_seed}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class StepOutput:
    """What the model says after the last fed token.

    ``hidden`` is the final-layer hidden state of that position after the
    final RMSNorm, i.e. exactly the vector the output head multiplies (the
    convention of Hugging Face's last ``hidden_states``).
    """

    logits: np.ndarray  # (vocab_size,) float32, for the next token
    hidden: np.ndarray  # (dim,) float32


@dataclass(frozen=True)
class _Layer:
    attn_norm: np.ndarray
    wqkv: np.ndarray  # q, k and v projections side by side: one matmul
    wo: np.ndarray
    mlp_norm: np.ndarray
    w13: np.ndarray  # SwiGLU gate and up projections side by side
    w2: np.ndarray


class ReferenceModel:
    """The weights of one ``ModelConfig``, ready to run; immutable once built.

    It holds no per-sequence state, so one instance serves any number of
    concurrent ``Session``s (one per request).
    """

    def __init__(self, config: ModelConfig, tokenizer: ByteTokenizer, dtype: type = np.float32) -> None:
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"config.vocab_size {config.vocab_size} != tokenizer vocab_size {tokenizer.vocab_size}")
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {np.dtype(dtype)}")
        self.config = config
        self.dtype = np.dtype(dtype)
        self._tokenizer_description = tokenizer.description
        self._weights = _init_weights(config, tokenizer)
        self._round: Callable[[np.ndarray], np.ndarray] = _to_half if self.dtype == np.float16 else _unchanged
        w = {name: self._round(array) for name, array in self._weights.items()}
        self._embed = w["embed"]
        self._layers = [
            _Layer(*(w[f"layers.{i}.{part}"] for part in ("attn_norm", "wqkv", "wo", "mlp_norm", "w13", "w2")))
            for i in range(config.n_layers)
        ]
        self._norm = w["norm"]
        if config.tie_embeddings:
            # The embedding's scale suits the input, not the head: rescale the
            # shared matrix (as muP rescales a tied head) to the untied head's logit spread.
            self._head = self._round(w["embed"].T * np.float32(_LOGIT_STD / (_EMBED_STD * math.sqrt(config.dim))))
        else:
            self._head = w["head"]
        self._prior = w["output_prior"]
        self._cos, self._sin = _rope_tables(config)

    @cached_property
    def model_hash(self) -> str:
        """Hex SHA-256 over config, tokenizer and float32 weights, canonically encoded."""
        header = {"config": asdict(self.config), "tokenizer": self._tokenizer_description}
        digest = hashlib.sha256(_HASH_DOMAIN)
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for name in sorted(self._weights):
            array = self._weights[name]
            digest.update(f"\0{name}:{','.join(map(str, array.shape))}\0".encode())
            digest.update(array.astype("<f4").tobytes())
        return digest.hexdigest()

    @property
    def model_id(self) -> str:
        """Readable short form, e.g. ``tiny-1a2b3c4d``; ``model_hash`` is the full one."""
        return f"{self.config.name}-{self.model_hash[:8]}"

    def new_session(self) -> Session:
        return Session(self)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        return self._round(hidden @ self._head + self._prior)

    def _forward(self, ids: np.ndarray, start: int, k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
        """Run ``ids`` at positions ``start...``, writing their keys and values to the cache.

        Returns the final normed hidden state of every position, float32.
        """
        cfg = self.config
        r = self._round
        n, end = len(ids), start + len(ids)
        n_kv, head_dim = cfg.n_kv_heads, cfg.head_dim
        group = cfg.n_heads // n_kv
        q_width, kv_width = cfg.n_heads * head_dim, n_kv * head_dim
        cos, sin = self._cos[start:end, None, :], self._sin[start:end, None, :]
        # Query j (position start + j) may not see keys after it: -inf added there, 0 elsewhere
        # (the same scores as assigning -inf through a boolean mask, at a fraction of the cost).
        future = None if n == 1 else np.where(np.arange(end)[None, :] > np.arange(start, end)[:, None],
                                              np.float32(-np.inf), np.float32(0))
        scale = np.float32(1 / math.sqrt(head_dim))

        x = self._embed[ids]
        for i, layer in enumerate(self._layers):
            h = r(_rms_norm(x, layer.attn_norm, cfg.norm_eps))
            qkv = r(h @ layer.wqkv)
            q = r(_rope(qkv[:, :q_width].reshape(n, cfg.n_heads, head_dim), cos, sin))
            k = r(_rope(qkv[:, q_width : q_width + kv_width].reshape(n, n_kv, head_dim), cos, sin))
            v = qkv[:, q_width + kv_width :].reshape(n, n_kv, head_dim)
            k_cache[i, :, start:end] = k.transpose(1, 0, 2)
            v_cache[i, :, start:end] = v.transpose(1, 0, 2)
            # Grouped-query attention: the query heads sharing a kv head are
            # stacked as extra rows, so one batched matmul per kv head covers all.
            q = q.reshape(n, n_kv, group, head_dim).transpose(1, 2, 0, 3).reshape(n_kv, group * n, head_dim)
            scores = (q @ k_cache[i, :, :end].transpose(0, 2, 1)) * scale
            if future is not None:
                scores = scores.reshape(n_kv, group, n, end)
                scores += future
                scores = scores.reshape(n_kv, group * n, end)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = r(r(scores) @ v_cache[i, :, :end])
            attended = attended.reshape(n_kv, group, n, head_dim).transpose(2, 0, 1, 3).reshape(n, q_width)
            x = r(x + r(attended @ layer.wo))

            h = r(_rms_norm(x, layer.mlp_norm, cfg.norm_eps))
            gate_up = r(h @ layer.w13)
            gate, up = gate_up[:, : cfg.hidden_dim], gate_up[:, cfg.hidden_dim :]
            x = r(x + r(r(_silu(gate) * up) @ layer.w2))
        return r(_rms_norm(x, self._norm, cfg.norm_eps))


class Session:
    """One sequence's KV cache; feed it tokens, read the next-token logits.

    The cache is allocated once at full context length so decoding never
    reallocates. A feed that fails validation leaves the session unchanged.
    """

    def __init__(self, model: ReferenceModel) -> None:
        cfg = model.config
        shape = (cfg.n_layers, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self._model = model
        self._k = np.empty(shape, np.float32)
        self._v = np.empty(shape, np.float32)
        self._length = 0

    @property
    def position(self) -> int:
        """How many tokens the cache holds."""
        return self._length

    def prefill(self, ids: Sequence[int]) -> StepOutput:
        hidden = self._feed(ids)
        return StepOutput(logits=self._model._logits(hidden[-1:])[0], hidden=hidden[-1])

    def step(self, token_id: int) -> StepOutput:
        return self.prefill((token_id,))

    def prefill_all(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Feed ``ids``; return next-token logits (n, vocab) and hidden states (n, dim) for every position."""
        hidden = self._feed(ids)
        return self._model._logits(hidden), hidden

    def _feed(self, ids: Sequence[int]) -> np.ndarray:
        cfg = self._model.config
        tokens = np.asarray(ids)
        if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("expected a non-empty sequence of token ids")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {tokens.min()}..{tokens.max()}")
        if self._length + len(tokens) > cfg.max_seq_len:
            raise ContextOverflowError(
                f"{self._length + len(tokens)} tokens exceed the context window of {cfg.max_seq_len} "
                f"({self._length} already in the session, {len(tokens)} new)"
            )
        hidden = []
        for block in range(0, len(tokens), _PREFILL_BLOCK):
            chunk = tokens[block : block + _PREFILL_BLOCK]
            hidden.append(self._model._forward(chunk, self._length, self._k, self._v))
            self._length += len(chunk)
        return hidden[0] if len(hidden) == 1 else np.concatenate(hidden)


def _init_weights(cfg: ModelConfig, tokenizer: ByteTokenizer) -> dict[str, np.ndarray]:
    def uniform(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        # A uniform distribution with the wanted standard deviation, from a
        # hash stream: bit-exact on every machine and numpy version.
        count = math.prod(shape)
        stream = hashlib.shake_256(_WEIGHT_DOMAIN + cfg.weight_seed.to_bytes(8, "little") + name.encode())
        raw = np.frombuffer(stream.digest(4 * count), dtype="<u4")
        unit = (raw >> 8).astype(np.float64) * 2.0**-24 * 2 - 1
        return (unit * (std * math.sqrt(3))).astype(np.float32).reshape(shape)

    dim, hidden, head_dim = cfg.dim, cfg.hidden_dim, cfg.head_dim
    qkv_width = (cfg.n_heads + 2 * cfg.n_kv_heads) * head_dim
    # Residual branches shrink with depth (GPT-2's scaled init) so no layer
    # swamps the others in the residual stream.
    branch = 1 / math.sqrt(2 * cfg.n_layers)
    weights = {"embed": uniform("embed", (cfg.vocab_size, dim), _EMBED_STD)}
    for i in range(cfg.n_layers):
        weights[f"layers.{i}.attn_norm"] = np.ones(dim, np.float32)
        weights[f"layers.{i}.wqkv"] = uniform(f"layers.{i}.wqkv", (dim, qkv_width), 1 / math.sqrt(dim))
        weights[f"layers.{i}.wo"] = uniform(f"layers.{i}.wo", (cfg.n_heads * head_dim, dim), branch / math.sqrt(dim))
        weights[f"layers.{i}.mlp_norm"] = np.ones(dim, np.float32)
        weights[f"layers.{i}.w13"] = uniform(f"layers.{i}.w13", (dim, 2 * hidden), 1 / math.sqrt(dim))
        weights[f"layers.{i}.w2"] = uniform(f"layers.{i}.w2", (hidden, dim), branch / math.sqrt(hidden))
    weights["norm"] = np.ones(dim, np.float32)
    if not cfg.tie_embeddings:
        weights["head"] = uniform("head", (dim, cfg.vocab_size), _LOGIT_STD / math.sqrt(dim))
    weights["output_prior"] = _output_prior(tokenizer)
    return weights


def _output_prior(tokenizer: ByteTokenizer) -> np.ndarray:
    """A fixed per-token logit bias that makes random weights write text.

    Without it half of all sampled bytes would be >= 0x80 and the output a
    stream of U+FFFD. It is an ordinary weight tensor (hashed like the rest).
    """
    prior = np.full(tokenizer.vocab_size, _PRIOR_MARKER, np.float32)
    prior[:256] = _PRIOR_OTHER_BYTE
    prior[0x20:0x7F] = 0.0
    prior[ord("\n")] = 0.0
    prior[ord("a") : ord("z") + 1] = _PRIOR_LOWERCASE
    prior[ord(" ")] = _PRIOR_LOWERCASE
    prior[sorted(tokenizer.stop_ids)] = _PRIOR_STOP
    return prior


def _rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = np.outer(np.arange(cfg.max_seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding, rotating the two halves of each head (Llama's "rotate_half")."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate((x1 * cos - x2 * sin, x1 * sin + x2 * cos), axis=-1)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x * (weight / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def _to_half(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _unchanged(x: np.ndarray) -> np.ndarray:
    return x
