"""A peer verifier's prefill (reference backend, fp32 and fp16) and the hub's judgement of it."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.protocol.signing import Signer
from gpunexus.verify.attacks import other_model, quantized_copy
from gpunexus.verify.commitment import commit
from gpunexus.verify.peer import (
    job_request,
    TINY_LOGPROB_LIMITS,
    PrefillReport,
    calibrate_logprobs,
    compare_commitments,
    judge,
    logprob_stats,
    prefill_report,
    reference_prefill,
)
from gpunexus.verify.registry import load_reference
from peer_jobs import generate_job

HUB = Signer.generate()
VERIFIER = Signer.generate().peer_id
PROMPTS = ["Tell me about rivers", "What is a GPU?", "Write a haiku on trio", "List three colours"]


def _judge(job, report: PrefillReport):
    return judge(tokens_in=job.tokens_in, tokens_out=job.tokens_out, output_tokens=len(job.opening.output_ids),
                 commitment=job.commitment, report=report)


@pytest.fixture(scope="module")
def verifiers():
    return {"float32": ReferenceBackend("tiny"), "float16": ReferenceBackend("tiny", dtype=np.float16)}


@pytest.mark.parametrize(("host_dtype", "verifier_dtype"), [(np.float16, "float32"), (np.float32, "float16"),
                                                             (np.float32, "float32")])
async def test_an_honest_output_passes_on_either_dtype(verifiers, host_dtype, verifier_dtype):
    host, _ = load_reference("tiny", host_dtype)
    for i, prompt in enumerate(PROMPTS):
        job = generate_job(host, prompt, seed=i, temperature=[0.7, 1.0][i % 2], hub=HUB, verifier=VERIFIER)
        report = await verifiers[verifier_dtype].prefill(job)
        assert report.engine == f"reference-{verifier_dtype}" and report.seed_replayed
        assert report.prompt_tokens == job.tokens_in and len(report.logprobs) == len(job.opening.output_ids)
        assert report.replay_reasons == ()
        verdict = _judge(job, report)
        assert verdict.passed, verdict.reasons
        assert verdict.stats.commitment is not None and verdict.stats.commitment.passed


async def test_another_model_a_heavier_quantisation_and_wrong_counts_fail(verifiers):
    model, tokenizer = load_reference("tiny")
    verifier = verifiers["float32"]
    cheats = {"other": other_model(model, tokenizer, weight_seed=99), "int4": quantized_copy(model, bits=4)}
    for name, cheat in cheats.items():
        job = generate_job(cheat, "Tell me about rivers", hub=HUB, verifier=VERIFIER)
        verdict = _judge(job, await verifier.prefill(job))
        assert not verdict.passed
        assert "commitment" in verdict.codes, (name, verdict.reasons)
    honest_job = generate_job(model, "Tell me about rivers", hub=HUB, verifier=VERIFIER)
    inflated = dataclasses.replace(honest_job, tokens_in=honest_job.tokens_in + 40)
    assert _judge(inflated, await verifier.prefill(inflated)).codes == {"count"}
    wrong_seed = dataclasses.replace(honest_job, opening=dataclasses.replace(
        honest_job.opening, sampling=dataclasses.replace(honest_job.opening.sampling, seed=777)))
    assert _judge(wrong_seed, await verifier.prefill(wrong_seed)).codes == {"seed-replay"}


async def test_random_text_with_an_honest_looking_commitment_fails_the_replay(verifiers):
    model, tokenizer = load_reference("tiny")
    job = generate_job(model, "What is a GPU?", hub=HUB, verifier=VERIFIER)
    prompt = tokenizer.completion_prompt(job.opening.prompt)
    rng = random.Random(3)
    ids = tuple(rng.randrange(32, 127) for _ in job.opening.output_ids)
    _, hidden = model.new_session().prefill_all(prompt + list(ids)[:-1])
    forged = dataclasses.replace(job, commitment=commit(hidden[len(prompt) - 1:], model.config.dim),
                                 opening=dataclasses.replace(job.opening, output_ids=ids, output_text=bytes(ids).decode()))
    verdict = _judge(forged, await verifiers["float32"].prefill(forged))
    assert "seed-replay" in verdict.codes and "commitment" not in verdict.codes


def test_any_engines_forward_pass_reports_what_the_reference_verifier_reports():
    # prefill_report (exllamav2's path) from the reference's own logits and hidden states: the same
    # logprobs, ranks, commitment and replay findings as reference_prefill, honest and with a wrong seed.
    model, tokenizer = load_reference("tiny")
    job = generate_job(model, "Tell me about rivers", seed=3, temperature=1.0, hub=HUB, verifier=VERIFIER)
    wrong = dataclasses.replace(job, opening=dataclasses.replace(
        job.opening, sampling=dataclasses.replace(job.opening.sampling, seed=778)))

    def reports(j):
        request = job_request(j)
        prompt, first_draw = request.resolve_prompt(tokenizer)
        out = list(request.output_ids)
        logits, hidden = model.new_session().prefill_all(prompt + out[:-1])
        return (prefill_report(logits, hidden, len(prompt), out, request.params, first_draw, engine="any",
                               host_commitment=j.commitment),
                reference_prefill(model, tokenizer, request, engine="any"))

    for j in (job, wrong):
        mine, ref = reports(j)
        assert (mine.logprobs, mine.ranks, mine.commitment) == (ref.logprobs, ref.ranks, ref.commitment)
        assert [r.split(" (")[0] for r in mine.replay_reasons] == [r.split(" (")[0] for r in ref.replay_reasons]
    assert _judge(job, reports(job)[0]).passed
    assert _judge(wrong, reports(wrong)[0]).codes == {"seed-replay"}


def test_commitments_compare_with_themselves_and_not_across_models():
    model, tokenizer = load_reference("tiny")
    other = other_model(model, tokenizer, weight_seed=99)
    ids = tokenizer.completion_prompt("Hello there, how are you today?")
    mine = commit(model.new_session().prefill_all(ids)[1], model.config.dim, block_size=8)
    theirs = commit(other.new_session().prefill_all(ids)[1], model.config.dim, block_size=8)
    assert compare_commitments(mine, mine).passed
    check = compare_commitments(mine, theirs)
    assert not check.passed and "activations differ" in check.reason
    assert "unreadable" in compare_commitments(mine, b"junk").reason
    shorter = commit(model.new_session().prefill_all(ids[:-1])[1], model.config.dim, block_size=8)
    assert "covers" in compare_commitments(mine, shorter).reason


def _logprob_report(model, job, top_k=5):
    """What an engine without activations reports: logprobs and ranks of the delivered tokens only."""
    _, tokenizer = load_reference("tiny")
    prompt = tokenizer.completion_prompt(job.opening.prompt)
    out = list(job.opening.output_ids)
    logits, _ = model.new_session().prefill_all(prompt + out[:-1])
    rows = logits[len(prompt) - 1:].astype(np.float64)
    lse = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
    lps = tuple(float(x) for x in rows[np.arange(len(out)), out] - lse)
    ranks = tuple(int((r > r[t]).sum()) for r, t in zip(rows, out))
    ranks = tuple(r if r < top_k else 255 for r in ranks)
    return PrefillReport("openai", len(prompt), b"", lps, ranks, top_k, False)


def test_logprob_path_passes_honest_and_fails_another_model_or_random_text():
    model, tokenizer = load_reference("tiny")
    f16, _ = load_reference("tiny", np.float16)
    other = other_model(model, tokenizer, weight_seed=99)
    honest = [generate_job(f16, p, seed=i, hub=HUB, verifier=VERIFIER) for i, p in enumerate(PROMPTS)]
    for job in honest:
        verdict = _judge(job, _logprob_report(model, job))
        assert verdict.passed, verdict.reasons
    for job in (generate_job(other, p, seed=i, hub=HUB, verifier=VERIFIER) for i, p in enumerate(PROMPTS)):
        verdict = _judge(job, _logprob_report(model, job))
        assert not verdict.passed and verdict.codes == {"logprobs"}
    stats = [logprob_stats(r.logprobs, r.ranks, r.top_k) for r in (_logprob_report(model, j) for j in honest)]
    limits = calibrate_logprobs(stats)
    # The shipped limits are looser than what these few honest outputs alone would give.
    assert limits.min_mean_logprob >= TINY_LOGPROB_LIMITS.min_mean_logprob
    assert limits.max_improbable_run <= TINY_LOGPROB_LIMITS.max_improbable_run


async def test_an_early_stop_and_a_replayed_answer_fail(verifiers):
    model, _ = load_reference("tiny")
    verifier = verifiers["float32"]
    job = generate_job(model, "Write a haiku on trio", max_tokens=40, hub=HUB, verifier=VERIFIER)
    assert job.tokens_out > 4 and job.finish_reason == "length"
    cut = job.opening.output_ids[:4]
    _, tokenizer = load_reference("tiny")
    prompt = tokenizer.completion_prompt(job.opening.prompt)
    _, hidden = model.new_session().prefill_all(prompt + list(cut)[:-1])
    early = dataclasses.replace(job, tokens_out=4, finish_reason="stop",
                                commitment=commit(hidden[len(prompt) - 1:], model.config.dim),
                                opening=dataclasses.replace(job.opening, output_ids=cut))
    assert "eos" in _judge(early, await verifier.prefill(early)).codes
    other = generate_job(model, "List three colours", max_tokens=40, hub=HUB, verifier=VERIFIER)
    replayed = dataclasses.replace(job, tokens_out=other.tokens_out, commitment=other.commitment,
                                   finish_reason=other.finish_reason,
                                   opening=dataclasses.replace(job.opening, output_ids=other.opening.output_ids))
    codes = _judge(replayed, await verifier.prefill(replayed)).codes
    assert {"commitment", "seed-replay"} <= codes
