"""The GPU backend: an EXL2 (or plain FP16) model run with exllamav2.

Installed with the ``gpunexus[exllamav2]`` extra (exllamav2 0.2/0.3 and a CUDA
build of torch); nothing here imports either until a backend is constructed,
so the rest of the node runs without them.

exllamav2 only computes: the decode loop is ours, so that every token is drawn
with the project's seeded sampler (:mod:`gpunexus.verify.sampler`) and a
verifier can replay each draw from the same logits. Per request:

1. the prompt (chat template applied) is prefilled into a KV cache with
   ``model.forward(ids[:-1], cache, preprocess_only=True)``;
2. each step feeds one token, ``model.forward(last, cache, last_id_only=True)``,
   takes the logits of that position to numpy float32 (cut to the config's
   ``vocab_size``, dropping the head's padding) and draws with
   ``sample(logits, params, uniform(seed, first_draw + index))``;
3. it stops on an end token (the tokenizer's EOS, every ``eos_token_id`` of
   ``generation_config.json``), a stop string (text that could begin one is held
   back, with :class:`gpunexus.verify.generate._StopStringFilter`), ``max_tokens``
   or the context window, exactly as :func:`gpunexus.verify.generate.generate`
   decides them.

Where exllamav2's ``forward`` accepts ``return_last_state=True`` (0.0.x onward),
each generated token also carries the hidden state its logits came from: the
residual stream of the last position *before* the final norm (exllamav2 takes
it at the input of the norm module), float32, in ``GeneratedToken.hidden`` of
:meth:`ExLlamaV2Backend.generate_ids`; elsewhere ``hidden`` is empty.

As a peer verifier (``prefill``) the backend runs one cache-less forward pass
over a job's prompt + delivered output and reports the seed replay of every
draw, the logprobs and its own commitment from the same hidden states.

Slots: one generation at a time per slot, ``max_slots`` slots (default 1),
each with its own FP16 KV cache of ``max_seq_len`` positions. exllamav2 keeps
per-device scratch buffers inside the model, so two forward passes must never
run at once: with several slots the generations take turns token by token
under one lock (fair interleaving, no batching; total throughput is about that
of one slot). More slots cost one cache each in VRAM.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import inspect
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from gpunexus.protocol.messages import AuditJob
from gpunexus.verify.commitment import CommitmentBuilder
from gpunexus.verify.generate import GeneratedToken, _drain, _StopStringFilter
from gpunexus.verify.peer import PrefillReport, prefill_report
from gpunexus.verify.sampler import SamplingParams, sample, uniform

from .base import BackendError, GenerationRequest, GenerationResult, ModelInfo, Token

__all__ = ["ExLlamaV2Backend", "IncrementalDecoder", "model_folder_hash"]

INSTALL_HINT = "exllamav2 is not installed: pip install 'gpunexus[exllamav2]'"
HASH_CACHE_NAME = ".gpunexus-hash"
_HASH_DOMAIN = b"gpunexus-model-folder/1\0"
_HASH_CHUNK = 8 * 1024 * 1024
# Prompt tokens the incremental decoder keeps as context, so that the first
# generated token's leading space (sentencepiece "\u2581") is not lost.
_DECODE_CONTEXT = 4


class ExLlamaV2Backend:
    """Serve an EXL2 model folder on the local CUDA GPU(s).

    ``max_seq_len`` caps the context (and the size of each slot's KV cache);
    by default it is the model's own (``max_position_embeddings`` and the like
    in ``config.json``). The model is spread over the visible GPUs with
    exllamav2's autosplit loader.
    """

    default_slots = 1

    def __init__(self, model_dir: str, public_name: str, *, max_slots: int = 1, max_seq_len: int | None = None) -> None:
        if max_slots < 1:
            raise BackendError(f"max_slots must be at least 1, got {max_slots}", code="internal", retryable=False)
        if max_seq_len is not None and max_seq_len < 2:
            raise BackendError(f"max_seq_len must be at least 2, got {max_seq_len}", code="internal", retryable=False)
        torch, exl = _import_exllamav2()
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise BackendError(f"{model_dir} is not a model folder (no config.json)", code="unknown_model", retryable=False)
        self._torch = torch
        try:
            config = exl.ExLlamaV2Config(str(folder))
            if max_seq_len is not None:
                config.max_seq_len = max_seq_len
            # Never more per forward pass than the window (load_autosplit also does this).
            config.max_input_len = min(config.max_input_len, config.max_seq_len)
            model = exl.ExLlamaV2(config)
            first = exl.ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
            model.load_autosplit(first)
            caches = [first] + [exl.ExLlamaV2Cache(model, max_seq_len=config.max_seq_len) for _ in range(max_slots - 1)]
            tokenizer = exl.ExLlamaV2Tokenizer(config)
        except BackendError:
            raise
        except Exception as exc:  # exllamav2 raises assertions, ValueError, RuntimeError, CUDA OOM...
            raise BackendError(f"exllamav2 could not load {model_dir}: {type(exc).__name__}: {exc}", code="internal", retryable=False) from exc
        self._config, self._model, self._tokenizer = config, model, tokenizer
        self.max_context = int(config.max_seq_len)
        self._vocab_size = int(config.vocab_size)
        self._forward_args = set(inspect.signature(model.forward).parameters)
        self.returns_hidden = "return_last_state" in self._forward_args
        self.stop_ids = _stop_token_ids(config, tokenizer)
        self._template = _load_chat_template(folder, tokenizer)
        self._special = _special_tokens(tokenizer)
        self._caches: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for cache in caches:
            self._caches.put(cache)
        self._gpu = threading.Lock()  # one forward pass at a time (shared scratch buffers)
        self._limiter = trio.CapacityLimiter(max_slots)
        self._closed = False
        self.info = ModelInfo(
            name=public_name,
            model_hash=model_folder_hash(folder),
            max_context=self.max_context,
            license="unspecified (see the model card; set it with --license)",
        )

    # -- prompts ------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        """The chat prompt as text, and whether a BOS token must be prepended.

        The model's own template is used where it has one: ``chat_template``
        in ``tokenizer_config.json`` (a string, or a list of named templates
        of which "default" is taken), else a ``chat_template.jinja`` or
        ``chat_template.json`` file, rendered like Hugging Face's
        ``apply_chat_template(..., add_generation_prompt=True)`` (sandboxed
        jinja2, ``trim_blocks``/``lstrip_blocks``, ``bos_token``/``eos_token``
        variables, ``raise_exception``); such templates write their own BOS.

        Without one, a plain fallback, meant for base models::

            <BOS>system: {content}
            user: {content}
            assistant: {content}
            assistant:

        one ``{role}: {content}`` line per message, then ``assistant:`` for
        the reply. No stop string is implied; a caller that wants the model to
        stop before inventing the next turn passes ``stop=["\\nuser:"]``.
        """
        if self._template is None:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join([*lines, "assistant:"]), True
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True, **self._special), False
        except Exception as exc:  # jinja2.TemplateError, raise_exception() in the template
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from None

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Prompt token ids (continuation included) and how many the continuation took.

        The continuation (failover: assistant text another host already
        delivered) is taken as its token ids when the order carries them;
        otherwise it is encoded together with the prompt text, so that a
        sentencepiece tokenizer does not add a word-start space in front of
        it; it counts as the tokens by which the joint encoding is longer
        than the prompt's alone.
        """
        if request.kind == "chat":
            text, bos = self.render_chat([{"role": m.role, "content": m.content} for m in request.messages])
            special = self._template is not None
        else:
            text, bos, special = request.prompt, True, False
        base = self._encode(text, bos=bos, special=special)
        if request.continuation_ids:  # the ids a host of this model already delivered: exact
            return base + list(request.continuation_ids), len(request.continuation_ids)
        if not request.continuation:
            return base, 0
        full = self._encode(text + request.continuation, bos=bos, special=special)
        return full, max(len(full) - len(base), 0)

    def _encode(self, text: str, *, bos: bool, special: bool) -> list[int]:
        ids = self._tokenizer.encode(text, add_bos=False, encode_special_tokens=special)[0].tolist() if text else []
        if bos and self._tokenizer.bos_token_id is not None:
            ids.insert(0, int(self._tokenizer.bos_token_id))
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out (as shown to a client)."""
        if not ids:
            return ""
        return self._tokenizer.decode(self._torch.tensor(list(ids), dtype=self._torch.long), decode_special_tokens=False)

    # -- decoding -----------------------------------------------------------

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        first_draw: int = 0,
        stop: threading.Event | None = None,
    ) -> Iterator[GeneratedToken]:
        """Generate from ``prompt_ids`` (blocking; run it in a worker thread).

        The same contract as :func:`gpunexus.verify.generate.generate`: one
        uniform draw per token starting at ``first_draw``, an end token is
        yielded and counted, a stop string and what follows is never shown,
        the last token has ``finish_reason`` set. Each token carries the
        float32 logits it was drawn from and, where exllamav2 returns it, the
        last hidden state (else an empty array). Setting ``stop`` ends the
        generation between tokens (and aborts a running prefill).
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        if len(prompt) >= self.max_context:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the context window of {self.max_context}")
        if self._closed:
            raise RuntimeError("the backend is closed")
        limit = min(params.max_tokens, self.max_context - len(prompt))
        cache = self._caches.get()
        try:
            cache.current_seq_len = 0
            if len(prompt) > 1:
                self._prefill(cache, prompt[:-1], stop)
                if stop is not None and stop.is_set():
                    return
            logits, hidden = self._step(cache, prompt[-1])
            decoder = IncrementalDecoder(self.decode, prompt[-_DECODE_CONTEXT:])
            held = _StopStringFilter(params.stop)
            for index in range(limit):
                token, logprob = sample(logits, params, uniform(params.seed, first_draw + index))
                if token in self.stop_ids:
                    text, _ = _drain(held, decoder)
                    finish: str | None = "stop"
                else:
                    text, stopped = held.push(decoder.feed(token))
                    finish = "stop" if stopped else None
                    if not stopped and index == limit - 1:
                        rest, stopped = _drain(held, decoder)
                        text += rest
                        finish = "stop" if stopped else "length"
                yield GeneratedToken(index, token, text, logprob, logits, hidden, finish)
                if finish is not None or (stop is not None and stop.is_set()):
                    return
                logits, hidden = self._step(cache, token)
        finally:
            cache.current_seq_len = 0
            self._caches.put(cache)

    def _prefill(self, cache: Any, ids: list[int], stop: threading.Event | None) -> None:
        kwargs: dict[str, Any] = {"preprocess_only": True}
        if stop is not None and "abort_event" in self._forward_args:
            kwargs["abort_event"] = stop
        with self._gpu:
            self._model.forward(self._ids_tensor(ids), cache, **kwargs)

    def _step(self, cache: Any, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token; the logits (and hidden state) of its position."""
        kwargs: dict[str, Any] = {"last_id_only": True}
        if self.returns_hidden:
            kwargs["return_last_state"] = True
        with self._gpu:
            out = self._model.forward(self._ids_tensor([token]), cache, **kwargs)
            logits, state = out if isinstance(out, tuple) else (out, None)
            row = logits[0, -1, : self._vocab_size].float().cpu().numpy()
            hidden = state[0, -1].float().cpu().numpy() if state is not None else np.empty(0, np.float32)
        return row, hidden

    def _ids_tensor(self, ids: list[int]) -> Any:
        # Shape (1, n) on the CPU: autosplit keeps the embedding table in system RAM.
        return self._torch.tensor([ids], dtype=self._torch.long)

    # -- the Backend interface ----------------------------------------------

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        try:
            prompt, first_draw = self.prompt_ids(request)
            s = request.sampling
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=request.max_tokens, stop=list(s.stop), seed=s.seed)
        except ValueError as exc:
            raise BackendError(str(exc), code="bad_request", retryable=False) from None
        if not prompt:
            raise BackendError("the prompt is empty", code="bad_request", retryable=False)
        if len(prompt) >= self.max_context:
            raise BackendError(f"prompt of {len(prompt)} tokens exceeds the context of {self.max_context}", code="bad_request", retryable=False)
        if self._closed:
            raise BackendError("the backend is shutting down", code="internal", retryable=True)
        stop = threading.Event()
        # The activation commitment (verify/commitment.py), built from each token's last
        # hidden state where this exllamav2 exposes it (``return_last_state``).
        builder: CommitmentBuilder | None = None

        def work() -> tuple[int, str]:
            nonlocal builder
            count, finish = 0, "length"
            with contextlib.closing(self.generate_ids(prompt, params, first_draw, stop)) as stream:
                for tok in stream:
                    if stop.is_set():
                        break
                    count += 1
                    if tok.hidden.size:
                        builder = builder or CommitmentBuilder(tok.hidden.shape[-1])
                        builder.add(tok.hidden)
                    trio.from_thread.run_sync(tokens.send_nowait, Token(tok.text, tok.token_id, tok.logprob))
                    if tok.finish_reason is not None:
                        finish = tok.finish_reason
            return count, finish

        try:
            count, finish = await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self._limiter)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock, trio.RunFinishedError):
            raise  # the consumer went away: not a model failure
        except (RuntimeError, AssertionError) as exc:  # CUDA errors, OOM: this host cannot serve it, another may
            raise BackendError(f"exllamav2 failed: {type(exc).__name__}: {exc}", code="internal", retryable=True) from exc
        finally:
            stop.set()
        commitment = builder.finish() if builder is not None else b""
        return GenerationResult(prompt_tokens=len(prompt), completion_tokens=count, finish_reason=finish, commitment=commitment)

    def prefill_all(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One cache-less forward pass over ``ids``: float32 logits (n, vocab) and, where exllamav2
        returns it, the last hidden state of every position (n, dim; else an empty array)."""
        if len(ids) > self._config.max_input_len:
            raise ValueError(f"{len(ids)} tokens exceed one forward pass of {self._config.max_input_len}")
        kwargs = {"return_last_state": True} if self.returns_hidden else {}
        with self._gpu:
            out = self._model.forward(self._ids_tensor(ids), **kwargs)
            logits, state = out if isinstance(out, tuple) else (out, None)
            rows = logits[0, :, : self._vocab_size].float().cpu().numpy()
            hidden = state[0].float().cpu().numpy() if state is not None else np.empty((0, 0), np.float32)
        return rows, hidden

    async def prefill(self, job: AuditJob) -> PrefillReport:
        """As a peer verifier: one forward pass over the job's prompt + delivered output on this GPU,
        the seed replay of every draw and this engine's own commitment (``verify.peer.prefill_report``)."""
        o = job.opening
        request = GenerationRequest(o.kind, o.messages, o.prompt, o.continuation, o.sampling, o.max_tokens,
                                    o.continuation_ids)
        try:
            prompt, first_draw = self.prompt_ids(request)
        except ValueError as exc:
            raise BackendError(str(exc), code="bad_request", retryable=False) from None
        output = [int(t) for t in o.output_ids]
        if not output or not all(0 <= t < self._vocab_size for t in output):
            raise BackendError("the job's output has no token ids of this model", code="bad_request", retryable=False)
        params = SamplingParams.from_sampling(o.sampling, o.max_tokens, o.sampling.seed)

        def work() -> PrefillReport:
            logits, hidden = self.prefill_all(prompt + output[:-1])
            return prefill_report(logits, hidden, len(prompt), output, params, first_draw, engine="exllamav2",
                                  host_commitment=job.commitment)

        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        except ValueError as exc:
            raise BackendError(str(exc), code="bad_request", retryable=False) from None

    def measure_tokens_per_s(self, tokens: int = 64) -> float:
        """Decode speed on this GPU, for the offer (a short greedy run, prefill excluded)."""
        params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=tokens, stop=[], seed=0)
        prompt = self._encode("Benchmark", bos=True, special=False)
        stream = self.generate_ids(prompt, params)
        with contextlib.closing(stream):
            if next(stream, None) is None:  # the first token pays for the prefill
                return 0.0
            start, n = time.perf_counter(), 0
            for _ in stream:
                n += 1
            elapsed = time.perf_counter() - start
        if n == 0 or elapsed <= 0:
            return 0.0
        return round(n / elapsed, 1)

    async def aclose(self) -> None:
        """Free the model and the caches (waits for running generations' current step)."""
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._unload)

    def _unload(self) -> None:
        with self._gpu:
            with contextlib.suppress(Exception):
                self._model.unload()
            self._caches = queue.SimpleQueue()
            with contextlib.suppress(Exception):
                self._torch.cuda.empty_cache()


class IncrementalDecoder:
    """Turn token ids into text as they arrive, whole characters only.

    Byte-level BPE and sentencepiece byte-fallback tokens can split one
    character across tokens, and a sentencepiece piece's text depends on what
    precedes it (the word-start "\u2581" becomes a space except at the start
    of a decode). So each token is not decoded alone: the decoder keeps a
    short window of ids, decodes it with and without the new ones and emits
    the difference, and holds the text back while it ends in U+FFFD (an
    incomplete character). This is the prefix/read-offset scheme of vLLM's and
    Hugging Face's streaming detokenizers; ``context`` (a few prompt ids)
    gives the first generated token its left neighbour. Decoding the whole
    output each step would also be correct, but quadratic.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context)
        if self._ids and decode(self._ids).endswith("\ufffd"):
            self._ids = []  # context cut inside a character: no context rather than a wrong one
        self._prefix = 0
        self._read = len(self._ids)

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (after.endswith("\ufffd") or len(after) <= len(before)):
            return ""
        text = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return text


def model_folder_hash(folder: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a model folder's ``config.json`` and ``*.safetensors`` files.

    The files are taken in order: ``config.json``, then the safetensors files
    sorted by name; each contributes its name, its size (8 bytes big-endian)
    and its bytes, after a domain prefix, so that moving bytes between files
    changes the hash. Hashing tens of GB takes minutes, so the result is kept
    in ``.gpunexus-hash`` in the folder, keyed by every file's name, size and
    mtime, and recomputed only when one of them changes (a read-only folder
    just goes uncached).
    """
    root = Path(folder)
    names = ["config.json", *sorted(p.name for p in root.glob("*.safetensors") if p.is_file())]
    stats = []
    for name in names:
        st = (root / name).stat()
        stats.append([name, st.st_size, st.st_mtime_ns])
    key = {"version": 1, "files": stats}
    cache_path = root / HASH_CACHE_NAME
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached.get("key") == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hashlib.sha256(_HASH_DOMAIN)
    for name, size, _ in stats:
        digest.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "big"))
        with open(root / name, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    result = digest.hexdigest()
    with contextlib.suppress(OSError):
        tmp = cache_path.with_name(HASH_CACHE_NAME + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": result}), encoding="utf-8")
        os.replace(tmp, cache_path)
    return result


def _import_exllamav2() -> tuple[Any, Any]:
    """torch and exllamav2, or a BackendError that says what is missing.

    Presence is checked before importing anything, and CUDA before importing
    exllamav2, whose import may try to build its CUDA extension.
    """
    for name in ("exllamav2", "torch"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise BackendError(INSTALL_HINT, code="internal", retryable=False)
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} (torch failed to import: {exc})", code="internal", retryable=False) from exc
    if not torch.cuda.is_available():
        raise BackendError(
            "exllamav2 needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False): "
            "check the NVIDIA driver and that torch is a CUDA build",
            code="internal",
            retryable=False,
        )
    try:
        import exllamav2
    except ImportError as exc:
        raise BackendError(f"{INSTALL_HINT} (import failed: {exc})", code="internal", retryable=False) from exc
    except Exception as exc:  # its CUDA extension failed to build or load
        raise BackendError(f"exllamav2 failed to load: {type(exc).__name__}: {exc}", code="internal", retryable=False) from exc
    return torch, exllamav2


def _stop_token_ids(config: Any, tokenizer: Any) -> frozenset[int]:
    """End tokens: the tokenizer's and config's EOS and every one in generation_config.json."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
    generation = getattr(config, "generation_config", None) or {}
    extra = generation.get("eos_token_id") if isinstance(generation, dict) else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list):
        ids.update(i for i in extra if isinstance(i, int))
    return frozenset(ids)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    """bos_token, eos_token, ... as a chat template expects them (tokenizer_config first)."""
    config = getattr(tokenizer, "tokenizer_config_dict", None) or {}
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(config.get(name)) or getattr(tokenizer, name, None) or ""
        out[name] = text
    return out


def _load_chat_template(folder: Path, tokenizer: Any) -> Any | None:
    """The model's chat template as a compiled jinja2 template, or None."""
    source: Any = (getattr(tokenizer, "tokenizer_config_dict", None) or {}).get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str) and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(source, str) and (folder / "chat_template.json").is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            source = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(source, str) or not source.strip():
        return None
    return compile_chat_template(source)


def compile_chat_template(source: str) -> Any:
    """A Hugging Face style chat template, compiled in a jinja2 sandbox."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
