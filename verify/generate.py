"""Token generation with the seeded sampler, and its replay by a verifier.

``generate`` is what an honest host runs; ``replay`` is what a verifier runs on
the host's claimed output: one batched prefill over prompt + output, then the
same sampler with the same per-position draws. An honest output agrees at
every position (up to float noise at exact sampling boundaries, which is why
the result is a per-position record and not a bare yes/no).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .model import ContextOverflowError, ReferenceModel
from .sampler import SamplingParams, sample, token_logprob, uniform
from .shaping import LogitShaper
from .tokenizer import ByteTokenizer, StreamDecoder

__all__ = ["GeneratedToken", "PositionCheck", "Replay", "generate", "replay"]


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token. The last one of a generation has ``finish_reason`` set.

    ``text`` is what to show for this token: whole characters only, with text
    that might begin a stop string held back until it is known not to, so
    pieces are not one-to-one with tokens (often "", sometimes several
    tokens' worth). Joined, they are the completion. ``logits`` are the
    logits this token was drawn from (the model's, shaped by penalties,
    logit bias and JSON mode where asked: ``verify.shaping``) and ``hidden``
    the model's hidden state there.
    """

    index: int
    token_id: int
    text: str
    logprob: float
    logits: np.ndarray
    hidden: np.ndarray
    finish_reason: str | None  # None, then "stop" or "length" on the last token


def generate(
    model: ReferenceModel,
    tokenizer: ByteTokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    first_draw: int = 0,
) -> Iterator[GeneratedToken]:
    """Generate from ``prompt_ids`` until a stop token, a stop string or the length limit.

    ``first_draw`` is the index of the first uniform to use: a host that
    continues another host's response (failover) starts after the draws the
    delivered tokens used, so no draw of the seed's schedule is used twice.
    Those delivered tokens are then the last ``first_draw`` ids of the
    prompt: they are fed through the text decoder and the stop-string filter
    first (their text was already shown), so that a character or a possible
    stop string cut by the failover comes out exactly as in the
    uninterrupted stream.

    The limit is ``params.max_tokens`` or what fits in the context window
    (prompt + output <= max_seq_len), whichever comes first; a prompt that
    fills the window is a ContextOverflowError. A stop token (EOS, end of turn) is yielded and
    counted, because its draw is part of what a verifier replays; a stop
    string and everything after it is never shown.
    """
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    window = model.config.max_seq_len
    if len(prompt) >= window:
        raise ContextOverflowError(f"a prompt of {len(prompt)} tokens leaves no room in the context window of {window}")
    session = model.new_session()
    out = session.prefill(prompt)
    limit = min(params.max_tokens, window - len(prompt))
    decoder = tokenizer.stream_decoder()
    held = _StopStringFilter(params.stop)
    delivered_ids = prompt[len(prompt) - first_draw:] if first_draw else []
    for delivered in delivered_ids:
        held.push(decoder.feed(delivered))
    shaper = LogitShaper(params, model.config.vocab_size, tokenizer.stop_ids, limit, delivered_ids) if params.shapes_logits else None
    for index in range(limit):
        logits = out.logits if shaper is None else shaper.shape(out.logits, index)
        token, logprob = sample(logits, params, uniform(params.seed, first_draw + index))
        if shaper is not None:
            shaper.advance(token)
        if token in tokenizer.stop_ids:
            text, _ = _drain(held, decoder)
            finish: str | None = "stop"
        else:
            text, stopped = held.push(decoder.feed(token))
            finish = "stop" if stopped else None
            if not stopped and index == limit - 1:
                rest, stopped = _drain(held, decoder)
                text += rest
                finish = "stop" if stopped else "length"
        yield GeneratedToken(index, token, text, logprob, logits, out.hidden, finish)
        if finish is not None:
            return
        out = session.step(token)


@dataclass(frozen=True)
class PositionCheck:
    """The verdict on one output position.

    ``expected`` is the token the reference draws there, given the seed and
    the claimed tokens before it; ``logprob`` is the reference's
    log-probability of the claimed token, comparable with what the host
    reported.
    """

    index: int
    claimed: int
    expected: int
    logprob: float

    @property
    def agrees(self) -> bool:
        return self.claimed == self.expected


@dataclass(frozen=True)
class Replay:
    """Per-position verdicts on a claimed output, and the reference hidden
    states an activation check compares against."""

    positions: tuple[PositionCheck, ...]
    hidden: np.ndarray  # (n, dim): the reference hidden state each output token was drawn from

    @property
    def agreement(self) -> float:
        """Fraction of positions whose claimed token is the one the seed draws."""
        return sum(p.agrees for p in self.positions) / len(self.positions)

    @property
    def mismatches(self) -> list[int]:
        return [p.index for p in self.positions if not p.agrees]


def replay(
    model: ReferenceModel, prompt_ids: Sequence[int], output_ids: Sequence[int], params: SamplingParams
) -> Replay:
    """Recompute, in one prefill, which token every output position had to be.

    Each position is judged on the claimed prefix (teacher forcing), so one
    disagreement does not spill over into the positions after it; logit
    shaping (penalties, bias, JSON mode) is replayed on that prefix too.
    """
    prompt, output = list(prompt_ids), list(output_ids)
    if not prompt or not output:
        raise ValueError("replay needs a non-empty prompt and a non-empty output")
    # The last output token is never fed to the model, so check it here.
    if not all(0 <= token < model.config.vocab_size for token in output):
        raise ValueError(f"output token ids must be in [0, {model.config.vocab_size})")
    logits, hidden = model.new_session().prefill_all(prompt + output[:-1])
    start = len(prompt) - 1
    limit = min(params.max_tokens, model.config.max_seq_len - len(prompt))
    shaper = LogitShaper(params, model.config.vocab_size, ByteTokenizer().stop_ids, limit) if params.shapes_logits else None
    positions = []
    for index, claimed in enumerate(output):
        row = logits[start + index] if shaper is None else shaper.shape(logits[start + index], index)
        expected, _ = sample(row, params, uniform(params.seed, index))
        positions.append(PositionCheck(index, claimed, expected, token_logprob(row, claimed)))
        if shaper is not None:
            shaper.advance(claimed)
    return Replay(tuple(positions), hidden[start:])


class _StopStringFilter:
    """Releases text only once it cannot be the start of a stop string.

    A stop string may arrive split across tokens ("EN" then "D"), so any
    suffix of the pending text that is a prefix of a stop string waits for the
    next piece before it is shown or cut.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = stops
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return the text now safe to show, and whether a stop string was completed."""
        pending = self._pending + text
        hits = [at for at in (pending.find(stop) for stop in self._stops) if at >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        hold = max((_overlap(pending, stop) for stop in self._stops), default=0)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def release(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


def _drain(held: _StopStringFilter, decoder: StreamDecoder) -> tuple[str, bool]:
    """Everything still held at the end of a generation, stop strings still applied."""
    text, stopped = held.push(decoder.flush())
    return (text, True) if stopped else (text + held.release(), False)
