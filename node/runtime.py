"""Assemble the roles: a libp2p peer plus a host service or a gateway server.

``open_host`` and ``open_gateway`` are async context managers used alike by
the CLI, ``gpunexus demo`` and the tests, so all three run the same code.
Both put the libp2p host and the HTTP server in one trio nursery.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import trio
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

from gpunexus.protocol.signing import Signer

from .backends.base import Backend
from .gateway.app import create_app, hypercorn_config
from .gateway.service import GatewayConfig, GatewayService
from .gateway.settlement import FreeSettlement, Settlement
from .gateway.team import TeamSettlement
from .host.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .host.metrics import HostMetrics
from .host.schedule import Clock, ScheduleFollower, Window
from .host.service import HostService, OrderCheck, UnknownModel
from .host.verifier import PeerVerifier, can_verify
from .hub_client import HostHubLink, HubSettlement, HubUnavailable
from .net.discovery import Directory, OfferTopics
from .net.offers import OfferBook
from .net.p2p import P2PConfig, P2PNode, open_p2p
from .net.prices import PriceBook, follow_prices, relay_hub_prices

log = logging.getLogger(__name__)


def node_home(home: str | Path, role: str) -> Path:
    path = Path(home) / "node" / role
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_identity(home: str | Path | None, role: str) -> Signer:
    """The role's persistent identity under ``$GPUNEXUS_HOME``, or a throwaway one."""
    if home is None:
        return Signer.generate()
    return Signer.load_or_create(node_home(home, role) / "identity.key")


@dataclass(frozen=True)
class HubLogin:
    """Where a node's hub is and the API key it uses there."""

    url: str
    api_key: str


@dataclass
class HostRuntime:
    node: P2PNode
    service: HostService
    control_url: str | None = None
    metrics_url: str | None = None
    hub: HostHubLink | None = None
    schedule: ScheduleFollower | None = None
    verifier: PeerVerifier | None = None

    def status(self) -> dict:
        """The host's status with its schedule and verifier work (``node status``, ``/metrics``)."""
        out = self.service.status()
        if self.schedule is not None:
            out["schedule"] = self.schedule.status()
        if self.verifier is not None:
            out["verifier"] = self.verifier.status()
        return out


@dataclass
class GatewayRuntime:
    node: P2PNode
    service: GatewayService
    base_url: str
    book: OfferBook


@dataclass
class ModelOptions:
    """One model a host serves, with its own terms (``--config host.toml``'s ``[[model]]`` table)."""

    backend: Backend
    price_micro_per_mtok: int
    max_slots: int = 4
    max_queue: int | None = None
    tokens_per_s: float = 0.0
    region: str = ""
    follow_market: bool = False
    """Ask the hub's market price (never under ``price_micro_per_mtok``) instead of a fixed one."""


@dataclass
class HostOptions:
    """A host: one model in the top fields (``backend`` ...), more in ``models``; all in one peer."""

    backend: Backend | None = None
    price_micro_per_mtok: int = 0
    p2p: P2PConfig = field(default_factory=P2PConfig)
    max_slots: int = 4
    max_queue: int | None = None
    tokens_per_s: float = 0.0
    region: str = ""
    home: str | Path | None = None
    order_check: OrderCheck | None = None
    control: bool = False
    hub: HubLogin | None = None
    """With a hub, the host registers its peer id and serves only hub-backed orders."""
    follow_market: bool = False
    """Ask the hub's market price (never under ``price_micro_per_mtok``) instead of a fixed one."""
    price_poll_s: float = 15.0
    schedule: tuple[Window, ...] = ()
    """Availability windows (``--available``): withdrawn outside them, announced inside; empty is always."""
    clock: Clock | None = None
    """The schedule's wall clock (tests inject one); the system's by default."""
    verify: bool = True
    """With a hub and a backend that can (``node/host/verifier.py``), also act as a peer verifier for the model."""
    verify_poll_s: float = 5.0
    models: list[ModelOptions] = field(default_factory=list)
    """Further models served by the same peer, each with its own terms."""
    metrics: tuple[str, int] | None = None
    """(address, port) of ``/metrics`` and ``/health`` for Prometheus (``--metrics-port``); None: not served."""
    sessions: bool = True
    """Serve gateways' ``/gpunexus/session/1`` streams too; False: per-request streams only (as hosts before sessions)."""

    def served(self) -> list[ModelOptions]:
        """Every model this host serves, the top fields' one first."""
        first = [] if self.backend is None else [ModelOptions(self.backend, self.price_micro_per_mtok, self.max_slots, self.max_queue,
                                                              self.tokens_per_s, self.region, self.follow_market)]
        served = first + list(self.models)
        if not served:
            raise ValueError("a host serves at least one model")
        return served


HUB_CONNECT_MAX_DELAY_S = 15.0


async def _connect_to_hub(link: HostHubLink) -> str:
    """Register with the hub, waiting (capped back-off) while it is unreachable.

    A host must not take paid orders before it knows its hub, so it waits
    rather than serving; but a hub that is down for a moment (a restart) is
    no reason to exit. A refusal (bad key, peer id of another account) is.
    """
    delay = 0.5
    while True:
        try:
            return await link.connect()
        except HubUnavailable as exc:
            log.warning("hub %s not reachable yet (%s); retrying in %.1f s", link.hub_url, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, HUB_CONNECT_MAX_DELAY_S)


def _terms(model: ModelOptions) -> dict:
    return {"price_micro_per_mtok": model.price_micro_per_mtok, "max_slots": model.max_slots, "max_queue": model.max_queue,
            "tokens_per_s": model.tokens_per_s, "region": model.region}


@asynccontextmanager
async def open_host(options: HostOptions) -> AsyncIterator[HostRuntime]:
    signer = load_identity(options.home, "host")
    link = None
    verifier: PeerVerifier | None = None
    order_check = options.order_check
    if options.hub is not None:
        link = HostHubLink(options.hub.url, options.hub.api_key, signer)
        hub_id = await _connect_to_hub(link)
        log.info("registered host %s with hub %s", signer.peer_id, hub_id)
        order_check = link.check_order
    first, *more = options.served()
    async with open_p2p(signer, options.p2p) as node, trio.open_nursery() as nursery:
        service = HostService(node, first.backend, order_check=order_check, sessions=options.sessions, **_terms(first))
        for model in more:
            service.add_model(model.backend, **_terms(model))
        for model in [first, *more]:
            if model.follow_market:
                service.follow_market_price(model.price_micro_per_mtok, model.backend.info.name)
        follower = ScheduleFollower(service, options.schedule, options.clock) if options.schedule else None
        if follower is not None:
            service.start_enabled = follower.available_now()  # outside a window: never announce at all
        if link is not None:
            service.announcer.on_announce.append(link.post_offer)
            service.announcer.on_withdraw.append(link.post_withdraw)
            service.on_receipt.append(link.record_receipt)
            nursery.start_soon(link.run_roots)  # each period's signed receipt root (audit selection)
            verifying = [m.backend for m in (first, *more) if can_verify(m.backend)] if options.verify else []
            if verifying:
                verifier = PeerVerifier(link, verifying, poll_s=options.verify_poll_s)
                nursery.start_soon(verifier.run)
            nursery.start_soon(functools.partial(relay_hub_prices, options.hub.url, node.pubsub, service.prices, interval=options.price_poll_s))
            # Before the first offer: a big model's hosts announce on their shard's topic from the start.
            await nursery.start(service.directory.follow_hub, options.hub.url)
        await nursery.start(service.run)
        if follower is not None:
            nursery.start_soon(follower.run)
        runtime = HostRuntime(node, service, hub=link, schedule=follower, verifier=verifier)
        if options.control and options.home is not None:
            runtime.control_url = await nursery.start(_serve_control, runtime, node_home(options.home, "host"))
        if options.metrics is not None:
            runtime.metrics_url = (await nursery.start(_serve_metrics, runtime, *options.metrics))[0]
        try:
            yield runtime
        finally:
            nursery.cancel_scope.cancel()
            if link is not None:
                with trio.CancelScope(shield=True):
                    await link.aclose()


@dataclass
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    p2p: P2PConfig = field(default_factory=P2PConfig)
    config: GatewayConfig = field(default_factory=GatewayConfig)
    settlement: Settlement = field(default_factory=FreeSettlement)
    home: str | Path | None = None
    hub: HubLogin | None = None
    """With a hub, requests are paid from the key's credits (replaces ``settlement``)."""
    team: bool = False
    """With a hub: each client pays with its own hub key (``TeamSettlement``); ``hub.api_key`` is unused."""
    audit_retention_s: float | None = 3600.0
    """With a hub: how long each paid request and its output are kept for the hub's
    audits; None (``--no-audit-retention``) keeps nothing, and the gateway then
    only uses hosts of good standing (``HubSettlement.excluded_host``)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (``--cors-origin``; empty: CORS off)."""


@asynccontextmanager
async def open_gateway(options: GatewayOptions) -> AsyncIterator[GatewayRuntime]:
    signer = load_identity(options.home, "gateway")
    settlement = options.settlement
    if options.hub is not None:
        if options.home is None:
            raise ValueError("a gateway with a hub needs a home folder for its receipt queue")
        if options.team:
            settlement = TeamSettlement(options.hub.url, signer, node_home(options.home, "gateway") / "team",
                                        audit_retention_s=options.audit_retention_s)
        else:
            queue = node_home(options.home, "gateway") / "receipts.db"
            settlement = HubSettlement(options.hub.url, options.hub.api_key, signer.peer_id, queue,
                                       audit_retention_s=options.audit_retention_s)
    p2p = dataclasses.replace(options.p2p, light=options.p2p.light or options.config.light_gossip)
    async with open_p2p(signer, p2p) as node, trio.open_nursery() as nursery:
        book, prices, topics = await follow_market(node, nursery, options.hub.url if options.hub else None,
                                                   options.config.price_poll_s, follow_known=options.config.follow_known)
        await nursery.start(settlement.run)
        service = GatewayService(node, book, settlement, options.config, prices=prices, topics=topics)
        if options.hub is not None:
            await nursery.start(functools.partial(service.catalogue.follow, options.hub.url))
        await nursery.start(service.run)
        app = create_app(service, cors_origins=options.cors_origins)
        bound = await nursery.start(_serve_http, app, options.host, options.port)
        base_url = bound[0].replace("0.0.0.0", "127.0.0.1") + "/v1"
        try:
            yield GatewayRuntime(node, service, base_url, book)
        finally:
            nursery.cancel_scope.cancel()


async def follow_market(node: P2PNode, nursery: trio.Nursery, hub_url: str | None, price_poll_s: float, *,
                        follow_known: bool | None = None, all_shards: bool = False) -> tuple[OfferBook, PriceBook, OfferTopics]:
    """What a gateway peer watches: offers (the hub's directory and the shard topics of the models it follows) and the
    market prices (fetched from the hub and gossiped on, with one)."""
    book = OfferBook()
    # A host whose connection dies leaves the book at once, not when its offer expires.
    node.on_disconnect(book.drop_host)
    directory = Directory()
    if hub_url is not None:
        await nursery.start(directory.follow_hub, hub_url)
    topics = OfferTopics(node, book, directory, follow_known=follow_known, all_shards=all_shards)
    await nursery.start(topics.run)
    prices = PriceBook()
    await nursery.start(follow_prices, node.pubsub, prices)
    if hub_url is not None:
        nursery.start_soon(functools.partial(relay_hub_prices, hub_url, node.pubsub, prices, interval=price_poll_s))
    return book, prices, topics


async def _serve_http(app, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    config = hypercorn_config(host, port)
    await serve(app, config, task_status=task_status, shutdown_trigger=trio.sleep_forever)


async def _serve_metrics(runtime: HostRuntime, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``/metrics`` (Prometheus) and ``/health`` (200 while serving, 503 while drained or withdrawn); read-only, no token."""
    metrics = HostMetrics(runtime.status)
    app = QuartTrio("gpunexus-host-metrics")

    @app.get("/metrics")
    async def prometheus():
        return metrics.render(), 200, {"content-type": METRICS_CONTENT_TYPE}

    @app.get("/health")
    async def health():
        status = runtime.service.status()
        taking = status["enabled"] and any(m["enabled"] for m in status["models"])
        return {"ok": True, "taking_orders": taking, "in_flight": status["in_flight"]}, 200 if taking else 503

    await _serve_http(app, host, port, task_status=task_status)


# --- host control: `gpunexus node enable|disable|status` -------------------
CONTROL_FILE = "control.json"


async def _serve_control(runtime: HostRuntime, folder: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A loopback-only HTTP endpoint, guarded by a token in a 0600 file."""
    service = runtime.service
    token = secrets.token_urlsafe(24)
    app = QuartTrio("gpunexus-control")

    @app.before_request
    async def check_token():
        if request.headers.get("authorization") != f"Bearer {token}":
            return {"error": "bad control token"}, 401

    @app.get("/status")
    async def status():
        report = runtime.status()
        if runtime.hub is not None:
            try:
                earnings = await runtime.hub.earnings()
                report["earnings_micro"] = earnings["amount_micro"]
                report["unpaid_micro"] = earnings.get("balance_micro", 0)
            except Exception as exc:  # status must answer even while the hub is away
                report["earnings_error"] = str(exc)
        return report

    @app.post("/enable")
    async def enable():
        return await switch(service.enable)

    @app.post("/disable")
    async def disable():
        return await switch(service.disable)

    async def switch(action):
        """The whole host, or the one model named by ``?model=`` (``node disable --model A``)."""
        try:
            await action(request.args.get("model"))
        except UnknownModel as exc:
            return {"error": str(exc)}, 404
        return runtime.status()

    config = hypercorn_config("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: serve(app, config, task_status=task_status, shutdown_trigger=trio.sleep_forever))
        url = bound[0]
        path = folder / CONTROL_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
        task_status.started(url)
        try:
            await trio.sleep_forever()
        finally:
            path.unlink(missing_ok=True)
