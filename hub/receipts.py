"""Receipt settlement: verify, bill once, sign, chain.

A batch goes through two phases:

1. :func:`precheck`, pure CPU and outside any transaction: decode, both
   signatures (host and gateway, :meth:`Receipt.verify`), the price ceiling and
   ``cost_micro == cost_micro(tokens_in + tokens_out, price)``. Only a receipt
   countersigned by the gateway can pass, so a bill always rests on what the
   gateway received, never on the host's word alone; a failed request has no
   countersigned receipt, so its host is not paid.
2. :func:`settle`, one write transaction for the whole batch. It locks the
   chain head first, which serialises settlement across threads and hub
   processes, so the "already settled?" check and the append cannot race.
   For each receipt: exactly-once by request id (the same bytes again is a
   ``duplicate``, different bytes under a settled id is refused), a registered
   host, an allowance of the gateway valid at the receipt's ``issued_at`` (see
   :mod:`gpunexus.hub.allowances`) that does not refuse its model, a price the host actually offered (at most
   the highest price it offered for the model between ``offer_lookback_s``
   before ``issued_at`` and ``clock_skew_s`` after: the gateway signed the
   order at an offered price, and that price, not today's market price, is
   what settles, so a price change never re-prices work in flight; see
   :mod:`gpunexus.hub.market`), and funds (live allowance, then free
   balance). Then the postings client -> host + fee, and a hub-signed log
   entry naming the previous entry's hash. Postings and log entries of the
   batch commit together; a refused receipt posts nothing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
from dataclasses import dataclass

import msgpack
import sqlalchemy as sa
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Receipt
from gpunexus.protocol.money import cost_micro
from gpunexus.protocol.signing import Signer
from sqlalchemy.engine import Connection

from . import allowances, chain, ledger, market
from .config import HubConfig
from .db import allowances as allowance_table
from .db import chain_head, gateways, hosts, receipt_log, users
from .ledger import Journal

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one submitted receipt."""

    request_id: str
    status: str  # "settled" | "duplicate" | "refused"
    reason: str = ""
    seq: int | None = None
    cost_micro: int = 0

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "status": self.status, "reason": self.reason,
                "seq": self.seq, "cost_micro": self.cost_micro}


@dataclass(frozen=True, slots=True)
class Checked:
    """A submitted receipt after :func:`precheck`: decoded, or refused already."""

    data: bytes
    receipt: Receipt | None
    refusal: Outcome | None


def check_one(data: bytes, cfg: HubConfig) -> Receipt:
    """The decoded receipt, or ProtocolError naming why it cannot be billed."""
    receipt = decode_as(Receipt, data)
    receipt.verify()
    if receipt.price_micro_per_mtok > cfg.max_price_micro_per_mtok:
        raise ProtocolError("price above the hub's ceiling")
    if receipt.cost_micro != cost_micro(receipt.tokens_in + receipt.tokens_out, receipt.price_micro_per_mtok):
        raise ProtocolError("cost does not match tokens at the price")
    return receipt


def precheck(blobs: list[bytes], cfg: HubConfig) -> list[Checked]:
    out = []
    for data in blobs:
        try:
            out.append(Checked(data, check_one(data, cfg), None))
        except ProtocolError as exc:
            out.append(Checked(data, None, Outcome(_request_id_hint(data), "refused", str(exc))))
    return out


def _precheck_chunk(blobs: list[bytes], cfg: HubConfig) -> list[tuple[Receipt | None, Outcome | None]]:
    return [(c.receipt, c.refusal) for c in precheck(blobs, cfg)]


class ParallelPrecheck:
    """:func:`precheck` spread over worker processes.

    Ed25519 verification in ``cryptography`` holds the GIL, so threads do not
    add verifications per second; processes do. The batch is cut into one
    slice per worker and the decoded receipts come back pickled, which costs
    far less than the signature checks it parallelises. Worth it only on a
    hub with cores to spare; the default is in-thread :func:`precheck`.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, blobs: list[bytes], cfg: HubConfig) -> list[Checked]:
        size = -(-len(blobs) // self.workers)
        slices = [blobs[i:i + size] for i in range(0, len(blobs), size)]
        results = self._pool.map(_precheck_chunk, slices, [cfg] * len(slices))
        return [Checked(d, r, o) for d, (r, o) in zip(blobs, (x for chunk in results for x in chunk), strict=True)]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _request_id_hint(data: bytes) -> str:
    """Best-effort request id of an unusable receipt, so the refusal can name it."""
    try:
        v = msgpack.unpackb(data, raw=False)
        return v[2] if isinstance(v, list) and len(v) > 2 and isinstance(v[2], str) else ""
    except Exception:
        return ""


def settle(conn: Connection, signer: Signer, cfg: HubConfig, items: list[Checked], now: float) -> list[Outcome]:
    """Settle a prechecked batch in the caller's transaction (see module doc)."""
    head = conn.execute(
        sa.select(chain_head.c.seq, chain_head.c.head_hash).where(chain_head.c.id == 1).with_for_update()
    ).one()
    seq, prev = head.seq, head.head_hash
    good = [c.receipt for c in items if c.receipt is not None]
    if not good:
        return [c.refusal for c in items]

    rids = [r.request_id for r in good]
    settled: dict[str, bytes] = {}
    for i in range(0, len(rids), _CHUNK):
        q = sa.select(receipt_log.c.request_id, receipt_log.c.receipt_hash).where(receipt_log.c.request_id.in_(rids[i:i + _CHUNK]))
        settled.update(conn.execute(q).all())
    host_ids = sorted({r.host_id for r in good})
    host_rows = conn.execute(
        sa.select(hosts.c.peer_id, users.c.id, users.c.suspended_at).join(users, users.c.id == hosts.c.user_id)
        .where(hosts.c.peer_id.in_(host_ids))
    ).all()
    host_users = {peer: user_id for peer, user_id, _ in host_rows}
    suspended_since = {peer: suspended_at for peer, _, suspended_at in host_rows if suspended_at is not None}
    """Work a suspended host signed before its suspension is still paid; what it signed after is not."""
    gw_ids = sorted({r.gateway_id for r in good})
    bound = set(conn.execute(sa.select(gateways.c.peer_id).where(gateways.c.peer_id.in_(gw_ids))).scalars())
    times = [r.issued_at for r in good]
    gw = allowances.for_gateways(conn, gw_ids, min(times) - cfg.clock_skew_s, max(times) + cfg.clock_skew_s)
    offered = market.OfferedPrices(conn, [h for h in host_ids if h in host_users],
                                   min(times) - cfg.offer_lookback_s, max(times) + cfg.clock_skew_s)
    user_ids = {a.user_id for g in gw.values() for a in g.windows} | set(host_users.values())
    user_accounts = dict(conn.execute(sa.select(users.c.id, users.c.account_id).where(users.c.id.in_(user_ids))).all())
    client_ids = {a.user_id for g in gw.values() for a in g.windows}
    free = ledger.lock_balances(conn, [user_accounts[u] for u in client_ids])
    live_left = {g: (v.live.remaining if v.live else 0) for g, v in gw.items()}
    fee_acct = ledger.system_account(conn, ledger.FEE)
    holds_acct = ledger.system_account(conn, ledger.HOLDS)

    outcomes: list[Outcome] = []
    journals: list[Journal] = []
    log_rows: list[dict] = []
    for item in items:
        r = item.receipt
        if r is None:
            outcomes.append(item.refusal)
            continue
        digest = hashlib.sha256(item.data).digest()
        if r.request_id in settled:
            same = settled[r.request_id] == digest
            outcomes.append(Outcome(r.request_id, "duplicate" if same else "refused",
                                    "" if same else "conflicts with the receipt already settled under this request id"))
            continue
        reason = ""
        window = gw[r.gateway_id].covering(r.issued_at, cfg.clock_skew_s)
        if r.issued_at > now + cfg.clock_skew_s:
            reason = "receipt issued in the future"
        elif r.host_id not in host_users:
            reason = "unknown host: no host account registered this peer id"
        elif r.host_id in suspended_since and r.issued_at >= suspended_since[r.host_id]:
            reason = "the host's account is suspended: it earns nothing more"
        elif window is None:
            reason = "allowance expired" if r.gateway_id in bound else "no allowance issued to this gateway"
        elif gw[r.gateway_id].refuse(r.issued_at, cfg.clock_skew_s, r.model):
            reason = f"the allowance refuses model {r.model!r} (switched off, or its licence not accepted)"
        else:
            reason = offered.refusal(r.host_id, r.model, r.price_micro_per_mtok,
                                     r.issued_at - cfg.offer_lookback_s, r.issued_at + cfg.clock_skew_s)
        if reason:
            outcomes.append(Outcome(r.request_id, "refused", reason))
            continue
        client_acct = user_accounts[window.user_id]
        from_hold = min(r.cost_micro, live_left[r.gateway_id])
        from_free = r.cost_micro - from_hold
        if free[client_acct] < from_free:
            outcomes.append(Outcome(r.request_id, "refused", "insufficient funds"))
            continue
        live_left[r.gateway_id] -= from_hold
        free[client_acct] -= from_free
        fee = cfg.fee(r.cost_micro)
        host_user = host_users[r.host_id]
        entries = ((holds_acct, -from_hold), (client_acct, -from_free),
                   (user_accounts[host_user], r.cost_micro - fee), (fee_acct, fee))
        journals.append(Journal(f"receipt:{r.request_id}", "settle", tuple(e for e in entries if e[1])))
        seq += 1
        entry = chain.LogEntry(seq, prev, item.data, f"user:{window.user_id}", f"user:{host_user}",
                               r.cost_micro, r.cost_micro - fee, fee, cfg.fee_bps, now)
        encoded = entry.encode()
        prev = chain.entry_hash(encoded)
        log_rows.append({
            "seq": seq, "request_id": r.request_id, "receipt_hash": digest, "client_user_id": window.user_id,
            "host_user_id": host_user, "model": r.model, "tokens": r.tokens_in + r.tokens_out,
            "cost": r.cost_micro, "fee": fee, "settled_at": now, "entry": encoded, "entry_hash": prev,
            "sig": chain.sign_hash(signer, prev), "key_id": window.key_id,
        })
        settled[r.request_id] = digest
        outcomes.append(Outcome(r.request_id, "settled", seq=seq, cost_micro=r.cost_micro))

    if journals:
        ledger.post_new(conn, journals, now=now)
        for g, v in gw.items():
            if v.live and live_left[g] != v.live.remaining:
                conn.execute(
                    sa.update(allowance_table)
                    .where(allowance_table.c.allowance_id == v.live.allowance_id)
                    .values(remaining=live_left[g])
                )
        conn.execute(receipt_log.insert(), log_rows)
        conn.execute(sa.update(chain_head).where(chain_head.c.id == 1).values(seq=seq, head_hash=prev))
    return outcomes


def export(conn: Connection) -> list[tuple[int, bytes, bytes, bytes]]:
    """Every log entry in order: (seq, entry bytes, entry hash, hub signature)."""
    q = sa.select(receipt_log.c.seq, receipt_log.c.entry, receipt_log.c.entry_hash, receipt_log.c.sig).order_by(receipt_log.c.seq)
    return [tuple(r) for r in conn.execute(q)]
