"""Disputes: a client asks the hub to audit one of its own settled requests.

A dispute does not judge anything itself: it selects the receipt for audit
at rate 1 (a pending ``audits`` row, the shape :mod:`gpunexus.hub.honesty`
selects with), and the existing machinery does the rest. The client's
gateway is asked for the request's opening at its next audit poll (it keeps
openings for an hour by default), the hub replays it on the reference
model, and a failed audit takes the host's share of that receipt back to the
client (``honesty.record_verdict``). The request page shows the verdict, its
reasons and the refund. A receipt already selected keeps its audit: the
dispute then shows that audit's verdict.

Only the paying client may dispute, once per request (pressing again
changes nothing), and at most :data:`MAX_DISPUTES_PER_DAY` a day, since each
audit costs the hub a prefill of the reference model.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import Receipt
from sqlalchemy.engine import Connection

from . import chain, honesty, ledger
from .config import HubConfig
from .db import audits, disputes, receipt_log

MAX_DISPUTES_PER_DAY = 20


class DisputeError(Exception):
    """A dispute that cannot be opened: ``status`` 404 (not the caller's request) or 429 (too many today)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True, slots=True)
class Dispute:
    request_id: str
    disputed_at: float
    audit: str
    """The audit's status: ``pending`` until the gateway's opening arrives, then ``passed``, ``failed``,
    ``unopened`` (the gateway no longer had the request) or ``skipped`` (no reference model for it)."""
    refunded_micro: int
    """What a failed audit took back from the host to the client."""
    unrecovered_micro: int
    """What it could not take back (the host was paid out already)."""


def dispute_of(conn: Connection, request_id: str) -> Dispute | None:
    row = conn.execute(
        sa.select(disputes.c.disputed_at, audits.c.status, audits.c.withheld, audits.c.debt)
        .select_from(disputes.join(audits, audits.c.request_id == disputes.c.request_id))
        .where(disputes.c.request_id == request_id)).first()
    return None if row is None else Dispute(request_id, row.disputed_at, row.status, int(row.withheld), int(row.debt))


def open_dispute(conn: Connection, cfg: HubConfig, user_id: int, request_id: str, now: float) -> Dispute:
    """Select ``user_id``'s settled request ``request_id`` for audit (once); the dispute as it stands."""
    row = conn.execute(sa.select(receipt_log.c.client_user_id, receipt_log.c.entry)
                       .where(receipt_log.c.request_id == request_id)).first()
    if row is None or row.client_user_id != user_id:
        raise DisputeError(404, "No request with this id on your account.")
    existing = dispute_of(conn, request_id)
    if existing is not None:
        return existing
    today = conn.execute(sa.select(sa.func.count()).select_from(disputes)
                         .where(disputes.c.user_id == user_id, disputes.c.disputed_at > now - 86400)).scalar_one()
    if today >= MAX_DISPUTES_PER_DAY:
        raise DisputeError(429, f"At most {MAX_DISPUTES_PER_DAY} disputes a day; try again tomorrow.")
    data = chain.LogEntry.decode(row.entry).receipt
    receipt = decode_as(Receipt, data)
    conn.execute(ledger.insert_ignore(conn, audits).values(
        request_id=request_id, host_id=receipt.host_id, gateway_id=receipt.gateway_id,
        period=honesty.period_of(cfg, receipt.issued_at), rate=1.0, receipt=data, status="pending", reasons="",
        selected_at=now, withheld=0, debt=0))
    conn.execute(disputes.insert().values(request_id=request_id, user_id=user_id, disputed_at=now))
    dispute = dispute_of(conn, request_id)
    assert dispute is not None
    return dispute
