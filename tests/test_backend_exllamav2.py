"""The exllamav2 backend.

The first part runs everywhere: the errors without exllamav2 or CUDA, the
incremental decoder, the model-folder hash, chat templates, and the decode
loop itself driven by the reference model in place of exllamav2 (it must give
exactly what :func:`gpunexus.verify.generate.generate` gives). The last part
needs exllamav2, torch and a CUDA GPU: it writes a tiny random FP16 Llama with
a byte-level tokenizer, loads it and generates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import json
import queue
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import trio

from gpunexus.node.backends.base import BackendError, GenerationRequest, Token
from gpunexus.node.backends.exllamav2 import (
    HASH_CACHE_NAME,
    INSTALL_HINT,
    ExLlamaV2Backend,
    IncrementalDecoder,
    compile_chat_template,
    model_folder_hash,
)
from gpunexus.protocol.messages import AuditJob, ChatMessage, Opening, Sampling
from gpunexus.protocol.signing import Signer
from gpunexus.verify.commitment import decode_commitment
from gpunexus.verify.generate import generate
from gpunexus.verify.peer import judge
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams, sample, uniform

HUB = Signer.generate()

# -- without exllamav2 / CUDA ---------------------------------------------------


def test_missing_exllamav2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "exllamav2", None)  # as if not installed
    with pytest.raises(BackendError) as caught:
        ExLlamaV2Backend(str(tmp_path), "some-model")
    assert str(caught.value) == INSTALL_HINT == "exllamav2 is not installed: pip install 'gpunexus[exllamav2]'"
    assert caught.value.code == "internal"
    assert caught.value.retryable is False


def _fake_module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_no_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", _fake_module("torch", cuda=cuda))
    monkeypatch.setitem(sys.modules, "exllamav2", _fake_module("exllamav2"))
    with pytest.raises(BackendError) as caught:
        ExLlamaV2Backend(str(tmp_path), "some-model")
    assert "CUDA" in str(caught.value) and "torch.cuda.is_available() is False" in str(caught.value)
    assert caught.value.retryable is False


def test_bad_slots_rejected_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="max_slots"):
        ExLlamaV2Backend(str(tmp_path), "m", max_slots=0)


def _bytes_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_never_splits_a_character() -> None:
    text = "héllo ✓ 𝄞 done"
    decoder = IncrementalDecoder(_bytes_decode)
    pieces = [decoder.feed(b) for b in text.encode("utf-8")]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1:3] == ["", "é"]  # held until its second byte


def test_incremental_decoder_flushes_an_unfinished_character() -> None:
    decoder = IncrementalDecoder(_bytes_decode)
    assert decoder.feed(ord("a")) == "a"
    assert decoder.feed(0xE2) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_incremental_decoder_keeps_sentencepiece_word_spaces() -> None:
    pieces = ["\u2581The", "\u2581cat", "s", "\u2581sat", "<s>"]

    def spm_decode(ids: list[int]) -> str:  # sentencepiece drops the first piece's word-start space
        text = "".join(pieces[i] for i in ids if pieces[i] != "<s>").replace("\u2581", " ")
        return text.removeprefix(" ")

    decoder = IncrementalDecoder(spm_decode, context=[4, 0])  # the prompt ended "<s> The"
    out = [decoder.feed(1), decoder.feed(2), decoder.feed(3), decoder.feed(4), decoder.flush()]
    assert out == [" cat", "s", " sat", "", ""]
    bare = IncrementalDecoder(spm_decode)  # no context: a first word-start space is lost, as in HF
    assert bare.feed(1) == "cat"


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_model_folder_hash_covers_config_and_safetensors_and_is_cached(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", b'{"a": 1}')
    _write(tmp_path / "b.safetensors", b"\x01" * 1000)
    _write(tmp_path / "a.safetensors", b"\x02" * 10)
    _write(tmp_path / "tokenizer.json", b"not hashed")
    expected = hashlib.sha256(b"gpunexus-model-folder/1\0")
    for name, data in (("config.json", b'{"a": 1}'), ("a.safetensors", b"\x02" * 10), ("b.safetensors", b"\x01" * 1000)):
        expected.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    first = model_folder_hash(tmp_path)
    assert first == expected.hexdigest()
    cached = json.loads((tmp_path / HASH_CACHE_NAME).read_text())
    assert cached["sha256"] == first
    # The cache is used while sizes and mtimes match ...
    cached["sha256"] = "f" * 64
    (tmp_path / HASH_CACHE_NAME).write_text(json.dumps(cached))
    assert model_folder_hash(tmp_path) == "f" * 64
    # ... and ignored once a file changes.
    _write(tmp_path / "a.safetensors", b"\x03" * 11)
    changed = model_folder_hash(tmp_path)
    assert changed not in (first, "f" * 64)
    _write(tmp_path / "tokenizer.json", b"still not hashed")
    assert model_folder_hash(tmp_path) == changed


def test_chat_template_renders_like_hugging_face() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    template = compile_chat_template(source)
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]
    text = template.render(messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert text == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no tools"):
        template.render(messages=[{"role": "tool", "content": "x"}], add_generation_prompt=True)


def test_fallback_chat_format_without_a_template() -> None:
    backend = object.__new__(ExLlamaV2Backend)
    backend._template = None
    text, bos = backend.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert (text, bos) == ("system: S\nuser: Hi\nassistant:", True)


# -- the decode loop, with the reference model standing in for exllamav2 ----------


class _ReferenceCache:
    """Stands in for an ExLlamaV2Cache: a reference-model session, reset with current_seq_len = 0."""

    def __init__(self, model) -> None:
        self._model = model
        self.session = model.new_session()
        self._length = 0

    @property
    def current_seq_len(self) -> int:
        return self._length

    @current_seq_len.setter
    def current_seq_len(self, value: int) -> None:
        if value == 0:
            self.session = self._model.new_session()
        self._length = value


def _stand_in_backend(slots: int = 1) -> ExLlamaV2Backend:
    """An ExLlamaV2Backend whose forward passes are the reference model's."""
    model, tok = load_reference()
    backend = object.__new__(ExLlamaV2Backend)
    backend.max_context = model.config.max_seq_len
    backend.stop_ids = tok.stop_ids
    backend._closed = False
    backend._caches = queue.SimpleQueue()
    for _ in range(slots):
        backend._caches.put(_ReferenceCache(model))
    backend._limiter = trio.CapacityLimiter(slots)
    backend.decode = tok.decode
    backend._prefill = lambda cache, ids, stop: cache.session.prefill(ids)

    def step(cache, token):
        out = cache.session.step(token)
        return out.logits, out.hidden

    backend._step = step
    backend.prompt_ids = lambda request: (tok.chat_prompt([{"role": m.role, "content": m.content} for m in request.messages]), 0)
    return backend


def test_decode_loop_matches_the_reference_generator() -> None:
    model, tok = load_reference()
    backend = _stand_in_backend()
    prompt = tok.chat_prompt([{"role": "user", "content": "héllo ✓ tell me a story"}])
    for params in (
        SamplingParams(max_tokens=40, seed=3),
        SamplingParams(max_tokens=25, temperature=0.7, top_p=0.9, top_k=20, seed=4),
        SamplingParams(max_tokens=30, temperature=0),
    ):
        ours = list(backend.generate_ids(prompt, params))
        theirs = list(generate(model, tok, prompt, params))
        assert [t.token_id for t in ours] == [t.token_id for t in theirs]
        assert "".join(t.text for t in ours) == "".join(t.text for t in theirs)
        assert ours[-1].finish_reason == theirs[-1].finish_reason
        for t in ours:  # replay every draw from the returned logits
            assert sample(t.logits, params, uniform(params.seed, t.index)) == (t.token_id, t.logprob)


def test_decode_loop_stop_strings_first_draw_and_window() -> None:
    model, tok = load_reference()
    backend = _stand_in_backend()
    prompt = tok.completion_prompt("Once upon a time")
    free = list(backend.generate_ids(prompt, SamplingParams(max_tokens=40, seed=9)))
    text = "".join(t.text for t in free)
    stop = text[6:8]
    assert len(stop) == 2
    cut = list(backend.generate_ids(prompt, SamplingParams(max_tokens=40, seed=9, stop=[stop])))
    assert "".join(t.text for t in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    # Failover: draws start after those the continuation used.
    later = list(backend.generate_ids(prompt, SamplingParams(max_tokens=5, seed=9), first_draw=7))
    assert [t.token_id for t in later] == [t.token_id for t in generate(model, tok, prompt, SamplingParams(max_tokens=5, seed=9), 7)]
    # The window bounds the output.
    backend.max_context = len(prompt) + 3
    short = list(backend.generate_ids(prompt, SamplingParams(max_tokens=40, temperature=0)))
    assert len(short) <= 3
    with pytest.raises(ValueError, match="context window"):
        list(backend.generate_ids(prompt + [0] * 3, SamplingParams()))


async def test_generate_streams_through_the_channel_and_returns_the_cache() -> None:
    backend = _stand_in_backend(slots=2)
    request = GenerationRequest("chat", (ChatMessage(role="user", content="hi"),), "", "", Sampling(temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=5), 12)
    send, receive = trio.open_memory_channel[Token](1000)
    results = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(lambda: _collect(backend, request, send, results))
    streamed = []
    while True:
        try:
            streamed.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert len(results) == 2 and results[0].completion_tokens == results[1].completion_tokens
    assert len(streamed) == results[0].completion_tokens * 2
    assert all(t.token_id is not None and t.logprob is not None for t in streamed)
    assert backend._caches.qsize() == 2
    # Every receipt carries an activation commitment over exactly the tokens generated.
    assert decode_commitment(results[0].commitment).n_tokens == results[0].completion_tokens


async def _collect(backend, request, send, results) -> None:
    results.append(await backend.generate(request, send))


async def test_generate_rejects_a_prompt_that_fills_the_window() -> None:
    backend = _stand_in_backend()
    backend.max_context = 3
    request = GenerationRequest("chat", (ChatMessage(role="user", content="a long enough prompt"),), "", "", Sampling(temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=5), 12)
    send, _ = trio.open_memory_channel[Token](100)
    with pytest.raises(BackendError) as caught:
        await backend.generate(request, send)
    assert caught.value.code == "bad_request"


async def _served_job(backend, request: GenerationRequest, **changes) -> AuditJob:
    """Serve ``request`` on ``backend`` and make the hub's signed job for what it delivered."""
    send, receive = trio.open_memory_channel[Token](1000)
    result = await backend.generate(request, send)
    ids = []
    while True:
        try:
            ids.append(receive.receive_nowait().token_id)
        except trio.WouldBlock:
            break
    opening = Opening("ab" * 16, request.kind, request.messages, request.prompt, request.continuation,
                      request.sampling, request.max_tokens, 0, tuple(ids), "")
    job = AuditJob("cd" * 16, HUB.peer_id, HUB.peer_id, 1, "m", "h" * 64, opening, result.prompt_tokens,
                   result.completion_tokens, result.finish_reason, result.commitment, 0.0, 60.0)
    return dataclasses.replace(job, **changes)


def _judged(job: AuditJob, report):
    return judge(tokens_in=job.tokens_in, tokens_out=job.tokens_out, output_tokens=len(job.opening.output_ids),
                 commitment=job.commitment, report=report)


async def test_prefill_as_a_peer_verifier_passes_what_it_serves_and_fails_another_seed() -> None:
    model, _ = load_reference()
    backend = _stand_in_backend()
    backend._vocab_size = model.config.vocab_size
    backend._limiter = trio.CapacityLimiter(1)
    backend.prefill_all = lambda ids: model.new_session().prefill_all(ids)
    request = GenerationRequest("chat", (ChatMessage(role="user", content="tell me a story"),), "", "",
                                Sampling(temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=5), 40)
    job = await _served_job(backend, request)
    report = await backend.prefill(job)
    assert report.engine == "exllamav2" and report.seed_replayed and report.replay_reasons == ()
    assert len(report.logprobs) == job.tokens_out and report.prompt_tokens == job.tokens_in
    assert _judged(job, report).passed
    reseeded = dataclasses.replace(job, opening=dataclasses.replace(
        job.opening, sampling=dataclasses.replace(job.opening.sampling, seed=6)))
    assert _judged(reseeded, await backend.prefill(reseeded)).codes == {"seed-replay"}
    with pytest.raises(BackendError, match="no token ids"):
        await backend.prefill(dataclasses.replace(job, opening=dataclasses.replace(job.opening, output_ids=())))


# -- on a CUDA GPU with exllamav2 -------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


VOCAB = 384
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 256, 2, 4, 2, 512


def _write_tiny_llama(folder: Path) -> None:
    """A random FP16 Llama (exllamav2 loads unquantized safetensors) with a byte-level BPE tokenizer.

    Ids 0-2 are <s>, </s>, <unk>; 3-258 the 256 bytes; the rest two-letter pieces
    (decodable, never produced by encoding) so that the vocabulary is a round size.
    """
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tokenizers = pytest.importorskip("tokenizers")
    byte_chars = _bytes_to_unicode()
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for b in range(256):
        vocab[byte_chars[b]] = 3 + b
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = (a + b for a in letters for b in letters)
    while len(vocab) < VOCAB:
        vocab[next(pairs)] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    }))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }))
    gen = torch.Generator().manual_seed(1234)
    head_dim = HIDDEN // HEADS

    def rand(*shape: int, scale: float = 0.05):
        return (torch.randn(*shape, generator=gen) * scale).half()

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=1.0), "model.norm.weight": torch.ones(HIDDEN).half(), "lm_head.weight": rand(VOCAB, HIDDEN, scale=0.2)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(HIDDEN).half(),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN).half(),
            p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
        }
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def gpu_backend(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("exllamav2", reason="exllamav2 is not installed (pip install 'gpunexus[exllamav2]')")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    folder = tmp_path_factory.mktemp("tiny-llama")
    _write_tiny_llama(folder)
    backend = ExLlamaV2Backend(str(folder), "tiny-llama", max_slots=2, max_seq_len=256)
    yield backend
    trio.run(backend.aclose)


def test_gpu_loads_and_describes_the_model(gpu_backend: ExLlamaV2Backend) -> None:
    assert gpu_backend.info.name == "tiny-llama"
    assert gpu_backend.info.max_context == 256
    assert len(gpu_backend.info.model_hash) == 64
    assert 1 in gpu_backend.stop_ids
    ids = gpu_backend._encode("héllo", bos=True, special=False)
    assert ids[0] == 0 and gpu_backend.decode(ids) == "héllo"


def test_gpu_generation_is_deterministic_and_replayable(gpu_backend: ExLlamaV2Backend) -> None:
    prompt = gpu_backend._encode("Once upon a time", bos=True, special=False)
    params = SamplingParams(max_tokens=24, seed=7)
    first = list(gpu_backend.generate_ids(prompt, params))
    again = list(gpu_backend.generate_ids(prompt, params))
    assert [t.token_id for t in first] == [t.token_id for t in again]
    assert "".join(t.text for t in first) == "".join(t.text for t in again)
    other = list(gpu_backend.generate_ids(prompt, dataclasses.replace(params, seed=8)))
    assert [t.token_id for t in other] != [t.token_id for t in first]
    for t in first:
        assert t.logits.dtype == np.float32 and t.logits.shape == (VOCAB,)
        assert sample(t.logits, params, uniform(params.seed, t.index)) == (t.token_id, t.logprob)
        if gpu_backend.returns_hidden:
            assert t.hidden.shape == (HIDDEN,)
    assert first[-1].finish_reason in ("length", "stop")
    if first[-1].finish_reason == "length":
        assert len(first) == 24
    else:
        assert first[-1].token_id in gpu_backend.stop_ids
    # Teacher-forced replay: one forward pass over prompt + output gives the same draws.
    torch = gpu_backend._torch
    ids = torch.tensor([prompt + [t.token_id for t in first[:-1]]], dtype=torch.long)
    logits = gpu_backend._model.forward(ids)[0, :, :VOCAB].float().cpu().numpy()
    agree = [sample(logits[len(prompt) - 1 + t.index], params, uniform(params.seed, t.index))[0] == t.token_id for t in first]
    assert sum(agree) >= 0.9 * len(agree)


def test_gpu_max_tokens_and_stop_strings(gpu_backend: ExLlamaV2Backend) -> None:
    prompt = gpu_backend._encode("The", bos=True, special=False)
    for seed in range(20):
        free = list(gpu_backend.generate_ids(prompt, SamplingParams(max_tokens=40, seed=seed)))
        text = "".join(t.text for t in free)
        if len(free) == 40 and len(text) >= 12 and "\ufffd" not in text[4:8]:
            break
    else:
        pytest.fail("no seed gave 40 tokens of text")
    stop = text[4:8]
    cut = list(gpu_backend.generate_ids(prompt, SamplingParams(max_tokens=40, seed=seed, stop=[stop])))
    assert "".join(t.text for t in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    assert len(list(gpu_backend.generate_ids(prompt, SamplingParams(max_tokens=3, seed=seed)))) == 3


async def test_gpu_generate_chat_through_the_interface(gpu_backend: ExLlamaV2Backend) -> None:
    request = GenerationRequest("chat", (ChatMessage(role="user", content="hi ✓"),), "", "", Sampling(temperature=1.0, top_p=0.9, top_k=50, stop=(), seed=3), 16)
    prompt, first_draw = gpu_backend.prompt_ids(request)
    assert first_draw == 0 and prompt[0] == 0 and gpu_backend.decode(prompt) == "user: hi ✓\nassistant:"
    send, receive = trio.open_memory_channel[Token](100)
    result = await gpu_backend.generate(request, send)
    streamed = []
    while True:
        try:
            streamed.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert result.prompt_tokens == len(prompt) and result.completion_tokens == len(streamed) <= 16
    continued = dataclasses.replace(request, continuation="".join(t.text for t in streamed[:4]))
    prompt2, draws = gpu_backend.prompt_ids(continued)
    assert prompt2[: len(prompt)] == prompt and draws == len(prompt2) - len(prompt)
    assert gpu_backend.measure_tokens_per_s(16) > 0


def test_gpu_stop_event_ends_generation(gpu_backend: ExLlamaV2Backend) -> None:
    stop = threading.Event()
    prompt = gpu_backend._encode("x", bos=True, special=False)
    stream = gpu_backend.generate_ids(prompt, SamplingParams(max_tokens=100, seed=1), stop=stop)
    next(stream)
    stop.set()
    assert len(list(stream)) <= 1


async def test_gpu_prefill_commitment_and_replay_as_a_peer_verifier(gpu_backend: ExLlamaV2Backend) -> None:
    """The GPU's one cache-less forward pass against its own token-by-token decode: the same draws and,
    where exllamav2 returns hidden states, a commitment the hub's comparison accepts."""
    request = GenerationRequest("completion", (), "Once upon a time", "", Sampling(temperature=1.0, top_p=1.0, top_k=0,
                                                                                   stop=(), seed=9), 48)
    job = await _served_job(gpu_backend, request)
    report = await gpu_backend.prefill(job)
    assert report.replay_reasons == () and len(report.logprobs) == job.tokens_out
    if gpu_backend.returns_hidden:
        assert decode_commitment(report.commitment).n_tokens == job.tokens_out
    verdict = _judged(job, report)
    assert verdict.passed, verdict.reasons
    reseeded = dataclasses.replace(job, opening=dataclasses.replace(
        job.opening, sampling=dataclasses.replace(job.opening.sampling, seed=10)))
    assert "seed-replay" in _judged(reseeded, await gpu_backend.prefill(reseeded)).codes
