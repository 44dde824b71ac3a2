"""Audits by peer verifiers: for models the hub cannot replay itself.

1. **Jobs.** When an opening arrives for a receipt whose model the hub has no
   reference for (or ``hub_replay`` is off), :func:`open_jobs` stores a round-1
   job (status ``verifying`` on the audit) and, at ``known_answer_rate``, a
   ``known-bad`` job: the same opening with its output replaced by random tokens
   of the same length, so the right answer is "fail". Which audits get one is
   decided by the period's committed secret, like the audit selection itself.
2. **The draw** (:func:`assign`). Each unassigned job is given to one verifier,
   drawn with ``SHA-256(domain || secret || job_id)`` among the eligible:
   hosts with a live offer of the model that polled for jobs of the same
   model hash in the last ``verifier_seen_s``, with ``p_honest >= verifier_min_p_honest`` and not
   excluded, never the audited host, nor a host of the host's account, nor an
   earlier verifier of the same audit or a host of its account (a second
   verifier is independent of the first). Anyone with the revealed secret and
   the eligible set can recheck the draw. Two jobs of one request never go
   to the same verifier (a known-answer job would stand out beside its
   twin). A job not answered within
   ``verifier_job_ttl_s`` is drawn again, its late verifier avoided.
3. **Results** (:func:`accept_result`). The verifier's signed
   :class:`~gpunexus.protocol.messages.VerifierResult` is judged by
   :func:`gpunexus.verify.peer.judge`. An audit passes on one passing result; a
   failing one draws a round-2 verifier, and **the host fails only on two
   independent failures** (``record_verdict`` then withholds its pay as a hub
   replay failure does). When round 2 contradicts round 1, a round-3 verifier
   breaks the tie and the verifier in the minority gets a failure on its own
   record: a hostile verifier that fails honest hosts is outvoted and loses
   its work. A ``known-bad`` job that the verifier's numbers pass counts as a
   failure on the *verifier's* record (``host_reputation``) too: one such miss
   takes it under ``verifier_min_p_honest``, so it gets no more jobs, and its
   own hosting is audited more.
4. **Fees.** Each answered job, except a missed known-answer one, pays the
   verifier ``verifier_fee_micro`` from the platform fee account (as far as
   that balance goes), posted once under ``verify:<job id>``.
"""

from __future__ import annotations

import hashlib
import json
import random

import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import AuditJob, Opening, Receipt, VerifierResult
from gpunexus.protocol.signing import Signer
from gpunexus.verify import reputation as rep_mod
from gpunexus.verify.peer import PrefillReport, judge
from sqlalchemy.engine import Connection

from . import honesty, ledger
from .config import HubConfig
from .db import audit_jobs, audit_openings, audits, hosts, offers, users, verifiers
from .ledger import Journal

_DRAW_DOMAIN = b"gpunexus-verifier-draw/1\0"
_KNOWN_DOMAIN = b"gpunexus-known-answer/1\0"


class JobRefused(ValueError):
    """A verifier's result the hub does not accept (not its job, already answered, expired)."""


def job_id_for(request_id: str, kind: str, round_: int) -> str:
    return hashlib.sha256(f"gpunexus-job/1\0{request_id}\0{kind}\0{round_}".encode()).hexdigest()[:32]


def _score(secret: bytes, label: bytes, job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(label + len(secret).to_bytes(2, "big") + secret + job_id.encode()).digest(), "big")


def _altered(opening: Opening, job_id: str, seed: bytes) -> Opening:
    """The opening under a fresh id with its output replaced by random byte tokens: what no honest model drew."""
    rng = random.Random(seed)
    if opening.output_ids:
        ids = tuple(rng.randrange(32, 127) for _ in opening.output_ids)
        text = bytes(ids).decode("ascii")
    else:  # an upstream host delivered text only
        ids, text = (), "".join(chr(rng.randrange(32, 127)) for _ in opening.output_text)
    return Opening(job_id, opening.kind, opening.messages, opening.prompt, opening.continuation,
                   opening.sampling, opening.max_tokens, opening.first_draw, ids, text, opening.continuation_ids)


def open_jobs(conn: Connection, cfg: HubConfig, request_id: str, receipt: Receipt, opening_blob: bytes, now: float) -> dict:
    """Send the audit of ``request_id`` to peer verifiers; the audit is ``verifying`` until they answer."""
    row = conn.execute(sa.select(audits.c.status, audits.c.period).where(audits.c.request_id == request_id)
                       .with_for_update()).one()
    if row.status != "pending":
        return {"request_id": request_id, "status": row.status, "already": True}
    conn.execute(ledger.insert_ignore(conn, audit_openings).values(request_id=request_id, opening=opening_blob, received_at=now))
    avoid = json.dumps([receipt.host_id])
    base = {"request_id": request_id, "model": receipt.model, "model_hash": receipt.model_hash, "avoid": avoid,
            "status": "unassigned", "created_at": now, "verdict": "", "reasons": "[]", "fee": 0}
    jobs = [{**base, "job_id": job_id_for(request_id, "audit", 1), "round": 1, "kind": "audit", "opening": opening_blob}]
    secret, _ = honesty.period_secret(conn, row.period, now)
    if _score(secret, _KNOWN_DOMAIN, request_id) < int(cfg.known_answer_rate * 2**256):
        known_id = job_id_for(request_id, "known-bad", 1)
        altered = _altered(decode_as(Opening, opening_blob), known_id, secret + request_id.encode())
        jobs.append({**base, "job_id": known_id, "round": 1, "kind": "known-bad", "opening": altered.encode()})
    conn.execute(ledger.insert_ignore(conn, audit_jobs), jobs)
    conn.execute(sa.update(audits).where(audits.c.request_id == request_id).values(status="verifying"))
    return {"request_id": request_id, "status": "verifying", "jobs": len(jobs)}


def see_verifier(conn: Connection, user_id: int, peer_id: str, model_hashes: list[str], now: float) -> None:
    """Note that ``peer_id`` (a host of ``user_id``) polls for jobs of these model hashes."""
    owner = conn.execute(sa.select(hosts.c.user_id).where(hosts.c.peer_id == peer_id)).scalar()
    if owner != user_id:
        raise JobRefused("this peer id is not registered to this account")
    for h in model_hashes:
        conn.execute(ledger.insert_ignore(conn, verifiers).values(peer_id=peer_id, model_hash=h, user_id=user_id, seen_at=now))
        conn.execute(sa.update(verifiers).where(verifiers.c.peer_id == peer_id, verifiers.c.model_hash == h)
                     .values(seen_at=now))


def _owners(conn: Connection, peer_ids: list[str]) -> dict[str, int]:
    return dict(conn.execute(sa.select(hosts.c.peer_id, hosts.c.user_id).where(hosts.c.peer_id.in_(peer_ids))).all()) \
        if peer_ids else {}


def eligible(conn: Connection, cfg: HubConfig, model: str, model_hash: str, avoid: list[str], now: float) -> list[str]:
    """Peer ids that may verify a job of ``model``/``model_hash`` avoiding ``avoid`` (and their accounts), sorted:
    they poll for that model hash and have a live offer of that model (they serve it, not only claim to)."""
    avoided_accounts = set(_owners(conn, avoid).values())
    serving = sa.select(offers.c.peer_id).where(offers.c.model == model, offers.c.expires_at >= now)
    rows = conn.execute(sa.select(verifiers.c.peer_id, verifiers.c.user_id).where(
        verifiers.c.model_hash == model_hash, verifiers.c.seen_at >= now - cfg.verifier_seen_s,
        verifiers.c.peer_id.in_(serving))).all()
    candidates = [r.peer_id for r in rows if r.peer_id not in avoid and r.user_id not in avoided_accounts]
    reps = honesty.reputation_of(conn, candidates)
    return sorted(p for p in candidates
                  if not rep_mod.excluded(reps[p]) and reps[p].p_honest >= cfg.verifier_min_p_honest)


def assign(conn: Connection, cfg: HubConfig, signer: Signer, now: float) -> int:
    """Draw a verifier for every unassigned job (and every expired one, its verifier avoided); how many drawn."""
    expired = conn.execute(sa.select(audit_jobs.c.job_id, audit_jobs.c.avoid, audit_jobs.c.verifier_id).where(
        audit_jobs.c.status == "assigned", audit_jobs.c.expires_at < now)).all()
    for job in expired:
        conn.execute(sa.update(audit_jobs).where(audit_jobs.c.job_id == job.job_id).values(
            status="unassigned", avoid=json.dumps([*json.loads(job.avoid), job.verifier_id]), verifier_id=None, job=None))
    drawn = 0
    open_rows = conn.execute(sa.select(audit_jobs).where(audit_jobs.c.status == "unassigned")
                             .order_by(audit_jobs.c.created_at, audit_jobs.c.job_id)).all()
    for job in open_rows:
        # Never both jobs of one request to one verifier: seeing the same prompt twice would tell it
        # that one of them is a known-answer job.
        siblings = conn.execute(sa.select(audit_jobs.c.verifier_id).where(
            audit_jobs.c.request_id == job.request_id, audit_jobs.c.job_id != job.job_id,
            audit_jobs.c.verifier_id.is_not(None))).scalars().all()
        pool = [p for p in eligible(conn, cfg, job.model, job.model_hash, json.loads(job.avoid), now)
                if p not in siblings]
        if not pool:
            continue  # stays unassigned until a verifier of this model polls
        period = conn.execute(sa.select(audits.c.period).where(audits.c.request_id == job.request_id)).scalar_one()
        secret, _ = honesty.period_secret(conn, period, now)
        verifier = pool[_score(secret, _DRAW_DOMAIN, job.job_id) % len(pool)]
        receipt = decode_as(Receipt, conn.execute(sa.select(audits.c.receipt)
                                                 .where(audits.c.request_id == job.request_id)).scalar_one())
        opening = decode_as(Opening, job.opening)
        signed = AuditJob(job.job_id, signer.peer_id, verifier, job.round, job.model, job.model_hash, opening,
                          receipt.tokens_in, receipt.tokens_out, receipt.finish_reason, receipt.commitment, now,
                          now + cfg.verifier_job_ttl_s).signed(signer)
        conn.execute(sa.update(audit_jobs).where(audit_jobs.c.job_id == job.job_id).values(
            status="assigned", verifier_id=verifier, job=signed.encode(), expires_at=signed.expires_at))
        drawn += 1
    return drawn


def jobs_for(conn: Connection, cfg: HubConfig, signer: Signer, user_id: int, peer_id: str, model_hashes: list[str],
             now: float) -> list[bytes]:
    """``GET /v1/audits/jobs``: note the verifier, draw what is open, hand it its signed jobs."""
    see_verifier(conn, user_id, peer_id, model_hashes, now)
    assign(conn, cfg, signer, now)
    return list(conn.execute(sa.select(audit_jobs.c.job).where(
        audit_jobs.c.status == "assigned", audit_jobs.c.verifier_id == peer_id, audit_jobs.c.expires_at >= now)
        .order_by(audit_jobs.c.created_at, audit_jobs.c.job_id)).scalars())


def report_of(result: VerifierResult) -> PrefillReport:
    return PrefillReport(result.engine, result.prompt_tokens, result.commitment, result.logprobs, result.ranks,
                         result.top_k, result.seed_replayed, result.replay_reasons)


def accept_result(conn: Connection, cfg: HubConfig, user_id: int, result: VerifierResult, blob: bytes, now: float) -> dict:
    """Judge a verifier's signed result (signature already checked); escalate, decide, pay. Idempotent."""
    job = conn.execute(sa.select(audit_jobs).where(audit_jobs.c.job_id == result.job_id).with_for_update()).first()
    if job is None or job.verifier_id != result.verifier_id:
        raise JobRefused("no such job for this verifier")
    if job.status == "answered":
        return {"job_id": job.job_id, "verdict": job.verdict, "already": True}
    if job.status != "assigned" or job.expires_at < now:
        raise JobRefused("this job is no longer assigned to this verifier (expired)")
    if _owners(conn, [result.verifier_id]).get(result.verifier_id) != user_id:
        raise JobRefused("this verifier is not registered to this account")
    if result.model_hash != job.model_hash:
        raise JobRefused("the result names another model hash than the job")
    signed = decode_as(AuditJob, job.job)
    opening = signed.opening
    verdict = judge(tokens_in=signed.tokens_in, tokens_out=signed.tokens_out,
                    output_tokens=len(opening.output_ids) or len(result.logprobs), commitment=signed.commitment,
                    report=report_of(result), temperature=opening.sampling.temperature)
    outcome = "passed" if verdict.passed else "failed"
    missed = job.kind == "known-bad" and verdict.passed
    fee = 0 if missed else _pay(conn, cfg, job.job_id, result.verifier_id, now)
    conn.execute(sa.update(audit_jobs).where(audit_jobs.c.job_id == job.job_id).values(
        status="answered", result=blob, verdict=outcome, reasons=json.dumps(list(verdict.reasons)), answered_at=now,
        fee=fee))
    out = {"job_id": job.job_id, "verdict": outcome, "fee_micro": fee}
    if job.kind == "known-bad":
        _record(conn, result.verifier_id, not missed, now)  # the verifier's own record: did it compute?
        return out
    rounds = conn.execute(sa.select(audit_jobs.c.round, audit_jobs.c.verifier_id, audit_jobs.c.verdict,
                                    audit_jobs.c.reasons)
                          .where(audit_jobs.c.request_id == job.request_id, audit_jobs.c.kind == "audit",
                                 audit_jobs.c.status == "answered").order_by(audit_jobs.c.round)).all()
    fails = [r for r in rounds if r.verdict == "failed"]
    passes = [r for r in rounds if r.verdict == "passed"]
    if len(fails) >= 2:  # two independent failures: the host fails; a verifier that passed it was wrong
        reasons = [f"verifier {r.verifier_id}: {x}" for r in fails for x in json.loads(r.reasons)]
        out["audit"] = honesty.record_verdict(conn, job.request_id, "failed", reasons, now)
        for r in passes:
            _record(conn, r.verifier_id, False, now)
    elif passes and (not fails or len(passes) >= 2):  # a pass, never contradicted or outvoted: the host passes
        out["audit"] = honesty.record_verdict(conn, job.request_id, "passed", [], now)
        for r in fails:
            _record(conn, r.verifier_id, False, now)
    else:  # one failure, or one against one: another independent verifier decides
        next_round = job.round + 1
        conn.execute(ledger.insert_ignore(conn, audit_jobs).values(
            job_id=job_id_for(job.request_id, "audit", next_round), request_id=job.request_id, round=next_round,
            kind="audit", model=job.model, model_hash=job.model_hash, opening=job.opening, status="unassigned",
            avoid=json.dumps([*json.loads(job.avoid), result.verifier_id]), created_at=now, verdict="", reasons="[]",
            fee=0))
        out["escalated"] = True
    return out


def _record(conn: Connection, peer_id: str, passed: bool, now: float) -> None:
    from .db import host_reputation

    conn.execute(ledger.insert_ignore(conn, host_reputation).values(peer_id=peer_id, passes=0, fails=0, updated_at=now))
    conn.execute(sa.update(host_reputation).where(host_reputation.c.peer_id == peer_id).values(
        passes=host_reputation.c.passes + int(passed), fails=host_reputation.c.fails + int(not passed), updated_at=now))


def _pay(conn: Connection, cfg: HubConfig, job_id: str, verifier_id: str, now: float) -> int:
    """The verifier's fee from the platform fee account, once per job, never overdrawing it."""
    if cfg.verifier_fee_micro == 0:
        return 0
    owner = _owners(conn, [verifier_id])[verifier_id]
    account = conn.execute(sa.select(users.c.account_id).where(users.c.id == owner)).scalar_one()
    fee_account = ledger.system_account(conn, ledger.FEE)
    amount = min(cfg.verifier_fee_micro, ledger.lock_balances(conn, [fee_account]).get(fee_account, 0))
    if amount <= 0 or not ledger.post(conn, Journal(f"verify:{job_id}", "verify", ((fee_account, -amount), (account, amount))), now=now):
        return 0
    return amount
