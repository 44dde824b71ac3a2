"""The hub's market: hosts' offers in, one signed price per model and epoch out.

**Offers.** Hosts post every offer they announce (``POST /v1/offers``, about
every 3 s). The hub keeps the latest per (host, model) in ``offers`` (market
supply) and the price history in ``offer_prices`` as stretches of time at one
price, so a heartbeat at an unchanged price only extends a row. To keep the
heartbeat cheap, a process skips the database write altogether while the
terms (price, tokens/s, slots) are unchanged and the row it last wrote still
has more than half the offer's lifetime to run.

**Epochs.** Epoch ``k`` is closed at ``k * epoch_s`` (unix time) from what
happened during ``[(k-1) * epoch_s, k * epoch_s)``; its price is in force from
``k * epoch_s`` until epoch ``k + 1`` is closed, so ``k = floor(now /
epoch_s)`` at the moment of closing. Per model seen in offers or settlements:

* demand = tokens *settled* for the model during the epoch (``receipt_log``
  by ``settled_at``). Gateways do not report demand they had to refuse yet,
  so this is settled demand, which cannot exceed what hosts served:
  utilisation above 1 shows only as queueing hosts, not as refused requests.
  A receipt a gateway delivers late counts in the epoch it settled in.
* supply = every host whose latest offer for the model was live at some time
  during the epoch, as ``HostSupply(peer_id, tokens_per_s, max_slots, ask)``.
  ``ask`` is the offer's price, except for hosts that say they follow the
  market (``Offer.follows_market``; ``ask=None``, no floor): a host started
  with ``--price market`` offers the published price, and counting that as a
  floor would stop the price from ever falling.

These go through :class:`gpunexus.pricing.market.MarketBook` (estimators and
control law) and the hub signs one :class:`PriceUpdate` per model.

**Several hub processes on one database.** Each process runs the loop and
keeps its own book, but the published row is the state: the ``prices`` table
has primary key (model, epoch) and every process inserts with ON CONFLICT DO
NOTHING, then reads the row back in the same transaction. The first writer
of an epoch wins; the others adopt its price (and the direction of its move)
into their books, so every process steps the next epoch from the same price.
Their estimators agree as well while they all see the same database, since
demand and supply are read from it, not from process memory.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import trio
from gpunexus.pricing.earnings import earnings_micro_per_gpu_hour, expected_utilisation
from gpunexus.pricing.estimators import HostSupply
from gpunexus.pricing.market import (
    EpochObservation,
    MarketBook,
    MarketConfig,
    PriceQuote,
)
from gpunexus.protocol.discovery import DiscoveryPlan, shard_of
from gpunexus.protocol.messages import Offer, PriceUpdate, Withdraw
from gpunexus.protocol.signing import Signer
from sqlalchemy.engine import Connection

from . import ledger
from .config import HubConfig
from .db import Database, offer_prices, offers, prices, receipt_log

log = logging.getLogger(__name__)

DAY_S = 86_400.0
CACHE_S = 5.0
"""Longest a process serves ``/v1/prices`` and ``/v1/market`` from memory."""

NO_OFFER = "no offer from this host covers this receipt's price"
ABOVE_OFFER = "price above every price this host offered for this model"


# --- offers -------------------------------------------------------------------

def record_offer(conn: Connection, offer: Offer, user_id: int, blob: bytes, now: float) -> bool:
    """Store ``offer`` (verified, owned by ``user_id``): latest row and price history; True for a host new to the model."""
    key = (offers.c.peer_id == offer.peer_id) & (offers.c.model == offer.model)
    latest = conn.execute(sa.select(offers.c.seq, offers.c.issued_at, offers.c.expires_at).where(key)).first()
    row = {"user_id": user_id, "price": offer.price_micro_per_mtok, "tokens_per_s": offer.tokens_per_s,
           "free_slots": offer.free_slots, "max_slots": offer.max_slots, "follows_market": offer.follows_market, "seq": offer.seq,
           "issued_at": offer.issued_at, "expires_at": offer.expires_at, "received_at": now, "blob": blob}
    newer = latest is None or (offer.seq, offer.issued_at) > (latest.seq, latest.issued_at)
    if latest is None:
        conn.execute(ledger.insert_ignore(conn, offers).values(peer_id=offer.peer_id, model=offer.model, **row))
    elif newer:  # an older offer (or one before a withdrawal) arriving late never replaces a newer one
        conn.execute(sa.update(offers).where(key).values(**row))
    back = newer and (latest is None or latest.expires_at <= now)  # first offer, or back after a withdrawal or a silence

    # one stretch per price: extend one that touches this offer's lifetime, or start one
    h = offer_prices.c
    touching = conn.execute(
        sa.select(h.id, h.since, h.until)
        .where(h.peer_id == offer.peer_id, h.model == offer.model, h.until >= offer.issued_at,
               h.price == offer.price_micro_per_mtok, h.since <= offer.expires_at)
        .order_by(h.until.desc()).limit(1)
    ).first()
    if touching is None:
        conn.execute(offer_prices.insert().values(peer_id=offer.peer_id, model=offer.model,
                                                  price=offer.price_micro_per_mtok,
                                                  since=offer.issued_at, until=offer.expires_at))
    elif offer.issued_at < touching.since or offer.expires_at > touching.until:
        conn.execute(sa.update(offer_prices).where(h.id == touching.id).values(
            since=min(touching.since, offer.issued_at), until=max(touching.until, offer.expires_at)))
    return back


def record_withdraw(conn: Connection, withdraw: Withdraw, now: float) -> int:
    """End the host's offers issued up to the withdrawal (verified, owned): supply and catch-up drop them now.

    Only the latest-offer rows change; the price history keeps the stretch
    the host offered, so receipts from before the withdrawal still settle.
    Returns how many offers ended.
    """
    o = offers.c
    live = conn.execute(sa.select(sa.func.count()).select_from(offers).where(
        o.peer_id == withdraw.peer_id, o.seq <= withdraw.seq, o.expires_at > now)).scalar()
    # The row takes the withdrawal's sequence number: an offer issued before it and posted after it
    # (a heartbeat in flight) is older than the row, and cannot list the host again.
    conn.execute(sa.update(offers).where(o.peer_id == withdraw.peer_id, o.seq <= withdraw.seq)
                 .values(seq=withdraw.seq, expires_at=sa.case((o.expires_at > now, now), else_=o.expires_at)))
    return int(live or 0)


@dataclass(slots=True)
class _Written:
    terms: tuple
    issued_at: float
    expires_at: float


class OfferCache:
    """Per process: which account owns a peer id, and which offers need no write."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.owners: dict[str, int] = {}
        self._written: dict[tuple[str, str], _Written] = {}
        self._max = max_entries

    def needs_write(self, offer: Offer) -> bool:
        w = self._written.get((offer.peer_id, offer.model))
        if w is None or w.terms != _terms(offer) or offer.issued_at < w.issued_at:
            return True
        return w.expires_at - offer.issued_at <= (offer.expires_at - offer.issued_at) / 2

    def forget(self, peer_id: str) -> None:
        """The host withdrew: its next offer must be written even with unchanged terms."""
        for key in [k for k in self._written if k[0] == peer_id]:
            del self._written[key]

    def wrote(self, offer: Offer) -> None:
        if len(self._written) >= self._max:
            self._written.clear()  # forgetting only costs a write
        self._written[(offer.peer_id, offer.model)] = _Written(_terms(offer), offer.issued_at, offer.expires_at)


def _terms(offer: Offer) -> tuple:
    return (offer.price_micro_per_mtok, offer.tokens_per_s, offer.max_slots, offer.follows_market)


# --- the settlement check -------------------------------------------------------

class OfferedPrices:
    """The offer price history of a batch's hosts, loaded with one query."""

    def __init__(self, conn: Connection, host_ids: list[str], t0: float, t1: float) -> None:
        h = offer_prices.c
        self._by: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        if not host_ids:
            return
        rows = conn.execute(
            sa.select(h.peer_id, h.model, h.since, h.until, h.price)
            .where(h.peer_id.in_(host_ids), h.until >= t0, h.since <= t1)
        ).all()
        for peer_id, model, since, until, price in rows:
            self._by.setdefault((peer_id, model), []).append((since, until, price))

    def refusal(self, host_id: str, model: str, price: int, t0: float, t1: float) -> str:
        """'' when ``host_id`` offered ``model`` at ``price`` or more during [t0, t1], else why not."""
        offered = [p for since, until, p in self._by.get((host_id, model), ()) if until >= t0 and since <= t1]
        if not offered:
            return NO_OFFER
        return "" if price <= max(offered) else ABOVE_OFFER


# --- epochs -------------------------------------------------------------------

class _Book(MarketBook):
    @property
    def last_epoch(self) -> int | None:
        return self._epoch

    def adopt(self, model: str, price: int, direction: int) -> None:
        """Take the published price as this book's state (another process closed the epoch)."""
        state = self._models[model]
        state.price, state.direction = price, direction


@dataclass(frozen=True)
class _Observed:
    demand: dict[str, int]
    hosts: dict[str, list[HostSupply]]
    published: dict[str, list[int]]  # model -> its last two published prices before this epoch, newest first


class Market:
    """Closes epochs, publishes signed prices, answers the market routes."""

    def __init__(self, db: Database, signer: Signer, config: HubConfig, clock: Callable[[], float] = time.time) -> None:
        self.db, self.signer, self.config, self.clock = db, signer, config, clock
        self.book = _Book(MarketConfig(epoch_s=config.epoch_s))
        self.offer_cache = OfferCache()
        self._lock = trio.Lock()
        self._cache: dict[str, tuple[float, int, object]] = {}

    def current_epoch(self, now: float | None = None) -> int:
        return math.floor((self.clock() if now is None else now) / self.config.epoch_s)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close every epoch as its boundary passes (the one in progress at once, if not yet closed)."""
        task_status.started()
        while True:
            epoch = self.current_epoch()
            try:
                await self.close_epoch(epoch)
            except Exception:  # a database hiccup must not stop the market; the next epoch retries
                log.exception("closing market epoch %d failed", epoch)
            await trio.sleep(max(0.05, (epoch + 1) * self.config.epoch_s - self.clock()))

    async def close_epoch(self, epoch: int) -> list[dict]:
        """Close ``epoch`` (see module doc); returns the published rows, this process's or another's."""
        async with self._lock:
            epoch_s = self.config.epoch_s
            end = epoch * epoch_s
            start = end - epoch_s
            stepped = self.book.last_epoch is None or epoch > self.book.last_epoch
            obs = await self.db.read(_observe, start, end, epoch, self.book.models())
            for model, last in obs.published.items():
                # the published price is the state: start from it, whoever published it
                if model not in self.book.models():
                    self.book.add_model(model, self.config.reference_price(model), last[0] if last else None)
                elif not last or self.book.price(model) == last[0]:
                    continue
                if last:
                    moved = (last[0] > last[1]) - (last[0] < last[1]) if len(last) == 2 else 0
                    self.book.adopt(model, last[0], moved)
            for model in {*obs.demand, *obs.hosts} - set(self.book.models()):
                self.book.add_model(model, self.config.reference_price(model))
            before = {m: self.book.price(m) for m in self.book.models()}
            quotes: list[PriceQuote] = []
            if stepped:
                observations = {}
                for model in self.book.models():
                    observations[model] = EpochObservation(obs.demand.get(model, 0), tuple(obs.hosts.get(model, ())))
                quotes = self.book.step(epoch, observations)
            now = self.clock()
            rows = [self._row(q, end, now) for q in quotes]
            published = await self.db.write(_publish, rows, epoch)
            for row in published:
                if row["model"] in before:
                    p = row["price"]
                    self.book.adopt(row["model"], p, (p > before[row["model"]]) - (p < before[row["model"]]))
            self._cache.clear()
            return published

    def _row(self, q: PriceQuote, epoch_start: float, now: float) -> dict:
        update = PriceUpdate(hub_id=self.signer.peer_id, model=q.model, epoch=q.epoch,
                             price_micro_per_mtok=q.price_micro_per_mtok, demand_tps=q.demand_tps,
                             supply_tps=q.supply_tps, issued_at=now).signed(self.signer)
        return {"model": q.model, "epoch": q.epoch, "epoch_start": epoch_start, "price": q.price_micro_per_mtok,
                "demand_tps": q.demand_tps, "supply_tps": q.supply_tps,
                "utilisation": q.utilisation if math.isfinite(q.utilisation) else None,
                "hosts": q.hosts, "floor": q.floor_micro_per_mtok, "ceiling": q.ceiling_micro_per_mtok,
                "hub_id": self.signer.peer_id, "issued_at": now, "blob": update.encode()}

    # --- reads for the routes (cached briefly per process) ---------------------
    async def _cached(self, name: str, fn: Callable, *args):
        now = self.clock()
        hit = self._cache.get(name)
        if hit and hit[1] == self.current_epoch(now) and abs(now - hit[0]) < CACHE_S:
            return hit[2]
        value = await self.db.read(fn, *args)
        self._cache[name] = (now, self.current_epoch(now), value)
        return value

    async def latest_updates(self) -> list[bytes]:
        """The latest signed PriceUpdate per model priced within the last day."""
        rows = await self._cached("latest", _latest, self.clock() - DAY_S)
        return [r["blob"] for r in rows]

    def offers_changed(self) -> None:
        """A host joined or left a model's lists: this process's next directory and catch-up answers read the database again."""
        for name in [n for n in self._cache if n == "directory" or n.startswith("offers:")]:
            del self._cache[name]

    async def directory(self) -> dict:
        """The ``GET /v1/directory`` document: every model with a live offer, its host count and discovery plan.

        Peers size their offer topics from it (:mod:`gpunexus.protocol.discovery`),
        and a gateway lists the market's models from it without following them all.
        """
        counts = await self._cached("directory", _live_hosts, self.clock())
        models = []
        for model, hosts in counts:
            plan = DiscoveryPlan.for_hosts(hosts)
            models.append({"model": model, "hosts": hosts, "shards": plan.shards, "refresh_s": plan.refresh_s})
        return {"hub_id": self.signer.peer_id, "models": models}

    async def shard_offers(self, model: str, shard: int, shards: int) -> list[bytes]:
        """The live signed offers of one shard of ``model``: a gateway's catch-up when it joins the shard."""
        rows = await self._cached(f"offers:{model}", _live_offers, model, self.clock())
        now = self.clock()
        return [blob for peer_id, expires_at, blob in rows if expires_at > now and shard_of(peer_id, shards) == shard]

    async def overview(self) -> dict:
        """The ``GET /v1/market`` document."""
        now = self.clock()
        return {"hub_id": self.signer.peer_id, "epoch_s": self.config.epoch_s,
                "models": await self._cached("overview", _overview, now)}


# --- database functions ------------------------------------------------------------

def _observe(conn: Connection, start: float, end: float, epoch: int, listed: list[str]) -> _Observed:
    r = receipt_log.c
    demand = {m: int(t) for m, t in conn.execute(
        sa.select(r.model, sa.func.sum(r.tokens)).where(r.settled_at >= start, r.settled_at < end).group_by(r.model))}
    o = offers.c
    hosts: dict[str, list[HostSupply]] = {}
    for peer, model, tps, slots, price, follows in conn.execute(
        sa.select(o.peer_id, o.model, o.tokens_per_s, o.max_slots, o.price, o.follows_market)
        .where(o.expires_at > start, o.issued_at < end).order_by(o.model, o.peer_id)
    ):
        hosts.setdefault(model, []).append(HostSupply(peer, tps, slots, None if follows else price))
    # the last two published prices of every model that is listed, seen now, or priced within a day
    p = prices.c
    recent = sa.select(p.model).where(p.epoch_start >= end - DAY_S, p.epoch < epoch).distinct()
    wanted = set(conn.execute(recent).scalars()) | set(listed) | set(demand) | set(hosts)
    published: dict[str, list[int]] = {}
    for model in sorted(wanted):
        last_two = conn.execute(sa.select(p.price).where(p.model == model, p.epoch < epoch)
                                .order_by(p.epoch.desc()).limit(2)).scalars().all()
        if last_two or model in listed:
            published[model] = list(last_two)
    return _Observed(demand, hosts, published)


def _publish(conn: Connection, rows: list[dict], epoch: int) -> list[dict]:
    if rows:
        conn.execute(ledger.insert_ignore(conn, prices), rows)
    stored = conn.execute(sa.select(prices).where(prices.c.epoch == epoch).order_by(prices.c.model)).mappings().all()
    return [dict(r) for r in stored]


def _latest(conn: Connection, since: float) -> list[dict]:
    p = prices.c
    last = (sa.select(p.model, sa.func.max(p.epoch).label("epoch"))
            .where(p.epoch_start >= since).group_by(p.model).subquery())
    q = (sa.select(prices).join(last, (p.model == last.c.model) & (p.epoch == last.c.epoch)).order_by(p.model))
    return [dict(r) for r in conn.execute(q).mappings()]


def _live_hosts(conn: Connection, now: float) -> list[tuple[str, int]]:
    o = offers.c
    q = sa.select(o.model, sa.func.count()).where(o.expires_at > now).group_by(o.model).order_by(o.model)
    return [(model, int(n)) for model, n in conn.execute(q)]


def _live_offers(conn: Connection, model: str, now: float) -> list[tuple[str, float, bytes]]:
    o = offers.c
    q = sa.select(o.peer_id, o.expires_at, o.blob).where(o.model == model, o.expires_at > now).order_by(o.peer_id)
    return [(peer_id, expires_at, bytes(blob)) for peer_id, expires_at, blob in conn.execute(q)]


def _overview(conn: Connection, now: float) -> list[dict]:
    latest = _latest(conn, now - DAY_S)
    if not latest:
        return []
    p = prices.c
    history: dict[str, list[list]] = {}
    for model, start, price in conn.execute(
        sa.select(p.model, p.epoch_start, p.price).where(p.epoch_start >= now - DAY_S).order_by(p.model, p.epoch)
    ):
        history.setdefault(model, []).append([start, price])
    o = offers.c
    capacity: dict[str, list[float]] = {}
    for model, tps, slots in conn.execute(sa.select(o.model, o.tokens_per_s, o.max_slots).where(o.expires_at > now)):
        capacity.setdefault(model, []).append(tps * slots)
    out = []
    for row in latest:
        model = row["model"]
        host_tps = statistics.median(capacity[model]) if capacity.get(model) else 0.0
        u = expected_utilisation(row["demand_tps"], row["supply_tps"], host_tps)
        out.append({
            "model": model, "epoch": row["epoch"], "price_micro_per_mtok": row["price"],
            "demand_tps": row["demand_tps"], "supply_tps": row["supply_tps"], "utilisation": row["utilisation"],
            "hosts": row["hosts"], "floor_micro_per_mtok": row["floor"], "ceiling_micro_per_mtok": row["ceiling"],
            "earnings_micro_per_gpu_hour": earnings_micro_per_gpu_hour(row["price"], host_tps, u),
            "history": history.get(model, []),
        })
    return out
