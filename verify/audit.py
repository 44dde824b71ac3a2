"""Audit one settled request with one reference prefill.

``audit(model, tokenizer, request)`` runs ``prefill_all`` once over prompt +
output and checks, in order of how much they prove:

``model``
    the receipt's model hash is the reference model's.
``count``
    ``tokens_in`` equals the prompt's token count (recomputed from the chat
    messages or prompt text plus any continuation), ``tokens_out`` the
    output's. Exact: no float involved.
``seed-replay``
    at every output position the claimed token is the one the seeded sampler
    draws from the reference logits (teacher forcing on the claimed prefix).
    Float noise between an honest host and the verifier can only matter when
    the draw lands within noise of a boundary of the claimed token's interval
    of the (filtered, temperature-scaled) CDF, so a disagreement within
    what logit errors of ``logit_tolerance`` can explain (ties re-ordered,
    probabilities shifted; see ``_distance``) plus ``replay_tolerance`` is
    tolerated and counted as a near tie; anything else is a mismatch. A mismatch where the replay draws
    a stop token is reported as a skipped end of sequence.
``eos``
    the output ends exactly where generation must end: at the first stop
    token, the first completed stop string, or the length limit
    (``min(max_tokens, context - prompt)``), with the matching finish reason.
    This catches truncated answers ("stop" with no stop token below
    max_tokens) and outputs that run on past a stop.
``commitment``
    the host's activation commitment matches the reference hidden states
    (``commitment.check_commitment`` with calibrated thresholds).
``low-logprob``
    no claimed token has probability below ``low_prob`` under the sampling
    distribution (temperature-scaled, unfiltered): an honest host draws
    such a token with probability < vocab * low_prob per position.
``json``
    in JSON mode, every claimed byte is one the grammar allowed there
    (``verify.json_mode``).
``embedding``
    an embedding request (``kind == "embedding"``) is checked instead by its
    exact counts and its vector against the reference's (``verify.embedding``).

Penalties, logit bias and JSON mode shape the logits before every draw
(``verify.shaping``); seed replay and low-logprob judge the shaped logits,
replayed on the claimed prefix exactly as the host ran them.

Every failed check adds a reason, prefixed by its code and a colon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .commitment import TINY_THRESHOLDS, CommitmentCheck, Thresholds, check_commitment
from .embedding import vector_problem
from .generate import _drain, _StopStringFilter
from .model import ReferenceModel
from .sampler import SamplingParams, sample_rows, uniform
from .shaping import LogitShaper
from .tokenizer import ByteTokenizer

__all__ = ["AuditPolicy", "AuditRequest", "AuditStats", "Verdict", "audit"]

CODES = ("model", "count", "seed-replay", "eos", "commitment", "low-logprob", "json", "embedding", "request")


@dataclass(frozen=True)
class AuditRequest:
    """Everything the verifier needs about one request and its receipt.

    The prompt is either ``prompt_ids`` (with ``first_draw``, the draw index
    of the first output token) or, as the order carries it, ``kind`` +
    ``messages``/``prompt`` + ``continuation``: the prompt ids are then
    rebuilt with the reference tokenizer as the reference backend does, and
    ``first_draw`` is the continuation's token count.
    """

    output_ids: tuple[int, ...]
    params: SamplingParams  # seed and max_tokens included
    tokens_in: int
    tokens_out: int
    finish_reason: str
    commitment: bytes
    model_hash: str
    prompt_ids: tuple[int, ...] | None = None
    first_draw: int = 0
    kind: str = ""  # "chat" or "completion" when prompt_ids is None
    messages: tuple[Mapping[str, Any], ...] = ()
    prompt: str = ""
    continuation: str = ""
    continuation_ids: tuple[int, ...] = ()
    output_vector: bytes = b""
    """An embedding request's delivered vector (``kind == "embedding"``)."""

    def resolve_prompt(self, tokenizer: ByteTokenizer) -> tuple[list[int], int]:
        """(prompt ids the model saw, draw index of the first output token)."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids), self.first_draw
        if self.kind == "chat":
            ids = tokenizer.chat_prompt([{"role": m["role"], "content": m["content"]} for m in self.messages])
        elif self.kind in ("completion", "embedding"):
            ids = tokenizer.completion_prompt(self.prompt)
        else:
            raise ValueError(f"unknown request kind {self.kind!r} and no prompt_ids")
        continued = list(self.continuation_ids) or tokenizer.encode(self.continuation)
        return ids + continued, len(continued)

    @classmethod
    def from_order(cls, order: Any, receipt: Any, output_ids: Sequence[int]) -> AuditRequest:
        """From a ``protocol.messages.Order``, its ``Receipt`` and the delivered token ids.

        The caller checks first that ``output_ids`` are what the receipt's
        ``output_hash`` covers (``protocol.messages.OutputHasher``).
        """
        params = SamplingParams.from_sampling(order.sampling, order.max_tokens, receipt.seed)
        return cls(
            output_ids=tuple(output_ids), params=params, tokens_in=receipt.tokens_in,
            tokens_out=receipt.tokens_out, finish_reason=receipt.finish_reason,
            commitment=receipt.commitment, model_hash=receipt.model_hash, kind=order.kind,
            messages=tuple({"role": m.role, "content": m.content} for m in order.messages),
            prompt=order.prompt, continuation=order.continuation, continuation_ids=tuple(order.continuation_ids),
            output_vector=getattr(order, "output_vector", b""),
        )


@dataclass(frozen=True)
class AuditPolicy:
    """Tolerances; the defaults are calibrated for the tiny reference model
    (bench/verify.py measures the honest float16-host spread they allow for)."""

    # Bound on |host logit - reference logit| for an honest host. The float16
    # host measured 0.030 at worst over 200 requests x 48 positions x all 262
    # logits; 0.1 leaves a factor 3. Ties within 2x this may sort either way
    # and the CDF may shift as ``_distance`` bounds.
    logit_tolerance: float = 0.1
    # Extra slack beyond that bound (CDF units; logits for greedy requests).
    replay_tolerance: float = 1e-3
    max_mismatches: int = 0  # positions beyond tolerance an output may have
    low_prob: float = 1e-9
    thresholds: Thresholds = TINY_THRESHOLDS
    require_commitment: bool = True


@dataclass(frozen=True)
class AuditStats:
    n_tokens: int = 0
    mismatches: int = 0  # positions beyond tolerance
    near_ties: int = 0  # disagreements within tolerance (float noise at a boundary)
    max_distance: float = 0.0  # worst disagreement (CDF units, or logits when greedy)
    low_prob_tokens: int = 0
    mean_logprob: float = 0.0  # of the claimed tokens, temperature 1, full vocabulary
    commitment: CommitmentCheck | None = None

    @property
    def mismatch_rate(self) -> float:
        return self.mismatches / self.n_tokens if self.n_tokens else 0.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    stats: AuditStats = field(default_factory=AuditStats)

    @property
    def codes(self) -> frozenset[str]:
        """The checks that failed (``model``, ``count``, ``seed-replay``, ``eos``, ...)."""
        return frozenset(r.split(":", 1)[0] for r in self.reasons)


def audit(
    model: ReferenceModel,
    tokenizer: ByteTokenizer,
    request: AuditRequest,
    policy: AuditPolicy = AuditPolicy(),
    *,
    prefilled: tuple[np.ndarray, np.ndarray] | None = None,
) -> Verdict:
    """Judge ``request`` against ``model``.

    ``prefilled`` is ``prefill_all(prompt + output[:-1])``'s (logits, hidden)
    when the caller already ran it (a peer verifier also builds its own
    commitment from the same pass, ``verify.peer``): one forward pass, not two.
    """
    reasons: list[str] = []
    output = [int(t) for t in request.output_ids]
    try:
        prompt, first_draw = request.resolve_prompt(tokenizer)
    except ValueError as exc:
        return Verdict(False, (f"request: {exc}",))
    if request.model_hash != model.model_hash:
        reasons.append(f"model: receipt names model {request.model_hash[:16]}..., the reference is {model.model_hash[:16]}...")
    if request.kind == "embedding":
        return _audit_embedding(model, prompt, request, reasons)
    if request.tokens_in != len(prompt):
        reasons.append(f"count: tokens_in {request.tokens_in} but the prompt has {len(prompt)} tokens")
    if request.tokens_out != len(output):
        reasons.append(f"count: tokens_out {request.tokens_out} but the output has {len(output)} tokens")
    if not prompt or not output:
        reasons.append("request: empty prompt or output")
        return Verdict(False, tuple(reasons))
    window = model.config.max_seq_len
    if len(prompt) + len(output) - 1 > window or not all(0 <= t < model.config.vocab_size for t in output):
        reasons.append("request: output does not fit the model (context or vocabulary)")
        return Verdict(False, tuple(reasons))

    logits, hidden = prefilled or model.new_session().prefill_all(prompt + output[:-1])
    start = len(prompt) - 1
    params = request.params

    # Seed replay and low-logprob, one position at a time on the claimed prefix.
    mismatches = near = 0
    worst = 0.0
    first_bad: list[str] = []
    log_low = math.log(policy.low_prob)
    rows = logits[start : start + len(output)].astype(np.float64)
    at = (np.arange(len(output)), np.asarray(output))
    logprob_sum = float((rows[at] - _logsumexp_rows(rows)).sum())
    broken_at = None
    if params.shapes_logits:
        # Penalties, logit bias and JSON mode replayed on the claimed prefix, as the host ran them.
        limit = min(params.max_tokens, window - len(prompt))
        shaper = LogitShaper(params, model.config.vocab_size, tokenizer.stop_ids, limit, prompt[len(prompt) - first_draw:] if first_draw else ())
        shaped = np.empty_like(rows)
        for index, claimed in enumerate(output):
            shaped[index] = shaper.shape(rows[index], index)
            shaper.advance(claimed)
        rows, broken_at = shaped, shaper.broken_at
    scaled = rows / (params.temperature or 1.0)
    low = int(((scaled[at] - _logsumexp_rows(scaled)) < log_low).sum())
    draws = [uniform(params.seed, first_draw + index) for index in range(len(output))]
    drawn = sample_rows(rows, params, draws)  # every position's seeded draw at once, exactly sample()'s
    for index in map(int, np.flatnonzero(drawn != at[1])):
        claimed, expected, u, row = output[index], int(drawn[index]), draws[index], rows[index]
        distance = _distance(row, params, u, claimed, expected, policy.logit_tolerance) if row[claimed] > -np.inf else math.inf
        worst = max(worst, distance)
        if distance <= policy.replay_tolerance:
            near += 1
            continue
        mismatches += 1
        if len(first_bad) < 3:
            if expected in tokenizer.stop_ids and claimed not in tokenizer.stop_ids:
                first_bad.append(f"token {index} skips the end of sequence the seed draws")
            else:
                first_bad.append(f"token {index} is {claimed}, the seed draws {expected}")
    if mismatches > policy.max_mismatches:
        reasons.append(
            f"seed-replay: {mismatches} of {len(output)} tokens are not what the seed draws ("
            + "; ".join(first_bad) + ")"
        )
    if low:
        reasons.append(f"low-logprob: {low} tokens have probability < {policy.low_prob:g} under the reference")
    if broken_at is not None:
        reasons.append(f"json: token {broken_at} breaks the JSON object the request asked for")

    eos = _end_check(tokenizer, output, params, min(params.max_tokens, window - len(prompt)), request.finish_reason)
    if eos:
        reasons.append(f"eos: {eos}")

    check = None
    if request.commitment or policy.require_commitment:
        if not request.commitment:
            reasons.append("commitment: the receipt carries no activation commitment")
        else:
            check = check_commitment(request.commitment, hidden[start:], policy.thresholds)
            if not check.passed:
                reasons.append(f"commitment: {check.reason}")

    stats = AuditStats(len(output), mismatches, near, worst, low, logprob_sum / len(output), check)
    return Verdict(not reasons, tuple(reasons), stats)


def _audit_embedding(model: ReferenceModel, prompt: list[int], request: AuditRequest, reasons: list[str]) -> Verdict:
    """An embedding: exact counts, and the vector the reference computes for the input (one prefill)."""
    if request.tokens_in != len(prompt) or request.tokens_out != 0:
        reasons.append(f"count: tokens {request.tokens_in}/{request.tokens_out}, the input has {len(prompt)} and an embedding outputs none")
    try:
        problem = vector_problem(model, prompt, request.output_vector)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        reasons.append(f"embedding: {problem}")
    return Verdict(not reasons, tuple(reasons), AuditStats(n_tokens=len(prompt)))


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    peak = x.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True)))[:, 0]


def _distance(row: np.ndarray, params: SamplingParams, u: float, claimed: int, expected: int, eps: float) -> float:
    """How far draw ``u`` is from any draw that could select ``claimed`` when
    the host's logits may differ from the reference's by float noise.

    Greedy: the claimed token's logit gap to the maximum, less ``2 * eps``.
    Sampling: tokens whose scaled logits lie within ``2 * eps / temperature``
    of the claimed one may sort on either side of it (float16 rounding makes
    exact ties, broken by id), so the claimed token's interval of the CDF
    starts anywhere between the mass of the tokens certainly before it and the
    mass of those possibly before it, and a mass ``m`` may move to at most
    ``m e^x / (m e^x + 1 - m)`` for ``x = +-2 * eps / temperature`` (every
    logit inside it up by eps, every one outside down); the result is the
    distance from ``u`` to that widened interval. A token outside top_k/top_p is
    reachable only if it is within that tie band of the weakest kept token;
    the top_p cut itself may move by as many tokens as that shift allows,
    which changes the normaliser (the interval is widened by both extremes).
    """
    if params.temperature == 0:
        return max(0.0, float(row[expected] - row[claimed]) - 2 * eps)
    scaled = row / params.temperature
    e2 = 2 * eps / params.temperature
    # The reference's sorted candidates, as _filtered orders them.
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    weights = np.exp(scaled[order] - scaled[order[0]])
    cum = np.cumsum(weights)
    # top_p keeps the shortest prefix reaching top_p; with the masses off by
    # the tilt the host's prefix may be anywhere from m_min to m_max long.
    m_min = m_max = len(order)
    if params.top_p < 1:
        frac = cum / cum[-1]
        m_min = min(len(order), int(np.searchsorted(_tilt(frac, e2), params.top_p, side="left")) + 1)
        m_max = min(len(order), int(np.searchsorted(_tilt(frac, -e2), params.top_p, side="left")) + 1)
    kept = scaled[order[:m_max]]
    c = float(scaled[claimed])
    mine = order[:m_max] == claimed
    if not mine.any() and c < kept.min() - e2:
        return math.inf  # outside top_k / top_p beyond any tie: no draw selects it
    w_c = math.exp(c - scaled[order[0]])
    others = weights[:m_max][~mine]
    before = float(others[kept[~mine] > c + e2].sum())
    maybe = float(others[kept[~mine] >= c - e2].sum())
    lo = float(_tilt(before / cum[m_max - 1], -e2))
    hi = float(_tilt(min(1.0, (maybe + w_c) / cum[m_min - 1]), e2))
    return max(0.0, lo - u, u - hi)


def _tilt(mass, x: float):
    """The most a probability mass can become when the logits inside it move
    by ``+x/2`` and those outside by ``-x/2``: ``m e^x / (m e^x + 1 - m)``
    (elementwise; 0 and 1 stay put)."""
    grown = np.asarray(mass, dtype=np.float64) * math.exp(x)
    return grown / (grown + 1.0 - np.asarray(mass, dtype=np.float64))


def _end_check(tokenizer: ByteTokenizer, output: list[int], params: SamplingParams, limit: int, finish: str) -> str:
    """Where ``generate`` would have ended on these tokens, against where they end.

    Empty string when they agree, else the problem.
    """
    decoder = tokenizer.stream_decoder()
    held = _StopStringFilter(params.stop)
    for index, token in enumerate(output):
        if index >= limit:
            return f"{len(output)} tokens exceed the limit of {limit}"
        if token in tokenizer.stop_ids:
            end, why = "stop", "a stop token"
        else:
            _, stopped = held.push(decoder.feed(token))
            end, why = ("stop", "a stop string") if stopped else (None, "")
            if end is None and index == limit - 1:
                _, stopped = _drain(held, decoder)
                end, why = ("stop", "a stop string") if stopped else ("length", "the length limit")
        if end is not None:
            if index < len(output) - 1:
                return f"the output runs on past {why} at token {index}"
            if finish != end:
                return f"finish_reason {finish!r} but the output ends at {why}"
            return ""
    return (
        f"the output stops after {len(output)} tokens (finish_reason {finish!r}) without a stop token "
        f"or stop string, below the limit of {limit}"
    )
