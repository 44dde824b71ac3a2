"""Shared fixtures for the hub tests: real SQLite files and, when configured, a real PostgreSQL.

Set ``GPUNEXUS_TEST_PG_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/gpunexus_test``)
to run every database-parametrised test against PostgreSQL too; each test gets
a freshly created schema in that database.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets

import pytest
import sqlalchemy as sa
import trio
from gpunexus.hub import keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import Database, metadata
from gpunexus.hub.ratelimit import RateLimiter
from gpunexus.hub.service import Hub
from gpunexus.protocol.messages import Offer, Receipt, host_registration_statement
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.signing import Signer

PG_URL = os.environ.get("GPUNEXUS_TEST_PG_URL")
_counter = itertools.count()
_pg_schema_fresh: list[bool] = []

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(not PG_URL, reason="GPUNEXUS_TEST_PG_URL is not set: no PostgreSQL server to test against"),
    ),
]


def fresh_url(backend: str, tmp_dir) -> str:
    """A URL to an empty database of ``backend`` (SQLite file, or a wiped PG schema)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_dir}/hub-{next(_counter)}.db"
    engine = sa.create_engine(PG_URL)
    if not _pg_schema_fresh:
        metadata.drop_all(engine)  # once per run: the schema may be from an older checkout
        _pg_schema_fresh.append(True)
    metadata.create_all(engine)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    engine.dispose()
    return PG_URL


def fresh_db(backend: str, tmp_dir) -> Database:
    db = Database(fresh_url(backend, tmp_dir))
    db.create_schema()
    return db


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db(backend, tmp_path):
    database = fresh_db(backend, tmp_path)
    yield database
    database.dispose()


# --- signed test material -------------------------------------------------------

PRICE = 2_000_000  # 2 USD per million tokens


def make_receipt(host: Signer, gateway: Signer, *, tokens_in: int = 100, tokens_out: int = 400,
                 price: int = PRICE, issued_at: float = 1000.0, cost: int | None = None,
                 request_id: str | None = None, countersign: bool = True) -> Receipt:
    r = Receipt(
        request_id=request_id or secrets.token_hex(16), host_id=host.peer_id, gateway_id=gateway.peer_id,
        model="ref-tiny", model_hash="h", price_micro_per_mtok=price, tokens_in=tokens_in, tokens_out=tokens_out,
        cost_micro=cost_micro(tokens_in + tokens_out, price) if cost is None else cost,
        output_hash=hashlib.sha256(b"out").digest(), prompt_hash=hashlib.sha256(b"in").digest(),
        seed=7, finish_reason="stop", commitment=b"", issued_at=issued_at,
    ).signed(host, "host_sig")
    return r.signed(gateway, "gateway_sig") if countersign else r


def make_offer(host: Signer, *, model: str = "ref-tiny", price: int = PRICE, issued_at: float = 1000.0,
               ttl: float = 600.0, tokens_per_s: float = 50.0, max_slots: int = 4, free_slots: int | None = None,
               seq: int = 1, follows_market: bool = False) -> Offer:
    """A host's signed offer; long-lived by default so receipts over a test's span are covered."""
    return Offer(
        peer_id=host.peer_id, model=model, model_hash="h", price_micro_per_mtok=price, tokens_per_s=tokens_per_s,
        free_slots=max_slots if free_slots is None else free_slots, max_slots=max_slots, max_context=2048,
        region="", license="", follows_market=follows_market, addrs=(), seq=seq, issued_at=issued_at, expires_at=issued_at + ttl,
    ).signed(host)


class Clock:
    """A settable clock: tests move time explicitly, never sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Market:
    """A hub with one client (10 USD granted), one registered host, one gateway identity."""

    def __init__(self, db: Database, config: HubConfig | None = None) -> None:
        self.clock = Clock()
        self.hub = Hub(db, Signer.generate(), config or HubConfig(), clock=self.clock)
        self.client, self.client_key = db.write_sync(keys.add_user, "client@example.com", "client")
        self.host, self.host_key = db.write_sync(keys.add_user, "host@example.com", "host")
        self.host_signer, self.gateway = Signer.generate(), Signer.generate()
        self.hub.grant_sync("client@example.com", 10_000_000, "initial")

    async def register_host(self, *, offer: bool = True) -> None:
        """Register the host peer id and (by default) post its offer at ``PRICE``, so its receipts settle."""
        proof = self.host_signer.sign(host_registration_statement(self.hub.hub_id, self.host_signer.peer_id))
        await self.hub.register_host(self.host, self.host_signer.peer_id, proof)
        if offer:
            await self.post_offer()

    async def post_offer(self, **kw) -> Offer:
        """Post the host's offer at ``clock.now`` (see :func:`make_offer` for the keywords)."""
        kw.setdefault("issued_at", self.clock.now)
        offer = make_offer(self.host_signer, **kw)
        await self.hub.post_offer(self.host, offer.encode())
        return offer

    def receipt(self, **kw) -> Receipt:
        kw.setdefault("issued_at", self.clock.now)
        return make_receipt(self.host_signer, self.gateway, **kw)


@pytest.fixture
async def market(db):
    m = Market(db)
    await m.register_host()
    return m


@pytest.fixture
async def served(db, nursery):
    """(market, base URL, rate-limit clock): a hub served on an ephemeral port."""
    market = Market(db)
    limit_clock = Clock(0.0)
    app = create_app(market.hub, limiter=RateLimiter(1.0, 30, clock=limit_clock))
    stop = trio.Event()
    binds = await nursery.start(lambda task_status: serve(market.hub, app, port=0, shutdown_trigger=stop.wait, task_status=task_status))
    yield market, binds[0], limit_clock
    stop.set()
