"""Users, roles and API keys.

A key looks like ``gnx_<key id>_<secret>``. The key id is public (it names
the key in listings and revocations); only SHA-256 of the secret is stored.
A slow password hash buys nothing here: the secret is 256 random bits, not a
human password, so the digest cannot be brute-forced, and a fast hash keeps
authentication off the request path's critical budget. The full key is
returned once, at creation, and never again.

A key may carry an expiry; it authenticates until then. It may carry spend
limits per UTC day and per calendar month (UTC): an allowance asked for with
the key never holds more than what is left under them (see
:mod:`gpunexus.hub.allowances`), so no gateway can spend past them; what a
key spent is the cost of the settled receipts of its allowances, by the
hub's settlement time. A suspended user's
keys authenticate nothing (suspension also revokes them, so gateways hear
of it; see :mod:`gpunexus.hub.accounts`).

Authentication reads the key row on every request (no cache), so a revocation
takes effect on the very next request, on every hub process sharing the
database. Gateways, which answer requests without asking the hub, hear of a
revocation through a long poll (:meth:`gpunexus.hub.service.Hub.revocations`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import ledger
from .db import api_keys, receipt_log, users

ROLES = ("client", "host", "admin")
KEY_PREFIX = "gnx"
MAX_LIMIT_MICRO = 1_000_000 * 1_000_000
"""Largest spend limit a key may carry: one million USD."""


class AuthError(Exception):
    """The bearer token is missing, malformed, unknown or revoked."""


class UserError(Exception):
    """A user-management request that cannot be done (unknown user, bad role...)."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str
    role: str
    account_id: int

    @property
    def account(self) -> str:
        """The opaque account name an allowance carries (no e-mail leaks to hosts)."""
        return f"user:{self.id}"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    email: str
    name: str
    created_at: float
    revoked_at: float | None
    expires_at: float | None = None
    limit_day_micro: int | None = None
    limit_month_micro: int | None = None

    def status(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "active"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _user(row) -> User:
    return User(id=row.id, email=row.email, role=row.role, account_id=row.account_id)


def add_user(conn: Connection, email: str, role: str) -> tuple[User, str]:
    """Create a user with an empty account and a first API key: (user, full key)."""
    user = create_user(conn, email, role)
    return user, create_key(conn, user, "first key")


def create_user(conn: Connection, email: str, role: str) -> User:
    """Create a user with an empty account and no key."""
    email = email.strip().lower()
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if "@" not in email or len(email) > 320:
        raise UserError(f"not an e-mail address: {email!r}")
    if conn.execute(sa.select(users.c.id).where(users.c.email == email)).first():
        raise UserError(f"user {email} already exists")
    account_id = ledger.open_account(conn, f"user:{email}")
    uid = conn.execute(
        users.insert().values(email=email, role=role, account_id=account_id, created_at=time.time()).returning(users.c.id)
    ).scalar_one()
    return User(id=uid, email=email, role=role, account_id=account_id)


def get_user(conn: Connection, email: str) -> User:
    row = conn.execute(sa.select(users).where(users.c.email == email.strip().lower())).first()
    if row is None:
        raise UserError(f"no user {email}")
    return _user(row)


def user_by_id(conn: Connection, user_id: int) -> User:
    return _user(conn.execute(sa.select(users).where(users.c.id == user_id)).one())


def create_key(conn: Connection, user: User, name: str = "", expires_at: float | None = None, *,
               limit_day_micro: int | None = None, limit_month_micro: int | None = None) -> str:
    """A new key for ``user`` (valid until ``expires_at``, spending at most the limits, where given).

    The returned string is the only copy of the secret.
    """
    for limit in (limit_day_micro, limit_month_micro):
        if limit is not None and not 0 < limit <= MAX_LIMIT_MICRO:
            raise UserError(f"a spend limit must be more than 0 and at most {MAX_LIMIT_MICRO // 1_000_000:,} USD")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    conn.execute(
        api_keys.insert().values(
            key_id=key_id, user_id=user.id, secret_hash=_hash(secret), name=name[:200], created_at=time.time(),
            expires_at=expires_at, limit_day_micro=limit_day_micro, limit_month_micro=limit_month_micro,
        )
    )
    return f"{KEY_PREFIX}_{key_id}_{secret}"


def key_id_of(key: str) -> str:
    """The public id of a full key (``gnx_<id>_<secret>``)."""
    return key.split("_")[1]


def list_keys(conn: Connection, email: str | None = None, *, user_id: int | None = None) -> list[KeyInfo]:
    """Keys of every user, of ``email``'s or of ``user_id``'s, oldest first (never their secrets)."""
    q = sa.select(api_keys, users.c.email).join(users, users.c.id == api_keys.c.user_id).order_by(api_keys.c.created_at)
    if email:
        q = q.where(users.c.email == email.strip().lower())
    if user_id is not None:
        q = q.where(api_keys.c.user_id == user_id)
    return [KeyInfo(r.key_id, r.email, r.name, r.created_at, r.revoked_at, r.expires_at, r.limit_day_micro,
                    r.limit_month_micro) for r in conn.execute(q)]


def revoke_key(conn: Connection, key_id: str, *, user_id: int | None = None) -> bool:
    """Revoke by key id (or full key), only among ``user_id``'s keys if given; False if no such unrevoked key."""
    if key_id.startswith(KEY_PREFIX + "_"):
        key_id = key_id_of(key_id)
    stmt = (
        sa.update(api_keys)
        .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
        .returning(api_keys.c.key_id)
    )
    if user_id is not None:
        stmt = stmt.where(api_keys.c.user_id == user_id)
    return conn.execute(stmt).first() is not None


def authenticate(conn: Connection, token: str | None, allow_revoked: bool = False) -> User:
    """The user owning bearer ``token``, or AuthError (same message for every failure).

    ``allow_revoked`` admits a revoked or expired key (or one of a suspended
    user): for what a revoked key may still
    do, delivering receipts of work served before the revocation (they
    authenticate themselves by their signatures and allowance) and hearing
    of its own revocation.
    """
    parts = (token or "").split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise AuthError("Incorrect API key provided.")
    row = conn.execute(
        sa.select(api_keys.c.secret_hash, api_keys.c.revoked_at, api_keys.c.expires_at, users)
        .join(users, users.c.id == api_keys.c.user_id)
        .where(api_keys.c.key_id == parts[1])
    ).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _hash(parts[2])):
        raise AuthError("Incorrect API key provided.")
    spent = row.revoked_at is not None or row.suspended_at is not None or (
        row.expires_at is not None and row.expires_at <= time.time())
    if spent and not allow_revoked:
        raise AuthError("Incorrect API key provided.")
    return _user(row)


def revocations_since(conn: Connection, user_id: int, after: float) -> list[tuple[str, float]]:
    """(key id, revoked at) of ``user_id``'s keys revoked after ``after``, oldest first."""
    q = (
        sa.select(api_keys.c.key_id, api_keys.c.revoked_at)
        .where(api_keys.c.user_id == user_id, api_keys.c.revoked_at > after)
        .order_by(api_keys.c.revoked_at)
    )
    return [(r.key_id, r.revoked_at) for r in conn.execute(q)]


def last_revocation(conn: Connection) -> float:
    """When the latest revocation on this hub happened (0.0 if none): what a watcher polls."""
    return conn.execute(sa.select(sa.func.coalesce(sa.func.max(api_keys.c.revoked_at), 0.0))).scalar_one()


@dataclass(frozen=True, slots=True)
class Spend:
    """What one key spent in the current UTC day and calendar month, and its limits (None: none)."""

    day_micro: int
    month_micro: int
    limit_day_micro: int | None
    limit_month_micro: int | None


def usd_text(micro: int) -> str:
    """Dollars as people write them, exact: 5_000_000 -> "5.00", 1_234_500 -> "1.2345"."""
    whole, frac = divmod(micro, 1_000_000)
    return f"{whole:,}." + f"{frac:06d}".rstrip("0").ljust(2, "0")


def limit_windows(now: float) -> tuple[float, float]:
    """(start of the UTC day, start of the UTC calendar month) that ``now`` falls in, in epoch seconds."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), day.replace(day=1).timestamp()


def spend(conn: Connection, key_ids: list[str], now: float) -> dict[str, Spend]:
    """Settled spend of each of ``key_ids`` today and this month (UTC, by settlement time), with its limits."""
    day_start, month_start = limit_windows(now)

    def cost_since(t: float):
        return sa.func.coalesce(sa.func.sum(sa.case((receipt_log.c.settled_at >= t, receipt_log.c.cost), else_=0)), 0)

    spent = {r.key_id: (int(r.day), int(r.month)) for r in conn.execute(
        sa.select(receipt_log.c.key_id, cost_since(day_start).label("day"), cost_since(month_start).label("month"))
        .where(receipt_log.c.key_id.in_(key_ids), receipt_log.c.settled_at >= month_start)
        .group_by(receipt_log.c.key_id))}
    limits = conn.execute(sa.select(api_keys.c.key_id, api_keys.c.limit_day_micro, api_keys.c.limit_month_micro)
                          .where(api_keys.c.key_id.in_(key_ids))).all()
    return {r.key_id: Spend(*spent.get(r.key_id, (0, 0)), r.limit_day_micro, r.limit_month_micro) for r in limits}
