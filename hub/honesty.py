"""Audits of settled receipts: selection, openings, verdicts, reputation, withheld pay.

1. **Selection** (:func:`select_settled`, in the settlement's worker thread,
   right after a batch settled). Each period of ``audit_period_s`` has a
   secret (:mod:`gpunexus.verify.selection`); its commitment is public at
   ``GET /v1/audits/commitment`` from the period's first use on, and the
   secret is revealed there once the period's root deadline (period end +
   ``audit_root_grace_s``) passed. Each host publishes, for each period, the
   signed Merkle root of the receipts it signed in it
   (:class:`~gpunexus.protocol.messages.ReceiptRoot`, ``POST
   /v1/audits/roots``, first one per host and period wins, refused after the
   deadline). A receipt of period ``p`` (``floor(issued_at /
   audit_period_s)``) is selected iff ``is_selected(secret_p, root_(host, p),
   request_id, rate)`` with ``rate = max(audit_rate,
   verify.reputation.audit_rate(host))``: the host fixed its root before the
   secret was revealed and the hub fixed the secret before it saw the root,
   so neither side picks which receipts are audited, and anyone holding the
   secret and the root can recheck the choice. A receipt settled before its
   root arrives waits (``audit_waiting``) for the root or the deadline; **a
   host that publishes no root for a period has all of that period's
   receipts selected** (rate 1) once the deadline passed, so withholding the
   root never pays. At rate 1 (challenges, suspects, ``audit_rate=1``) the
   choice does not depend on the root and is made at settlement. Receipts
   paid by one of ``challenge_accounts`` (the hub's own probes, sent through
   an ordinary gateway by ``gpunexus hub challenge``) are always selected.
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

import base64
import json
import math
from dataclasses import dataclass

import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import Opening, Receipt, ReceiptRoot
from gpunexus.verify import reputation as rep_mod
from gpunexus.verify import selection
from gpunexus.verify.audit import AuditRequest, Verdict, audit
from gpunexus.verify.registry import REFERENCE_CONFIGS, load_reference
from sqlalchemy.engine import Connection

from . import ledger
from .config import HubConfig
from .db import (
    audit_jobs,
    audit_openings,
    audit_periods,
    audit_roots,
    audit_waiting,
    audits,
    host_reputation,
    receipt_log,
    users,
)
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


def root_deadline(cfg: HubConfig, period: int) -> float:
    """When ``period``'s roots are due: its end plus ``audit_root_grace_s``; its secret is revealed then."""
    return (period + 1) * cfg.audit_period_s + cfg.audit_root_grace_s


def _root_of(conn: Connection, host_id: str, period: int) -> bytes | None:
    return conn.execute(sa.select(audit_roots.c.root).where(audit_roots.c.host_id == host_id,
                                                            audit_roots.c.period == period)).scalar()


def _choose(conn: Connection, rows: list[dict], secret: bytes, root: bytes | None, now: float) -> list[str]:
    """Decide waiting-shaped ``rows`` of one host and period; insert the selected as pending audits."""
    chosen = []
    for w in rows:
        rate = w["rate"] if root is not None else 1.0  # no root by the deadline: everything is audited
        if rate >= 1.0 or selection.is_selected(secret, root, w["request_id"], rate):
            chosen.append({"request_id": w["request_id"], "host_id": w["host_id"], "gateway_id": w["gateway_id"],
                           "period": w["period"], "rate": rate, "receipt": w["receipt"], "status": "pending",
                           "reasons": "", "selected_at": now, "withheld": 0, "debt": 0})
    if chosen:  # one multi-row statement: a batch of 1000 receipts must not cost 1000 round trips
        conn.execute(ledger.insert_ignore(conn, audits), chosen)
    return [c["request_id"] for c in chosen]


def select_settled(conn: Connection, cfg: HubConfig, settled: list[tuple[Receipt, bytes]], now: float) -> list[str]:
    """Select among just-settled receipts, or park them until their host's root; the selected request ids.

    A receipt's period is that of its ``issued_at``. At rate 1 (challenges, suspects, ``audit_rate=1``)
    it is selected at once; otherwise with the host's root of that period once the root is there, or at
    rate 1 once the root's deadline passed without one; until then it waits in ``audit_waiting``.
    """
    if not settled:
        return []
    reps = reputation_of(conn, sorted({r.host_id for r, _ in settled}))
    challenged: set[str] = set()
    if cfg.challenge_accounts:
        challenged = set(conn.execute(
            sa.select(receipt_log.c.request_id).join(users, users.c.id == receipt_log.c.client_user_id)
            .where(receipt_log.c.request_id.in_([r.request_id for r, _ in settled]),
                   users.c.email.in_(sorted(e.strip().lower() for e in cfg.challenge_accounts)))).scalars())
    secrets: dict[int, bytes] = {}
    roots: dict[tuple[str, int], bytes | None] = {}
    groups: dict[tuple[str, int], list[dict]] = {}  # (host, period) -> rows decided now
    waiting = []
    for receipt, data in settled:
        period = period_of(cfg, receipt.issued_at)
        if period not in secrets:
            secrets[period], _ = period_secret(conn, period, now)
        key = (receipt.host_id, period)
        if key not in roots:
            roots[key] = _root_of(conn, receipt.host_id, period)
        rate = 1.0 if receipt.request_id in challenged else host_rate(cfg, reps[receipt.host_id])
        row = {"request_id": receipt.request_id, "host_id": receipt.host_id, "gateway_id": receipt.gateway_id,
               "period": period, "rate": rate, "receipt": data, "settled_at": now}
        if rate >= 1.0 or roots[key] is not None or now >= root_deadline(cfg, period):
            groups.setdefault(key, []).append(row)
        else:
            waiting.append(row)
    if waiting:
        conn.execute(ledger.insert_ignore(conn, audit_waiting), waiting)
    picked = []
    for (host_id, period), rows in groups.items():
        picked += _choose(conn, rows, secrets[period], roots[(host_id, period)], now)
    return picked


def _decide_waiting(conn: Connection, where, root_for, now: float) -> list[str]:
    rows = [dict(r._mapping) for r in conn.execute(sa.select(audit_waiting).where(where)
                                                    .order_by(audit_waiting.c.host_id, audit_waiting.c.period))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["host_id"], r["period"]), []).append(r)
    picked = []
    for (_, period), group in groups.items():
        secret, _ = period_secret(conn, period, now)
        picked += _choose(conn, group, secret, root_for(group[0]), now)
    if rows:
        conn.execute(sa.delete(audit_waiting).where(audit_waiting.c.request_id.in_([r["request_id"] for r in rows])))
    return picked


def accept_root(conn: Connection, cfg: HubConfig, root_msg: ReceiptRoot, blob: bytes, now: float) -> dict:
    """Store a host's root (first one per host and period wins) and decide the receipts waiting for it."""
    period_secret(conn, root_msg.period, now)  # the secret exists at the latest now, before any reveal
    conn.execute(ledger.insert_ignore(conn, audit_roots).values(
        host_id=root_msg.host_id, period=root_msg.period, count=root_msg.count, root=root_msg.root,
        issued_at=root_msg.issued_at, received_at=now, blob=blob))
    stored = conn.execute(sa.select(audit_roots.c.root, audit_roots.c.count).where(
        audit_roots.c.host_id == root_msg.host_id, audit_roots.c.period == root_msg.period)).one()
    picked = _decide_waiting(conn, sa.and_(audit_waiting.c.host_id == root_msg.host_id,
                                           audit_waiting.c.period == root_msg.period), lambda r: stored.root, now)
    return {"host_id": root_msg.host_id, "period": root_msg.period, "root": stored.root.hex(), "count": stored.count,
            "accepted": stored.root == root_msg.root and stored.count == root_msg.count, "selected": len(picked)}


def decide_overdue(conn: Connection, cfg: HubConfig, now: float) -> list[str]:
    """Receipts still waiting after their period's root deadline: their host published no root, all selected."""
    last = math.floor((now - cfg.audit_root_grace_s) / cfg.audit_period_s) - 1  # last period whose deadline passed
    return _decide_waiting(conn, audit_waiting.c.period <= last,
                           lambda r: _root_of(conn, r["host_id"], r["period"]), now)


def commitments(conn: Connection, cfg: HubConfig, now: float) -> dict:
    """The current period's commitment and the latest revealed secret (its roots' deadline passed)."""
    period = period_of(cfg, now)
    _, commitment = period_secret(conn, period, now)
    last = math.floor((now - cfg.audit_root_grace_s) / cfg.audit_period_s) - 1
    prev = conn.execute(sa.select(audit_periods.c.period, audit_periods.c.secret, audit_periods.c.commitment)
                        .where(audit_periods.c.period <= last).order_by(audit_periods.c.period.desc()).limit(1)).first()
    return {
        "period_s": cfg.audit_period_s,
        "root_grace_s": cfg.audit_root_grace_s,
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


def record_verdict(conn: Connection, request_id: str, status: str, reasons: list[str], now: float,
                   opening: bytes | None = None) -> dict:
    """Store the verdict (and the opening it rests on); update reputation and withhold pay for a failed audit. Idempotent."""
    row = conn.execute(sa.select(audits.c.status, audits.c.host_id).where(audits.c.request_id == request_id)
                       .with_for_update()).one()
    if row.status not in ("pending", "verifying"):  # verifying: peer verifiers have it (hub/peer_audit.py)
        return {"request_id": request_id, "status": row.status, "already": True}
    if opening is not None:
        conn.execute(ledger.insert_ignore(conn, audit_openings).values(request_id=request_id, opening=opening, received_at=now))
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


def verifier_verdicts(conn: Connection, request_ids: list[str]) -> dict[str, list[dict]]:
    """Each audit's peer-verifier verdicts in round order (``hub/peer_audit.py``): who judged, and what."""
    if not request_ids:
        return {}
    out: dict[str, list[dict]] = {}
    for r in conn.execute(sa.select(audit_jobs.c.request_id, audit_jobs.c.round, audit_jobs.c.verifier_id,
                                    audit_jobs.c.status, audit_jobs.c.verdict)
                          .where(audit_jobs.c.request_id.in_(request_ids), audit_jobs.c.kind == "audit")
                          .order_by(audit_jobs.c.round)):
        out.setdefault(r.request_id, []).append({"round": r.round, "verifier_id": r.verifier_id,
                                                 "verdict": r.verdict or r.status})
    return out


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
        by_verifiers = verifier_verdicts(conn, [x.request_id for x in rows])
        out.append({
            "peer_id": peer, "audits": r.passes + r.fails, "failures": r.fails, "p_honest": r.p_honest,
            "excluded": rep_mod.excluded(r),
            "pending": conn.execute(sa.select(sa.func.count()).select_from(audits)
                                    .where(audits.c.host_id == peer, audits.c.status.in_(("pending", "verifying")))).scalar_one(),
            "recent": [{"request_id": x.request_id, "status": x.status, "reasons": json.loads(x.reasons or "[]"),
                        "decided_at": x.decided_at, "withheld_micro": x.withheld, "debt_micro": x.debt,
                        "verifiers": by_verifiers.get(x.request_id, [])} for x in rows],
        })
    return out


AUDIT_LOG_FORMAT = "gpunexus/audit-log/1"


def export_audits(conn: Connection, cfg: HubConfig, now: float) -> list[dict]:
    """The audit log (JSON-able lines) written next to the receipt log by ``gpunexus hub receipts export``.

    Line 1, the header: ``{"format": "gpunexus/audit-log/1", "period_s", "root_grace_s", "exported_at"}``.
    Then one line per kind:

    * ``{"kind": "period", "period", "commitment": hex, "secret": hex}`` for every period whose root
      deadline passed (its secret is public); later periods are not listed (their secret stays hidden).
    * ``{"kind": "root", "host_id", "period", "root": base64 ReceiptRoot}``: every host-signed root.
    * ``{"kind": "verdict", "request_id", "host_id", "period", "rate", "status", "reasons": [..],
      "decided_at", "verifiers": [{"round", "verifier_id", "verdict"}]}``: every selected receipt (the
      receipt itself is in the receipt log), ``status`` ``pending``, ``verifying`` (with peer
      verifiers), ``passed``, ``failed``, ``unopened`` or ``skipped``; ``verifiers`` is empty where the
      hub replayed the audit itself, else the escalation path (``hub/peer_audit.py``).
    """
    last = math.floor((now - cfg.audit_root_grace_s) / cfg.audit_period_s) - 1
    out: list[dict] = [{"format": AUDIT_LOG_FORMAT, "period_s": cfg.audit_period_s,
                        "root_grace_s": cfg.audit_root_grace_s, "exported_at": now}]
    for r in conn.execute(sa.select(audit_periods).where(audit_periods.c.period <= last).order_by(audit_periods.c.period)):
        out.append({"kind": "period", "period": r.period, "commitment": r.commitment.hex(), "secret": r.secret.hex()})
    for r in conn.execute(sa.select(audit_roots).order_by(audit_roots.c.period, audit_roots.c.host_id)):
        out.append({"kind": "root", "host_id": r.host_id, "period": r.period,
                    "root": base64.b64encode(r.blob).decode()})
    rows = conn.execute(sa.select(audits).order_by(audits.c.selected_at, audits.c.request_id)).all()
    judged = verifier_verdicts(conn, [r.request_id for r in rows])
    for r in rows:
        out.append({"kind": "verdict", "request_id": r.request_id, "host_id": r.host_id, "period": r.period,
                    "rate": r.rate, "status": r.status, "reasons": json.loads(r.reasons or "[]"),
                    "decided_at": r.decided_at, "verifiers": judged.get(r.request_id, [])})
    return out


def export_openings(conn: Connection) -> list[tuple[str, bytes]]:
    """(request id, Opening bytes) of every opening the hub audited, in the order received."""
    return [tuple(r) for r in conn.execute(sa.select(audit_openings.c.request_id, audit_openings.c.opening)
                                           .order_by(audit_openings.c.received_at, audit_openings.c.request_id))]


def decode_opening(blob: bytes) -> Opening:
    return decode_as(Opening, blob)
