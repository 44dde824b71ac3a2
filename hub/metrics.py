"""The hub's ``/metrics``, in Prometheus' text format (prometheus_client).

What an operator graphs and alerts on: requests by route and status and how
long they took, receipts by outcome (settled, duplicate, refused and why),
and, read from the database at scrape time, the money: each platform
account's balance, user balances summed per role, the ledger's grand total
(conservation: it must stay 0), the receipts settled so far, audits by
status and hosts by standing.

The scrape needs an admin API key (``Authorization: Bearer``, which
Prometheus' ``authorization`` scrape setting sends): these are the
business's figures. One registry per hub, not the library's global one, so
several hubs in one process (the tests, ``gpunexus demo``) keep their own.
The money figures are read in one transaction of cheap aggregates (the
chain head's sequence number rather than a count of the receipt log); the
full conservation check, which walks every posting, stays on the admin page.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy.engine import Connection

from gpunexus.verify import reputation

from . import reports
from .db import accounts, audits, chain_head, host_reputation

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpunexus_hub_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("gpunexus_hub_request_seconds", "Time to answer, by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.receipts = Counter("gpunexus_hub_receipts", "Receipts submitted, by outcome (settled, duplicate, refused) and reason", ["status", "reason"], registry=r)
        self.platform = Gauge("gpunexus_hub_platform_balance_micro_usd", "Balance of each platform account (fees, holds, clearing, grants)", ["account"], registry=r)
        self.users = Gauge("gpunexus_hub_user_balance_micro_usd", "User balances summed per role", ["role"], registry=r)
        self.total = Gauge("gpunexus_hub_ledger_total_micro_usd", "Sum of every account's balance: 0 while money is conserved", registry=r)
        self.settled = Gauge("gpunexus_hub_receipts_settled", "Receipts in the signed log (its last sequence number)", registry=r)
        self.audits = Gauge("gpunexus_hub_audits", "Audits by status", ["status"], registry=r)
        self.hosts = Gauge("gpunexus_hub_hosts", "Audited hosts by standing (excluded: their audit record puts them below the honesty bar)", ["standing"], registry=r)

    def answered(self, route: str, status: int, started: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def outcomes(self, outcomes) -> None:
        for o in outcomes:
            # A refusal's reason is free text with ids in it; its first words are the kind.
            self.receipts.labels(o.status, _reason_kind(o.reason) if o.status == "refused" else "").inc()

    def render(self, snapshot: dict) -> bytes:
        for name, value in snapshot["platform"].items():
            self.platform.labels(name).set(value)
        for role, value in snapshot["users"].items():
            self.users.labels(role).set(value)
        self.total.set(snapshot["total"])
        self.settled.set(snapshot["settled"])
        for status, n in snapshot["audits"].items():
            self.audits.labels(status).set(n)
        for standing, n in snapshot["hosts"].items():
            self.hosts.labels(standing).set(n)
        return generate_latest(self.registry)


def snapshot(conn: Connection) -> dict:
    """The money figures of one scrape, in one read transaction."""
    platform, by_role = reports.balances(conn)
    total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(accounts.c.balance), 0))).scalar_one()
    head = conn.execute(sa.select(chain_head.c.seq)).scalar()
    by_status = dict(conn.execute(sa.select(audits.c.status, sa.func.count()).group_by(audits.c.status)).all())
    records = conn.execute(sa.select(host_reputation.c.passes, host_reputation.c.fails)).all()
    excluded = sum(reputation.excluded(reputation.Reputation(r.passes, r.fails)) for r in records)
    return {
        "platform": platform,
        "users": by_role,
        "total": int(total),
        "settled": int(head or 0),
        "audits": {status: int(n) for status, n in by_status.items()},
        "hosts": {"good": len(records) - excluded, "excluded": excluded},
    }


def _reason_kind(reason: str) -> str:
    words = reason.replace(":", " ").split()
    return " ".join(words[:3]).lower() if words else "unknown"
