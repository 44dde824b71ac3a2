"""The one interface every inference backend implements.

A backend streams tokens into a trio channel as it produces them and returns
a :class:`GenerationResult` at the end. Pushing into a channel (rather than
yielding) lets the host's sender coalesce whatever tokens are ready into one
frame without ever delaying the first: the producer never waits for the
network, and the network never waits for a batch to fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from gpunexus.protocol.messages import PLAIN_TEXT, AuditJob, Capabilities, ChatMessage, Order, Sampling, TokenDetail
from gpunexus.verify.peer import PrefillReport


class BackendError(Exception):
    """The backend could not serve the request (bad input or upstream failure)."""

    def __init__(self, message: str, *, code: str = "internal", retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: str
    messages: tuple[ChatMessage, ...]
    prompt: str
    continuation: str
    sampling: Sampling
    max_tokens: int
    continuation_ids: tuple[int, ...] = ()
    """The continuation as token ids (see ``Order.continuation_ids``): a backend
    that knows the model's tokenizer continues from these, never from
    re-encoded text; one that does not (an upstream server) uses the text."""
    logprobs: bool = False
    """Give each token a ``detail`` (its bytes, and ``top_logprobs`` alternatives)."""
    top_logprobs: int = 0
    upstream: dict | None = None
    """``Order.upstream`` decoded: tools, tool choice, a JSON schema and messages
    beyond text, for a backend that forwards them to an engine; None: plain text."""

    @classmethod
    def from_order(cls, order: Order) -> GenerationRequest:
        return cls(order.kind, order.messages, order.prompt, order.continuation, order.sampling, order.max_tokens,
                   order.continuation_ids, order.logprobs, order.top_logprobs, order.upstream_fields() or None)


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token; ``token_id`` is None where the backend does not expose ids.

    ``count`` above one stands for several tokens the backend cannot show one
    by one: an upstream server that streams several tokens per event and
    reports the true total only in its final usage.
    """

    text: str
    token_id: int | None
    logprob: float | None
    count: int = 1
    detail: TokenDetail | None = None
    """Where the request asked for logprobs: the token's bytes and its likeliest alternatives."""
    tool_calls: tuple[dict, ...] = ()
    """Tool-call deltas the engine streamed with this token (OpenAI ``delta.tool_calls`` items)."""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    commitment: bytes = b""


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    prompt_tokens: int
    vector: bytes
    """Little-endian float32, as ``protocol.messages.Embedding`` carries it."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a host announces about the model a backend serves."""

    name: str
    model_hash: str
    max_context: int
    license: str
    capabilities: Capabilities = PLAIN_TEXT
    """What the backend really does beyond plain text; announced in every offer."""


class Backend(Protocol):
    info: ModelInfo

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        """Stream tokens into ``tokens`` (never blocking on it) and return the totals."""

    async def aclose(self) -> None:
        """Release what the backend holds (threads, HTTP clients, GPU memory)."""


class EmbeddingBackend(Backend, Protocol):
    """A backend whose capabilities include ``embeddings``."""

    async def embed(self, request: GenerationRequest) -> EmbeddingResult:
        """The embedding of ``request.prompt`` (an ``embedding`` order)."""


class VerifierBackend(Backend, Protocol):
    """A backend that can act as a peer verifier for its model (``node serve --verify``).

    One prefill of the job's prompt + delivered output on this engine, no new
    generation; the hub judges the numbers (``verify.peer.judge``).
    """

    async def prefill(self, job: AuditJob) -> PrefillReport:
        """The verifier's report on ``job`` (raises BackendError when the engine cannot score it)."""
