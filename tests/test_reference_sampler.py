import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpunexus.verify.sampler import SamplingParams, sample, sample_rows, token_logprob, top_logprobs, uniform

PROBS = np.array([0.5, 0.3, 0.2])
LOGITS = np.log(PROBS)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_uniform_is_a_repeatable_draw_in_the_unit_interval(seed: int, index: int) -> None:
    u = uniform(seed, index)
    assert 0.0 <= u < 1.0
    assert uniform(seed, index) == u


def test_uniform_is_pinned() -> None:
    # Hosts and verifiers must agree on every draw forever: this value is protocol.
    assert uniform(0, 0) == 0.6861366213355649
    draws = {uniform(seed, index) for seed in range(3) for index in range(100)}
    assert len(draws) == 300
    assert 0.4 < np.mean(list(draws)) < 0.6


@pytest.mark.parametrize(("seed", "index"), [(-1, 0), (2**64, 0), (0, -1)])
def test_uniform_rejects_out_of_range_counters(seed: int, index: int) -> None:
    with pytest.raises(ValueError, match="must be in"):
        uniform(seed, index)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"temperature": -0.1}, "temperature must be between 0 and 2"),
        ({"temperature": 2.5}, "temperature must be between 0 and 2"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"top_p": 0}, "top_p must be greater than 0"),
        ({"top_p": 1.5}, "top_p must be greater than 0 and at most 1"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"seed": -5}, "seed must be in"),
        ({"seed": 2**64}, "seed must be in"),
        ({"stop": ["a", ""]}, "non-empty strings"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
        ({"stop": 7}, "stop must be a string or a list"),
    ],
)
def test_params_validation(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**fields)


def test_params_normalise_stop() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=1, seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize(("u", "token"), [(0.0, 0), (0.49, 0), (0.51, 1), (0.79, 1), (0.81, 2), (0.999, 2)])
def test_inverse_cdf_over_sorted_probabilities(u: float, token: int) -> None:
    assert sample(LOGITS, SamplingParams(), u)[0] == token


def test_sampling_follows_the_distribution() -> None:
    logits = np.array([0.3, -1.0, 2.0, 0.0, 1.0])
    expected = np.exp(logits) / np.exp(logits).sum()
    n = 4000
    counts = np.bincount([sample(logits, SamplingParams(), (i + 0.5) / n)[0] for i in range(n)], minlength=5)
    np.testing.assert_allclose(counts / n, expected, atol=2 / n)


def test_ties_break_by_lowest_token_id() -> None:
    flat = np.zeros(4)
    assert [sample(flat, SamplingParams(), u)[0] for u in (0.1, 0.3, 0.6, 0.9)] == [0, 1, 2, 3]
    assert sample(np.array([1.0, 3.0, 3.0]), SamplingParams(temperature=0), 0.99)[0] == 1


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.3, top_k=50), SamplingParams(temperature=1.0, top_p=0.9, top_k=5),
    SamplingParams(top_p=0.01), SamplingParams(temperature=0.2, top_k=1),
])
def test_batched_replay_draws_what_sample_draws(params: SamplingParams) -> None:
    # A verifier's replay of a whole output at once must pick sample()'s token on every row, exactly:
    # peaked and flat rows, float16-rounded logits with exact ties, and draws on cdf boundaries.
    rng = np.random.default_rng(5)
    rows = np.concatenate([
        rng.normal(0, 3, (300, 262)),
        rng.normal(0, 3, (300, 262)).astype(np.float16).astype(np.float64).round(1),  # many exact ties
        np.zeros((20, 262)),
    ])
    rows[:50, 7] = 40.0  # nearly all mass on one token
    draws = list(rng.random(len(rows)))
    draws[:3] = [0.0, 0.5, 1 - 2**-53]
    flat = len(rows) - 20
    draws[flat : flat + 4] = [k / 262 for k in (1, 2, 131, 261)]  # exactly on boundaries of a uniform cdf
    expected = [sample(row, params, u)[0] for row, u in zip(rows, draws, strict=True)]
    assert sample_rows(rows, params, draws).tolist() == expected


def test_greedy_ignores_the_draw() -> None:
    logits = np.array([0.1, 2.0, 1.9])
    assert {sample(logits, SamplingParams(temperature=0), u)[0] for u in (0.0, 0.5, 0.999)} == {1}


def test_top_k_and_top_p_limit_the_choice() -> None:
    draws = [(i + 0.5) / 200 for i in range(200)]
    assert {sample(LOGITS, SamplingParams(top_k=2), u)[0] for u in draws} == {0, 1}
    assert {sample(LOGITS, SamplingParams(top_k=1), u)[0] for u in draws} == {0}
    # 0.5 < 0.7 <= 0.5 + 0.3: the two most likely tokens stay, renormalised.
    assert {sample(LOGITS, SamplingParams(top_p=0.7), u)[0] for u in draws} == {0, 1}
    assert sample(LOGITS, SamplingParams(top_p=0.7), 0.7)[0] == 1  # 0.7 > 0.5/0.8
    assert {sample(LOGITS, SamplingParams(top_p=0.01), u)[0] for u in draws} == {0}


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([0.0, 1.0])  # token 1 comes first in the CDF
    assert sample(logits, SamplingParams(temperature=0.1), 0.9999)[0] == 1  # p(1) = 0.99995
    assert sample(logits, SamplingParams(temperature=1.0), 0.7)[0] == 1  # p(1) = 0.73
    assert sample(logits, SamplingParams(temperature=2.0), 0.7)[0] == 0  # p(1) = 0.62


def test_logprob_is_under_the_unmodified_distribution() -> None:
    for params in (SamplingParams(), SamplingParams(temperature=0.3, top_k=1), SamplingParams(temperature=0)):
        token, logprob = sample(LOGITS, params, 0.1)
        assert token == 0
        assert logprob == pytest.approx(math.log(0.5))
    assert token_logprob(LOGITS, 2) == pytest.approx(math.log(0.2))


def test_top_logprobs() -> None:
    logits = np.array([1.0, 3.0, 3.0, -2.0])
    top = top_logprobs(logits, 3)
    assert [t for t, _ in top] == [1, 2, 0]
    total = math.log(np.exp(logits).sum())
    assert [lp for _, lp in top] == pytest.approx([3 - total, 3 - total, 1 - total])
