import dataclasses
import re

import numpy as np
import pytest

from gpunexus.verify.model import ContextOverflowError, ReferenceModel
from gpunexus.verify.registry import REFERENCE_CONFIGS, load_reference
from gpunexus.verify.tokenizer import ByteTokenizer

TINY = REFERENCE_CONFIGS["tiny"]
tok = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return load_reference("tiny")[0]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    # Longer than two prefill blocks (128 queries each), so block boundaries are covered.
    return [int(i) for i in np.random.default_rng(7).integers(0, 256, 300)]


def test_weights_and_outputs_are_deterministic(model: ReferenceModel, ids: list[int]) -> None:
    again = ReferenceModel(TINY, tok)
    assert again.model_hash == model.model_hash
    a = model.new_session().prefill(ids[:40])
    b = again.new_session().prefill(ids[:40])
    assert np.array_equal(a.logits, b.logits)
    assert np.array_equal(a.hidden, b.hidden)


def test_kv_cache_decode_matches_one_batched_prefill(model: ReferenceModel, ids: list[int]) -> None:
    logits, hidden = model.new_session().prefill_all(ids)
    assert logits.shape == (len(ids), TINY.vocab_size) and logits.dtype == np.float32
    assert hidden.shape == (len(ids), TINY.dim) and hidden.dtype == np.float32

    session = model.new_session()
    out = session.prefill(ids[:10])
    stepped_logits, stepped_hidden = [out.logits], [out.hidden]
    for token in ids[10:]:
        out = session.step(token)
        stepped_logits.append(out.logits)
        stepped_hidden.append(out.hidden)
    assert session.position == len(ids)
    np.testing.assert_allclose(np.array(stepped_logits), logits[9:], atol=1e-4)
    np.testing.assert_allclose(np.array(stepped_hidden), hidden[9:], atol=1e-4)


def test_prefill_in_pieces_continues_the_same_sequence(model: ReferenceModel, ids: list[int]) -> None:
    whole = model.new_session().prefill(ids[:120])
    session = model.new_session()
    session.prefill(ids[:50])
    split = session.prefill(ids[50:120])
    np.testing.assert_allclose(split.logits, whole.logits, atol=1e-4)


def test_float16_host_gives_nearly_the_same_logits(model: ReferenceModel, ids: list[int]) -> None:
    half = load_reference("tiny", dtype=np.float16)[0]
    assert half.dtype == np.float16 and half.model_id == model.model_id
    full_logits, _ = model.new_session().prefill_all(ids)
    half_logits, half_hidden = half.new_session().prefill_all(ids)
    assert half_logits.dtype == np.float32 and half_hidden.dtype == np.float32
    assert not np.array_equal(half_logits, full_logits)  # it really rounds
    assert np.abs(half_logits - full_logits).max() < 0.1  # logits spread ~6
    assert (half_logits.argmax(axis=1) == full_logits.argmax(axis=1)).mean() > 0.95
    # The cached decode path rounds the same way.
    session = half.new_session()
    session.prefill(ids[:20])
    np.testing.assert_allclose(session.step(ids[20]).logits, half_logits[20], atol=0.05)


def test_model_id_names_config_weights_and_tokenizer(model: ReferenceModel) -> None:
    assert re.fullmatch(r"tiny-[0-9a-f]{8}", model.model_id)
    assert re.fullmatch(r"[0-9a-f]{64}", model.model_hash)
    assert model.model_id == "tiny-" + model.model_hash[:8]
    small = dataclasses.replace(TINY, n_layers=1, max_seq_len=64)
    variants = [
        small,
        dataclasses.replace(small, weight_seed=small.weight_seed + 1),
        dataclasses.replace(small, dim=64),
        dataclasses.replace(small, rope_theta=500000.0),
        dataclasses.replace(small, tie_embeddings=True),
    ]
    hashes = {ReferenceModel(config, tok).model_hash for config in variants}
    assert model.model_hash not in hashes and len(hashes) == len(variants)


def test_tied_head_reads_the_embedding(ids: list[int]) -> None:
    tied = ReferenceModel(dataclasses.replace(TINY, tie_embeddings=True, max_seq_len=64), tok)
    logits = tied.new_session().prefill(ids[:30]).logits
    assert np.isfinite(logits).all() and 1 < logits[:256].std() < 10


def test_load_reference_shares_one_model() -> None:
    model, tokenizer = load_reference()
    assert load_reference("tiny") == (model, tokenizer)
    with pytest.raises(LookupError, match="unknown reference model 'huge'"):
        load_reference("huge")


def test_context_window_is_enforced() -> None:
    short = ReferenceModel(dataclasses.replace(TINY, max_seq_len=16), tok)
    with pytest.raises(ContextOverflowError, match="17 tokens exceed the context window of 16"):
        short.new_session().prefill([1] * 17)
    session = short.new_session()
    session.prefill([1] * 16)
    with pytest.raises(ContextOverflowError):
        session.step(1)
    assert session.position == 16


@pytest.mark.parametrize(("ids", "match"), [([], "non-empty"), ([262], r"\[0, 262\)"), ([-1], r"\[0, 262\)")])
def test_bad_token_ids_are_rejected(model: ReferenceModel, ids: list[int], match: str) -> None:
    session = model.new_session()
    with pytest.raises(ValueError, match=match):
        session.prefill(ids)
    assert session.position == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"n_heads": 3}, "dim must divide"),
        ({"n_kv_heads": 3}, "dim must divide"),
        ({"weight_seed": -1}, "weight_seed"),
    ],
)
def test_bad_configs_are_rejected(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_greedy_decoding_keeps_moving(model: ReferenceModel) -> None:
    session = model.new_session()
    out = session.prefill(tok.chat_prompt([{"role": "user", "content": "Tell me about the sea."}]))
    produced = []
    for _ in range(200):
        produced.append(int(out.logits.argmax()))
        out = session.step(produced[-1])
    assert len(set(produced[-100:])) >= 5
    # The output prior makes it write mostly printable ASCII, not U+FFFD soup.
    assert sum(32 <= t < 127 or t == 10 for t in produced) >= 190
