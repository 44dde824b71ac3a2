import math

import numpy as np
import pytest
from gpunexus.verify.attacks import honest, quantized_copy, reference_hidden
from gpunexus.verify.commitment import (
    TINY_THRESHOLDS,
    CommitmentBuilder,
    Thresholds,
    bytes_per_token,
    calibrate,
    check_commitment,
    commit,
    decode_commitment,
)
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams

model, tok = load_reference()
host16, _ = load_reference(dtype=np.float16)
PROMPT = tok.chat_prompt([{"role": "user", "content": "tell me a story about a fox"}])


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_layout_and_size(n: int) -> None:
    rng = np.random.default_rng(n)
    hidden = rng.standard_normal((n, 128)).astype(np.float32)
    data = commit(hidden, 128, k=32, block_size=32)
    blocks = math.ceil(n / 32)
    assert len(data) == 12 + blocks * 32 * 3 == round(bytes_per_token(n, 128) * n)
    d = decode_commitment(data)
    assert d.n_tokens == n and d.indices.shape == (blocks, 32)
    for j, pos in enumerate(d.committed_positions):
        top = np.sort(np.argsort(-np.abs(hidden[pos]))[:32])
        assert list(d.indices[j]) == list(top)
        assert np.array_equal(d.values[j], hidden[pos][top].astype(np.float16))
    assert check_commitment(data, hidden).passed
    # Wide models use two-byte indices.
    wide = commit(rng.standard_normal((n, 300)).astype(np.float32), 300, k=16, block_size=8)
    assert len(wide) == 12 + math.ceil(n / 8) * 16 * 4


def test_builder_is_incremental_and_matches_commit() -> None:
    hidden = np.random.default_rng(0).standard_normal((70, 128)).astype(np.float32)
    b = CommitmentBuilder(128)
    for h in hidden:
        b.add(h)
    assert b.tokens == 70 and b.finish() == commit(hidden, 128)


def test_honest_float16_passes_and_cheats_fail() -> None:
    p = SamplingParams(max_tokens=80, seed=3)
    h = honest(host16, tok, PROMPT, p)
    ref = reference_hidden(model, PROMPT, h.output_ids)
    check = check_commitment(h.commitment, ref)
    assert check.passed, check.reason
    assert len(check.blocks) == math.ceil(len(h.output_ids) / 32)
    q = honest(quantized_copy(host16), tok, PROMPT, p)
    assert not check_commitment(q.commitment, reference_hidden(model, PROMPT, q.output_ids)).passed
    # Wrong length, truncated bytes, other hidden states.
    assert "covers" in check_commitment(h.commitment, ref[:-1]).reason
    assert "unreadable" in check_commitment(h.commitment[:-2], ref).reason
    shuffled = ref[::-1].copy()
    assert not check_commitment(h.commitment, shuffled).passed


def test_calibrate_sets_thresholds_beyond_the_honest_spread() -> None:
    blocks = []
    for seed in range(6):
        h = honest(host16, tok, PROMPT, SamplingParams(max_tokens=64, seed=seed))
        blocks += check_commitment(h.commitment, reference_hidden(model, PROMPT, h.output_ids), Thresholds(0, 1e9, 1e9, 0)).blocks
    cal = calibrate(blocks)
    t = cal.thresholds
    assert t.min_exponent_match < cal.worst.exponent_match and t.max_mantissa_mean > cal.worst.mantissa_mean
    # The shipped thresholds are at least as loose as this small calibration.
    assert TINY_THRESHOLDS.max_mantissa_mean >= cal.worst.mantissa_mean
    assert TINY_THRESHOLDS.min_exponent_match <= cal.worst.exponent_match
