"""Penalties, logit bias and JSON mode in the seeded sampler, and their replay by the audit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from gpunexus.verify.attacks import honest
from gpunexus.verify.audit import AuditRequest, audit
from gpunexus.verify.embedding import embed, vector_problem
from gpunexus.verify.generate import generate, replay
from gpunexus.verify.json_mode import JsonState
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams

model, tok = load_reference()
host16, _ = load_reference(dtype=np.float16)
PROMPT = tok.chat_prompt([{"role": "user", "content": "give me a json object about a fox"}])


def output(params: SamplingParams, prompt=PROMPT, on=model) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    for t in generate(on, tok, prompt, params):
        ids.append(t.token_id)
        text += t.text
        finish = t.finish_reason
    return ids, text, finish


def audit_of(params: SamplingParams, prompt=PROMPT, on=host16):
    h = honest(on, tok, prompt, params)
    return h, audit(model, tok, AuditRequest(
        output_ids=h.output_ids, params=params, tokens_in=h.tokens_in, tokens_out=h.tokens_out,
        finish_reason=h.finish_reason, commitment=h.commitment, model_hash=model.model_hash, prompt_ids=h.prompt_ids))


def test_json_mode_output_always_parses_as_an_object_200_seeds():
    finishes = set()
    for seed in range(200):
        max_tokens = (2, 3, 5, 8, 13, 40, 120)[seed % 7]
        temperature = (0.0, 0.7, 1.0, 1.5)[seed % 4]
        ids, text, finish = output(SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, json_mode=True))
        value = json.loads(text)
        assert isinstance(value, dict), (seed, text)
        assert len(ids) <= max_tokens
        finishes.add(finish)
    assert finishes == {"stop", "length"}  # ended by a stop token, and cut by the limit yet closed


def test_json_mode_from_a_continuation_still_closes():
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=5, json_mode=True)
    delivered = list(b'{"a":"bc')
    text = "".join(t.text for t in generate(model, tok, PROMPT + delivered, params, first_draw=len(delivered)))
    assert isinstance(json.loads('{"a":"bc' + text), dict)


def test_the_json_grammar_accepts_exactly_json():
    for doc in ('{}', '{"a":1}', '{"a": [1, -2.5e+3, true, null, {"b": "\\u00e9\\n"}]}', '{"é":"✓"}'):
        raw = doc.replace("\\u00e9", "x").encode()
        state = JsonState()
        assert all(state.step(b) for b in raw) and state.done, doc
    for doc in ('[]', '{"a":01}', '{"a":1,}', '{"a" 1}', '{"a":tru}', '{}x', '{"\\ud800":1}', '{"a":"\x01"}'):
        state = JsonState()
        assert not (all(state.step(b) for b in doc.encode()) and state.done), doc
    assert not JsonState().step(0xC0)  # an overlong lead byte is never text


def test_logit_bias_and_penalties_change_the_draws():
    plain = SamplingParams(temperature=0.0, max_tokens=24, seed=1)
    ids, _, _ = output(plain)
    forced, text, _ = output(dataclasses.replace(plain, logit_bias=((ord("q"), 100.0),)))
    assert set(forced) == {ord("q")} and text == "q" * 24
    repeated = max(np.bincount(ids))
    penalised, _, _ = output(dataclasses.replace(plain, frequency_penalty=2.0, presence_penalty=2.0))
    assert max(np.bincount(penalised)) < repeated
    banned, _, _ = output(dataclasses.replace(plain, logit_bias=((ids[0], -100.0),)))
    assert banned[0] != ids[0]


@pytest.mark.parametrize("kw", [
    dict(json_mode=True), dict(presence_penalty=1.5, frequency_penalty=0.7), dict(logit_bias=((ord("e"), 4.0), (ord(" "), -3.0))),
    dict(json_mode=True, frequency_penalty=1.0, temperature=0.0),
])
def test_an_honest_float16_host_with_shaping_passes_the_audit(kw):
    for seed in range(4):
        params = SamplingParams(**{"temperature": 1.0, "max_tokens": 40, "seed": 300 + seed, **kw})
        _, verdict = audit_of(params)
        assert verdict.passed, verdict.reasons


def test_the_audit_replays_the_shaping():
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=9, json_mode=True, frequency_penalty=1.5)
    h, verdict = audit_of(params, on=model)
    assert verdict.passed
    # A host that ignored the parameters (generated unshaped) is caught.
    unshaped_h, _ = audit_of(dataclasses.replace(params, json_mode=False, frequency_penalty=0.0), on=model)
    cheat = audit(model, tok, AuditRequest(output_ids=unshaped_h.output_ids, params=params, tokens_in=unshaped_h.tokens_in,
                                          tokens_out=unshaped_h.tokens_out, finish_reason=unshaped_h.finish_reason,
                                          commitment=unshaped_h.commitment, model_hash=model.model_hash, prompt_ids=unshaped_h.prompt_ids))
    assert not cheat.passed and {"seed-replay", "json"} & cheat.codes
    assert replay(model, PROMPT, list(h.output_ids), params).agreement == 1.0


def test_embeddings_are_real_deterministic_unit_vectors_and_checkable():
    ids = tok.completion_prompt("the quick brown fox")
    a, b = embed(model, ids), embed(model, ids)
    assert a.dtype == np.dtype("<f4") and a.shape == (model.config.dim,)
    assert np.array_equal(a, b) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    other = embed(model, tok.completion_prompt("a lazy dog sleeps"))
    assert float(a @ other) < 0.999
    assert vector_problem(model, ids, embed(host16, ids).tobytes()) == ""  # an honest float16 host
    assert "cosine" in vector_problem(model, ids, other.tobytes())
    assert "dimensions" in vector_problem(model, ids, a[:-1].tobytes())


def test_an_embedding_is_audited_by_its_counts_and_vector():
    text = "hello world"
    ids = tok.completion_prompt(text)
    honest_vector = embed(host16, ids).tobytes()

    def verdict(vector: bytes, tokens_in: int = len(ids)):
        return audit(model, tok, AuditRequest(output_ids=(), params=SamplingParams(max_tokens=1), tokens_in=tokens_in, tokens_out=0,
                                              finish_reason="stop", commitment=b"", model_hash=model.model_hash, kind="embedding",
                                              prompt=text, output_vector=vector))

    assert verdict(honest_vector).passed
    assert verdict(embed(model, tok.completion_prompt("other")).tobytes()).codes == {"embedding"}
    assert verdict(honest_vector, tokens_in=len(ids) + 5).codes == {"count"}
