"""The seeded sampler every host uses, so that a verifier can replay it.

Randomness is a pure function of (seed, position): generated token ``i`` is
drawn with ``uniform(seed, i)`` and nothing else, exactly one draw per token,
greedy or not. A verifier holding the seed, the prompt and the claimed output
recomputes the logits in one prefill and knows which token every position
had to be; no sampler state ever has to be carried between tokens.

The draw maps through the inverse CDF of the filtered distribution, sorted by
probability with ties broken by token id, so the same logits and uniform give
the same token on any machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SamplingParams", "sample", "sample_rows", "token_logprob", "top_logprobs", "uniform"]

_UNIFORM_DOMAIN = b"gpunexus-uniform/1\0"
_MAX_STOP_SEQUENCES = 4  # as the OpenAI API


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler; validated on construction.

    ``stop`` accepts None, a single string or a sequence of them (as the
    OpenAI API does) and is stored as a tuple. ``top_k`` 0 and ``top_p`` 1 mean "off";
    ``temperature`` 0 means greedy. The penalties, ``logit_bias`` (sorted
    ``(token id, bias)`` pairs) and ``json_mode`` change the logits before
    the draw (``verify.shaping``), so a verifier replays them too.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_mode: bool = False

    def __post_init__(self) -> None:
        _require_number("temperature", self.temperature)
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        _require_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be greater than 0 and at most 1, got {self.top_p}")
        _require_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or a positive integer, got {self.top_k}")
        _require_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _require_int("seed", self.seed)
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        stop = _stop_tuple(self.stop)
        if len(stop) > _MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {_MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stop)}")
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        for name in ("presence_penalty", "frequency_penalty"):
            _require_number(name, getattr(self, name))
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if not all(0 <= t and -100 <= b <= 100 for t, b in bias):
            raise ValueError("logit_bias takes token ids >= 0 and biases between -100 and 100")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias)))

    @classmethod
    def from_sampling(cls, sampling: Any, max_tokens: int, seed: int) -> SamplingParams:
        """From a ``protocol.messages.Sampling``: what a host runs and a verifier replays alike."""
        s = sampling
        return cls(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=max_tokens, stop=tuple(s.stop), seed=seed,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            logit_bias=tuple((b.token, b.bias) for b in s.logit_bias), json_mode=s.json_mode,
        )

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature, top_k and top_p acts on the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.json_mode)


def uniform(seed: int, index: int) -> float:
    """The uniform draw in [0, 1) for generated token ``index`` under ``seed``.

    SHA-256 of the pair, top 53 bits: counter-based, so any position can be
    recomputed alone, and identical in every language and on every machine.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= index < 2**64:
        raise ValueError(f"index must be in [0, 2**64), got {index}")
    digest = hashlib.sha256(_UNIFORM_DOMAIN + seed.to_bytes(8, "big") + index.to_bytes(8, "big")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) * 2.0**-53


def sample(logits: np.ndarray, params: SamplingParams, u: float) -> tuple[int, float]:
    """Choose the next token with draw ``u``; return it with its log-probability.

    The log-probability is under the model's unmodified distribution
    (temperature 1, full vocabulary), not the filtered one the choice came
    from: it is what the model believes (vLLM's default for reported
    logprobs), it never becomes 0 or -inf because of top_k/top_p, and a
    verifier can compare it with its own reference logits without replaying
    the filters.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if params.temperature == 0:
        token = int(np.argmax(logits))  # first maximum: lowest id on ties
    else:
        order, probs = _filtered(logits, params)
        cdf = np.cumsum(probs)
        # "right": a zero-width interval (probability underflow) is never chosen.
        position = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(order) - 1)
        token = int(order[position])
    return token, token_logprob(logits, token)


def sample_rows(logits: np.ndarray, params: SamplingParams, draws: Sequence[float]) -> np.ndarray:
    """``sample``'s token for every row of ``logits`` (n, vocab) with its draw, in one batched pass.

    A verifier replays a whole output at once: per-row calls cost as much
    as the prefill they check. Every step is ``_filtered``'s and
    ``sample``'s own arithmetic (stable sort, exp against the row maximum,
    the same sums, the same cumulative sums compared the same way), so the
    tokens are the same, not merely close.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(draws) != len(logits):
        raise ValueError("expected logits of shape (n, vocab) and one draw per row")
    if params.temperature == 0:
        return np.argmax(logits, axis=1)  # first maximum: lowest id on ties
    scaled = logits / params.temperature
    order = np.argsort(-scaled, axis=1, kind="stable")
    if params.top_k:
        order = order[:, : params.top_k]
    top = np.take_along_axis(scaled, order, axis=1)
    probs = np.exp(top - top[:, :1])
    width = probs.shape[1]
    keep = np.full(len(probs), width)
    if params.top_p < 1:
        cumulative = np.cumsum(probs, axis=1) / probs.sum(axis=1, keepdims=True)
        # searchsorted(side="left") on a non-decreasing row: how many entries lie below top_p.
        keep = np.minimum((cumulative < params.top_p).sum(axis=1) + 1, width)
    cdf = np.cumsum(probs, axis=1)
    rows = np.arange(len(probs))
    target = np.asarray(draws, dtype=np.float64) * cdf[rows, keep - 1]
    # searchsorted(side="right") within the kept prefix: how many of its entries are <= the target.
    below = ((cdf <= target[:, None]) & (np.arange(width)[None, :] < keep[:, None])).sum(axis=1)
    return order[rows, np.minimum(below, keep - 1)]


def token_logprob(logits: np.ndarray, token_id: int) -> float:
    """Log-probability of ``token_id`` under the full, temperature-1 softmax of ``logits``."""
    logits = np.asarray(logits, dtype=np.float64)
    return float(logits[token_id] - _logsumexp(logits))


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens and their log-probabilities, lowest id first on ties.

    Tokens a mask ruled out (logit -inf) are never listed: fewer than ``k``
    come back when fewer are possible.
    """
    logits = np.asarray(logits, dtype=np.float64)
    order = np.argsort(-logits, kind="stable")[:k]
    total = _logsumexp(logits)
    return [(int(t), float(logits[t] - total)) for t in order if logits[t] > -np.inf]


def _filtered(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids sorted by probability (ties by id) and their unnormalised
    probabilities after temperature, then top_k, then top_p (the order
    Hugging Face and vLLM apply them)."""
    scaled = logits / params.temperature
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    if params.top_p < 1:
        cumulative = np.cumsum(probs) / probs.sum()
        # The smallest prefix whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        order, probs = order[:keep], probs[:keep]
    return order, probs


def _logsumexp(x: np.ndarray) -> float:
    peak = float(x.max())
    return peak + math.log(float(np.exp(x - peak).sum()))


def _stop_tuple(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, Sequence):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop)


def _require_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")

