"""People on the dashboard: sign-up, passwords, login sessions, suspension.

Programs authenticate with API keys (:mod:`gpunexus.hub.keys`); people log in
with an email and a password and get a session. Passwords are hashed with
argon2id (``argon2-cffi``'s defaults, RFC 9106's second recommended profile);
only the encoded hash is stored, in its own table, and nothing in the hub logs
a password. A login session is a random token: the browser holds it in a
signed cookie, the database only its SHA-256 (see ``web_sessions`` in
:mod:`gpunexus.hub.db`), so logout and suspension end it server-side.

Every function takes a connection inside a transaction, so a sign-up (user,
account, password, accepted terms) commits whole or not at all. The slow
parts (hashing, verifying) run outside any transaction:
:class:`~gpunexus.hub.service.Hub` hashes in a worker thread first.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import argon2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import keys, ledger
from .db import api_keys, hosts, hub_secrets, key_requests, passwords, terms_acceptances, users, web_sessions
from .keys import User

TERMS_VERSION = "2025-06"
"""The terms a sign-up accepts (``hub/web/templates/terms.html`` shows them); bump when they change."""

SIGNUP_ROLES = ("client", "host")
"""Roles a person may choose; admins are made with ``gpunexus hub user add --role admin``."""

MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 256
SESSION_TTL_S = 12 * 3600.0
"""A login lasts 12 hours, then the person logs in again."""

_EMAIL = re.compile(r"[^@\s<>\"'`]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+")
_COMMON = frozenset({
    "password", "password1", "password12", "password123", "1234567890", "0123456789", "qwertyuiop",
    "1q2w3e4r5t", "iloveyou12", "letmein123", "welcome123", "qwerty1234", "abcdefghij", "passw0rd12",
})
_hasher = argon2.PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
"""Verified against when an email is unknown, so a login takes as long whether the account exists or not."""


class AccountError(Exception):
    """A sign-up or login the hub refuses; ``field`` names the form field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True, slots=True)
class Login:
    """What a login needs from the database: the user, its hash (None: no password set), suspension."""

    user: User
    hash: str | None
    suspended: bool


def normalise_email(email: str) -> str:
    """The lower-cased address, or :class:`AccountError` if it does not look like one."""
    email = email.strip().lower()
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        raise AccountError("email", "Enter a valid email address, like name@example.com.")
    return email


def password_problem(password: str, email: str) -> str | None:
    """Why ``password`` is too weak (a sentence for the form), or None."""
    if len(password) < MIN_PASSWORD_CHARS:
        return f"Use at least {MIN_PASSWORD_CHARS} characters for your password."
    if len(password) > MAX_PASSWORD_CHARS:
        return f"Use at most {MAX_PASSWORD_CHARS} characters for your password."
    local = email.split("@")[0]
    if len(set(password)) < 4 or password.lower() in _COMMON or (len(local) >= 4 and local in password.lower()):
        return "This password is too easy to guess: avoid common words, repeats and your email address."
    return None


def hash_password(password: str) -> str:
    """The argon2id encoded hash (slow on purpose: run it in a worker thread)."""
    return _hasher.hash(password)


def verify_password(login: Login | None, password: str) -> bool:
    """Whether ``password`` matches; as slow for an unknown email or an unset password as for a known one."""
    encoded = login.hash if login and login.hash else _DUMMY_HASH
    try:
        _hasher.verify(encoded, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
    return encoded is not _DUMMY_HASH


def needs_rehash(encoded: str) -> bool:
    return _hasher.check_needs_rehash(encoded)


def sign_up(conn: Connection, email: str, role: str, password_hash: str, terms_version: str,
            address: str, now: float) -> User:
    """Create the user, its account, its password and its acceptance of the terms, in the caller's transaction."""
    if role not in SIGNUP_ROLES:
        raise AccountError("role", "Choose whether you use models (client) or rent out a GPU (host).")
    if terms_version != TERMS_VERSION:
        raise AccountError("terms", "Accept the terms of service to create an account.")
    if conn.execute(sa.select(users.c.id).where(users.c.email == email)).first():
        raise AccountError("email", "An account with this email already exists. Log in instead.")
    user = keys.create_user(conn, email, role)
    conn.execute(passwords.insert().values(user_id=user.id, hash=password_hash, updated_at=now))
    conn.execute(terms_acceptances.insert().values(user_id=user.id, version=terms_version, accepted_at=now,
                                                   address=address[:64]))
    return user


def login_record(conn: Connection, email: str) -> Login | None:
    row = conn.execute(
        sa.select(users, passwords.c.hash).outerjoin(passwords, passwords.c.user_id == users.c.id)
        .where(users.c.email == email)
    ).first()
    if row is None:
        return None
    return Login(keys.user_by_id(conn, row.id), row.hash, row.suspended_at is not None)


def set_password(conn: Connection, user_id: int, password_hash: str, now: float) -> None:
    """Set (or replace) a user's password; every open session of the user ends."""
    conn.execute(sa.delete(passwords).where(passwords.c.user_id == user_id))
    conn.execute(passwords.insert().values(user_id=user_id, hash=password_hash, updated_at=now))
    conn.execute(sa.delete(web_sessions).where(web_sessions.c.user_id == user_id))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def open_session(conn: Connection, user_id: int, now: float, ttl_s: float = SESSION_TTL_S) -> str:
    """A new login session for ``user_id``: the token the cookie carries."""
    token = secrets.token_urlsafe(32)
    conn.execute(web_sessions.insert().values(token_hash=_token_hash(token), user_id=user_id, created_at=now,
                                              expires_at=now + ttl_s))
    return token


def session_user(conn: Connection, token: str, now: float) -> User | None:
    """The user of a live session (not expired, user not suspended), or None."""
    row = conn.execute(
        sa.select(users).join(web_sessions, web_sessions.c.user_id == users.c.id)
        .where(web_sessions.c.token_hash == _token_hash(token), web_sessions.c.expires_at > now,
               users.c.suspended_at.is_(None))
    ).first()
    return keys.user_by_id(conn, row.id) if row else None


def close_session(conn: Connection, token: str) -> None:
    conn.execute(sa.delete(web_sessions).where(web_sessions.c.token_hash == _token_hash(token)))


def set_suspended(conn: Connection, user_id: int, suspended: bool, now: float) -> bool:
    """Suspend (or restore) a user; False if there is no such user.

    Suspending ends the user's sessions and revokes every active key: the
    revocation is what gateways hear within a second (a suspended user's
    keys authenticate nothing in any case), and a restored user makes new
    keys rather than having old ones come back to life.
    """
    found = conn.execute(sa.update(users).where(users.c.id == user_id)
                         .values(suspended_at=now if suspended else None).returning(users.c.id)).first()
    if found is None:
        return False
    if suspended:
        conn.execute(sa.delete(web_sessions).where(web_sessions.c.user_id == user_id))
        conn.execute(sa.update(api_keys).where(api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None))
                     .values(revoked_at=time.time()))  # wall time, as keys.revoke_key: gateways' revocation cursors are
    return True


def suspended_host_peers(conn: Connection) -> list[str]:
    """Host peer ids whose account is suspended: the hub's signed reputations mark them excluded."""
    return list(conn.execute(sa.select(hosts.c.peer_id).join(users, users.c.id == hosts.c.user_id)
                             .where(users.c.suspended_at.is_not(None))).scalars())


def create_key_once(conn: Connection, user: User, name: str, expires_at: float | None, nonce: str, *,
                    limit_day_micro: int | None = None, limit_month_micro: int | None = None) -> str | None:
    """A new key, unless this form ``nonce`` already made one (a resubmitted form): then None."""
    claimed = conn.execute(sa.select(key_requests.c.key_id).where(key_requests.c.nonce == nonce)).first()
    if claimed is not None:
        return None
    key = keys.create_key(conn, user, name, expires_at, limit_day_micro=limit_day_micro,
                          limit_month_micro=limit_month_micro)
    conn.execute(key_requests.insert().values(nonce=nonce, key_id=keys.key_id_of(key)))
    return key


def cookie_secret(conn: Connection) -> bytes:
    """The key that signs dashboard cookies: made by the first hub process, read by every other."""
    conn.execute(ledger.insert_ignore(conn, hub_secrets).values(name="cookie_secret", value=secrets.token_bytes(32)))
    return conn.execute(sa.select(hub_secrets.c.value).where(hub_secrets.c.name == "cookie_secret")).scalar_one()
