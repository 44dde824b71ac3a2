import dataclasses

import numpy as np
import pytest

from gpunexus.verify.generate import _StopStringFilter, generate, replay
from gpunexus.verify.model import ContextOverflowError, ReferenceModel
from gpunexus.verify.registry import REFERENCE_CONFIGS, load_reference
from gpunexus.verify.sampler import SamplingParams

model, tok = load_reference()
PROMPT = tok.chat_prompt([{"role": "user", "content": "héllo ✓ tell me a story"}])


def run(params: SamplingParams, prompt: list[int] = PROMPT, on: ReferenceModel = model) -> list:
    return list(generate(on, tok, prompt, params))


def text_of(tokens: list) -> str:
    return "".join(t.text for t in tokens)


def test_same_request_same_tokens_and_seed_matters() -> None:
    params = SamplingParams(max_tokens=40, seed=11)
    first = run(params)
    assert [t.token_id for t in run(params)] == [t.token_id for t in first]
    assert [t.token_id for t in run(dataclasses.replace(params, seed=12))] != [t.token_id for t in first]
    assert [t.index for t in first] == list(range(len(first)))


def test_max_tokens_ends_with_length() -> None:
    tokens = run(SamplingParams(max_tokens=7, temperature=0))
    assert len(tokens) == 7
    assert [t.finish_reason for t in tokens] == [None] * 6 + ["length"]
    assert text_of(tokens) == tok.decode([t.token_id for t in tokens])
    assert len(run(SamplingParams(max_tokens=1))) == 1


def test_stop_token_ends_with_stop() -> None:
    for seed in range(40):
        tokens = run(SamplingParams(max_tokens=60, seed=seed))
        if tokens[-1].finish_reason == "stop":
            break
    else:
        pytest.fail("no seed in 40 drew a stop token within 60 tokens")
    assert tokens[-1].token_id in tok.stop_ids
    assert all(t.token_id not in tok.stop_ids for t in tokens[:-1])
    assert text_of(tokens) == tok.decode([t.token_id for t in tokens])


def test_stop_string_split_across_tokens_is_cut_with_all_after_it() -> None:
    params = SamplingParams(max_tokens=80, temperature=0)
    full = text_of(run(params))
    assert full.isascii()  # one token per character below
    stop = full[30:33]
    cut = full.index(stop)
    tokens = run(dataclasses.replace(params, stop=["never", stop]))
    assert text_of(tokens) == full[:cut]
    assert tokens[-1].finish_reason == "stop"
    assert len(tokens) == cut + len(stop)  # the token completing the stop string is counted
    # The tokens that began the stop string showed nothing: their text was held back.
    assert [t.text for t in tokens[cut:]] == [""] * len(stop)


def test_stop_string_that_never_completes_is_released() -> None:
    params = SamplingParams(max_tokens=50, temperature=0)
    full = text_of(run(params))
    partial = full[-2:] + "\x00"  # the output ends on a prefix of it
    tokens = run(dataclasses.replace(params, stop=partial))
    assert text_of(tokens) == full
    assert tokens[-1].finish_reason == "length"


def test_stop_string_filter_on_multibyte_text() -> None:
    held = _StopStringFilter(("✓ END",))
    assert held.push("héllo ✓") == ("héllo ", False)
    assert held.push(" E") == ("", False)
    assert held.push("N") == ("", False)
    assert held.push("D and more") == ("", True)
    other = _StopStringFilter(("✓ END", "ll"))
    assert other.push("héllo") == ("hé", True)


def test_generation_stops_at_the_context_window() -> None:
    short = ReferenceModel(dataclasses.replace(REFERENCE_CONFIGS["tiny"], max_seq_len=32), tok)
    assert len(PROMPT) == 30
    tokens = run(SamplingParams(max_tokens=10, temperature=0), on=short)
    assert len(tokens) == 2  # prompt + output fill the window exactly
    assert tokens[-1].finish_reason == "length"
    with pytest.raises(ContextOverflowError, match="no room"):
        run(SamplingParams(), prompt=[1] * 32, on=short)


def test_replay_agrees_with_an_honest_output() -> None:
    params = SamplingParams(max_tokens=60, seed=3, temperature=0.8, top_p=0.95, top_k=50)
    tokens = run(params)
    result = replay(model, PROMPT, [t.token_id for t in tokens], params)
    assert result.agreement == 1.0 and result.mismatches == []
    np.testing.assert_allclose([p.logprob for p in result.positions], [t.logprob for t in tokens], atol=1e-4)
    np.testing.assert_allclose(result.hidden, np.array([t.hidden for t in tokens]), atol=1e-4)


def test_replay_catches_a_changed_token_or_seed() -> None:
    params = SamplingParams(max_tokens=60, seed=3)
    output = [t.token_id for t in run(params)]
    forged = list(output)
    forged[20] = (forged[20] + 1) % 256
    result = replay(model, PROMPT, forged, params)
    assert 20 in result.mismatches and result.positions[20].expected == output[20]
    # Teacher forcing: positions before the forgery are untouched.
    assert all(p.agrees for p in result.positions[:20])
    assert replay(model, PROMPT, output, dataclasses.replace(params, seed=4)).agreement < 0.8


def test_replay_accepts_an_honest_float16_host() -> None:
    half = load_reference(dtype=np.float16)[0]
    params = SamplingParams(max_tokens=100, seed=5)
    output = [t.token_id for t in run(params, on=half)]
    assert replay(model, PROMPT, output, params).agreement >= 0.95


def test_replay_rejects_malformed_claims() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        replay(model, PROMPT, [], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 262\)"):
        replay(model, PROMPT, [65, -1], SamplingParams())
