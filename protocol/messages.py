"""The messages gpunexus peers exchange, with their value checks.

Discovery (gossipsub ``gpunexus/offers/2/<model>/<shard>``, :mod:`.discovery`): :class:`Offer`, :class:`Withdraw`.
Market (gossipsub ``gpunexus/prices/1``): :class:`PriceUpdate`.
Inference (stream ``/gpunexus/infer/1``): the gateway sends one
:class:`Order`; the host answers with :class:`Chunk` frames and ends with a
host-signed :class:`Receipt`, or with an :class:`Error`.
Settlement (gateway <-> hub over HTTP): :class:`Allowance`, countersigned
:class:`Receipt`. Audits (gateway <-> hub over HTTP): :class:`Opening`,
:class:`HostReputation`, :class:`Revocation`. Peer verification (verifier <-> hub over
HTTP): :class:`AuditJob` (hub-signed), :class:`VerifierResult` (verifier-signed).
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar

import msgpack

from .codec import Message, message
from .errors import ProtocolError
from .ids import public_key_from_peer_id
from .limits import (
    MAX_ADDRS,
    MAX_CHUNK_TOKENS,
    MAX_COMMITMENT_BYTES,
    MAX_FRAME_BYTES,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
)

PRICES_TOPIC = "gpunexus/prices/1"
INFER_PROTOCOL = "/gpunexus/infer/1"

FINISH_REASONS = ("stop", "length", "tool_calls")
ORDER_KINDS = ("chat", "completion", "embedding")
MAX_EMBEDDING_DIMS = 65_536
ROLES = ("system", "user", "assistant", "developer", "tool")


def _require(cond: bool, text: str) -> None:
    if not cond:
        raise ProtocolError(text)


def _peer(value: str, what: str) -> None:
    public_key_from_peer_id(value) if value else _require(False, f"{what} is empty")


def _token_ids_ok(ids: tuple[int, ...]) -> bool:
    return len(ids) <= MAX_TOKENS and all(0 <= t < 2**32 for t in ids)


UPSTREAM_FIELDS = frozenset({"messages", "tools", "tool_choice", "parallel_tool_calls", "response_format"})
"""What ``Order.upstream`` may carry: the fields only the engine behind a pass-through host understands."""


def canonical_json(value: object) -> bytes:
    """Sorted keys, no spaces, UTF-8: equal values give equal bytes on every peer."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def upstream_bytes(fields: dict) -> bytes:
    """``Order.upstream`` for ``fields`` (empty when there are none): canonical, so equal fields sign alike."""
    return canonical_json(fields) if fields else b""


def _json_array(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), list)
    except (ValueError, UnicodeDecodeError):
        return False


def _check_upstream(raw: bytes) -> None:
    _require(len(raw) <= MAX_FRAME_BYTES, "order.upstream too long")
    try:
        fields = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("order.upstream is not JSON") from None
    _require(isinstance(fields, dict) and fields and set(fields) <= UPSTREAM_FIELDS,
             f"order.upstream must be an object of some of {sorted(UPSTREAM_FIELDS)}")


def _prompt_hash(kind: str, messages: tuple[ChatMessage, ...], prompt: str, continuation: str, continuation_ids: tuple[int, ...],
                 upstream: bytes = b"") -> bytes:
    body = [kind, [m.to_wire() for m in messages], prompt, continuation, list(continuation_ids)]
    if upstream:  # appended only when present, so the hashes of plain-text orders are unchanged
        body.append(upstream)
    return hashlib.sha256(msgpack.packb(body, use_bin_type=True)).digest()


def _name(value: str, what: str) -> None:
    _require(0 < len(value) <= MAX_NAME_CHARS, f"{what} must be 1..{MAX_NAME_CHARS} characters")


MAX_ALLOWANCE_BYTES = 20_000
"""An encoded :class:`Allowance` refusing :data:`MAX_REFUSED_MODELS` models of the longest names fits."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's own bound on ``top_logprobs``."""
MAX_CHOICES = 128
"""OpenAI's own bound on ``n``."""


@message
class Capabilities(Message):
    """What a host's backend does beyond plain text, announced (signed) in each offer.

    Gateways route a request only to hosts whose offers have what it asks
    for; a field is true only where the backend really does it (the
    reference model, for one, has no tools and no vision). The context
    length is the offer's own ``max_context``, not repeated here.
    ``top_logprobs`` is the most alternatives per token it reports (0: the
    sampled token's logprob only); ``max_n`` the most choices it serves for
    one request.
    """

    TYPE: ClassVar[str] = "capabilities"

    tools: bool = False
    json_mode: bool = False
    """``response_format: {"type": "json_object"}``: the output always parses as a JSON object."""
    json_schema: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    max_n: int = 1
    penalties: bool = False
    """``presence_penalty`` and ``frequency_penalty``."""
    logit_bias: bool = False
    vision: bool = False
    embeddings: bool = False

    def check(self) -> None:
        _require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"capabilities.top_logprobs must be 0..{MAX_TOP_LOGPROBS}")
        _require(1 <= self.max_n <= MAX_CHOICES, f"capabilities.max_n must be 1..{MAX_CHOICES}")
        _require(self.logprobs or not self.top_logprobs, "capabilities.top_logprobs needs logprobs")


PLAIN_TEXT = Capabilities()
"""A backend that generates text and nothing more."""


@message
class Offer(Message):
    """A host's signed, expiring announcement of one model it serves.

    ``capabilities`` is part of what the host signs: a gateway trusts a
    capability as far as it trusts the price.
    """

    TYPE: ClassVar[str] = "offer"
    SIGNATURES: ClassVar = (("sig", "peer_id"),)

    peer_id: str
    model: str
    model_hash: str
    price_micro_per_mtok: int
    tokens_per_s: float
    free_slots: int
    max_slots: int
    max_context: int
    region: str
    license: str
    follows_market: bool
    """The host asks the hub's market price: its price is no floor for the market."""
    addrs: tuple[str, ...]
    seq: int
    issued_at: float
    expires_at: float
    capabilities: Capabilities = PLAIN_TEXT
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.peer_id, "offer.peer_id")
        _name(self.model, "offer.model")
        _require(len(self.model_hash) <= 128, "offer.model_hash too long")
        _require(self.price_micro_per_mtok >= 0, "offer.price must be >= 0")
        _require(self.tokens_per_s >= 0, "offer.tokens_per_s must be >= 0")
        _require(0 <= self.free_slots <= self.max_slots <= 100_000, "offer slots out of range")
        _require(0 < self.max_context <= 10_000_000, "offer.max_context out of range")
        _require(len(self.region) <= 64 and len(self.license) <= 256, "offer region/license too long")
        _require(len(self.addrs) <= MAX_ADDRS and all(len(a) <= 512 for a in self.addrs), "offer.addrs too long")
        _require(self.expires_at > self.issued_at, "offer expires before it is issued")


@message
class Withdraw(Message):
    """A host's signed notice that it stops serving (all its offers)."""

    TYPE: ClassVar[str] = "withdraw"
    SIGNATURES: ClassVar = (("sig", "peer_id"),)

    peer_id: str
    seq: int
    issued_at: float
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.peer_id, "withdraw.peer_id")


@message
class PriceUpdate(Message):
    """The hub's signed market price for one model at one epoch."""

    TYPE: ClassVar[str] = "price"
    SIGNATURES: ClassVar = (("sig", "hub_id"),)

    hub_id: str
    model: str
    epoch: int
    price_micro_per_mtok: int
    demand_tps: float
    supply_tps: float
    issued_at: float
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.hub_id, "price.hub_id")
        _name(self.model, "price.model")
        _require(self.epoch >= 0 and self.price_micro_per_mtok >= 0, "price fields out of range")


@message
class ChatMessage(Message):
    """One chat turn, already flattened to text by the gateway."""

    TYPE: ClassVar[str] = "msg"

    role: str
    content: str

    def check(self) -> None:
        _require(self.role in ROLES, f"unknown role {self.role[:20]!r}")
        _require(len(self.content) <= MAX_PROMPT_CHARS, "message content too long")


@message
class LogitBias(Message):
    """One ``logit_bias`` entry: added to the token's logit before every draw."""

    TYPE: ClassVar[str] = "logit_bias"

    token: int
    bias: float

    def check(self) -> None:
        _require(0 <= self.token < 2**32, "logit_bias.token out of range")
        _require(-100.0 <= self.bias <= 100.0, "logit_bias.bias must be in [-100, 100]")


@message
class Sampling(Message):
    """Sampling parameters; ``seed`` makes every draw replayable by a verifier.

    The penalties, ``logit_bias`` and ``json_mode`` shape the logits before
    each draw (``verify.shaping``); they travel here, in the opening a
    verifier gets, so an audit replays them too.
    """

    TYPE: ClassVar[str] = "sampling"

    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[LogitBias, ...] = ()
    json_mode: bool = False
    """``response_format: {"type": "json_object"}``: constrained decoding to a JSON object."""

    def check(self) -> None:
        _require(-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0, "penalties must be in [-2, 2]")
        _require(len(self.logit_bias) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        _require(0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]")
        _require(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _require(0 <= self.top_k <= 1_000_000, "top_k must be >= 0")
        _require(len(self.stop) <= MAX_STOP_SEQUENCES, f"at most {MAX_STOP_SEQUENCES} stop sequences")
        _require(all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop), "stop sequences must be 1..256 characters")
        _require(0 <= self.seed < 2**63, "seed must be in [0, 2**63)")


@message
class Order(Message):
    """A gateway's signed request to a host: what to run, at what price, for whom.

    ``continuation`` is assistant text already delivered to the client by a
    host that failed mid-stream: the new host continues after it.
    ``logprobs`` asks for each token's bytes in the chunks and
    ``top_logprobs`` for that many alternatives per token (``TokenDetail``).
    An ``embedding`` order embeds ``prompt`` (one input; ``max_tokens`` is
    1 and unused) and is answered with one :class:`Embedding`.
    ``continuation_ids`` are the token ids of that text as the failed host
    produced them, when its backend exposes ids: a host of the same model
    continues from those ids rather than from re-tokenized text, because a
    delivered output need not survive a decode/encode round trip (a byte
    token that is not whole UTF-8 alone, a merge the tokenizer would make
    differently). Either way the sampler's draw index starts at the number
    of continued tokens, so the seed schedule is not reused.
    """

    TYPE: ClassVar[str] = "order"
    SIGNATURES: ClassVar = (("sig", "gateway_id"),)

    request_id: str
    gateway_id: str
    host_id: str
    model: str
    price_micro_per_mtok: int
    max_tokens: int
    kind: str
    messages: tuple[ChatMessage, ...]
    prompt: str
    continuation: str
    sampling: Sampling
    allowance: bytes
    issued_at: float
    continuation_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    upstream: bytes = b""
    """OpenAI fields a pass-through host (``--backend openai``) forwards to its
    engine as they are: canonical JSON (sorted keys, compact) of an object
    with some of :data:`UPSTREAM_FIELDS`. ``messages`` is there only when a
    message is more than text (image parts, tool calls, tool results); the
    flattened ``messages`` above still hold its text, for counts and audits.
    Empty for plain text. Covered by the prompt hash, so receipts bind it."""
    sig: bytes = b""

    def check(self) -> None:
        _require(len(self.request_id) == 32, "order.request_id must be 32 hex characters")
        _require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS and (self.logprobs or not self.top_logprobs), "order.top_logprobs out of range")
        if self.kind == "embedding":
            _require(not self.messages and not self.continuation and not self.continuation_ids, "an embedding order embeds its prompt only")
        _peer(self.gateway_id, "order.gateway_id")
        _peer(self.host_id, "order.host_id")
        _name(self.model, "order.model")
        _require(self.price_micro_per_mtok >= 0, "order.price must be >= 0")
        _require(1 <= self.max_tokens <= MAX_TOKENS, "order.max_tokens out of range")
        _require(self.kind in ORDER_KINDS, f"order.kind must be one of {ORDER_KINDS}")
        if self.kind == "chat":
            _require(0 < len(self.messages) <= MAX_MESSAGES, "a chat order needs 1..1024 messages")
        _require(len(self.prompt) <= MAX_PROMPT_CHARS, "order.prompt too long")
        _require(len(self.continuation) <= MAX_TEXT_CHARS, "order.continuation too long")
        _require(_token_ids_ok(self.continuation_ids), "order.continuation_ids out of range")
        _require(len(self.allowance) <= MAX_ALLOWANCE_BYTES, "order.allowance too long")
        if self.upstream:
            _require(self.kind != "embedding", "an embedding order carries no upstream fields")
            _check_upstream(self.upstream)

    def prompt_hash(self) -> bytes:
        """SHA-256 of exactly what the model is asked: kind, messages, prompt, continuation (text and ids), upstream fields."""
        return _prompt_hash(self.kind, self.messages, self.prompt, self.continuation, self.continuation_ids, self.upstream)

    def upstream_fields(self) -> dict:
        """``upstream`` decoded (``{}`` when empty); :meth:`check` made sure it is a JSON object of known fields."""
        return json.loads(self.upstream) if self.upstream else {}


@message
class TokenDetail(Message):
    """What ``logprobs`` asks about one generated token: its bytes and the likeliest alternatives.

    Bytes, not text: a token of a byte-level (or byte-fallback) vocabulary
    may be part of a character; OpenAI's ``bytes`` field carries them as is.
    """

    TYPE: ClassVar[str] = "token_detail"

    token: bytes
    top_tokens: tuple[bytes, ...]
    top_logprobs: tuple[float, ...]

    def check(self) -> None:
        _require(len(self.token) <= 256 and all(len(t) <= 256 for t in self.top_tokens), "token_detail token too long")
        _require(len(self.top_tokens) == len(self.top_logprobs) <= MAX_TOP_LOGPROBS, "token_detail alternatives out of range")


@message
class Chunk(Message):
    """Tokens that were ready together, coalesced into one frame.

    The host never waits to fill a chunk: the first token goes out alone, and
    later chunks carry whatever the backend produced while the previous frame
    was being written. ``token_ids`` and ``logprobs`` are empty when a
    backend does not expose them (an upstream OpenAI-compatible server);
    ``n_tokens`` always counts the tokens, so the gateway can check a
    receipt's ``tokens_out`` either way. ``details`` (one per token) only
    when the order asked for ``logprobs``.
    """

    TYPE: ClassVar[str] = "chunk"

    text: str
    n_tokens: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    details: tuple[TokenDetail, ...] = ()
    tool_calls: bytes = b""
    """Tool-call deltas of this chunk as the engine streamed them: a JSON array of
    OpenAI ``delta.tool_calls`` items (``index``, and ``id``, ``type``,
    ``function.name``/``arguments`` pieces). Empty when the chunk is text only."""

    def check(self) -> None:
        _require(not self.details or (len(self.details) == self.n_tokens == len(self.logprobs)), "chunk details do not match its tokens")
        if self.tool_calls:
            _require(len(self.tool_calls) <= MAX_TEXT_CHARS, "chunk tool calls too long")
            _require(_json_array(self.tool_calls), "chunk.tool_calls must be a JSON array")
        # A chunk of tool-call deltas alone (an id and a name, no argument text yet) may count no token.
        _require(0 < self.n_tokens <= MAX_CHUNK_TOKENS or (self.n_tokens == 0 and bool(self.tool_calls)), "chunk token count out of range")
        _require(not self.token_ids or len(self.token_ids) == self.n_tokens, "chunk token ids do not match its count")
        _require(len(self.text) <= MAX_TEXT_CHARS, "chunk text too long")
        # Logprobs come per token: with ids where the backend exposes them, else one per counted token (an upstream engine).
        _require(not self.logprobs or len(self.logprobs) == (len(self.token_ids) or self.n_tokens), "chunk logprobs do not match tokens")


@message
class Embedding(Message):
    """A host's answer to an ``embedding`` order: one vector, little-endian float32 bytes.

    Raw float32 is what OpenAI's ``encoding_format: "base64"`` (the SDK's
    default) carries, so the gateway base64-encodes it without a copy
    through floats.
    """

    TYPE: ClassVar[str] = "embedding"

    vector: bytes

    def check(self) -> None:
        _require(0 < len(self.vector) <= 4 * MAX_EMBEDDING_DIMS and len(self.vector) % 4 == 0, "embedding vector size out of range")


@message
class Receipt(Message):
    """What a request cost: signed by the host, countersigned by the gateway.

    The gateway countersigns only after checking the counts and the output
    hash against what it actually received, so a bill rests on both sides'
    word, never on the host's alone.
    """

    TYPE: ClassVar[str] = "receipt"
    SIGNATURES: ClassVar = (("host_sig", "host_id"), ("gateway_sig", "gateway_id"))

    request_id: str
    host_id: str
    gateway_id: str
    model: str
    model_hash: str
    price_micro_per_mtok: int
    tokens_in: int
    tokens_out: int
    cost_micro: int
    output_hash: bytes
    prompt_hash: bytes
    seed: int
    finish_reason: str
    commitment: bytes
    issued_at: float
    host_sig: bytes = b""
    gateway_sig: bytes = b""

    def check(self) -> None:
        _require(len(self.request_id) == 32, "receipt.request_id must be 32 hex characters")
        _peer(self.host_id, "receipt.host_id")
        _peer(self.gateway_id, "receipt.gateway_id")
        _name(self.model, "receipt.model")
        _require(min(self.price_micro_per_mtok, self.tokens_in, self.tokens_out, self.cost_micro) >= 0, "receipt amounts must be >= 0")
        _require(len(self.output_hash) == 32 and len(self.prompt_hash) == 32, "receipt hashes are 32 bytes")
        _require(self.finish_reason in FINISH_REASONS, "receipt.finish_reason unknown")
        _require(len(self.commitment) <= MAX_COMMITMENT_BYTES, "receipt.commitment too long")


MAX_REFUSED_MODELS = 64
"""Most models one allowance may refuse (it rides in every order: see ``Order.allowance``)."""


@message
class Allowance(Message):
    """A hub-signed budget a gateway may spend for one account until it expires.

    ``refused_models`` are the model ids this budget must not pay for: the
    operator switched them off, or their licence needs an acknowledgement
    the account has not given. The gateway refuses a request for one before
    any host works, and a host refuses an order for one (it would not be
    paid), so the hub's word binds without a round trip on the request path.
    """

    TYPE: ClassVar[str] = "allowance"
    SIGNATURES: ClassVar = (("sig", "hub_id"),)

    allowance_id: str
    hub_id: str
    account: str
    gateway_id: str
    budget_micro: int
    issued_at: float
    expires_at: float
    refused_models: tuple[str, ...] = ()
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.hub_id, "allowance.hub_id")
        _peer(self.gateway_id, "allowance.gateway_id")
        _require(self.budget_micro >= 0, "allowance.budget must be >= 0")
        _require(self.expires_at > self.issued_at, "allowance expires before it is issued")
        _require(len(self.refused_models) <= MAX_REFUSED_MODELS, f"allowance refuses more than {MAX_REFUSED_MODELS} models")
        for model in self.refused_models:
            _name(model, "allowance.refused_models entry")


@message
class Opening(Message):
    """What a gateway hands the hub to audit one settled receipt.

    The order's request as the host saw it (kind, messages, prompt,
    continuation, sampling, max_tokens; ``first_draw`` = tokens delivered by
    an earlier host before a failover) and the output the gateway received:
    token ids and text, exactly what ``OutputHasher`` covered, so the hub can
    check both against the receipt's ``output_hash`` and ``prompt_hash``.
    Unsigned: it is bound to the receipt by those two hashes.
    """

    TYPE: ClassVar[str] = "opening"

    request_id: str
    kind: str
    messages: tuple[ChatMessage, ...]
    prompt: str
    continuation: str
    sampling: Sampling
    max_tokens: int
    first_draw: int
    output_ids: tuple[int, ...]
    output_text: str
    continuation_ids: tuple[int, ...] = ()
    output_vector: bytes = b""
    """An embedding order's vector as delivered (float32 LE)."""
    upstream: bytes = b""
    """The order's ``upstream`` fields (tools, a schema, messages beyond text), part of its prompt hash."""
    output_tool_calls: bytes = b""
    """Every tool-call delta item as delivered, in order: a JSON array (empty: none)."""

    def check(self) -> None:
        _require(len(self.request_id) == 32, "opening.request_id must be 32 hex characters")
        if self.upstream:
            _check_upstream(self.upstream)
        if self.output_tool_calls:
            _require(len(self.output_tool_calls) <= MAX_TEXT_CHARS, "opening.output_tool_calls too long")
            _require(_json_array(self.output_tool_calls), "opening.output_tool_calls must be a JSON array")
        _require(self.kind in ORDER_KINDS, f"opening.kind must be one of {ORDER_KINDS}")
        _require(len(self.messages) <= MAX_MESSAGES, "opening has too many messages")
        _require(len(self.prompt) <= MAX_PROMPT_CHARS and len(self.continuation) <= MAX_TEXT_CHARS, "opening prompt too long")
        _require(1 <= self.max_tokens <= MAX_TOKENS and 0 <= self.first_draw <= MAX_TOKENS, "opening counts out of range")
        _require(_token_ids_ok(self.output_ids), "opening.output_ids out of range")
        _require(len(self.output_text) <= MAX_TEXT_CHARS, "opening.output_text too long")
        _require(_token_ids_ok(self.continuation_ids), "opening.continuation_ids out of range")
        _require(len(self.output_vector) <= 4 * MAX_EMBEDDING_DIMS and len(self.output_vector) % 4 == 0, "opening.output_vector size out of range")

    def prompt_hash(self) -> bytes:
        """The same hash as :meth:`Order.prompt_hash` of the order this opens."""
        return _prompt_hash(self.kind, self.messages, self.prompt, self.continuation, self.continuation_ids, self.upstream)

    def output_hash(self) -> bytes:
        """The :class:`OutputHasher` digest of the delivered output (chunking does not matter)."""
        hasher = OutputHasher()
        if self.output_ids or self.output_text:
            hasher.update(Chunk(self.output_text, max(1, len(self.output_ids)), self.output_ids, ()))
        if self.output_vector:
            hasher.update_vector(self.output_vector)
        if self.output_tool_calls:
            hasher.update_tool_calls(json.loads(self.output_tool_calls))
        return hasher.digest()


@message
class HostReputation(Message):
    """The hub's signed word on one host's audit record, for gateways' matching."""

    TYPE: ClassVar[str] = "reputation"
    SIGNATURES: ClassVar = (("sig", "hub_id"),)

    hub_id: str
    peer_id: str
    p_honest: float
    excluded: bool
    audits: int
    failures: int
    issued_at: float
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.hub_id, "reputation.hub_id")
        _peer(self.peer_id, "reputation.peer_id")
        _require(0.0 <= self.p_honest <= 1.0, "reputation.p_honest must be in [0, 1]")
        _require(0 <= self.failures <= self.audits, "reputation counts out of range")


@message
class Revocation(Message):
    """The hub's signed word that an API key was revoked at ``revoked_at``.

    Gateways hold a long poll open for these (``GET /v1/revocations``) and
    stop serving the key the moment one arrives. Work already served under
    the key's allowance still settles: the allowance, not the key, pays.
    """

    TYPE: ClassVar[str] = "revocation"
    SIGNATURES: ClassVar = (("sig", "hub_id"),)

    hub_id: str
    key_id: str
    account: str
    revoked_at: float
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.hub_id, "revocation.hub_id")
        _name(self.key_id, "revocation.key_id")
        _name(self.account, "revocation.account")


@message
class ReceiptRoot(Message):
    """A host's signed Merkle root of the receipts it signed in one audit period.

    ``root`` is ``verify.merkle.merkle_root`` over ``receipt_leaf(request_id,
    receipt bytes)`` of each receipt the host signed with ``issued_at`` in
    ``period`` (``floor(issued_at / audit_period_s)``), in issue order; the
    receipt bytes are the receipt as the host signed it (``gateway_sig``
    empty). The hub selects that period's audits with this root
    (``verify.selection``); a host that publishes none has every receipt of
    the period audited.
    """

    TYPE: ClassVar[str] = "receipt_root"
    SIGNATURES: ClassVar = (("sig", "host_id"),)

    host_id: str
    period: int
    count: int
    root: bytes
    issued_at: float
    sig: bytes = b""

    def check(self) -> None:
        _peer(self.host_id, "receipt_root.host_id")
        _require(self.period >= 0 and self.count >= 0, "receipt_root.period and count must be >= 0")
        _require(len(self.root) == 32, "receipt_root.root must be 32 bytes")


MAX_LOGPROB_TOKENS = 65_536
"""Most output tokens one verifier result scores (longer outputs are audited by the hub or not at all)."""
ENGINES_MAX_CHARS = 64


@message
class AuditJob(Message):
    """The hub's request to a peer verifier: replay the prefill of one delivered output.

    Signed by the hub, addressed to one verifier peer id, expiring. It holds
    what the host claimed (counts, finish reason, activation commitment) and
    the gateway's :class:`Opening` (the request and the delivered output),
    but never the host's identity or its signed receipt: a verifier cannot
    favour a host it knows, and a known-answer job (an altered opening the
    hub made itself) looks like any other. ``round`` is 1 for the first
    verifier of an audit, 2 for the one a failure draws, 3 for the one that
    breaks a tie between the first two.
    """

    TYPE: ClassVar[str] = "audit_job"
    SIGNATURES: ClassVar = (("sig", "hub_id"),)

    job_id: str
    hub_id: str
    verifier_id: str
    round: int
    model: str
    model_hash: str
    opening: Opening
    tokens_in: int
    tokens_out: int
    finish_reason: str
    commitment: bytes
    issued_at: float
    expires_at: float
    sig: bytes = b""

    def check(self) -> None:
        _require(len(self.job_id) == 32, "audit_job.job_id must be 32 hex characters")
        _peer(self.hub_id, "audit_job.hub_id")
        _peer(self.verifier_id, "audit_job.verifier_id")
        _require(self.round in (1, 2, 3), "audit_job.round must be 1, 2 or 3")
        _name(self.model, "audit_job.model")
        _require(0 < len(self.model_hash) <= MAX_NAME_CHARS, "audit_job.model_hash is empty or too long")
        _require(min(self.tokens_in, self.tokens_out) >= 0, "audit_job counts must be >= 0")
        _require(self.finish_reason in FINISH_REASONS, "audit_job.finish_reason unknown")
        _require(len(self.commitment) <= MAX_COMMITMENT_BYTES, "audit_job.commitment too long")
        _require(self.expires_at >= self.issued_at, "audit_job expires before it was issued")


@message
class VerifierResult(Message):
    """A peer verifier's answer to one :class:`AuditJob`, signed by the verifier's peer id.

    The numbers the hub judges by (``verify.peer.judge``), not a verdict:
    the prompt token count by the verifier's tokenizer, its own activation
    commitment over the output (empty for an engine without activations),
    each delivered token's logprob and rank (``verify.peer.RANK_UNKNOWN``
    beyond the ``top_k`` the engine lists), and, where the engine replays the
    seeded sampler, the reasons that replay found.
    """

    TYPE: ClassVar[str] = "verifier_result"
    SIGNATURES: ClassVar = (("sig", "verifier_id"),)

    job_id: str
    hub_id: str
    verifier_id: str
    model_hash: str
    engine: str
    prompt_tokens: int
    commitment: bytes
    logprobs: tuple[float, ...]
    ranks: tuple[int, ...]
    top_k: int
    seed_replayed: bool
    replay_reasons: tuple[str, ...]
    issued_at: float
    sig: bytes = b""

    def check(self) -> None:
        _require(len(self.job_id) == 32, "verifier_result.job_id must be 32 hex characters")
        _peer(self.hub_id, "verifier_result.hub_id")
        _peer(self.verifier_id, "verifier_result.verifier_id")
        _require(0 < len(self.engine) <= ENGINES_MAX_CHARS, "verifier_result.engine is empty or too long")
        _require(self.prompt_tokens >= 0 and 0 <= self.top_k <= 255, "verifier_result counts out of range")
        _require(len(self.commitment) <= MAX_COMMITMENT_BYTES, "verifier_result.commitment too long")
        _require(len(self.logprobs) <= MAX_LOGPROB_TOKENS and len(self.ranks) == len(self.logprobs),
                 "verifier_result needs one rank per logprob")
        _require(all(lp <= 1e-6 for lp in self.logprobs), "verifier_result.logprobs must be <= 0")
        _require(all(0 <= r <= 255 for r in self.ranks), "verifier_result.ranks must be 0..255")
        _require(len(self.replay_reasons) <= 16 and all(len(r) <= 1000 for r in self.replay_reasons),
                 "verifier_result.replay_reasons too long")


ERROR_CODES = ("busy", "bad_request", "unknown_model", "price", "payment", "internal", "protocol", "draining")


@message
class Error(Message):
    """A host's refusal or failure; ``retryable`` tells the gateway to try elsewhere."""

    TYPE: ClassVar[str] = "error"

    code: str
    message: str
    retryable: bool

    def check(self) -> None:
        _require(self.code in ERROR_CODES, f"unknown error code {self.code[:20]!r}")
        _require(len(self.message) <= 4096, "error message too long")


class OutputHasher:
    """Running SHA-256 of a response as delivered: its token ids and its text.

    Host and gateway feed it the same chunks, so a receipt's ``output_hash``
    proves both saw the same output; binding the text as well as the ids
    covers backends that expose no ids. An embedding's vector is bound the
    same way (and only then enters the digest, so text digests are unchanged).
    """

    def __init__(self) -> None:
        self._ids = hashlib.sha256(b"gpunexus/output-ids/1\n")
        self._text = hashlib.sha256(b"gpunexus/output-text/1\n")
        self._vectors: hashlib._Hash | None = None
        self._tools: hashlib._Hash | None = None
        self.tokens = 0

    def update(self, chunk: Chunk) -> None:
        self._ids.update(b"".join(t.to_bytes(4, "big") for t in chunk.token_ids))
        self._text.update(chunk.text.encode("utf-8", "surrogatepass"))
        if chunk.tool_calls:
            self.update_tool_calls(json.loads(chunk.tool_calls))
        self.tokens += chunk.n_tokens

    def update_tool_calls(self, deltas: list) -> None:
        """Bind tool-call deltas item by item (canonical JSON), so how they were chunked does not matter."""
        if self._tools is None:
            self._tools = hashlib.sha256(b"gpunexus/output-tool-calls/1\n")
        for item in deltas:
            raw = canonical_json(item)
            self._tools.update(len(raw).to_bytes(4, "big") + raw)

    def update_vector(self, vector: bytes) -> None:
        if self._vectors is None:
            self._vectors = hashlib.sha256(b"gpunexus/output-vectors/1\n")
        self._vectors.update(vector)

    def digest(self) -> bytes:
        vectors = self._vectors.digest() if self._vectors is not None else b""
        tools = self._tools.digest() if self._tools is not None else b""
        return hashlib.sha256(self._ids.digest() + self._text.digest() + vectors + tools).digest()


def host_registration_statement(hub_id: str, peer_id: str) -> bytes:
    """What a host's peer key signs to bind its peer id to its hub account.

    Naming the hub keeps one hub's proof from being replayed at another.
    """
    return f"gpunexus/host-register/1\n{hub_id}\n{peer_id}".encode()
