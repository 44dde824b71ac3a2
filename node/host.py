"""The host role: serve ``/gpunexus/infer/1`` streams from a backend.

One stream carries one request: the gateway's signed :class:`Order`, then our
:class:`Chunk` frames, then a signed :class:`Receipt` (or an :class:`Error`).
Anything malformed gets an error frame and a closed stream; the host itself
never goes down for a peer's mistake.

Availability is the owner's: ``disable`` stops taking new orders (they get a
retryable ``draining`` error, so gateways move on invisibly), waits for the
requests in flight to finish, then withdraws the offer.
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

from .backends.base import Backend, BackendError, GenerationRequest, Token
from .offers import Announcer, OfferBook, OfferTerms, follow_offers
from .prices import PriceBook, follow_prices
from .p2p import P2PNode
from .quietlog import QuietLog
from .wire import FramedStream, PeerGone

log = logging.getLogger(__name__)
_refusals = QuietLog(log)
"""A gateway that keeps sending what this host refuses (out of credit, under the ask) is one line per window."""

ORDER_TIMEOUT = 30.0
"""How long a stream may stay open without an order: gateways keep spare
streams open to skip negotiation on the request path (see node/streams.py)."""
SEND_TIMEOUT = 30.0
"""How long one chunk may take to leave: a gateway that stops reading is cut off."""

MAX_BATCH_TOKENS = 512
"""Most tokens coalesced into one chunk (well under the protocol's cap)."""

OrderCheck = Callable[[Order], Awaitable[None]]


@dataclass
class HostStats:
    started_at: float = field(default_factory=time.time)
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    refused: int = 0
    tokens_out: int = 0
    billed_micro: int = 0


class HostService:
    """Serves orders for one backend and keeps its offer announced."""

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
    ) -> None:
        self.node = node
        self.backend = backend
        self.max_slots = max_slots
        self.max_queue = 4 * max_slots if max_queue is None else max_queue
        self._slots = trio.CapacityLimiter(max_slots)
        self.order_check = order_check
        self.on_receipt: list[Callable[[Receipt], None]] = []
        """Called with every receipt this host signs, before it is sent (the hub link's period roots)."""
        self.stats = HostStats()
        self.enabled = False
        self.start_enabled = True
        """Announce as soon as ``run`` starts; False for a host whose schedule says it is off now."""
        self._idle = trio.Event()
        self._idle.set()
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
        self.announcer = Announcer(node.pubsub, node.signer, node.listen_addrs, self.free_slots)
        self.announcer.terms = [self.terms]
        self.market = OfferBook()
        """Every offer on the network: hosts relay the offer topic, and see their competitors."""
        self.prices = PriceBook()
        self.follow_market = False
        self.min_price_micro_per_mtok = 0

    def free_slots(self) -> int:
        return max(0, self.max_slots - self.stats.in_flight) if self.enabled else 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.node.host.set_stream_handler(INFER_PROTOCOL, self._handle_stream)
        if self.start_enabled:
            await self.enable()
        try:
            async with trio.open_nursery() as nursery:
                # Subscribing makes this host a relay of the topic, not only a publisher.
                await nursery.start(follow_offers, self.node.pubsub, self.market)
                await nursery.start(follow_prices, self.node.pubsub, self.prices)
                nursery.start_soon(self.announcer.run)
                if self.follow_market:
                    nursery.start_soon(self._follow_market_price)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if self.enabled:
                    await self.announcer.withdraw()

    def follow_market_price(self, min_price_micro_per_mtok: int) -> None:
        """Ask the market price (never under ``min_price``) from now on, not a fixed one."""
        self.follow_market = True
        self.min_price_micro_per_mtok = min_price_micro_per_mtok
        self.terms.follows_market = True

    async def _follow_market_price(self) -> None:
        while True:
            update = self.prices.get(self.terms.model)
            if update is not None:
                ask = max(self.min_price_micro_per_mtok, update.price_micro_per_mtok)
                if ask != self.terms.price_micro_per_mtok:
                    log.info("market price for %s is now %d micro-USD/Mtok; asking %d", self.terms.model, update.price_micro_per_mtok, ask)
                    # Orders already signed keep their price: only new offers change.
                    self.terms.price_micro_per_mtok = ask
                    self.announcer.wake()
            await self.prices.changed.wait()

    async def enable(self) -> None:
        self.enabled = True
        self.announcer.active = True
        self.announcer.wake()

    async def disable(self) -> None:
        """Stop taking orders, let the ones in flight finish, then withdraw."""
        self.enabled = False
        self.announcer.active = False
        await self._idle.wait()
        if self.enabled:
            return  # enabled again while draining (by hand or by the schedule): keep the offer
        await self.announcer.withdraw()

    def status(self) -> dict:
        s = self.stats
        return {
            "peer_id": self.node.peer_id,
            "addrs": self.node.listen_addrs(),
            "model": self.terms.model,
            "model_hash": self.terms.model_hash,
            "price_micro_per_mtok": self.terms.price_micro_per_mtok,
            "follows_market": self.follow_market,
            "enabled": self.enabled,
            "in_flight": s.in_flight,
            "max_slots": self.max_slots,
            "queued": max(0, s.in_flight - self.max_slots),
            "served": s.served,
            "failed": s.failed,
            "refused": s.refused,
            "tokens_out": s.tokens_out,
            "billed_micro": s.billed_micro,
            "uptime_s": round(time.time() - s.started_at, 1),
        }

    # --- one stream ------------------------------------------------------
    async def _handle_stream(self, stream) -> None:
        framed = FramedStream(stream)
        try:
            await self._serve(framed)
        except PeerGone as exc:
            log.info("gateway went away: %s", exc)
        except Exception:  # the last line of defence: log, never take the host down
            log.exception("unexpected failure serving a stream")
            await framed.reset()
        else:
            await framed.close()

    async def _serve(self, framed: FramedStream) -> None:
        try:
            with trio.fail_after(ORDER_TIMEOUT):
                order = await framed.receive_as(Order)
            self._check_order(order)
        except trio.TooSlowError:
            await self._refuse(framed, "protocol", "no order within the deadline", retryable=False)
            return
        except ProtocolError as exc:
            await self._refuse(framed, "protocol" if "order." not in str(exc) else "bad_request", str(exc), retryable=False)
            return
        except _Refusal as refusal:
            await self._refuse(framed, refusal.code, refusal.message, refusal.retryable)
            return
        if self.order_check is not None:
            try:
                await self.order_check(order)
            except ProtocolError as exc:
                # No hub-backed allowance, no work: another host may take unpaid orders.
                await self._refuse(framed, "payment", str(exc), retryable=True)
                return
        self.stats.in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            # Past the slots, orders wait here in arrival order (the limiter is fair).
            async with self._slots:
                await self._generate(framed, order)
        finally:
            self.stats.in_flight -= 1
            if self.stats.in_flight == 0:
                self._idle.set()

    def _check_order(self, order: Order) -> None:
        order.verify()
        if order.host_id != self.node.peer_id:
            raise _Refusal("bad_request", "this order is for another host", retryable=True)
        if order.model != self.terms.model:
            raise _Refusal("unknown_model", f"this host serves {self.terms.model}, not {order.model}", retryable=True)
        if not self.enabled:
            raise _Refusal("draining", "host is not taking new requests", retryable=True)
        if order.price_micro_per_mtok < self.terms.price_micro_per_mtok:
            raise _Refusal("price", "offered price is below this host's ask", retryable=True)
        if self.stats.in_flight >= self.max_slots + self.max_queue:
            raise _Refusal("busy", "all slots and the queue are full", retryable=True)
        missing = order_lacks(order, self.terms.capabilities)
        if missing:
            # Never served without what it asked for; another host may have it.
            raise _Refusal("bad_request", f"this host does not offer {', '.join(missing)}", retryable=True)

    async def _refuse(self, framed: FramedStream, code: str, message: str, retryable: bool) -> None:
        self.stats.refused += 1
        _refusals.info(code, "refused an order: %s (%s)", message, code)
        with trio.move_on_after(SEND_TIMEOUT):
            await framed.send(Error(code=code, message=message, retryable=retryable))

    async def _embed(self, framed: FramedStream, order: Order) -> None:
        """An embedding order: one vector, then a receipt for the input tokens (none out)."""
        try:
            result = await self.backend.embed(GenerationRequest.from_order(order))  # type: ignore[attr-defined]
        except BackendError as exc:
            self.stats.failed += 1
            with trio.move_on_after(SEND_TIMEOUT):
                await framed.send(Error(code=exc.code, message=str(exc), retryable=exc.retryable))
            return
        hasher = OutputHasher()
        hasher.update_vector(result.vector)
        with trio.fail_after(SEND_TIMEOUT):
            await framed.send(Embedding(result.vector))
        await self._send_receipt(framed, order, result.prompt_tokens, hasher, "stop", b"")

    async def _generate(self, framed: FramedStream, order: Order) -> None:
        if order.kind == "embedding":
            await self._embed(framed, order)
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
                    result = await self.backend.generate(GenerationRequest.from_order(order), send)
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
            self.stats.failed += 1
            log.info("request %s abandoned: %s", order.request_id, type(abandoned).__name__)
            return
        if failure is not None:
            self.stats.failed += 1
            log.warning("backend failed: %s", failure)
            with trio.move_on_after(SEND_TIMEOUT):
                await framed.send(Error(code=failure.code, message=str(failure), retryable=failure.retryable))
            return
        assert result is not None
        await self._send_receipt(framed, order, result.prompt_tokens, hasher, result.finish_reason, result.commitment)

    async def _send_receipt(self, framed: FramedStream, order: Order, tokens_in: int, hasher: OutputHasher,
                            finish_reason: str, commitment: bytes) -> None:
        receipt = Receipt(
            request_id=order.request_id,
            host_id=self.node.peer_id,
            gateway_id=order.gateway_id,
            model=order.model,
            model_hash=self.terms.model_hash,
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
        self.stats.served += 1
        self.stats.tokens_out += hasher.tokens
        self.stats.billed_micro += receipt.cost_micro


class _Refusal(Exception):
    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


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
