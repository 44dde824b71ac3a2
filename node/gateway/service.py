"""The gateway role: turn one OpenAI request into a stream from some host.

The relay picks hosts from the live offer book (ranking lives in
``gpunexus.pricing``), sends a signed :class:`Order`, forwards chunks as they
arrive and checks the host's receipt against what it actually received
before countersigning it. Failures are the gateway's problem, not the
client's:

* no first token within ``first_token_timeout``, a refusal, or a stream that
  breaks before any content: try the next host, invisibly;
* a host that announces it is full may be queueing the order: wait for it
  (up to ``queue_timeout``, see `_QueueWait`) instead; one that answered
  "busy" (its queue is full too) is asked again after the others;
* a host whose connection is gone leaves the candidate set at once, for
  every request, instead of when its offer expires;
* a host that dies mid-stream: continue on another host from the text
  already delivered (the order's ``continuation``, and its token ids where
  the host streamed them, so the continuation is exact), so the client's
  stream simply goes on; the dead host gets no receipt and is not paid;
* the hub's word on models first: a model the allowance refuses (switched
  off, licence not accepted) gets 403 naming why, before any host works;
* money first: each attempt reserves its worst-case cost from the
  allowance (:func:`worst_case_tokens`) before the order leaves, so a
  request the allowance cannot cover gets 402 before any host works;
* nothing left to try: a clean error (HTTP 503 before content, an SSE error
  event after), never a hang.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.peer.id import ID

from gpunexus.pricing.capabilities import Needs, lacking, unmet
from gpunexus.pricing.matching import Matcher, MatchPolicy
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.ids import new_request_id
from gpunexus.protocol.messages import (
    INFER_PROTOCOL,
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    Capabilities,
    Chunk,
    Embedding,
    Error,
    LogitBias,
    Offer,
    Opening,
    Order,
    OutputHasher,
    Receipt,
    Sampling,
    TokenDetail,
)
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.signing import Signer
from gpunexus.verify.registry import is_byte_level

from ..net.libp2p_compat import connection_shutting_down
from ..net.discovery import OfferTopics
from ..net.offers import OfferBook
from ..net.p2p import P2PNode
from ..net.prices import PriceBook
from ..net.session import MAX_BUFFERED_BYTES, Channel, ReaderTooSlow
from ..net.session_pool import SessionPool
from ..net.streams import StreamPool
from ..net.wire import FramedStream, PeerGone
from .catalogue import CatalogueView
from .openai_api import APIError, CompletionRequest, EmbeddingRequest
from .openai_shapes import Usage
from .settlement import Grant, Settlement, SettlementRefused

log = logging.getLogger(__name__)


@dataclass
class GatewayConfig:
    max_price_micro_per_mtok: int | None = None
    min_tokens_per_s: float | None = None
    open_timeout: float = 5.0
    """Dial + stream negotiation with one host."""
    first_token_timeout: float = 10.0
    """From order sent to first chunk: past it, the next host gets the request
    (unless the host says it is full and so may be queueing it: see `_QueueWait`)."""
    queue_timeout: float = 120.0
    """Longest wait for the first token from a host that keeps announcing it is full."""
    busy_retry_s: float = 3.0
    """How long to wait for a fresh offer (one heartbeat) before asking a host that answered "busy" again."""
    stall_timeout: float = 30.0
    """Longest silence mid-stream before the host is treated as dead."""
    max_attempts: int = 5
    """Hosts tried per request; "busy" answers after the first token do not count (see `complete`)."""
    price_poll_s: float = 15.0
    """How often a gateway with a hub fetches the hub's signed market prices."""
    sessions: bool = True
    """One ``/gpunexus/session/1`` stream per host for all requests to it (node/net/session.py) where the host speaks it;
    False: one stream per request, as gateways before sessions did."""
    follow_known: bool | None = None
    """Offer topics: follow every model the network is known to have (True), only those asked for (False), or every
    one while the hub's directory counts at most 256 hosts (None); see node/net/discovery.py."""
    light_gossip: bool = True
    """Run gossip as a light member (mesh degree 3/2/4): a gateway receives about 3 copies of each offer instead of 6;
    hosts keep the full degree and carry the topics."""
    reader_limit_bytes: int = MAX_BUFFERED_BYTES
    """How far (message bytes) one client may fall behind its stream on a session before the request is cut."""


@dataclass
class Delta:
    """Text that arrived together; with logprobs asked, each of its tokens' logprob and detail."""

    text: str
    logprobs: tuple[float, ...] = ()
    details: tuple[TokenDetail, ...] = ()
    tokens: int = 0
    tool_calls: tuple[dict, ...] = ()
    """Tool-call deltas as the host's engine streamed them (OpenAI ``delta.tool_calls`` items)."""


@dataclass
class Finish:
    finish_reason: str
    usage: Usage
    fingerprint: str | None = None
    vector: bytes = b""
    """An embedding request's vector (float32 LE)."""


@dataclass
class GatewayStats:
    requests: int = 0
    failovers: int = 0
    queue_waits: int = 0
    """First-token deadlines passed while the host announced it was full, and waited through."""
    receipts_rejected: int = 0
    receipts: list[Receipt] = field(default_factory=list)


Emit = Callable[[Delta], Awaitable[None]]
IndexedEmit = Callable[[int, Delta], Awaitable[None]]
"""Emit for one of ``n`` choices: its index, then its delta."""

EMBED_PARALLEL = 8
"""Inputs of one embeddings request in flight at once."""
FIRST_OFFER_WAIT_S = 4.0
"""Longest a request for a model just joined waits for its first offer: one small-model heartbeat and a margin."""


async def _ignore(delta: Delta) -> None:
    """An embedding order streams no text."""


def choice_request(request: CompletionRequest, index: int) -> CompletionRequest:
    """Choice ``index`` of an ``n``-choice request as a request of its own.

    With a client seed, choice 0 keeps it (n=1 and n=3 agree on the first
    choice) and the others get seeds derived from it and their index, so
    the same request gives the same choices; without one, each choice's
    seed derives from its own request id.
    """
    seed = request.seed
    if seed is not None and index:
        digest = hashlib.sha256(f"gpunexus/choice/1\n{seed}\n{index}".encode()).digest()
        seed = int.from_bytes(digest[:8], "big") % 2**63
    return dataclasses.replace(request, n=1, seed=seed)


class _HostFailed(Exception):
    """This host did not deliver; the relay moves on to the next one.

    ``busy``: it refused because its slots and queue are full; it is alive
    and may be asked again, after the others. ``unreachable``: the
    connection to it is gone (a failed dial, a connection closed under the
    stream), not just one stream.
    """

    def __init__(self, message: str, *, busy: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.busy = busy
        self.unreachable = unreachable


class _Outcome:
    __slots__ = ("text", "tokens", "receipt", "problems", "token_ids", "vector", "tool_calls")

    def __init__(self) -> None:
        self.text = ""
        self.tokens = 0
        self.tool_calls: list[dict] = []
        """Tool-call deltas that reached the client, in order: a stream of them cannot be continued elsewhere."""
        self.token_ids: list[int] = []
        self.receipt: Receipt | None = None
        self.problems: list[str] = []
        self.vector = b""


class GatewayService:
    def __init__(self, node: P2PNode, book: OfferBook, settlement: Settlement, config: GatewayConfig | None = None, *,
                 prices: PriceBook | None = None, topics: OfferTopics | None = None) -> None:
        self.node = node
        self.book = book
        self.topics = topics
        """The offer topics feeding ``book``: a model a client names is followed from its first request."""
        self.prices = prices or PriceBook()
        self.settlement = settlement
        self.config = config or GatewayConfig()
        self.matcher = Matcher()
        self.stats = GatewayStats()
        self.catalogue = CatalogueView()
        """The hub's catalogue (licences, availability) for ``/v1/models``; filled only with a hub."""
        self._pool: StreamPool | None = None
        self._sessions: SessionPool | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work: sessions with hosts, spare streams to hosts that predate sessions."""
        async with trio.open_nursery() as nursery:
            self._pool = StreamPool(self._open, nursery)
            if self.config.sessions:
                self._sessions = SessionPool(self._open_stream, nursery, max_buffered=self.config.reader_limit_bytes)
            task_status.started()
            await trio.sleep_forever()

    @property
    def open_sessions(self) -> int:
        """Hosts this gateway has a session with now."""
        return self._sessions.open_sessions if self._sessions is not None else 0

    def policy(self, needs: Needs | None = None) -> MatchPolicy:
        return MatchPolicy(self.config.max_price_micro_per_mtok, self.config.min_tokens_per_s, needs or Needs())

    async def discover(self, model: str) -> None:
        """Make sure ``model``'s offers are in the book if the network has it: join its topic on first use.

        A gateway in a big market follows only the models it is asked for;
        joining catches up from the hub at once, and with no hub waits at
        most one small-model heartbeat for the first offer.
        """
        if self.topics is None or self.book.for_model(model):
            return
        if not await self.topics.follow_if_known(model):
            return
        with trio.move_on_after(FIRST_OFFER_WAIT_S):
            while not self.book.for_model(model):
                await self.book.changed.wait()

    def check_serveable(self, model: str, needs: Needs) -> None:
        """APIError unless some live host serves ``model`` with every capability ``needs`` names.

        404 for a model no host serves; 400 naming what no host of the model
        offers, or what the order cannot carry to a host yet.
        """
        offers = self.book.for_model(model)
        if not offers:
            raise APIError(404, f"The model '{model}' does not exist or no host serves it right now.", param="model", code="model_not_found")
        if needs.plain:
            return
        missing = unmet((o.capabilities for o in offers), needs)
        if missing:
            raise APIError(400, f"No host offers {' and '.join(missing)} for model '{model}'.", param=_param_of(missing[0]), code="capability_not_offered")
        uncarried = lacking(CARRIED, needs)
        if uncarried:
            raise APIError(400, f"This gateway cannot pass {' and '.join(uncarried)} to hosts yet.", param=_param_of(uncarried[0]), code="unsupported_parameter")

    def detokenize(self, request: CompletionRequest) -> CompletionRequest:
        """A request whose prompts came as token ids, as text: exact where every host's tokenizer is known here.

        Orders carry text, and hosts encode it with their own tokenizer, so ids
        can only become text where that round trip is exact: the reference
        models' byte-level vocabulary (ids 0-255 are bytes). For any other
        host the ids would mean another text, so the answer is a 400.
        """
        if not request.prompt_ids:
            return request
        offers = self.book.for_model(request.model)
        if not offers:
            raise APIError(404, f"The model '{request.model}' does not exist or no host serves it right now.", param="model", code="model_not_found")
        if not all(is_byte_level(o.model_hash) for o in offers):
            raise APIError(400, f"'prompt' as token ids needs a tokenizer this gateway knows; the hosts of '{request.model}' "
                           "run one it does not: send text.", param="prompt", code="unsupported_parameter")
        texts = []
        for i, ids in enumerate(request.prompt_ids):
            if any(t > 255 for t in ids):
                raise APIError(400, f"'prompt[{i}]' holds special tokens (ids above 255); send them as text.", param="prompt")
            try:
                texts.append(bytes(ids).decode("utf-8"))
            except UnicodeDecodeError:
                raise APIError(400, f"'prompt[{i}]' is not UTF-8 text as token ids.", param="prompt") from None
        return dataclasses.replace(request, prompt=texts[0], batch=tuple(texts) if len(texts) > 1 else (), prompt_ids=())

    async def complete(self, request: CompletionRequest, bearer: str | None, emit: Emit) -> Finish:
        """Run one request to the end, emitting text as it arrives; APIError if it cannot start."""
        self.stats.requests += 1
        await self.discover(request.model)
        self.check_serveable(request.model, request.needs)
        try:
            grant = await self._authorize(bearer, request.model)
        except SettlementRefused as unpaid:
            raise _refusal_error(unpaid) from None
        request_id = new_request_id()
        seed = _seed(request, request_id)
        delivered_text = ""
        delivered_tokens = 0
        delivered_ids: list[int] | None = []  # None once a host streamed tokens without ids
        tried: set[str] = set()
        refused: set[str] = set()
        last_error = "no host serves this model within your price and speed limits"
        attempt = failures = 0
        busy_until: float | None = None  # set by the first "busy": how long waiting for a full market may last
        while failures < self.config.max_attempts:
            if busy_until is not None and trio.current_time() >= busy_until:
                break
            candidates = await self._candidates(request.model, request.needs, tried, refused)
            if not candidates:
                break
            offer = candidates[0]
            continuation_ids = tuple(delivered_ids) if delivered_ids else ()
            order = self._order(request, offer, request_id if attempt == 0 else new_request_id(), seed, delivered_text,
                                continuation_ids, request.max_tokens - delivered_tokens, grant)
            reserved = cost_micro(worst_case_tokens(order), order.price_micro_per_mtok)
            try:
                self.settlement.reserve(grant, reserved)
            except SettlementRefused as unpaid:
                if delivered_tokens:
                    raise _MidStreamExhausted(f"the rest of the response cannot be paid for: {unpaid.message}") from None
                raise _refusal_error(unpaid) from None
            outcome = _Outcome()
            try:
                await self._attempt(offer, order, outcome, emit)
            except _HostFailed as failure:
                last_error = str(failure)
                self._note_failure(offer, failure, tried, refused)
                attempt += 1
                if failure.busy and delivered_tokens:
                    # Mid-stream, every survivor alive but full: the client cannot retry a
                    # stream that has begun, so wait for a place as long as a queue would
                    # (queue_timeout), not max_attempts. Before content a quick 503 is
                    # better: the client's own retry policy takes over.
                    busy_until = busy_until if busy_until is not None else trio.current_time() + self.config.queue_timeout
                else:
                    failures += 1
                if outcome.tool_calls:
                    # A continuation carries text; half a tool call's arguments cannot be handed on.
                    raise _MidStreamExhausted(f"the host failed while streaming tool calls, which cannot be continued elsewhere: {failure}")
                delivered_text += outcome.text
                delivered_tokens += outcome.tokens
                if delivered_ids is not None and len(outcome.token_ids) == outcome.tokens:
                    delivered_ids.extend(outcome.token_ids)
                else:
                    delivered_ids = None
                if outcome.tokens:
                    self.stats.failovers += 1
                    log.warning("host %s failed mid-stream after %d tokens (%s); continuing elsewhere", offer.peer_id, outcome.tokens, failure)
                else:
                    log.info("host %s failed before content (%s); trying the next", offer.peer_id, failure)
                if delivered_tokens >= request.max_tokens:
                    return Finish("length", Usage(0, delivered_tokens))
                continue
            finally:
                # Released before the receipt is recorded, with no await between the
                # two: the receipt's actual cost takes the reservation's place.
                self.settlement.release(grant, reserved)
            self.matcher.report_success(offer.peer_id)
            receipt = outcome.receipt
            assert receipt is not None
            if outcome.problems:
                # The client got its text; the host gets no countersignature, so no pay.
                self.stats.receipts_rejected += 1
                log.warning("refusing to countersign receipt %s from %s: %s", receipt.request_id, offer.peer_id, "; ".join(outcome.problems))
            else:
                if receipt.cost_micro > reserved:
                    log.warning("receipt %s costs %d micro-USD, over the %d reserved for it", receipt.request_id, receipt.cost_micro, reserved)
                self._settle(receipt, grant, order, outcome, delivered_tokens)
            prompt_tokens = max(0, receipt.tokens_in - delivered_tokens) if delivered_tokens else receipt.tokens_in
            return Finish(receipt.finish_reason, Usage(prompt_tokens, delivered_tokens + outcome.tokens), receipt.model_hash[:32], outcome.vector)
        if delivered_tokens:
            raise _MidStreamExhausted(f"every host failed mid-response: {last_error}")
        raise APIError(503, f"No host available for '{request.model}': {last_error}.", type="server_error", code="no_host_available")

    async def complete_choices(self, request: CompletionRequest, bearer: str | None, emit: IndexedEmit) -> list[Finish]:
        """``n`` choices (per prompt of a batch), each its own order (own seed, host, receipt and audit), run side by side.

        Each choice is an independent seeded generation, so fanning it out
        keeps every receipt a single output the verifier replays as is, and a
        failed host costs one choice a failover, not the whole request. The
        first choice that cannot be served ends them all with its error.
        """
        if request.choices == 1:
            return [await self.complete(request, bearer, functools.partial(emit, 0))]
        await self.discover(request.model)
        self.check_serveable(request.model, request.needs)
        prompts = request.batch or (request.prompt,)
        finishes: list[Finish | None] = [None] * request.choices
        failure: APIError | None = None

        async def one(index: int) -> None:
            nonlocal failure
            prompt, j = divmod(index, request.n)
            single = dataclasses.replace(request, prompt=prompts[prompt], batch=())
            try:
                finishes[index] = await self.complete(choice_request(single, j), bearer, functools.partial(emit, index))
            except APIError as error:
                failure = failure or error
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for index in range(request.choices):
                nursery.start_soon(one, index)
        if failure is not None:
            raise failure
        return [f for f in finishes if f is not None]

    async def embed(self, request: EmbeddingRequest, bearer: str | None) -> list[Finish]:
        """One ``embedding`` order per input, ``EMBED_PARALLEL`` at a time; each Finish holds its vector."""
        needs = Needs(embeddings=True)
        await self.discover(request.model)
        self.check_serveable(request.model, needs)
        out: list[Finish | None] = [None] * len(request.inputs)
        failure: APIError | None = None
        limiter = trio.CapacityLimiter(EMBED_PARALLEL)

        async def one(index: int, text: str) -> None:
            nonlocal failure
            order = CompletionRequest("embedding", request.model, (), text, False, False, 1, 1.0, 1.0, 0, (), None,
                                      request.user, needs=needs)
            async with limiter:
                try:
                    out[index] = await self.complete(order, bearer, _ignore)
                except APIError as error:
                    failure = failure or error
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for index, text in enumerate(request.inputs):
                nursery.start_soon(one, index, text)
        if failure is not None:
            raise failure
        return [f for f in out if f is not None]

    def _rank(self, model: str, needs: Needs, tried: set[str], refused: set[str]) -> list[Offer]:
        # Hosts the hub's audits excluded (HubSettlement.excluded_host) get no traffic.
        excluded = getattr(self.settlement, "excluded_host", None)
        ranked = self.matcher.rank(self.book.for_model(model), model, self.policy(needs), time.monotonic(), excluded)
        # Stable: hosts that answered "busy" go last, in ranking order.
        return sorted((o for o in ranked if o.peer_id not in tried), key=lambda o: o.peer_id in refused)

    async def _candidates(self, model: str, needs: Needs, tried: set[str], refused: set[str]) -> list[Offer]:
        """A fresh ranking for the next attempt, without the hosts that failed this request.

        A host that answered "busy" (slots and queue full) is alive, so it
        stays a candidate, behind every other. When only such hosts are
        left, the best is asked again once its next offer arrives (at most
        ``busy_retry_s``), not at once: a full queue a millisecond ago is
        full now. ``max_attempts`` bounds the retries before content,
        ``queue_timeout`` those of a stream that has begun.
        """
        candidates = self._rank(model, needs, tried, refused)
        if candidates and candidates[0].peer_id in refused:
            first = candidates[0]
            with trio.move_on_after(self.config.busy_retry_s):
                while (current := self.book.get(first.peer_id, model)) is not None and current.seq == first.seq:
                    await self.book.changed.wait()
            candidates = self._rank(model, needs, tried, refused)
        return candidates

    def _note_failure(self, offer: Offer, failure: _HostFailed, tried: set[str], refused: set[str]) -> None:
        """What a failed attempt means for the rest of this request and for the next ones.

        A host whose queue wait ran out (``queue_timeout``) failed like any
        other: asking it again would put the order at the back of the same queue.
        """
        if failure.busy:
            refused.add(offer.peer_id)  # full, not broken: no back-off, asked again last
            return
        tried.add(offer.peer_id)
        self.matcher.report_failure(offer.peer_id, time.monotonic())
        if failure.unreachable:
            # Out of the candidate set for every request now, not when its offer
            # expires (its stale offer still promises free slots); a new offer brings it back.
            self.book.drop_host(offer.peer_id)
            if self._pool is not None:
                self._pool.forget(offer.peer_id)
            if self._sessions is not None:
                self._sessions.forget(offer.peer_id)

    def _connection_lost(self, framed: FramedStream | Channel, peer_id: str) -> bool:
        """Whether the connection under ``framed`` is gone, not just this one stream.

        yamux resets every stream of a dying connection before libp2p drops
        the connection, so ``is_connected`` can still say yes when the stream
        breaks; the muxer's shutdown flag is set first.
        """
        return connection_shutting_down(framed.stream) or not self.node.is_connected(peer_id)

    def _still_queued(self, offer: Offer, framed: FramedStream | Channel, wait: _QueueWait) -> bool:
        """Past a first-token deadline: wait one more for this host (see `_QueueWait`)?"""
        if self._connection_lost(framed, offer.peer_id) or not wait.keeps_waiting(self.book.get(offer.peer_id, offer.model), time.monotonic()):
            return False
        self.stats.queue_waits += 1
        return True

    def _order(self, request: CompletionRequest, offer: Offer, request_id: str, seed: int, continuation: str,
               continuation_ids: tuple[int, ...], max_tokens: int, grant: Grant) -> Order:
        return Order(
            request_id=request_id,
            gateway_id=self._signer(grant).peer_id,
            host_id=offer.peer_id,
            model=request.model,
            price_micro_per_mtok=offer.price_micro_per_mtok,
            max_tokens=max_tokens,
            kind=request.kind,
            messages=request.messages,
            prompt=request.prompt,
            continuation=continuation,
            continuation_ids=continuation_ids,
            sampling=Sampling(
                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, stop=request.stop, seed=seed,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                logit_bias=tuple(LogitBias(t, b) for t, b in request.logit_bias), json_mode=request.json_mode,
            ),
            allowance=grant.allowance,
            issued_at=time.time(),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            upstream=request.upstream,
        ).signed(self._signer(grant))

    async def _open(self, offer: Offer) -> FramedStream:
        return FramedStream(await self._open_stream(offer, [INFER_PROTOCOL]))

    async def _open_stream(self, offer: Offer, protocols: list[str]):
        """A libp2p stream to the offer's host, in the first of ``protocols`` it speaks."""
        peer = ID.from_base58(offer.peer_id)
        store = self.node.host.get_peerstore()
        addrs = []
        for text in offer.addrs:
            try:
                addrs.append(multiaddr.Multiaddr(text.split("/p2p/")[0]))
            except Exception:
                continue
        if addrs:
            store.add_addrs(peer, addrs, 600)
        if not self.node.is_connected(offer.peer_id):
            # A live offer says the host is up: a dial that failed while it was
            # down must not block this one (the matcher paces retries).
            self.node.allow_redial(offer.peer_id)
        with trio.fail_after(self.config.open_timeout):
            return await self.node.host.new_stream(peer, protocols)

    async def _send_order(self, offer: Offer, order: Order) -> tuple[FramedStream | Channel, bool]:
        """Send the order on the host's session, else on a spare stream if one works, else on a fresh one.

        Also says whether the request took its place in the spare streams'
        demand count (``StreamPool.take``): it is released when the request
        is over, or here if the order could not be sent.
        """
        sessions = self._sessions
        if sessions is not None and sessions.speaks_sessions(offer.peer_id):
            return await self._send_on_session(sessions, offer, order), False
        if self._pool is None:
            return await self._send_on_stream(offer, order, None), False
        spare = self._pool.take(offer)
        try:
            return await self._send_on_stream(offer, order, spare), True
        except BaseException:
            self._pool.release(offer)
            raise

    async def _send_on_stream(self, offer: Offer, order: Order, spare: FramedStream | None) -> FramedStream:
        if spare is not None:
            try:
                await spare.send(order)
                return spare
            except PeerGone:
                await spare.reset()
        try:
            framed = await self._open(offer)
        except Exception as exc:  # any dial failure (timeout included) means: next host
            raise _HostFailed(f"cannot open a stream: {type(exc).__name__}: {exc}", unreachable=True) from None
        try:
            await framed.send(order)
        except PeerGone as exc:
            raise _HostFailed(str(exc), unreachable=self._connection_lost(framed, offer.peer_id)) from None
        return framed

    async def _send_on_session(self, sessions: SessionPool, offer: Offer, order: Order) -> FramedStream | Channel:
        """The order on the host's session; a reused session found broken by this send is replaced once."""
        reused = sessions.has_session(offer.peer_id)
        while True:
            try:
                channel = await sessions.open(offer)
            except Exception as exc:  # any dial failure (timeout included) means: next host
                raise _HostFailed(f"cannot open a session: {type(exc).__name__}: {exc}", unreachable=True) from None
            try:
                await channel.send(order)
                return channel
            except PeerGone as exc:
                await channel.reset()
                if not reused:
                    raise _HostFailed(str(exc), unreachable=self._connection_lost(channel, offer.peer_id)) from None
                reused = False

    async def _attempt(self, offer: Offer, order: Order, outcome: _Outcome, emit: Emit) -> None:
        framed, pooled = await self._send_order(offer, order)
        hasher = OutputHasher()
        parts: list[str] = []
        queue = _QueueWait(offer, self.config.queue_timeout)
        try:
            deadline = self.config.first_token_timeout
            msg = None
            while True:
                if msg is None:
                    with trio.move_on_after(deadline) as waited:
                        msg = await framed.receive()
                    if waited.cancelled_caught:
                        if not outcome.tokens and self._still_queued(offer, framed, queue):
                            continue
                        raise _HostFailed("no first token in time" if not outcome.tokens else "stream stalled")
                    deadline = self.config.stall_timeout
                if isinstance(msg, Chunk):
                    if not outcome.tokens and pooled and self._pool is not None:
                        self._pool.refill(offer)
                    # Every chunk that came in with this one goes to the client as one delta.
                    text = []
                    calls: list[dict] = []
                    detailed: list[Chunk] | None = [] if order.logprobs else None  # chunks whose logprobs the client asked for
                    before = outcome.tokens
                    while isinstance(msg, Chunk):
                        hasher.update(msg)
                        outcome.token_ids.extend(msg.token_ids)
                        outcome.tokens += msg.n_tokens
                        if outcome.tokens > order.max_tokens:
                            raise _HostFailed("host sent more tokens than ordered")
                        if detailed is not None:
                            if len(msg.details) != msg.n_tokens:
                                raise _HostFailed("host sent no logprobs though the order asked for them")
                            detailed.append(msg)
                        if msg.text:
                            text.append(msg.text)
                            parts.append(msg.text)
                        if msg.tool_calls:
                            if not order.upstream:
                                raise _HostFailed("host sent tool calls the order did not ask for")
                            calls.extend(_tool_call_deltas(msg.tool_calls))
                        msg = framed.receive_ready()
                    joined = text[0] if len(text) == 1 else "".join(text)
                    outcome.tool_calls.extend(calls)
                    if detailed:
                        await emit(Delta(joined, tuple(lp for c in detailed for lp in c.logprobs),
                                         tuple(d for c in detailed for d in c.details), outcome.tokens - before, tuple(calls)))
                    elif text or calls:
                        await emit(Delta(joined, tokens=outcome.tokens - before, tool_calls=tuple(calls)))
                    continue
                if isinstance(msg, Embedding) and order.kind == "embedding" and not outcome.vector:
                    hasher.update_vector(msg.vector)
                    outcome.vector = msg.vector
                    msg = None
                    continue
                if isinstance(msg, Receipt):
                    if order.kind == "embedding" and not outcome.vector:
                        raise _HostFailed("host sent a receipt but no embedding")
                    outcome.problems = _receipt_problems(order, msg, hasher, offer)
                    outcome.receipt = msg
                    return
                if isinstance(msg, Error):
                    if not msg.retryable and not outcome.tokens and msg.code == "bad_request":
                        raise APIError(400, f"The host rejected the request: {msg.message}")
                    raise _HostFailed(f"host error {msg.code}: {msg.message}", busy=msg.code == "busy")
                raise _HostFailed(f"unexpected {msg.TYPE} message")
        except PeerGone as exc:
            raise _HostFailed(str(exc), unreachable=self._connection_lost(framed, offer.peer_id)) from None
        except ProtocolError as exc:
            raise _HostFailed(str(exc)) from None
        except ReaderTooSlow as exc:
            # The client, not the host, fell behind: no failover, the stream ends with the reason.
            raise _MidStreamExhausted(str(exc)) from None
        finally:
            outcome.text = "".join(parts)
            if pooled and self._pool is not None:
                self._pool.release(offer)
            if outcome.receipt is None:
                await framed.reset()
            else:
                await framed.close()

    async def _authorize(self, bearer: str | None, model: str) -> Grant:
        """The settlement's grant; a team gateway first admits a key it has not seen (one hub call, bounded)."""
        admit = getattr(self.settlement, "admit", None)
        if admit is not None:
            await admit(bearer)
        return self.settlement.authorize(bearer, model)

    def _signer(self, grant: Grant) -> Signer:
        """Who signs this grant's orders and countersigns its receipts: a team member's own identity, else this peer."""
        return grant.signer or self.node.signer

    def _settle(self, receipt: Receipt, grant: Grant, order: Order | None = None, outcome: _Outcome | None = None, first_draw: int = 0) -> None:
        countersigned = receipt.signed(self._signer(grant), "gateway_sig")
        self.stats.receipts.append(countersigned)
        del self.stats.receipts[:-100]
        # What an audit of this receipt needs, handed over before the receipt so a
        # settlement can store both in one write (one with no ``retain`` keeps
        # nothing: no hub, no audits).
        retain = getattr(self.settlement, "retain", None)
        if retain is not None and order is not None and outcome is not None:
            retain(Opening(
                request_id=order.request_id, kind=order.kind, messages=order.messages, prompt=order.prompt,
                continuation=order.continuation, sampling=order.sampling, max_tokens=order.max_tokens,
                first_draw=first_draw, output_ids=tuple(outcome.token_ids), output_text=outcome.text,
                continuation_ids=order.continuation_ids, output_vector=outcome.vector, upstream=order.upstream,
                output_tool_calls=json.dumps(outcome.tool_calls, ensure_ascii=False).encode() if outcome.tool_calls else b"",
            ), grant)
        self.settlement.record(countersigned, grant)


CARRIED = Capabilities(tools=True, json_mode=True, json_schema=True, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS, max_n=MAX_CHOICES,
                       penalties=True, logit_bias=True, vision=True, embeddings=True)
"""What an order can carry to a host (the gateway refuses a request needing more, even where a host offers it):
everything a capability names; tools, JSON schemas and images travel in ``Order.upstream``."""


def _tool_call_deltas(raw: bytes) -> list[dict]:
    """A chunk's tool-call deltas, checked to be what the OpenAI stream shape holds (else the host failed)."""
    try:
        deltas = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _HostFailed("host sent tool calls that are not JSON") from None
    if not isinstance(deltas, list) or not all(
            isinstance(d, dict) and type(d.get("index")) is int and d["index"] >= 0
            and isinstance(d.get("function", {}), dict) for d in deltas):
        raise _HostFailed("host sent malformed tool-call deltas")
    return deltas

_PARAMS = {"json_mode": "response_format", "json_schema": "response_format", "penalties": "presence_penalty", "vision": "messages"}


def _param_of(need: str) -> str:
    """The request parameter behind a need's name ("n=3" -> "n")."""
    name = need.split("=", 1)[0]
    return _PARAMS.get(name, name)


PROMPT_OVERHEAD_TOKENS = 64
"""Tokens a chat template or a tokenizer may add around a whole prompt (BOS, the assistant's turn, a default system line)."""
MESSAGE_OVERHEAD_TOKENS = 16
"""Tokens a chat template may add around each message (role headers, separators)."""


def worst_case_tokens(order: Order) -> int:
    """An upper bound on ``tokens_in + tokens_out`` of the receipt this order can earn.

    Prompt tokens are bounded by UTF-8 bytes: a byte-level tokenizer makes
    one token per byte, and a BPE or sentencepiece vocabulary with byte
    fallback never makes a token of less than one byte. Templates add a
    bounded number of special tokens (``*_OVERHEAD_TOKENS``). The gateway
    reserves this bound's cost before it sends the order, so the estimate
    errs high; the receipt's exact cost replaces it.
    """
    text_bytes = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in order.messages) + len(order.prompt.encode("utf-8", "surrogatepass"))
    continued = len(order.continuation_ids) if order.continuation_ids else len(order.continuation.encode("utf-8", "surrogatepass"))
    overhead = PROMPT_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(order.messages)
    return text_bytes + continued + overhead + order.max_tokens


def _refusal_error(refused: SettlementRefused) -> APIError:
    """The settlement hook's refusal as the OpenAI error a client expects."""
    if refused.status == 402:
        return APIError(402, refused.message, type="insufficient_quota", code=refused.code, headers={"x-should-retry": "false"})
    if refused.status >= 500:
        return APIError(refused.status, refused.message, type="server_error", code=refused.code, headers={"retry-after": "1"})
    return APIError(refused.status, refused.message, type="invalid_request_error", code=refused.code)


class _QueueWait:
    """Whether a host that has sent no first token yet is queueing the order or hanging.

    A host past its slots queues orders (``--queue``) and starts them in
    arrival order as slots free, which can take longer than
    ``first_token_timeout``; failing over then, as the gateway used to,
    turned a busy survivor's queue into 503s (issue 8). The gateway judges
    from what the host already says, signed, every few seconds: its offer's
    free slots. We chose that over a new "queued" message from the host:
    that would be a wire-protocol change older peers refuse, and a host's
    word that it queued an order tells a queue from a hang no better than
    its offers saying it is full. We also rejected a longer deadline for
    hosts whose offer showed 0 free slots at ranking time: that offer is a
    heartbeat old either way (a host that filled since would get the short
    deadline) and nothing is checked again during the long one.

    The rule: each time the first-token deadline passes, wait one more if
    the host's live offer now, or at the previous check (the ranked offer at
    the first), showed no free slot, up to ``queue_timeout`` in all (the
    caller also requires the connection to be up). Slots are given out in
    arrival order, so a host that advertised a free slot at two checks in a
    row with no token for us is not serving us: it fails as before. A host
    whose offer is gone (expired, withdrawn, dropped) gets no more patience.
    """

    def __init__(self, offer: Offer, limit: float) -> None:
        self._was_full = offer.free_slots <= 0
        self._until = time.monotonic() + limit

    def keeps_waiting(self, current: Offer | None, now: float) -> bool:
        if current is None or now >= self._until:
            return False
        full = current.free_slots <= 0
        keep = full or self._was_full
        self._was_full = full
        return keep


class _MidStreamExhausted(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, type="server_error", code="no_host_available")


def _receipt_problems(order: Order, receipt: Receipt, hasher: OutputHasher, offer: Offer) -> list[str]:
    """What keeps this receipt from describing exactly what was received, at the ordered price."""
    problems = []
    try:
        receipt.verify("host_sig")
    except ProtocolError as exc:
        problems.append(f"signature: {exc}")
    if receipt.request_id != order.request_id or receipt.host_id != order.host_id or receipt.gateway_id != order.gateway_id:
        problems.append("ids")
    if receipt.model != order.model or receipt.price_micro_per_mtok != order.price_micro_per_mtok:
        problems.append("model or price")
    if receipt.tokens_out != hasher.tokens or receipt.output_hash != hasher.digest():
        problems.append(f"output (receipt says {receipt.tokens_out} tokens, received {hasher.tokens})")
    if receipt.prompt_hash != order.prompt_hash() or receipt.seed != order.sampling.seed:
        problems.append("prompt or seed")
    if receipt.cost_micro != cost_micro(receipt.tokens_in + receipt.tokens_out, receipt.price_micro_per_mtok):
        problems.append("cost")
    if receipt.model_hash != offer.model_hash:
        problems.append("model hash differs from the offer")
    return problems


def _seed(request: CompletionRequest, request_id: str) -> int:
    """The client's seed if given (same seed, same output), else one derived from the request id."""
    if request.seed is not None:
        return request.seed % 2**63
    return int.from_bytes(hashlib.sha256(bytes.fromhex(request_id)).digest()[:8], "big") % 2**63
