"""Read-only views of the ledger and the receipt log for people: usage, earnings, request logs, totals.

Each function answers one page of the dashboard (and would answer the same
JSON route), reading in one transaction. Days are UTC days, numbered from the
epoch (``day * 86400`` is its first second); amounts are integer micro-USD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Receipt
from gpunexus.verify import reputation as rep_mod
from sqlalchemy.engine import Connection

from . import chain, honesty, ledger
from .db import accounts, api_keys, audits, hosts, offers, payouts, prices, receipt_log, users

DAY_S = 86400
_FOREVER = 1e15
"""An end of time for queries over all of an account's history (the year 31 million)."""


@dataclass(frozen=True, slots=True)
class DayModel:
    """Requests, tokens and money of one (day, model): spent by a client or earned by a host."""

    day: int
    model: str
    requests: int
    tokens: int
    amount_micro: int


def by_model(rows: list[DayModel]) -> list[dict]:
    """The per-(day, model) rows summed per model, in model order: the usage and earnings tables."""
    totals: dict[str, dict] = {}
    for r in rows:
        m = totals.setdefault(r.model, {"model": r.model, "requests": 0, "tokens": 0, "amount_micro": 0})
        m["requests"] += r.requests
        m["tokens"] += r.tokens
        m["amount_micro"] += r.amount_micro
    return sorted(totals.values(), key=lambda m: m["model"])


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One settled request as its client (or host) sees it."""

    seq: int
    request_id: str
    settled_at: float
    model: str
    host_id: str
    tokens_in: int
    tokens_out: int
    cost_micro: int
    host_amount_micro: int
    audit: str | None
    """The audit's status if the request was selected for one (``pending``, ``passed``, ``failed``...)."""


def _side(side: str):
    if side == "client":
        return receipt_log.c.client_user_id, receipt_log.c.cost
    if side == "host":
        return receipt_log.c.host_user_id, receipt_log.c.cost - receipt_log.c.fee
    raise ValueError(f"side must be client or host, not {side!r}")


def _day(conn: Connection):
    """The UTC day number of ``settled_at`` in SQL."""
    return _bucket(conn, receipt_log.c.settled_at, DAY_S)


def _bucket(conn: Connection, column, seconds: float):
    """``floor(column / seconds)`` in SQL: SQLite truncates a positive REAL with CAST, PostgreSQL rounds, so floor()."""
    n = column / seconds
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(n), sa.BigInteger)
    return sa.cast(n, sa.Integer)


def daily(conn: Connection, user_id: int, side: str, start: float, end: float) -> list[DayModel]:
    """Per (day, model) totals of ``user_id``'s requests (``side`` client: spent; host: earned) in [start, end)."""
    who, amount = _side(side)
    day = _day(conn).label("day")
    rows = conn.execute(
        sa.select(day, receipt_log.c.model, sa.func.count(), sa.func.sum(receipt_log.c.tokens), sa.func.sum(amount))
        .where(who == user_id, receipt_log.c.settled_at >= start, receipt_log.c.settled_at < end)
        .group_by(day, receipt_log.c.model)
        .order_by(day, receipt_log.c.model)
    ).all()
    return [DayModel(int(d), m, int(n), int(t), int(a)) for d, m, n, t, a in rows]


def fees_daily(conn: Connection, start: float, end: float) -> list[DayModel]:
    """The platform fee earned per (day, model) in [start, end), every account's requests together."""
    day = _day(conn).label("day")
    rows = conn.execute(
        sa.select(day, receipt_log.c.model, sa.func.count(), sa.func.sum(receipt_log.c.tokens), sa.func.sum(receipt_log.c.fee))
        .where(receipt_log.c.settled_at >= start, receipt_log.c.settled_at < end)
        .group_by(day, receipt_log.c.model)
        .order_by(day, receipt_log.c.model)
    ).all()
    return [DayModel(int(d), m, int(n), int(t), int(a)) for d, m, n, t, a in rows]


@dataclass(frozen=True, slots=True)
class MarketPoint:
    """One model's market over one stretch of time: averages of the epochs the hub published in it."""

    start: float
    model: str
    price_micro_per_mtok: float
    demand_tps: float
    supply_tps: float


def market_history(conn: Connection, start: float, end: float, bucket_s: float) -> list[MarketPoint]:
    """Published prices, demand and supply per model, averaged per ``bucket_s`` stretch of [start, end)."""
    p = prices.c
    bucket = _bucket(conn, p.epoch_start, bucket_s).label("bucket")
    rows = conn.execute(
        sa.select(bucket, p.model, sa.func.avg(p.price), sa.func.avg(p.demand_tps), sa.func.avg(p.supply_tps))
        .where(p.epoch_start >= start, p.epoch_start < end)
        .group_by(bucket, p.model)
        .order_by(bucket, p.model)
    ).all()
    return [MarketPoint(int(b) * bucket_s, m, float(price), float(demand), float(supply))
            for b, m, price, demand, supply in rows]


def request_log(conn: Connection, user_id: int, side: str, start: float, end: float, *,
                limit: int = 100, before_seq: int | None = None, request_id: str | None = None) -> list[LoggedRequest]:
    """``user_id``'s settled requests in [start, end), newest first, ``limit`` at most, older than ``before_seq``
    (only ``request_id``'s, if given)."""
    who, _ = _side(side)
    q = (
        sa.select(receipt_log.c.seq, receipt_log.c.settled_at, receipt_log.c.cost, receipt_log.c.fee,
                  receipt_log.c.entry, audits.c.status)
        .outerjoin(audits, audits.c.request_id == receipt_log.c.request_id)
        .where(who == user_id, receipt_log.c.settled_at >= start, receipt_log.c.settled_at < end)
        .order_by(receipt_log.c.seq.desc())
        .limit(limit)
    )
    if before_seq is not None:
        q = q.where(receipt_log.c.seq < before_seq)
    if request_id is not None:
        q = q.where(receipt_log.c.request_id == request_id)
    out = []
    for r in conn.execute(q):
        try:  # the hub wrote and signed these bytes itself; a row it cannot read is shown without its details
            receipt = decode_as(Receipt, chain.LogEntry.decode(r.entry).receipt)
        except ProtocolError:
            continue
        out.append(LoggedRequest(r.seq, receipt.request_id, r.settled_at, receipt.model, receipt.host_id,
                                 receipt.tokens_in, receipt.tokens_out, r.cost, r.cost - r.fee, r.status))
    return out


def request_detail(conn: Connection, user_id: int, request_id: str) -> tuple[LoggedRequest, str, list[str]] | None:
    """One settled request of ``user_id`` (as client or host): (request, "client"/"host", audit reasons); None otherwise."""
    row = conn.execute(sa.select(receipt_log.c.client_user_id, receipt_log.c.host_user_id)
                       .where(receipt_log.c.request_id == request_id)).first()
    if row is None or user_id not in (row.client_user_id, row.host_user_id):
        return None
    side = "client" if row.client_user_id == user_id else "host"
    reasons = conn.execute(sa.select(audits.c.reasons).where(audits.c.request_id == request_id)).scalar()
    found = request_log(conn, user_id, side, 0.0, _FOREVER, limit=1, request_id=request_id)
    return (found[0], side, json.loads(reasons or "[]")) if found else None


def receipt_extract(conn: Connection, user_id: int) -> list[tuple[int, bytes, bytes, bytes]]:
    """Every log entry ``user_id`` paid or earned, in order: the rows of :func:`gpunexus.hub.chain.write_log`."""
    q = (sa.select(receipt_log.c.seq, receipt_log.c.entry, receipt_log.c.entry_hash, receipt_log.c.sig)
         .where(sa.or_(receipt_log.c.client_user_id == user_id, receipt_log.c.host_user_id == user_id))
         .order_by(receipt_log.c.seq))
    return [tuple(r) for r in conn.execute(q)]


def balances(conn: Connection) -> tuple[dict[str, int], dict[str, int]]:
    """(each platform account's balance, user balances summed per role): the admin page's and ``/metrics``' figures."""
    system = dict(conn.execute(sa.select(accounts.c.name, accounts.c.balance)
                               .where(accounts.c.name.in_(list(ledger.SYSTEM_ACCOUNTS)))).all())
    by_role = dict(conn.execute(sa.select(users.c.role, sa.func.sum(accounts.c.balance))
                                .join(accounts, accounts.c.id == users.c.account_id).group_by(users.c.role)).all())
    return ({name: int(system.get(name, 0)) for name in ledger.SYSTEM_ACCOUNTS},
            {role: int(by_role.get(role) or 0) for role in ("client", "host", "admin")})


def ledger_totals(conn: Connection) -> dict:
    """Platform accounts one by one, user accounts summed per role, the grand total and :func:`ledger.verify`."""
    platform, by_role = balances(conn)
    check = ledger.verify(conn)
    return {
        "platform": platform,
        "users": by_role,
        "total_micro": check.total,
        "ok": check.ok,
        "mismatched": list(check.mismatched),
        "negative": list(check.negative),
        "settled_requests": conn.execute(sa.select(sa.func.count()).select_from(receipt_log)).scalar_one(),
    }


def user_rows(conn: Connection, query: str = "", limit: int = 200) -> list[dict]:
    """Users whose email contains ``query`` (all if empty), newest first, with balance and active keys."""
    active = (sa.select(api_keys.c.user_id, sa.func.count().label("n")).where(api_keys.c.revoked_at.is_(None))
              .group_by(api_keys.c.user_id).subquery())
    q = (sa.select(users.c.id, users.c.email, users.c.role, users.c.created_at, users.c.suspended_at,
                   accounts.c.balance, sa.func.coalesce(active.c.n, 0).label("keys"))
         .join(accounts, accounts.c.id == users.c.account_id)
         .outerjoin(active, active.c.user_id == users.c.id)
         .order_by(users.c.id.desc()).limit(limit))
    if query:
        q = q.where(users.c.email.contains(query.strip().lower(), autoescape=True))
    return [dict(r._mapping) for r in conn.execute(q)]


def _verdicts(conn: Connection, peer_ids: list[str], limit: int) -> list[dict]:
    rows = conn.execute(sa.select(audits.c.request_id, audits.c.host_id, audits.c.status, audits.c.reasons,
                                  audits.c.selected_at, audits.c.decided_at)
                        .where(audits.c.host_id.in_(peer_ids)).order_by(audits.c.selected_at.desc()).limit(limit)).all()
    return [{**r._mapping, "reasons": json.loads(r.reasons or "[]")} for r in rows]


def host_view(conn: Connection, user_id: int, recent: int = 20) -> dict:
    """A host account's peers with their reputation, its offers as last posted, and recent audit verdicts."""
    peers = [r.peer_id for r in conn.execute(sa.select(hosts.c.peer_id).where(hosts.c.user_id == user_id)
                                             .order_by(hosts.c.registered_at))]
    reps = honesty.reputation_of(conn, peers)
    return {
        "peers": [{"peer_id": p, "audits": reps[p].passes + reps[p].fails, "failures": reps[p].fails,
                   "p_honest": reps[p].p_honest, "excluded": rep_mod.excluded(reps[p])} for p in peers],
        "offers": [dict(r._mapping) for r in conn.execute(
            sa.select(offers.c.peer_id, offers.c.model, offers.c.price, offers.c.tokens_per_s, offers.c.free_slots,
                      offers.c.max_slots, offers.c.follows_market, offers.c.received_at, offers.c.expires_at)
            .where(offers.c.user_id == user_id).order_by(offers.c.model, offers.c.peer_id))],
        "verdicts": _verdicts(conn, peers, recent) if peers else [],
    }


def payout_summary(conn: Connection, user_id: int) -> dict:
    """A host's unpaid balance, payouts made and in flight, its threshold, its Connect account and whether Stripe
    said it can be paid out (None: not asked), and the payout history."""
    row = conn.execute(sa.select(users.c.account_id, users.c.payout_threshold_micro, users.c.connect_account_id,
                                 users.c.connect_payouts_enabled).where(users.c.id == user_id)).one()
    history = [dict(r._mapping) for r in conn.execute(
        sa.select(payouts.c.payout_id, payouts.c.amount, payouts.c.status, payouts.c.transfer_id, payouts.c.created_at)
        .where(payouts.c.user_id == user_id).order_by(payouts.c.created_at.desc()).limit(50))]
    totals = dict(conn.execute(sa.select(payouts.c.status, sa.func.sum(payouts.c.amount))
                               .where(payouts.c.user_id == user_id).group_by(payouts.c.status)).all())
    return {
        "unpaid_micro": ledger.balance(conn, row.account_id),
        "paid_micro": int(totals.get("paid", 0)),
        "in_flight_micro": int(totals.get("pending", 0)),
        "threshold_micro": row.payout_threshold_micro,
        "connect_account_id": row.connect_account_id,
        "payouts_enabled": row.connect_payouts_enabled,
        "history": history,
    }


def admin_hosts(conn: Connection, recent: int = 5) -> list[dict]:
    """Every registered host peer with its owner, reputation, live offers and recent verdicts."""
    report = {h["peer_id"]: h for h in honesty.host_report(conn, recent)}
    rows = conn.execute(sa.select(hosts.c.peer_id, hosts.c.registered_at, users.c.email, users.c.suspended_at)
                        .join(users, users.c.id == hosts.c.user_id).order_by(hosts.c.registered_at)).all()
    models = {}
    for peer, model in conn.execute(sa.select(offers.c.peer_id, offers.c.model).order_by(offers.c.model)):
        models.setdefault(peer, []).append(model)
    empty = {"audits": 0, "failures": 0, "pending": 0, "p_honest": None, "excluded": False, "recent": []}
    return [{**empty, **report.get(r.peer_id, {}), "peer_id": r.peer_id, "owner": r.email,
             "owner_suspended": r.suspended_at is not None, "registered_at": r.registered_at,
             "models": models.get(r.peer_id, [])} for r in rows]
