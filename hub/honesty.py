"""Audits of settled receipts: selection, openings, verdicts, reputation, withheld pay.

1. **Selection** (:func:`select_settled`, in the settlement's worker thread,
   right after a batch settled). Each period of ``audit_period_s`` has a
   secret (:mod:`gpunexus.verify.selection`); its commitment is public at
   ``GET /v1/audits/commitment`` from the period's first receipt on, and the
   secret is revealed there once the period is over. A receipt is selected iff
   ``is_selected(secret, SHA-256(receipt bytes), request_id, rate)`` with
   ``rate = max(audit_rate, verify.reputation.audit_rate(host))``: the host
   signed the receipt before it could know the secret, and the hub fixed the
   secret before it saw the receipt, so neither side picks which receipts are
   audited, and anyone holding the receipt can recheck the choice after the
   reveal. (The receipt's own hash stands in for the per-host Merkle root of
   ``verify.selection``: hosts do not publish period roots yet.) Receipts paid
   by one of ``challenge_accounts`` (the hub's own probes, sent through an
   ordinary gateway by ``gpunexus hub challenge``) are always selected.
2. **Opening**: a selected receipt is pending until the gateway that
   countersigned it posts the :class:`~gpunexus.protocol.messages.Opening`
   (the request and the output it received). It must match the receipt's
   ``prompt_hash``, ``output_hash`` and seed, or it is refused (the gateway
   signed those hashes). A gateway without the opening (expired, or
   ``--no-audit-retention``) answers ``null``: the audit is ``unopened`` and
   says nothing about the host.
3. **Verdict**: :func:`gpunexus.verify.audit.audit` against the reference
   model whose hash the receipt names (``skipped`` when the hub has none),
   in a worker thread. The verdict, the host's reputation and, for a failed
   audit, the withholding of the host's earnings for that receipt (a ledger
   posting host -> client, key ``audit:<request id>``, never below zero: what
   was already paid out is recorded as ``debt``) commit in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import Opening, Receipt
from gpunexus.verify import reputation as rep_mod
from gpunexus.verify import selection
from gpunexus.verify.audit import AuditRequest, Verdict, audit
from gpunexus.verify.registry import REFERENCE_CONFIGS, load_reference
from sqlalchemy.engine import Connection

from . import ledger
from .config import HubConfig
from .db import audit_periods, audits, host_reputation, receipt_log, users
from .ledger import Journal


def period_of(cfg: HubConfig, t: float) -> int:
    return math.floor(t / cfg.audit_period_s)


def period_secret(conn: Connection, period: int, now: float) -> tuple[bytes, bytes]:
    """(secret, commitment) of ``period``, created on first use (the first writer wins)."""
    secret = selection.new_secret()
    conn.execute(ledger.insert_ignore(conn, audit_periods).values(
        period=period, secret=secret, commitment=selection.secret_commitment(secret), created_at=now))
    row = conn.execute(sa.select(audit_periods.c.secret, audit_periods.c.commitment)
                       .where(audit_periods.c.period == period)).one()
    return row.secret, row.commitment


def reputation_of(conn: Connection, peer_ids: list[str]) -> dict[str, rep_mod.Reputation]:
    rows = conn.execute(sa.select(host_reputation.c.peer_id, host_reputation.c.passes, host_reputation.c.fails)
                        .where(host_reputation.c.peer_id.in_(peer_ids))).all() if peer_ids else []
    out = {p: rep_mod.Reputation() for p in peer_ids}
    out.update({r.peer_id: rep_mod.Reputation(r.passes, r.fails) for r in rows})
    return out


def host_rate(cfg: HubConfig, reputation: rep_mod.Reputation) -> float:
    return min(1.0, max(cfg.audit_rate, rep_mod.audit_rate(reputation)))


def select_settled(conn: Connection, cfg: HubConfig, settled: list[tuple[Receipt, bytes]], now: float) -> list[str]:
    """Mark the selected ones among just-settled receipts as pending audits; their request ids."""
    if not settled:
        return []
    period = period_of(cfg, now)
    secret, _ = period_secret(conn, period, now)
    reps = reputation_of(conn, sorted({r.host_id for r, _ in settled}))
    challenged: set[str] = set()
    if cfg.challenge_accounts:
        challenged = set(conn.execute(
            sa.select(receipt_log.c.request_id).join(users, users.c.id == receipt_log.c.client_user_id)
            .where(receipt_log.c.request_id.in_([r.request_id for r, _ in settled]),
                   users.c.email.in_(sorted(e.strip().lower() for e in cfg.challenge_accounts)))).scalars())
    rows = []
    for receipt, data in settled:
        rate = 1.0 if receipt.request_id in challenged else host_rate(cfg, reps[receipt.host_id])
        if selection.is_selected(secret, hashlib.sha256(data).digest(), receipt.request_id, rate):
            rows.append({"request_id": receipt.request_id, "host_id": receipt.host_id, "gateway_id": receipt.gateway_id,
                         "period": period, "rate": rate, "receipt": data, "status": "pending", "reasons": "",
                         "selected_at": now, "withheld": 0, "debt": 0})
    for row in rows:
        conn.execute(ledger.insert_ignore(conn, audits).values(**row))
    return [r["request_id"] for r in rows]


def commitments(conn: Connection, cfg: HubConfig, now: float) -> dict:
    """The current period's commitment and the previous period's revealed secret."""
    period = period_of(cfg, now)
    _, commitment = period_secret(conn, period, now)
    prev = conn.execute(sa.select(audit_periods.c.period, audit_periods.c.secret, audit_periods.c.commitment)
                        .where(audit_periods.c.period < period).order_by(audit_periods.c.period.desc()).limit(1)).first()
    return {
        "period_s": cfg.audit_period_s,
        "current": {"period": period, "commitment": commitment.hex()},
        "previous": None if prev is None else {"period": prev.period, "commitment": prev.commitment.hex(),
                                               "secret": prev.secret.hex()},
    }


def pending_for(conn: Connection, user_id: int) -> list[str]:
    from .db import gateways

    mine = sa.select(gateways.c.peer_id).where(gateways.c.user_id == user_id)
    q = (sa.select(audits.c.request_id).where(audits.c.status == "pending", audits.c.gateway_id.in_(mine))
         .order_by(audits.c.selected_at).limit(1000))
    return list(conn.execute(q).scalars())


@dataclass(frozen=True)
class Pending:
    request_id: str
    host_id: str
    gateway_owner: int | None
    status: str
    receipt: bytes


def load_pending(conn: Connection, request_id: str) -> Pending | None:
    from .db import gateways

    row = conn.execute(
        sa.select(audits.c.request_id, audits.c.host_id, gateways.c.user_id, audits.c.status, audits.c.receipt)
        .select_from(audits.outerjoin(gateways, gateways.c.peer_id == audits.c.gateway_id))
        .where(audits.c.request_id == request_id)).first()
    return None if row is None else Pending(row[0], row[1], row[2], row[3], row[4])


def opening_problem(opening: Opening, receipt: Receipt) -> str:
    """Why this opening is not the request and output the receipt covers ('' if it is)."""
    if opening.request_id != receipt.request_id:
        return "the opening names another request"
    if opening.prompt_hash() != receipt.prompt_hash:
        return "the opening's request does not hash to the receipt's prompt_hash"
    if opening.sampling.seed != receipt.seed:
        return "the opening's seed is not the receipt's"
    # Only the hash: a host that hid token ids or claimed more tokens than ids is the
    # audit's business (``count``), not a fault of the gateway's opening.
    if opening.output_hash() != receipt.output_hash:
        return "the opening's output does not hash to the receipt's output_hash"
    return ""


_BY_HASH: dict[str, str] = {}


def reference_for(model_hash: str):
    """(model, tokenizer) of the reference model with this hash, or None."""
    if not _BY_HASH:
        for name in REFERENCE_CONFIGS:
            _BY_HASH[load_reference(name)[0].model_hash] = name
    name = _BY_HASH.get(model_hash)
    return None if name is None else load_reference(name)


def run_audit(opening: Opening, receipt: Receipt) -> tuple[str, Verdict | None]:
    """CPU work, for a worker thread: ('passed'|'failed', verdict) or ('skipped', None)."""
    ref = reference_for(receipt.model_hash)
    if ref is None:
        return "skipped", None
    model, tokenizer = ref
    verdict = audit(model, tokenizer, AuditRequest.from_order(opening, receipt, opening.output_ids))
    return ("passed" if verdict.passed else "failed"), verdict


def record_verdict(conn: Connection, request_id: str, status: str, reasons: list[str], now: float) -> dict:
    """Store the verdict; update reputation and withhold pay for a failed audit. Idempotent."""
    row = conn.execute(sa.select(audits.c.status, audits.c.host_id).where(audits.c.request_id == request_id)
                       .with_for_update()).one()
    if row.status != "pending":
        return {"request_id": request_id, "status": row.status, "already": True}
    withheld = debt = 0
    if status in ("passed", "failed"):
        passed = status == "passed"
        conn.execute(ledger.insert_ignore(conn, host_reputation).values(peer_id=row.host_id, passes=0, fails=0, updated_at=now))
        conn.execute(sa.update(host_reputation).where(host_reputation.c.peer_id == row.host_id).values(
            passes=host_reputation.c.passes + int(passed), fails=host_reputation.c.fails + int(not passed), updated_at=now))
        if not passed:
            withheld, debt = _withhold(conn, request_id, now)
    conn.execute(sa.update(audits).where(audits.c.request_id == request_id).values(
        status=status, reasons=json.dumps(reasons), decided_at=now, withheld=withheld, debt=debt))
    return {"request_id": request_id, "status": status, "passed": status == "passed", "reasons": reasons,
            "withheld_micro": withheld, "debt_micro": debt}


def _withhold(conn: Connection, request_id: str, now: float) -> tuple[int, int]:
    """Take the host's share of this receipt back to the client, as far as its balance allows."""
    entry = conn.execute(sa.select(receipt_log.c.client_user_id, receipt_log.c.host_user_id, receipt_log.c.cost,
                                   receipt_log.c.fee).where(receipt_log.c.request_id == request_id)).one()
    share = int(entry.cost - entry.fee)
    accounts = dict(conn.execute(sa.select(users.c.id, users.c.account_id)
                                 .where(users.c.id.in_([entry.client_user_id, entry.host_user_id]))).all())
    host_acct, client_acct = accounts[entry.host_user_id], accounts[entry.client_user_id]
    available = ledger.lock_balances(conn, [host_acct]).get(host_acct, 0)
    take = max(0, min(share, available))
    if take and host_acct != client_acct:
        ledger.post(conn, Journal(f"audit:{request_id}", "audit", ((host_acct, -take), (client_acct, take))), now=now)
    elif host_acct == client_acct:
        take = 0
    return take, share - take


def reputations(conn: Connection) -> list[tuple[str, rep_mod.Reputation]]:
    rows = conn.execute(sa.select(host_reputation.c.peer_id, host_reputation.c.passes, host_reputation.c.fails)
                        .order_by(host_reputation.c.peer_id)).all()
    return [(r.peer_id, rep_mod.Reputation(r.passes, r.fails)) for r in rows]


def host_report(conn: Connection, recent: int = 5) -> list[dict]:
    """Every host that has an audit record or a selected receipt, with its recent verdicts."""
    reps = dict(reputations(conn))
    peers = sorted(set(reps) | set(conn.execute(sa.select(audits.c.host_id).distinct()).scalars()))
    out = []
    for peer in peers:
        r = reps.get(peer, rep_mod.Reputation())
        rows = conn.execute(sa.select(audits.c.request_id, audits.c.status, audits.c.reasons, audits.c.decided_at,
                                      audits.c.withheld, audits.c.debt)
                            .where(audits.c.host_id == peer).order_by(audits.c.selected_at.desc()).limit(recent)).all()
        out.append({
            "peer_id": peer, "audits": r.passes + r.fails, "failures": r.fails, "p_honest": r.p_honest,
            "excluded": rep_mod.excluded(r),
            "pending": conn.execute(sa.select(sa.func.count()).select_from(audits)
                                    .where(audits.c.host_id == peer, audits.c.status == "pending")).scalar_one(),
            "recent": [{"request_id": x.request_id, "status": x.status, "reasons": json.loads(x.reasons or "[]"),
                        "decided_at": x.decided_at, "withheld_micro": x.withheld, "debt_micro": x.debt} for x in rows],
        })
    return out


def decode_opening(blob: bytes) -> Opening:
    return decode_as(Opening, blob)
