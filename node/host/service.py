"""The host role: serve requests from one or more backends.

A request is the gateway's signed :class:`Order`, then our :class:`Chunk`
frames, then a signed :class:`Receipt` (or an :class:`Error`). It comes on a
gateway's ``/gpunexus/session/1`` stream, which carries all of that
gateway's requests (node/net/session.py), or on a ``/gpunexus/infer/1`` stream
of its own (gateways that predate sessions); both are served by the same
code. Anything malformed gets an error frame and a closed request; the host
itself never goes down for a peer's mistake.

Availability is the owner's: ``disable`` stops taking new orders (they get a
retryable ``draining`` error, so gateways move on invisibly), waits for the
requests in flight to finish, then withdraws the offer. One peer may serve
several models (:class:`ModelServer` each: own backend, terms, slots and
counters), and each can be taken back alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import INFER_PROTOCOL, Capabilities, Chunk, Embedding, Error, Order, OutputHasher, Receipt
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.session import SESSION_PROTOCOL

from ..backends.base import Backend, BackendError, GenerationRequest, Token
from ..net.discovery import Directory, OfferTopics
from ..net.offers import Announcer, OfferBook, OfferTerms
from ..net.p2p import P2PNode
from ..net.prices import PriceBook, follow_prices
from ..net.session import Channel, Session
from ..net.wire import FramedStream, PeerGone

log = logging.getLogger(__name__)

ORDER_TIMEOUT = 30.0
"""How long a stream may stay open without an order: gateways keep spare
streams open to skip negotiation on the request path (see node/net/streams.py)."""
SEND_TIMEOUT = 30.0
"""How long one chunk may take to leave: a gateway that stops reading is cut off."""

MAX_BATCH_TOKENS = 512
"""Most tokens coalesced into one chunk (well under the protocol's cap)."""

OrderCheck = Callable[[Order], Awaitable[None]]
Conversation = FramedStream | Channel
"""Where one request's messages go: its own stream, or its channel on a session."""


@dataclass
class HostStats:
    started_at: float = field(default_factory=time.time)
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    refused: int = 0
    tokens_out: int = 0
    billed_micro: int = 0

    def add(self, other: HostStats) -> None:
        for name in ("in_flight", "served", "failed", "refused", "tokens_out", "billed_micro"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class ModelServer:
    """One model of a host: its backend, its terms, its own slots, queue and counters.

    A host serves several models in one peer (``node serve --model A --model
    B``); each is announced, filled and taken back on its own, so a slow model
    cannot take the slots of a fast one, and the owner can take back one
    model (``node disable --model A``) while the others keep serving.
    """

    def __init__(self, backend: Backend, *, price_micro_per_mtok: int, max_slots: int = 4, max_queue: int | None = None,
                 tokens_per_s: float = 0.0, region: str = "") -> None:
        if max_slots < 1:
            raise ValueError("a model needs at least one slot")
        self.backend = backend
        self.max_slots = max_slots
        self.max_queue = 4 * max_slots if max_queue is None else max_queue
        self.slots = trio.CapacityLimiter(max_slots)
        self.stats = HostStats()
        self.enabled = True
        """The owner's switch for this model alone; the host's own switch (``HostService.enabled``) is above it."""
        self.idle = trio.Event()
        self.idle.set()
        self.follow_market = False
        self.min_price_micro_per_mtok = 0
        info = backend.info
        self.terms = OfferTerms(
            model=info.name,
            model_hash=info.model_hash,
            price_micro_per_mtok=price_micro_per_mtok,
            tokens_per_s=tokens_per_s,
            max_slots=max_slots,
            max_context=info.max_context,
            license=info.license,
            region=region,
            capabilities=info.capabilities,
        )

    @property
    def name(self) -> str:
        return self.terms.model

    def started(self) -> None:
        self.stats.in_flight += 1
        if self.idle.is_set():
            self.idle = trio.Event()

    def finished(self) -> None:
        self.stats.in_flight -= 1
        if self.stats.in_flight == 0:
            self.idle.set()

    def status(self, host_enabled: bool) -> dict:
        s = self.stats
        return {
            "model": self.terms.model,
            "model_hash": self.terms.model_hash,
            "price_micro_per_mtok": self.terms.price_micro_per_mtok,
            "follows_market": self.follow_market,
            "tokens_per_s": self.terms.tokens_per_s,
            "region": self.terms.region,
            "license": self.terms.license,
            "enabled": host_enabled and self.enabled,
            "model_enabled": self.enabled,
            "in_flight": s.in_flight,
            "max_slots": self.max_slots,
            "queued": max(0, s.in_flight - self.max_slots),
            "served": s.served,
            "failed": s.failed,
            "refused": s.refused,
            "tokens_out": s.tokens_out,
            "billed_micro": s.billed_micro,
        }


class UnknownModel(LookupError):
    """``node disable --model X`` for a model this host does not serve."""


class HostService:
    """Serves orders for one or more models in one peer and keeps their offers announced.

    Two switches decide whether a model takes orders: the host's
    (``enable``/``disable`` with no model: ``node disable``, the schedule,
    SIGTERM) and the model's own (``disable(model)``: ``node disable --model
    A``). The host's switch leaves the models' alone, so a model taken back by
    hand stays back across schedule windows until ``node enable --model A``.
    """

    def __init__(
        self,
        node: P2PNode,
        backend: Backend,
        *,
        price_micro_per_mtok: int,
        max_slots: int = 4,
        max_queue: int | None = None,
        tokens_per_s: float = 0.0,
        region: str = "",
        order_check: OrderCheck | None = None,
        sessions: bool = True,
    ) -> None:
        self.node = node
        self.order_check = order_check
        self.sessions = sessions
        """Serve ``/gpunexus/session/1`` as well as per-request streams (False: streams only, as hosts before sessions)."""
        self.open_sessions: set[Session] = set()
        """Gateways' sessions being served now."""
        self.on_receipt: list[Callable[[Receipt], None]] = []
        """Called with every receipt this host signs, before it is sent (the hub link's period roots)."""
        self.started_at = time.time()
        self.enabled = False
        self.start_enabled = True
        """Announce as soon as ``run`` starts; False for a host whose schedule says it is off now."""
        self.models: dict[str, ModelServer] = {}
        self.directory = Directory()
        """Each model's discovery plan; the runtime points it at the hub's directory when there is a hub."""
        self.announcer = Announcer(node.pubsub, node.signer, node.listen_addrs, self.free_slots_for, self.directory.plan)
        self.market = OfferBook()
        """The offers in this host's shard of each model it serves: it relays those topics, and sees its competitors there."""
        self.topics = OfferTopics(node, self.market, self.directory)
        self.prices = PriceBook()
        self.unmatched = HostStats()
        """Refusals of orders that no model here takes (garbage, forgeries, other models)."""
        self.add_model(backend, price_micro_per_mtok=price_micro_per_mtok, max_slots=max_slots, max_queue=max_queue,
                       tokens_per_s=tokens_per_s, region=region)

    def add_model(self, backend: Backend, **terms) -> ModelServer:
        """Serve one more model from this peer (before ``run``); its name must be new here."""
        server = ModelServer(backend, **terms)
        if server.name in self.models:
            raise ValueError(f"this host already serves {server.name!r}")
        self.models[server.name] = server
        self._refresh_terms()
        return server

    @property
    def first(self) -> ModelServer:
        """The first model added: a one-model host's only one."""
        return next(iter(self.models.values()))

    @property
    def terms(self) -> OfferTerms:
        return self.first.terms

    @property
    def max_slots(self) -> int:
        return sum(m.max_slots for m in self.models.values())

    @property
    def stats(self) -> HostStats:
        """Every model's counters added up (a snapshot)."""
        total = HostStats(started_at=self.started_at)
        total.add(self.unmatched)
        for server in self.models.values():
            total.add(server.stats)
        return total

    def model(self, name: str) -> ModelServer:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"this host serves {', '.join(self.models)}, not {name!r}") from None

    def serving(self, server: ModelServer) -> bool:
        return self.enabled and server.enabled

    def free_slots_for(self, terms: OfferTerms) -> int:
        server = self.models[terms.model]
        return max(0, server.max_slots - server.stats.in_flight) if self.serving(server) else 0

    def free_slots(self) -> int:
        return sum(self.free_slots_for(m.terms) for m in self.models.values())

    def _refresh_terms(self) -> None:
        """The heartbeat announces the models that are switched on, and only those."""
        self.announcer.terms = [m.terms for m in self.models.values() if m.enabled]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.node.host.set_stream_handler(INFER_PROTOCOL, self._handle_stream)
        if self.sessions:
            self.node.host.set_stream_handler(SESSION_PROTOCOL, self._handle_session)
        if self.start_enabled:
            await self.enable()
        try:
            async with trio.open_nursery() as nursery:
                # Subscribing makes this host a relay of its topics, not only a publisher.
                await nursery.start(self.topics.run)
                for name in self.models:
                    await self.topics.follow(name)
                nursery.start_soon(self._follow_directory)
                await nursery.start(follow_prices, self.node.pubsub, self.prices)
                nursery.start_soon(self.announcer.run)
                if any(m.follow_market for m in self.models.values()):
                    nursery.start_soon(self._follow_market_price)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if self.enabled:
                    await self.announcer.withdraw()

    async def _follow_directory(self) -> None:
        """A model's shard count changed: announce at once on the new topic (the old one's books keep the offer until it expires)."""
        while True:
            await self.directory.changed.wait()
            self.announcer.wake()

    def follow_market_price(self, min_price_micro_per_mtok: int, model: str | None = None) -> None:
        """Ask the market price (never under ``min_price``) from now on, not a fixed one (the first model by default)."""
        server = self.model(model) if model is not None else self.first
        server.follow_market = True
        server.min_price_micro_per_mtok = min_price_micro_per_mtok
        server.terms.follows_market = True

    async def _follow_market_price(self) -> None:
        while True:
            for server in self.models.values():
                update = self.prices.get(server.name) if server.follow_market else None
                if update is None:
                    continue
                ask = max(server.min_price_micro_per_mtok, update.price_micro_per_mtok)
                if ask != server.terms.price_micro_per_mtok:
                    log.info("market price for %s is now %d micro-USD/Mtok; asking %d", server.name, update.price_micro_per_mtok, ask)
                    # Orders already signed keep their price: only new offers change.
                    server.terms.price_micro_per_mtok = ask
                    self.announcer.wake()
            await self.prices.changed.wait()

    async def enable(self, model: str | None = None) -> None:
        """Take orders again: the whole host, or one model (its own switch; the host's stays as it is)."""
        if model is not None:
            self.model(model).enabled = True
            self._refresh_terms()
        else:
            self.enabled = True
            self.announcer.active = True
        self.announcer.wake()

    async def disable(self, model: str | None = None) -> None:
        """Stop taking orders, let the ones in flight finish, then withdraw: the whole host, or one model."""
        if model is not None:
            await self._disable_model(self.model(model))
            return
        self.enabled = False
        self.announcer.active = False
        for server in self.models.values():
            await server.idle.wait()
        if self.enabled:
            return  # enabled again while draining (by hand or by the schedule): keep the offer
        await self.announcer.withdraw()

    async def _disable_model(self, server: ModelServer) -> None:
        server.enabled = False
        self._refresh_terms()  # no more heartbeats for it; gateways asking now hear "draining"
        await server.idle.wait()
        if server.enabled or not self.enabled:
            return  # switched on again while draining; or the host is off, and withdrew everything itself
        await self.announcer.reannounce()

    def status(self) -> dict:
        s = self.stats
        first = self.first
        return {
            "peer_id": self.node.peer_id,
            "addrs": self.node.listen_addrs(),
            # The first model's terms at the top, as a one-model host always answered.
            "model": first.terms.model,
            "model_hash": first.terms.model_hash,
            "price_micro_per_mtok": first.terms.price_micro_per_mtok,
            "follows_market": first.follow_market,
            "enabled": self.enabled,
            "in_flight": s.in_flight,
            "max_slots": self.max_slots,
            "queued": sum(max(0, m.stats.in_flight - m.max_slots) for m in self.models.values()),
            "served": s.served,
            "failed": s.failed,
            "refused": s.refused,
            "tokens_out": s.tokens_out,
            "billed_micro": s.billed_micro,
            "uptime_s": round(time.time() - self.started_at, 1),
            "sessions": len(self.open_sessions),
            "models": [m.status(self.enabled) for m in self.models.values()],
        }

    # --- one request -----------------------------------------------------
    async def _handle_session(self, stream) -> None:
        session = Session(stream)
        self.open_sessions.add(session)
        log.debug("a gateway opened a session")
        try:
            await session.run(accept=self._handle)
            await session.framed.close()
        finally:
            self.open_sessions.discard(session)
        log.debug("a session ended: %s", session.broken)

    async def _handle_stream(self, stream) -> None:
        await self._handle(FramedStream(stream))

    async def _handle(self, framed: Conversation) -> None:
        try:
            await self._serve(framed)
        except PeerGone as exc:
            log.info("gateway went away: %s", exc)
        except Exception:  # the last line of defence: log, never take the host down
            log.exception("unexpected failure serving a stream")
            await framed.reset()
        else:
            await framed.close()

    async def _serve(self, framed: Conversation) -> None:
        server: ModelServer | None = None
        try:
            with trio.fail_after(ORDER_TIMEOUT):
                order = await framed.receive_as(Order)
            server = self._check_order(order)
        except trio.TooSlowError:
            await self._refuse(framed, None, "protocol", "no order within the deadline", retryable=False)
            return
        except ProtocolError as exc:
            await self._refuse(framed, None, "protocol" if "order." not in str(exc) else "bad_request", str(exc), retryable=False)
            return
        except _Refusal as refusal:
            await self._refuse(framed, refusal.server, refusal.code, refusal.message, refusal.retryable)
            return
        if self.order_check is not None:
            try:
                await self.order_check(order)
            except ProtocolError as exc:
                # No hub-backed allowance, no work: another host may take unpaid orders.
                await self._refuse(framed, server, "payment", str(exc), retryable=True)
                return
        server.started()
        try:
            # Past the slots, orders wait here in arrival order (the limiter is fair).
            async with server.slots:
                await self._generate(framed, order, server)
        finally:
            server.finished()

    def _check_order(self, order: Order) -> ModelServer:
        """The model server that takes ``order``, or a :class:`_Refusal` saying why none does."""
        order.verify()
        if order.host_id != self.node.peer_id:
            raise _Refusal("bad_request", "this order is for another host", retryable=True)
        server = self.models.get(order.model)
        if server is None:
            raise _Refusal("unknown_model", f"this host serves {', '.join(self.models)}, not {order.model}", retryable=True)
        if not self.serving(server):
            raise _Refusal("draining", "host is not taking new requests" if not self.enabled else f"this host is not taking new requests for {server.name}",
                           retryable=True, server=server)
        if order.price_micro_per_mtok < server.terms.price_micro_per_mtok:
            raise _Refusal("price", "offered price is below this host's ask", retryable=True, server=server)
        if server.stats.in_flight >= server.max_slots + server.max_queue:
            raise _Refusal("busy", "all slots and the queue are full", retryable=True, server=server)
        missing = order_lacks(order, server.terms.capabilities)
        if missing:
            # Never served without what it asked for; another host may have it.
            raise _Refusal("bad_request", f"this host does not offer {', '.join(missing)}", retryable=True, server=server)
        return server

    async def _refuse(self, framed: Conversation, server: ModelServer | None, code: str, message: str, retryable: bool) -> None:
        (server.stats if server is not None else self.unmatched).refused += 1
        # Routine (busy, under the ask, drained): counted in node status and /metrics, logged only at -vv.
        log.debug("refused an order: %s (%s)", message, code)
        with trio.move_on_after(SEND_TIMEOUT):
            await framed.send(Error(code=code, message=message, retryable=retryable))

    async def _embed(self, framed: Conversation, order: Order, server: ModelServer) -> None:
        """An embedding order: one vector, then a receipt for the input tokens (none out)."""
        try:
            result = await server.backend.embed(GenerationRequest.from_order(order))  # type: ignore[attr-defined]
        except BackendError as exc:
            server.stats.failed += 1
            with trio.move_on_after(SEND_TIMEOUT):
                await framed.send(Error(code=exc.code, message=str(exc), retryable=exc.retryable))
            return
        hasher = OutputHasher()
        hasher.update_vector(result.vector)
        with trio.fail_after(SEND_TIMEOUT):
            await framed.send(Embedding(result.vector))
        await self._send_receipt(framed, order, server, result.prompt_tokens, hasher, "stop", b"")

    async def _generate(self, framed: Conversation, order: Order, server: ModelServer) -> None:
        if order.kind == "embedding":
            await self._embed(framed, order, server)
            return
        send, receive = trio.open_memory_channel[Token](math.inf)
        hasher = OutputHasher()
        result = None
        failure: BackendError | None = None

        async def produce() -> None:
            # A backend failure ends the token stream and is re-raised below, outside
            # the nursery, so it is not wrapped in an exception group.
            nonlocal result, failure
            async with send:
                try:
                    result = await server.backend.generate(GenerationRequest.from_order(order), send)
                except BackendError as exc:
                    failure = exc

        abandoned: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            try:
                async with receive:
                    async for first in receive:
                        batch = [first]
                        while len(batch) < MAX_BATCH_TOKENS:
                            try:
                                batch.append(receive.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        chunk = _chunk(batch)
                        hasher.update(chunk)
                        with trio.fail_after(SEND_TIMEOUT):
                            await framed.send(chunk)
            except (PeerGone, trio.TooSlowError) as exc:
                # Handled here, inside the nursery, so it is not wrapped in an exception group.
                abandoned = exc
                nursery.cancel_scope.cancel()
        if abandoned is not None:
            server.stats.failed += 1
            log.info("request %s abandoned: %s", order.request_id, type(abandoned).__name__)
            return
        if failure is not None:
            server.stats.failed += 1
            log.warning("backend failed: %s", failure)
            with trio.move_on_after(SEND_TIMEOUT):
                await framed.send(Error(code=failure.code, message=str(failure), retryable=failure.retryable))
            return
        assert result is not None
        await self._send_receipt(framed, order, server, result.prompt_tokens, hasher, result.finish_reason, result.commitment)

    async def _send_receipt(self, framed: Conversation, order: Order, server: ModelServer, tokens_in: int, hasher: OutputHasher,
                            finish_reason: str, commitment: bytes) -> None:
        receipt = Receipt(
            request_id=order.request_id,
            host_id=self.node.peer_id,
            gateway_id=order.gateway_id,
            model=order.model,
            model_hash=server.terms.model_hash,
            price_micro_per_mtok=order.price_micro_per_mtok,
            tokens_in=tokens_in,
            tokens_out=hasher.tokens,
            cost_micro=cost_micro(tokens_in + hasher.tokens, order.price_micro_per_mtok),
            output_hash=hasher.digest(),
            prompt_hash=order.prompt_hash(),
            seed=order.sampling.seed,
            finish_reason=finish_reason,
            commitment=commitment,
            issued_at=time.time(),
        ).signed(self.node.signer, "host_sig")
        for hook in self.on_receipt:
            hook(receipt)
        with trio.fail_after(SEND_TIMEOUT):
            await framed.send(receipt)
        server.stats.served += 1
        server.stats.tokens_out += hasher.tokens
        server.stats.billed_micro += receipt.cost_micro


class _Refusal(Exception):
    def __init__(self, code: str, message: str, retryable: bool, server: ModelServer | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable, self.server = code, message, retryable, server


def _chunk(tokens: list[Token]) -> Chunk:
    n_tokens = sum(t.count for t in tokens)
    ids = tuple(t.token_id for t in tokens if t.token_id is not None)
    logprobs = tuple(t.logprob for t in tokens if t.logprob is not None)
    logprobs = logprobs if len(logprobs) == n_tokens else ()
    details = tuple(t.detail for t in tokens if t.detail is not None) if tokens[0].detail is not None else ()
    calls = [d for t in tokens for d in t.tool_calls]
    return Chunk(
        text="".join(t.text for t in tokens),
        n_tokens=n_tokens,
        token_ids=ids if len(ids) == n_tokens else (),
        logprobs=logprobs,
        details=details if len(details) == n_tokens and logprobs else (),
        tool_calls=json.dumps(calls, ensure_ascii=False, separators=(",", ":")).encode() if calls else b"",
    )


def order_lacks(order: Order, caps: Capabilities) -> list[str]:
    """What ``order`` asks for that ``caps`` does not offer (the host's last check before serving)."""
    s = order.sampling
    upstream = order.upstream_fields()
    wanted = {
        "tools": ("tools" in upstream or any(m.role == "tool" for m in order.messages)) and not caps.tools,
        "json_schema": "response_format" in upstream and not caps.json_schema,
        "vision": _has_images(upstream.get("messages", ())) and not caps.vision,
        "embeddings": order.kind == "embedding" and not caps.embeddings,
        "logprobs": order.logprobs and not caps.logprobs,
        f"top_logprobs={order.top_logprobs}": order.top_logprobs > caps.top_logprobs,
        "penalties": bool(s.presence_penalty or s.frequency_penalty) and not caps.penalties,
        "logit_bias": bool(s.logit_bias) and not caps.logit_bias,
        "json_mode": s.json_mode and not caps.json_mode,
    }
    return [name for name, lacking in wanted.items() if lacking]


def _has_images(messages: list) -> bool:
    return any(isinstance(part, dict) and part.get("type") == "image_url"
               for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for part in m["content"])
