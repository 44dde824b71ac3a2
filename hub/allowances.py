"""Hub-signed, short-lived budgets for a gateway peer id, reserved from the balance.

How a receipt finds its allowance: receipts do not carry the allowance, so
the hub binds each gateway peer id to one account on its first allowance (a
second account asking for the same peer id is refused) and keeps every
allowance it issued. A receipt is authorised when one of the allowances issued
to its ``gateway_id`` was valid at the receipt's ``issued_at`` (within the
clock skew); the account billed is that allowance's account.

Money: issuing moves the budget from the account to ``platform:holds``
(journal ``reserve:<id>``). A renewal rolls the previous allowance's unspent
budget into the new one and reserves only the top-up, so one gateway never
holds two budgets. Receipts draw on the gateway's live allowance first and on
the account's free balance for any overflow. The unspent hold returns to the
account (``release:<id>``) once the allowance is past expiry plus the grace
period of :class:`~gpunexus.hub.config.HubConfig`.

Keys: an allowance asked for with a key that has spend limits holds at most
what is left under them: the limit less the key's settled spend in the
period (UTC day, calendar month) less what its other live allowances still
hold, less the budget carried over. So what a gateway can spend under the
key's allowances never passes a limit; once nothing is left, the answer is
402 naming the limit. An allowance never outlives its key's expiry.

Models: each allowance names the models its account's keys may not use
(``refused_models``, see :mod:`gpunexus.hub.catalogue`); the answer to the
gateway carries the reasons (licence name and URL) next to the signed bytes.
A receipt for a model its covering allowance refused does not settle: honest
gateways and hosts never serve one, so only a pair that ignored the
allowance goes unpaid.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from gpunexus.protocol.messages import MAX_REFUSED_MODELS, Allowance
from gpunexus.protocol.signing import Signer
from sqlalchemy.engine import Connection

from . import catalogue, keys, ledger
from .catalogue import Refusal
from .config import HubConfig
from .db import allowances, api_keys, gateways, users
from .keys import User
from .ledger import Journal


class AllowanceRefused(Exception):
    """No allowance: ``status`` 401 (key expired), 402 (no credit, key limit reached) or 409 (peer id bound elsewhere)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class AllowanceRow:
    allowance_id: str
    user_id: int
    gateway_id: str
    remaining: int
    issued_at: float
    expires_at: float
    key_id: str | None
    refused_models: str | None
    """JSON list of the model ids the signed allowance refuses (NULL: none)."""

    def refuses(self, model: str) -> bool:
        return bool(self.refused_models) and model in json.loads(self.refused_models)


@dataclass(frozen=True, slots=True)
class Issued:
    """A signed allowance and what the gateway is told beside it."""

    allowance: Allowance
    refusals: list[Refusal]
    """Why each of ``allowance.refused_models`` is refused."""
    limited_by_balance: bool
    """The budget is less than asked because the account (or the key's limit) has no more: a gateway answers 402, not "retry"."""
    terms: str = ""
    """:func:`catalogue.terms_stamp` of the account when the refusals were read."""
    limit_note: str | None = None
    """Set when a key's spend limit, not the balance, capped the budget: the limit, in words."""
    key_expires_at: float | None = None


def _limit_headroom(conn: Connection, key_id: str, exclude_allowance: str | None, carry: int,
                    now: float) -> tuple[int, str] | None:
    """(micro-USD the key may still be promised, the tightest limit in words), or None without limits."""
    spent = keys.spend(conn, [key_id], now).get(key_id)
    if spent is None or (spent.limit_day_micro is None and spent.limit_month_micro is None):
        return None
    q = sa.select(sa.func.coalesce(sa.func.sum(allowances.c.remaining), 0)).where(
        allowances.c.key_id == key_id, allowances.c.live)
    if exclude_allowance is not None:
        q = q.where(allowances.c.allowance_id != exclude_allowance)
    held = int(conn.execute(q).scalar_one()) + carry
    options = []
    if spent.limit_day_micro is not None:
        options.append((spent.limit_day_micro - spent.day_micro - held,
                        f"daily spend limit of {keys.usd_text(spent.limit_day_micro)} USD (resets at 00:00 UTC)"))
    if spent.limit_month_micro is not None:
        options.append((spent.limit_month_micro - spent.month_micro - held,
                        f"monthly spend limit of {keys.usd_text(spent.limit_month_micro)} USD (resets on the 1st, 00:00 UTC)"))
    return min(options, key=lambda o: o[0])


def issue(conn: Connection, signer: Signer, cfg: HubConfig, user: User, gateway_id: str,
          requested_micro: int | None, now: float, key_id: str | None = None) -> Issued:
    """Sign a fresh allowance for ``gateway_id``, reserving its budget (see module doc).

    ``key_id`` is the key that asked: its limits cap the budget, its expiry the allowance's.
    """
    key_expires_at = None
    if key_id is not None:
        key_expires_at = conn.execute(  # locked: two gateways of one key must not both take its last headroom
            sa.select(api_keys.c.expires_at).where(api_keys.c.key_id == key_id).with_for_update()).scalar()
        if key_expires_at is not None and key_expires_at <= now:
            raise AllowanceRefused(401, "invalid_api_key", "Incorrect API key provided.")
    refusals = catalogue.refusals(conn, user.id)
    if len(refusals) > MAX_REFUSED_MODELS:
        raise AllowanceRefused(409, "too_many_refused_models",
                               f"More than {MAX_REFUSED_MODELS} catalogued models are closed to this account "
                               "(licences not accepted): accept the licences of the models you use on the hub's models page.")
    conn.execute(ledger.insert_ignore(conn, gateways).values(peer_id=gateway_id, user_id=user.id))
    owner = conn.execute(  # locked: two renewals of one gateway must not both create a live allowance
        sa.select(gateways.c.user_id).where(gateways.c.peer_id == gateway_id).with_for_update()).scalar_one()
    if owner != user.id:
        raise AllowanceRefused(409, "gateway_bound", "this gateway peer id is bound to another account")
    old = conn.execute(
        sa.select(allowances.c.allowance_id, allowances.c.remaining)
        .where(allowances.c.gateway_id == gateway_id, allowances.c.live)
        .with_for_update()
    ).first()
    carry = old.remaining if old else 0
    free = ledger.lock_balances(conn, [user.account_id])[user.account_id]
    target = min(requested_micro or cfg.allowance_budget_micro, cfg.allowance_max_micro)
    take = min(max(0, target - carry), free)
    limit_note = None
    headroom = _limit_headroom(conn, key_id, old.allowance_id if old else None, carry, now) if key_id else None
    if headroom is not None and headroom[0] < take:
        take = max(0, headroom[0])
        limit_note = f"This API key's {headroom[1]} is reached."
    budget = carry + take
    if budget <= 0:
        if limit_note:
            raise AllowanceRefused(402, "key_limit_reached", limit_note)
        raise AllowanceRefused(402, "insufficient_quota", "You exceeded your current quota, please add credits.")
    allowance_id = secrets.token_hex(16)
    if take:
        holds = ledger.system_account(conn, ledger.HOLDS)
        ledger.post(conn, Journal(f"reserve:{allowance_id}", "reserve", ((user.account_id, -take), (holds, take))), now=now)
    if old:
        conn.execute(
            sa.update(allowances).where(allowances.c.allowance_id == old.allowance_id).values(live=False, remaining=0)
        )
    expires_at = now + cfg.allowance_ttl_s if key_expires_at is None else min(now + cfg.allowance_ttl_s, key_expires_at)
    conn.execute(
        allowances.insert().values(
            allowance_id=allowance_id, user_id=user.id, gateway_id=gateway_id, budget=budget,
            remaining=budget, issued_at=now, expires_at=expires_at, live=True, key_id=key_id,
            refused_models=json.dumps([r.model for r in refusals]) if refusals else None,
        )
    )
    allowance = Allowance(
        allowance_id=allowance_id, hub_id=signer.peer_id, account=user.account, gateway_id=gateway_id,
        budget_micro=budget, issued_at=now, expires_at=expires_at, refused_models=tuple(r.model for r in refusals),
    ).signed(signer)
    return Issued(allowance, refusals, limited_by_balance=budget < target, terms=catalogue.terms_stamp(conn, user.id),
                  limit_note=limit_note,
                  key_expires_at=key_expires_at)


def release_expired(conn: Connection, cfg: HubConfig, now: float) -> int:
    """Return unspent holds of allowances past expiry + grace to their accounts."""
    rows = conn.execute(
        sa.select(allowances.c.allowance_id, allowances.c.remaining, users.c.account_id)
        .join(users, users.c.id == allowances.c.user_id)
        .where(allowances.c.live, allowances.c.expires_at + cfg.allowance_grace_s < now)
        .order_by(allowances.c.allowance_id)
        .with_for_update(of=allowances)
    ).all()
    if not rows:
        return 0
    holds = ledger.system_account(conn, ledger.HOLDS)
    for r in rows:
        if r.remaining:
            ledger.post(conn, Journal(f"release:{r.allowance_id}", "release", ((holds, -r.remaining), (r.account_id, r.remaining))), now=now)
    conn.execute(
        sa.update(allowances)
        .where(allowances.c.allowance_id.in_([r.allowance_id for r in rows]))
        .values(live=False, remaining=0)
    )
    return len(rows)


@dataclass(frozen=True, slots=True)
class GatewayAllowances:
    """What settlement needs about one gateway: windows that authorise, the live budget."""

    windows: list[AllowanceRow]
    live: AllowanceRow | None

    def covering(self, t: float, skew: float) -> AllowanceRow | None:
        for row in reversed(self.windows):
            if row.issued_at - skew <= t <= row.expires_at + skew:
                return row
        return None

    def refuse(self, t: float, skew: float, model: str) -> bool:
        """Every allowance valid at ``t`` refuses ``model``.

        Not just the newest: a receipt does not say which allowance its order
        carried, and one sent under the allowance before a switch-off was
        served in good faith.
        """
        rows = [r for r in self.windows if r.issued_at - skew <= t <= r.expires_at + skew]
        return bool(rows) and all(r.refuses(model) for r in rows)


def for_gateways(conn: Connection, gateway_ids: list[str], t_lo: float, t_hi: float) -> dict[str, GatewayAllowances]:
    """Allowances of these gateways valid somewhere in [t_lo, t_hi]; live rows locked."""
    cols = (allowances.c.allowance_id, allowances.c.user_id, allowances.c.gateway_id, allowances.c.remaining,
            allowances.c.issued_at, allowances.c.expires_at, allowances.c.key_id, allowances.c.refused_models)
    live = {
        r.gateway_id: AllowanceRow(*r)
        for r in conn.execute(
            sa.select(*cols)
            .where(allowances.c.gateway_id.in_(gateway_ids), allowances.c.live)
            .order_by(allowances.c.allowance_id)
            .with_for_update()
        )
    }
    out = {g: GatewayAllowances([], live.get(g)) for g in gateway_ids}
    q = (
        sa.select(*cols)
        .where(allowances.c.gateway_id.in_(gateway_ids), allowances.c.issued_at <= t_hi, allowances.c.expires_at >= t_lo)
        .order_by(allowances.c.issued_at)
    )
    for r in conn.execute(q):
        out[r.gateway_id].windows.append(AllowanceRow(*r))
    return out
