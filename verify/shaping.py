"""From the model's logits to the ones the seeded sampler draws from.

Presence and frequency penalties (OpenAI's definitions: each token's logit
less ``frequency_penalty`` times its count in the output so far, less
``presence_penalty`` once it has appeared), ``logit_bias`` and JSON mode
(``verify.json_mode``) all act here, in that order, one output position at
a time. The host's generation and the verifier's replay run the same
:class:`LogitShaper` over the same tokens, so an audit replays every one of
them; the logprobs a host reports are those of the shaped logits (what the
token was drawn from), before temperature, top_k and top_p.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from .json_mode import JsonMask, JsonState
from .sampler import SamplingParams

__all__ = ["LogitShaper"]


class LogitShaper:
    """Shapes the logits of one generation, position by position.

    ``limit`` is how many tokens this generation may still produce;
    ``history`` the output tokens already delivered before it (a failover's
    continuation), which count for the penalties and the JSON state.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, stop_ids: frozenset[int], limit: int,
                 history: Iterable[int] = ()) -> None:
        self.limit = limit
        self._bias = None
        if params.logit_bias:
            if params.logit_bias[-1][0] >= vocab_size:
                raise ValueError(f"logit_bias names token {params.logit_bias[-1][0]}, outside the vocabulary of {vocab_size}")
            self._bias = np.zeros(vocab_size)
            for token, bias in params.logit_bias:
                self._bias[token] = bias
        self._presence, self._frequency = params.presence_penalty, params.frequency_penalty
        self._counts = np.zeros(vocab_size) if (self._presence or self._frequency) else None
        self._json = JsonState() if params.json_mode else None
        self._mask = _json_mask(vocab_size, stop_ids) if params.json_mode else None
        self.broken_at: int | None = None
        """Output position of the first token the JSON grammar did not allow (a verifier's finding)."""
        self._position = 0
        for token in history:
            self.advance(token)
        self._position = 0

    @property
    def active(self) -> bool:
        return self._bias is not None or self._counts is not None or self._json is not None

    def shape(self, logits: np.ndarray, index: int) -> np.ndarray:
        """The logits to draw output token ``index`` (0 = first of this generation) from, float64."""
        out = np.asarray(logits, dtype=np.float64)
        if self._bias is not None:
            out = out + self._bias
        if self._counts is not None:
            out = out - self._frequency * self._counts - self._presence * (self._counts > 0)
        if self._json is not None:
            out = out + self._mask.mask(self._json, self.limit - index)
        return out

    def advance(self, token: int) -> bool:
        """Take ``token`` as drawn; False when the JSON grammar did not allow it."""
        if self._counts is not None:
            self._counts[token] += 1
        ok = True
        if self._json is not None and not (self._json.done and token in self._mask.stop_ids):
            ok = token < 256 and self._json.step(token)
            if not ok:
                # Judged from here on without the grammar: one finding, not a cascade.
                self.broken_at, self._json = self._position, None
        self._position += 1
        return ok


@lru_cache(maxsize=8)
def _json_mask(vocab_size: int, stop_ids: frozenset[int]) -> JsonMask:
    """One mask cache per vocabulary, shared by every request."""
    return JsonMask(vocab_size, stop_ids)
