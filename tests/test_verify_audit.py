"""Library-level honesty tests: every cheat caught, honest float16 hosts pass."""

import dataclasses

import numpy as np
import pytest
from gpunexus.verify.attacks import (
    HostOutput,
    honest,
    other_model,
    quantized_copy,
    random_tokens,
    reference_hidden,
)
from gpunexus.verify.audit import AuditPolicy, AuditRequest, audit
from gpunexus.verify.commitment import commit
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams

model, tok = load_reference()
host16, _ = load_reference(dtype=np.float16)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "tell", "me", "story", "about", "hello", "world", "why"]
N = 8  # requests per attack


def prompt(i: int) -> list[int]:
    words = np.random.default_rng(i).choice(WORDS, 5)
    return tok.chat_prompt([{"role": "user", "content": " ".join(words)}])


def params(i: int, **kw) -> SamplingParams:
    base = {"temperature": 1.0, "max_tokens": 40, "seed": 1000 + i}
    base.update(kw)
    return SamplingParams(**base)


def request(h: HostOutput, p: SamplingParams, **kw) -> AuditRequest:
    fields = {
        "output_ids": h.output_ids, "params": p, "tokens_in": h.tokens_in, "tokens_out": h.tokens_out,
        "finish_reason": h.finish_reason, "commitment": h.commitment, "model_hash": model.model_hash,
        "prompt_ids": h.prompt_ids,
    }
    fields.update(kw)
    return AuditRequest(**fields)


def honest_outputs(n: int = N, **kw) -> list[tuple[HostOutput, SamplingParams]]:
    out = []
    for i in range(n):
        p = params(i, **kw)
        out.append((honest(host16, tok, prompt(i), p), p))
    return out


HONEST = honest_outputs()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.0},
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.3, "top_k": 40},
        {"temperature": 1.0, "stop": ("e ",)},
    ],
)
def test_honest_float16_host_passes(kw: dict) -> None:
    for i in range(12):
        p = params(i, **kw)
        h = honest(host16, tok, prompt(i), p)
        verdict = audit(model, tok, request(h, p))
        assert verdict.passed, (p, verdict.reasons)
        assert verdict.stats.commitment is not None and verdict.stats.commitment.passed


def test_honest_continuation_from_order_fields() -> None:
    """A failover host continues after delivered text: draws start after it."""
    messages = ({"role": "user", "content": "tell me a story"},)
    continuation = "Once upon"
    ids = tok.chat_prompt(list(messages)) + tok.encode(continuation)
    p = params(3)
    h = honest(host16, tok, ids, p, first_draw=len(continuation))
    req = request(h, p, prompt_ids=None, kind="chat", messages=messages, continuation=continuation)
    assert audit(model, tok, req).passed
    # The same output judged as if it started at draw 0 fails the replay.
    wrong = request(h, p, prompt_ids=tuple(ids), first_draw=0)
    assert "seed-replay" in audit(model, tok, wrong).codes


def assert_all_caught(requests: list[AuditRequest], code: str) -> None:
    for req in requests:
        verdict = audit(model, tok, req)
        assert not verdict.passed
        assert code in verdict.codes, verdict.reasons


def test_different_model_caught() -> None:
    cheap = other_model(host16, tok, weight_seed=7)
    reqs = []
    for i in range(N):
        p = params(i)
        reqs.append(request(honest(cheap, tok, prompt(i), p), p))
    assert_all_caught(reqs, "seed-replay")
    assert_all_caught(reqs, "commitment")


def test_lower_precision_copy_caught() -> None:
    int4 = quantized_copy(host16, bits=4)
    assert int4.model_hash == model.model_hash  # it claims the right model
    reqs = []
    for i in range(N):
        p = params(i)
        reqs.append(request(honest(int4, tok, prompt(i), p), p))
    assert_all_caught(reqs, "commitment")
    assert sum("seed-replay" in audit(model, tok, r).codes for r in reqs) >= N - 1


def test_random_tokens_with_valid_commitment_caught() -> None:
    rng = np.random.default_rng(5)
    for i in range(N):
        p = params(i)
        h = random_tokens(model, tok, prompt(i), p.max_tokens, rng)
        verdict = audit(model, tok, request(h, p))
        assert not verdict.passed and "seed-replay" in verdict.codes
        assert "commitment" not in verdict.codes  # the commitment really is valid


def test_ignoring_the_seed_caught() -> None:
    for i in range(N):
        p = params(i)
        h = honest(host16, tok, prompt(i), dataclasses.replace(p, seed=p.seed + 1))
        verdict = audit(model, tok, request(h, p))
        assert not verdict.passed and "seed-replay" in verdict.codes
        assert "commitment" not in verdict.codes


def test_replayed_answer_for_another_prompt_caught() -> None:
    for i, (h, p) in enumerate(HONEST):
        other = prompt(100 + i)
        replayed = dataclasses.replace(h, prompt_ids=tuple(other), tokens_in=len(other))
        verdict = audit(model, tok, request(replayed, p))
        assert not verdict.passed and "seed-replay" in verdict.codes, verdict.reasons


def test_inflated_token_counts_caught() -> None:
    for h, p in HONEST:
        assert_all_caught([request(h, p, tokens_out=h.tokens_out + 1)], "count")
        assert_all_caught([request(h, p, tokens_in=h.tokens_in + 3)], "count")


def test_early_stop_caught() -> None:
    for i in range(N):
        p = params(i, max_tokens=48)
        full = honest(host16, tok, prompt(i), p)
        cut = full.output_ids[: max(1, len(full.output_ids) // 2)]
        if len(cut) == len(full.output_ids):
            continue
        hidden = reference_hidden(model, full.prompt_ids, cut)
        h = dataclasses.replace(full, output_ids=cut, tokens_out=len(cut), finish_reason="stop",
                                commitment=commit(hidden, model.config.dim))
        verdict = audit(model, tok, request(h, p))
        assert not verdict.passed and "eos" in verdict.codes, verdict.reasons
        # Appending a stop token to make the cut look natural fails the replay instead.
        stopped = dataclasses.replace(h, output_ids=cut + (tok.eos_id,), tokens_out=len(cut) + 1)
        stopped = dataclasses.replace(
            stopped, commitment=commit(reference_hidden(model, full.prompt_ids, stopped.output_ids), model.config.dim)
        )
        assert "seed-replay" in audit(model, tok, request(stopped, p)).codes


def test_skipped_end_of_sequence_caught() -> None:
    for h, p in HONEST:
        if h.finish_reason != "stop" or h.output_ids[-1] not in tok.stop_ids:
            continue
        longer = dataclasses.replace(p, max_tokens=len(h.output_ids) + 5)
        ids = h.output_ids[:-1] + (ord("a"),) * 6
        hidden = reference_hidden(model, h.prompt_ids, ids)
        cheat = dataclasses.replace(h, output_ids=ids, tokens_out=len(ids), finish_reason="length",
                                    commitment=commit(hidden, model.config.dim))
        verdict = audit(model, tok, request(cheat, longer))
        assert "seed-replay" in verdict.codes
        assert "skips the end of sequence" in verdict.reasons[0] or any("skips" in r for r in verdict.reasons)
        return
    pytest.skip("no honest output ended on a stop token")


def test_model_hash_and_missing_commitment() -> None:
    h, p = HONEST[0]
    assert "model" in audit(model, tok, request(h, p, model_hash="0" * 64)).codes
    assert "commitment" in audit(model, tok, request(h, p, commitment=b"")).codes
    relaxed = AuditPolicy(require_commitment=False)
    assert audit(model, tok, request(h, p, commitment=b""), relaxed).passed
    assert "commitment" in audit(model, tok, request(h, p, commitment=h.commitment[:-1])).codes


def test_low_logprob_tokens_flagged() -> None:
    h, p = HONEST[0]
    ids = list(h.output_ids)
    ids[1] = tok.bos_id  # the prior makes a marker token all but impossible
    hidden = reference_hidden(model, h.prompt_ids, ids)
    cheat = dataclasses.replace(h, output_ids=tuple(ids), commitment=commit(hidden, model.config.dim))
    assert "low-logprob" in audit(model, tok, request(cheat, p)).codes


def test_from_order_matches_the_reference_backend() -> None:
    """The verifier rebuilds the prompt exactly as the node's reference backend does."""
    from types import SimpleNamespace

    from gpunexus.node.backends.base import GenerationRequest
    from gpunexus.node.backends.reference import ReferenceBackend
    from gpunexus.protocol.messages import ChatMessage, Sampling

    sampling = Sampling(temperature=0.9, top_p=0.95, top_k=50, stop=("\n\n",), seed=77)
    order = SimpleNamespace(kind="chat", messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi ✓")),
                            prompt="", continuation="Hel", continuation_ids=(72, 101, 0xC3), sampling=sampling, max_tokens=30)
    backend_ids, first_draw = ReferenceBackend().prompt_ids(
        GenerationRequest(order.kind, order.messages, order.prompt, order.continuation, sampling, order.max_tokens,
                          order.continuation_ids)
    )
    assert backend_ids[-3:] == [72, 101, 0xC3] and first_draw == 3  # the ids, not the text, are continued
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=30, stop=("\n\n",), seed=77)
    h = honest(host16, tok, backend_ids, p, first_draw=first_draw)
    receipt = SimpleNamespace(seed=77, tokens_in=h.tokens_in, tokens_out=h.tokens_out, finish_reason=h.finish_reason,
                              commitment=h.commitment, model_hash=model.model_hash)
    req = AuditRequest.from_order(order, receipt, h.output_ids)
    assert req.resolve_prompt(tok) == (backend_ids, first_draw)
    assert audit(model, tok, req).passed
