"""Double-entry ledger in integer micro-USD.

Every movement of money is one *journal* row (its primary key is the
idempotency key: ``receipt:<request id>``, ``stripe:<event id>``,
``grant:<uuid>``...) and two or more *postings* that sum to zero, so the sum
over all accounts is zero after any sequence of operations. ``accounts.balance``
caches the sum of an account's postings; :func:`verify` recomputes it.

Accounts: one per user (a client spends from it, a host earns into it), and
four platform accounts:

``platform:fee``
    the platform's cut of every settled receipt.
``platform:holds``
    escrow for the budgets of live allowances (never negative).
``platform:stripe_clearing``
    money that entered or left through Stripe; it goes negative by what
    clients paid in, positive by what hosts were paid out.
``platform:grants``
    the source of credits an admin grants by hand (manual-credits mode).

Only the last two may go negative; the schema's CHECK and the conditional
update in :func:`apply_deltas` both refuse to overdraw any other account,
whatever the interleaving of concurrent transactions.

All functions take a live :class:`~sqlalchemy.engine.Connection` inside a
transaction so callers compose a posting with the rest of their work (a
receipt's settlement and its log entry commit together).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .db import accounts, journal, postings

FEE = "platform:fee"
HOLDS = "platform:holds"
CLEARING = "platform:stripe_clearing"
GRANTS = "platform:grants"
SYSTEM_ACCOUNTS = {FEE: False, HOLDS: False, CLEARING: True, GRANTS: True}


class InsufficientFunds(Exception):
    """A posting would take an account below zero; the transaction is rolled back."""

    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} has insufficient funds")
        self.account_id = account_id


@dataclass(frozen=True, slots=True)
class Journal:
    """One balanced ledger transaction: ``entries`` are (account id, amount) pairs."""

    key: str
    kind: str
    entries: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if sum(a for _, a in self.entries) != 0:
            raise ValueError(f"journal {self.key} does not balance")
        if any(type(a) is not int for _, a in self.entries):
            raise TypeError("amounts are integer micro-USD")


def insert_ignore(conn: Connection, table: sa.Table):
    """``INSERT ... ON CONFLICT DO NOTHING`` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def open_account(conn: Connection, name: str, *, allow_negative: bool = False) -> int:
    """The id of account ``name``, creating it at zero if it does not exist."""
    conn.execute(insert_ignore(conn, accounts).values(name=name, allow_negative=allow_negative, balance=0))
    return conn.execute(sa.select(accounts.c.id).where(accounts.c.name == name)).scalar_one()


def system_account(conn: Connection, name: str) -> int:
    return open_account(conn, name, allow_negative=SYSTEM_ACCOUNTS[name])


def balance(conn: Connection, account_id: int) -> int:
    return conn.execute(sa.select(accounts.c.balance).where(accounts.c.id == account_id)).scalar_one()


def lock_balances(conn: Connection, account_ids: Iterable[int]) -> dict[int, int]:
    """Current balances, row-locked until commit on PostgreSQL (in id order)."""
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    q = sa.select(accounts.c.id, accounts.c.balance).where(accounts.c.id.in_(ids)).order_by(accounts.c.id)
    return dict(conn.execute(q.with_for_update()).all())


def post(conn: Connection, entry: Journal, *, now: float | None = None) -> bool:
    """Record ``entry`` once: False (and nothing changed) if its key was already posted.

    Raises :class:`InsufficientFunds` when an account would go negative; the
    caller's transaction must then roll back (raising out of
    ``engine.begin()`` does that).
    """
    row = conn.execute(
        insert_ignore(conn, journal)
        .values(key=entry.key, kind=entry.kind, created_at=now or time.time())
        .returning(journal.c.key)
    ).first()
    if row is None:
        return False
    conn.execute(postings.insert(), [{"journal_key": entry.key, "account_id": a, "amount": v} for a, v in entry.entries])
    apply_deltas(conn, _deltas(entry.entries))
    return True


def post_new(conn: Connection, entries: Sequence[Journal], *, now: float | None = None) -> None:
    """Record journals whose keys the caller has proven new, in bulk.

    Used by batch settlement, which checks idempotency under the chain lock
    first: one insert per table and one balance update per account for the
    whole batch, instead of a round of statements per receipt.
    """
    if not entries:
        return
    now = now or time.time()
    conn.execute(journal.insert(), [{"key": j.key, "kind": j.kind, "created_at": now} for j in entries])
    conn.execute(
        postings.insert(),
        [{"journal_key": j.key, "account_id": a, "amount": v} for j in entries for a, v in j.entries],
    )
    apply_deltas(conn, _deltas(e for j in entries for e in j.entries))


def apply_deltas(conn: Connection, deltas: dict[int, int]) -> None:
    """Add ``deltas`` to balances, refusing (atomically, per row) to overdraw."""
    stmt = (
        sa.update(accounts)
        .where(accounts.c.id == sa.bindparam("aid"))
        .where(sa.or_(accounts.c.allow_negative, accounts.c.balance + sa.bindparam("d") >= 0))
        .values(balance=accounts.c.balance + sa.bindparam("d"))
    )
    for aid in sorted(deltas):
        d = deltas[aid]
        if d and conn.execute(stmt, {"aid": aid, "d": d}).rowcount != 1:
            raise InsufficientFunds(aid)


def _deltas(entries: Iterable[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for aid, amount in entries:
        out[aid] += amount
    return out


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """What :func:`verify` found: the total (must be 0) and inconsistent accounts."""

    total: int
    mismatched: tuple[str, ...]
    negative: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.total == 0 and not self.mismatched and not self.negative


def verify(conn: Connection) -> LedgerCheck:
    """Recompute every balance from its postings and check the invariants."""
    sums = dict(
        conn.execute(sa.select(postings.c.account_id, sa.func.sum(postings.c.amount)).group_by(postings.c.account_id))
        .all()
    )
    rows = conn.execute(sa.select(accounts.c.id, accounts.c.name, accounts.c.balance, accounts.c.allow_negative)).all()
    mismatched = tuple(r.name for r in rows if int(sums.get(r.id, 0)) != r.balance)
    negative = tuple(r.name for r in rows if r.balance < 0 and not r.allow_negative)
    return LedgerCheck(total=sum(r.balance for r in rows), mismatched=mismatched, negative=negative)
