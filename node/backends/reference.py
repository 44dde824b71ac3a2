"""The reference backend: the numpy transformer from ``gpunexus.verify``.

It runs on any CPU, really computes every token, and samples with the
project's seeded sampler, so the hub's verifier can replay its output
exactly. Decoding runs in a worker thread (numpy releases the GIL in its
matrix kernels), one thread per request; the host's slots bound how many.

It offers what it honestly does (:data:`CAPABILITIES`): logprobs and up to
20 alternatives per token from its real logits, penalties, logit bias and
JSON mode in the seeded sampler (so audits replay them), ``n`` choices (each
its own order, seeded apart by the gateway) and embeddings from its hidden
states. It has no tool calling and no vision, and does not claim them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import trio

from gpunexus.protocol.messages import MAX_TOP_LOGPROBS, AuditJob, Capabilities, TokenDetail
from gpunexus.verify.commitment import CommitmentBuilder
from gpunexus.verify.embedding import embed
from gpunexus.verify.generate import GeneratedToken, generate
from gpunexus.verify.peer import PrefillReport, job_request, reference_prefill
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams, top_logprobs

from .base import BackendError, EmbeddingResult, GenerationRequest, GenerationResult, ModelInfo, Token

CAPABILITIES = Capabilities(json_mode=True, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS, max_n=16, penalties=True,
                            logit_bias=True, embeddings=True)


class ReferenceBackend:
    default_slots = 2
    """Two decodes at once keep a small CPU busy without starving the network loop."""

    def __init__(self, name: str = "tiny", *, public_name: str | None = None, dtype: type = np.float32) -> None:
        try:
            self.model, self.tokenizer = load_reference(name, dtype)
        except LookupError as exc:
            raise BackendError(str(exc), code="unknown_model", retryable=False) from None
        self.info = ModelInfo(
            name=public_name or name,
            model_hash=self.model.model_hash,
            max_context=self.model.config.max_seq_len,
            license="Apache-2.0 (gpunexus reference weights, generated from a seed)",
            capabilities=CAPABILITIES,
        )
        self._token_bytes = [bytes([i]) if i < 256 else b"" for i in range(self.model.config.vocab_size)]

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Prompt token ids (continuation included) and how many the continuation took."""
        if request.kind == "chat":
            ids = self.tokenizer.chat_prompt([{"role": m.role, "content": m.content} for m in request.messages])
        else:
            ids = self.tokenizer.completion_prompt(request.prompt)
        continued = list(request.continuation_ids) or self.tokenizer.encode(request.continuation)
        return ids + continued, len(continued)

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        try:
            prompt, first_draw = self.prompt_ids(request)
        except ValueError as exc:
            raise BackendError(str(exc), code="bad_request", retryable=False) from None
        if len(prompt) >= self.model.config.max_seq_len:
            raise BackendError(f"prompt of {len(prompt)} tokens exceeds the context of {self.model.config.max_seq_len}", code="bad_request", retryable=False)
        params = SamplingParams.from_sampling(request.sampling, request.max_tokens, request.sampling.seed)
        if params.logit_bias and params.logit_bias[-1][0] >= self.model.config.vocab_size:
            raise BackendError(f"logit_bias names token {params.logit_bias[-1][0]}; this model's vocabulary is 0..{self.model.config.vocab_size - 1}", code="bad_request", retryable=False)
        details = request.logprobs
        stop = threading.Event()

        # The activation commitment (verify/commitment.py) is built as tokens
        # are drawn, from the same hidden state each one is sampled from: one
        # top-k per block, so it costs next to nothing per token.
        builder = CommitmentBuilder(self.model.config.dim)

        def work() -> tuple[int, str]:
            count, finish = 0, "length"
            for tok in generate(self.model, self.tokenizer, prompt, params, first_draw):
                if stop.is_set():
                    break
                count += 1
                builder.add(tok.hidden)
                detail = self._detail(tok, request.top_logprobs) if details else None
                trio.from_thread.run_sync(tokens.send_nowait, Token(tok.text, tok.token_id, tok.logprob, detail=detail))
                if tok.finish_reason is not None:
                    finish = tok.finish_reason
            return count, finish

        try:
            count, finish = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        finally:
            stop.set()
        return GenerationResult(prompt_tokens=len(prompt), completion_tokens=count, finish_reason=finish, commitment=builder.finish())

    def _detail(self, tok: GeneratedToken, k: int) -> TokenDetail:
        """The token's bytes and its ``k`` likeliest alternatives, from the logits it was drawn from."""
        top = top_logprobs(tok.logits, k) if k else []
        names = self._token_bytes
        return TokenDetail(names[tok.token_id], tuple(names[t] for t, _ in top), tuple(lp for _, lp in top))

    async def embed(self, request: GenerationRequest) -> EmbeddingResult:
        """Mean-pooled, L2-normalised final hidden state of the input (``verify.embedding``)."""
        ids = self.tokenizer.completion_prompt(request.prompt)
        if len(ids) > self.model.config.max_seq_len:
            raise BackendError(f"input of {len(ids)} tokens exceeds the context of {self.model.config.max_seq_len}", code="bad_request", retryable=False)
        vector = await trio.to_thread.run_sync(embed, self.model, ids, abandon_on_cancel=True)
        return EmbeddingResult(prompt_tokens=len(ids), vector=vector.tobytes())

    async def prefill(self, job: AuditJob) -> PrefillReport:
        """As a peer verifier: one ``prefill_all`` of the job's prompt + output (``verify.peer.reference_prefill``)."""
        engine = f"reference-{np.dtype(self.model.dtype).name}"
        return await trio.to_thread.run_sync(
            lambda: reference_prefill(self.model, self.tokenizer, job_request(job), engine=engine), abandon_on_cancel=True)

    def measure_tokens_per_s(self, tokens: int = 64) -> float:
        """Decode speed on this machine, for the offer (a short greedy run)."""
        params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=tokens, stop=[], seed=0)
        start = time.perf_counter()
        n = sum(1 for _ in generate(self.model, self.tokenizer, self.tokenizer.completion_prompt("Benchmark"), params))
        return round(n / (time.perf_counter() - start), 1)

    async def aclose(self) -> None:
        return None
