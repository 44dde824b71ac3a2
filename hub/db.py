"""The hub's schema and engine: SQLAlchemy 2.x Core, sync, run in worker threads.

SQLAlchemy's asyncio layer and aiosqlite do not run under trio, so every
database call goes through :meth:`Database.write` / :meth:`Database.read`,
which run a sync transaction in ``trio.to_thread.run_sync`` under a bounded
:class:`trio.CapacityLimiter`.

Concurrency rules, the same on both backends:

* SQLite (the embedded default) runs in WAL mode and every write transaction
  starts with ``BEGIN IMMEDIATE``: writers are serialised by SQLite itself,
  across threads *and* processes, and a reader never blocks them.
* PostgreSQL runs at READ COMMITTED; code that reads a row to decide a write
  locks it first (``SELECT ... FOR UPDATE``), always in the order
  chain head -> allowances -> accounts by id, and a deadlock or serialisation
  failure retries the whole transaction.
* Balances are also guarded in the schema: ``CHECK (allow_negative OR
  balance >= 0)``, so no code path can overdraw an account.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
import trio
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .chain import GENESIS

T = TypeVar("T")

metadata = sa.MetaData()

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""An autoincrementing id: SQLite only autoincrements an INTEGER PRIMARY KEY."""

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("allow_negative", sa.Boolean, nullable=False, default=False),
    sa.Column("balance", sa.BigInteger, nullable=False, default=0),
    sa.CheckConstraint("allow_negative OR balance >= 0", name="balance_not_negative"),
)

journal = sa.Table(
    "journal",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
"""One row per ledger transaction; ``key`` is its idempotency key."""

postings = sa.Table(
    "postings",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("journal_key", sa.String(200), sa.ForeignKey("journal.key"), nullable=False, index=True),
    sa.Column("account_id", sa.BigInteger, sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("account_id", sa.BigInteger, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("stripe_customer_id", sa.String(255)),
    sa.Column("payment_method_id", sa.String(255)),
    sa.Column("recharge_threshold_micro", sa.BigInteger),
    sa.Column("recharge_amount_micro", sa.BigInteger),
    sa.Column("recharge_error", sa.String(200)),
    sa.Column("payout_threshold_micro", sa.BigInteger),
    sa.Column("connect_account_id", sa.String(255)),
    sa.Column("suspended_at", sa.Float),
    sa.Column("connect_payouts_enabled", sa.Boolean),
)
"""``connect_payouts_enabled``: whether Stripe last said the Connect account can be paid out (NULL: not asked,
as for an account id set through ``PUT /v1/payout-settings``)."""

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("limit_day_micro", sa.BigInteger),
    sa.Column("limit_month_micro", sa.BigInteger),
)
"""``limit_day_micro`` / ``limit_month_micro``: most the key may spend per UTC day / calendar month (NULL: no limit)."""

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("peer_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
)

gateways = sa.Table(
    "gateways",
    metadata,
    sa.Column("peer_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
)

allowances = sa.Table(
    "allowances",
    metadata,
    sa.Column("allowance_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("gateway_id", sa.String(64), nullable=False),
    sa.Column("budget", sa.BigInteger, nullable=False),
    sa.Column("remaining", sa.BigInteger, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("live", sa.Boolean, nullable=False),
    sa.Column("key_id", sa.String(32)),
    sa.Column("refused_models", sa.Text),
    sa.CheckConstraint("remaining >= 0", name="allowance_not_negative"),
    sa.Index("allowances_by_gateway", "gateway_id", "issued_at"),
)
"""Allowances issued; ``live`` marks the one per gateway whose budget is held.

When a gateway renews, the old allowance's remaining budget rolls over into
the new one (``live`` moves), but the old row stays: it still proves that the
gateway could spend for that account during its validity window. ``key_id``
is the API key that asked for it (NULL on rows from before keys had limits):
its receipts count against that key's spend limits. ``refused_models`` is the
JSON list the signed allowance carries: receipts for those models do not
settle under it.
"""

receipt_log = sa.Table(
    "receipt_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("request_id", sa.String(32), nullable=False, unique=True),
    sa.Column("receipt_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("client_user_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("host_user_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("cost", sa.BigInteger, nullable=False),
    sa.Column("fee", sa.BigInteger, nullable=False),
    sa.Column("settled_at", sa.Float, nullable=False),
    sa.Column("entry", sa.LargeBinary, nullable=False),
    sa.Column("entry_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("sig", sa.LargeBinary(64), nullable=False),
    sa.Column("key_id", sa.String(32)),
    sa.Index("receipt_log_by_time", "settled_at"),
    sa.Index("receipt_log_by_key", "key_id", "settled_at"),
)

chain_head = sa.Table(
    "chain_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.LargeBinary(32), nullable=False),
)
"""One row: the last log entry. Locking it serialises appends to the chain."""

stripe_events = sa.Table(
    "stripe_events",
    metadata,
    sa.Column("event_id", sa.String(255), primary_key=True),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

payouts = sa.Table(
    "payouts",
    metadata,
    sa.Column("payout_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("transfer_id", sa.String(255)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

offers = sa.Table(
    "offers",
    metadata,
    sa.Column("peer_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("price", sa.BigInteger, nullable=False),
    sa.Column("tokens_per_s", sa.Float, nullable=False),
    sa.Column("free_slots", sa.Integer, nullable=False),
    sa.Column("max_slots", sa.Integer, nullable=False),
    sa.Column("follows_market", sa.Boolean, nullable=False, default=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Index("offers_by_expiry", "expires_at"),
)
"""The latest offer of each host for each model (market supply)."""

offer_prices = sa.Table(
    "offer_prices",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("peer_id", sa.String(64), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("price", sa.BigInteger, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("until", sa.Float, nullable=False),
    sa.Index("offer_prices_by_host", "peer_id", "model", "until"),
)
"""Price history of offers: one row per stretch of time a host offered a
model at one price (``since`` = first such offer's issue time, ``until`` = the
last one's expiry). Settlement checks receipt prices against it; a heartbeat
at an unchanged price only moves ``until``."""

prices = sa.Table(
    "prices",
    metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("epoch", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("epoch_start", sa.Float, nullable=False),
    sa.Column("price", sa.BigInteger, nullable=False),
    sa.Column("demand_tps", sa.Float, nullable=False),
    sa.Column("supply_tps", sa.Float, nullable=False),
    sa.Column("utilisation", sa.Float),
    sa.Column("hosts", sa.Integer, nullable=False),
    sa.Column("floor", sa.BigInteger, nullable=False),
    sa.Column("ceiling", sa.BigInteger, nullable=False),
    sa.Column("hub_id", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Index("prices_by_time", "epoch_start"),
)
"""Published market prices, one row per (model, epoch); the first hub process
to close an epoch writes it and every other one adopts it. ``utilisation`` is
NULL when there was demand and no supply (infinite)."""

audit_periods = sa.Table(
    "audit_periods",
    metadata,
    sa.Column("period", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("secret", sa.LargeBinary(32), nullable=False),
    sa.Column("commitment", sa.LargeBinary(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
"""The hub's audit-selection secret per period (``period = floor(t / audit_period_s)``);
its commitment is published while the period runs, the secret once it is over."""

audits = sa.Table(
    "audits",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("host_id", sa.String(64), nullable=False, index=True),
    sa.Column("gateway_id", sa.String(64), nullable=False, index=True),
    sa.Column("period", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reasons", sa.Text, nullable=False, default=""),
    sa.Column("selected_at", sa.Float, nullable=False),
    sa.Column("decided_at", sa.Float),
    sa.Column("withheld", sa.BigInteger, nullable=False, default=0),
    sa.Column("debt", sa.BigInteger, nullable=False, default=0),
    sa.Index("audits_by_status", "status", "gateway_id"),
)
"""Receipts selected for audit and their verdicts. ``status``: ``pending`` (waiting
for the gateway's opening), ``passed``, ``failed``, ``unopened`` (the gateway had no
opening: no verdict on the host), ``skipped`` (no reference model for its hash).
``reasons`` is JSON (a list of strings); ``withheld`` is what a failed audit took
back from the host, ``debt`` what it could not (already paid out)."""

audit_roots = sa.Table(
    "audit_roots",
    metadata,
    sa.Column("host_id", sa.String(64), primary_key=True),
    sa.Column("period", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
)
"""Hosts' signed receipt roots (``ReceiptRoot``), one per host and period: the first one wins."""

audit_waiting = sa.Table(
    "audit_waiting",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("host_id", sa.String(64), nullable=False),
    sa.Column("gateway_id", sa.String(64), nullable=False),
    sa.Column("period", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("receipt", sa.LargeBinary, nullable=False),
    sa.Column("settled_at", sa.Float, nullable=False),
    sa.Index("audit_waiting_by_host", "host_id", "period"),
)
"""Settled receipts whose selection waits for their host's root of their period (or its deadline)."""

audit_openings = sa.Table(
    "audit_openings",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("opening", sa.LargeBinary, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)
"""The gateways' openings (``Opening.encode()``) the hub audited, for ``gpunexus hub audits export``."""

host_reputation = sa.Table(
    "host_reputation",
    metadata,
    sa.Column("peer_id", sa.String(64), primary_key=True),
    sa.Column("passes", sa.Integer, nullable=False, default=0),
    sa.Column("fails", sa.Integer, nullable=False, default=0),
    sa.Column("updated_at", sa.Float, nullable=False),
)
"""Audit record per host peer id (``verify.reputation.Reputation``)."""

audit_jobs = sa.Table(
    "audit_jobs",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(32), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("model_hash", sa.String(256), nullable=False),
    sa.Column("opening", sa.LargeBinary, nullable=False),
    sa.Column("avoid", sa.Text, nullable=False, default="[]"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("verifier_id", sa.String(64)),
    sa.Column("job", sa.LargeBinary),
    sa.Column("expires_at", sa.Float),
    sa.Column("result", sa.LargeBinary),
    sa.Column("verdict", sa.String(16), nullable=False, default=""),
    sa.Column("reasons", sa.Text, nullable=False, default="[]"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("answered_at", sa.Float),
    sa.Column("fee", sa.BigInteger, nullable=False, default=0),
    sa.Index("audit_jobs_by_status", "status", "verifier_id"),
)
"""Peer-verifier jobs (``hub/peer_audit.py``). ``kind``: ``audit`` (a real receipt's audit, ``round`` 1 or 2),
``known-bad`` (an opening the hub altered: the right answer is "fail"). ``status``: ``unassigned`` (no
verifier drawn yet), ``assigned`` (``job`` is the signed ``AuditJob``), ``answered``. ``avoid`` (JSON) lists
the peer ids never to draw for it (the audited host, earlier verifiers); ``verdict``/``reasons`` are the
hub's judgement of the verifier's result; ``fee`` what the verifier was paid for it."""

verifiers = sa.Table(
    "verifiers",
    metadata,
    sa.Column("peer_id", sa.String(64), primary_key=True),
    sa.Column("model_hash", sa.String(256), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
)
"""Host peers that poll for verifier jobs (``GET /v1/audits/jobs``), per model hash, and when they last did."""

passwords = sa.Table(
    "passwords",
    metadata,
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(200), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
"""Argon2id hashes of dashboard passwords (never the password); a user without a row cannot log in.

A table of its own rather than a column of ``users``, so that no query that
reads whole user rows (billing, listings) ever carries a hash along."""

terms_acceptances = sa.Table(
    "terms_acceptances",
    metadata,
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), primary_key=True, autoincrement=False),
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("accepted_at", sa.Float, nullable=False),
    sa.Column("address", sa.String(64), nullable=False, default=""),
)
"""Which version of the terms each user accepted, when, and from which address."""

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)
"""Dashboard logins. The cookie carries a random token (signed); only its SHA-256 is
kept, so a copy of the database opens no session. Logging out, suspension and
expiry delete or ignore the row, whatever cookie a browser still holds."""

key_requests = sa.Table(
    "key_requests",
    metadata,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.key_id"), nullable=False),
)
"""The one-time form nonce each dashboard key creation came with: a resubmitted form creates no second key."""

hub_secrets = sa.Table(
    "hub_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)
"""Secrets every process of one hub must share (the dashboard's cookie-signing key), made once."""

models = sa.Table(
    "models",
    metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("licence_name", sa.String(200), nullable=False, default=""),
    sa.Column("licence_url", sa.String(500), nullable=False, default=""),
    sa.Column("context_length", sa.Integer),
    sa.Column("available", sa.Boolean, nullable=False, default=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("family", sa.String(100)),
    sa.Column("licence_ack", sa.Boolean),
    sa.Column("min_vram_gb", sa.Float),
    sa.Column("min_compute_capability", sa.String(16)),
    sa.Column("min_tokens_per_s", sa.Float),
)
"""The operator's model catalogue: what a model id is, under which licence, and whether it is offered.

``licence_ack`` (NULL: false): a client's keys may use the model only once
its account accepted the licence (``licence_acceptances``)."""

licence_acceptances = sa.Table(
    "licence_acceptances",
    metadata,
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), primary_key=True, autoincrement=False),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("licence_name", sa.String(200), nullable=False),
    sa.Column("licence_url", sa.String(500), nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
)
"""Which licence of a model each account accepted, and when. An acceptance counts
only while the catalogue names the same licence (name and URL): a changed
licence must be accepted again."""

disputes = sa.Table(
    "disputes",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("disputed_at", sa.Float, nullable=False),
    sa.Index("disputes_by_user", "user_id", "disputed_at"),
)
"""Receipts a client asked the hub to audit (:mod:`gpunexus.hub.disputes`); the verdict is the ``audits`` row's."""

_ADDED_COLUMNS = (users.c.suspended_at, api_keys.c.expires_at, api_keys.c.limit_day_micro, api_keys.c.limit_month_micro,
                  allowances.c.key_id, allowances.c.refused_models, receipt_log.c.key_id, models.c.family, models.c.licence_ack,
                  models.c.min_vram_gb, models.c.min_compute_capability, models.c.min_tokens_per_s, users.c.connect_payouts_enabled)
"""Nullable columns added after the first release; :meth:`Database.create_schema` adds them to older databases."""

_RETRY_PGCODES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def default_url(home: str) -> str:
    return "sqlite:///" + os.path.join(home, "hub", "hub.db")


def make_engine(url: str) -> Engine:
    """An engine with the concurrency rules of the module docstring applied."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Take transaction control away from pysqlite so "begin" below decides.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    readonly = conn.get_execution_options().get("gnx_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Database:
    """An engine plus the thread limiter every call goes through."""

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.limiter = trio.CapacityLimiter(threads)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    def create_schema(self) -> None:
        """Create missing tables and the chain head row (idempotent)."""
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        for index in receipt_log.indexes:  # indexes added after a database was created (on columns added just above)
            index.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(chain_head.c.id)).first() is None:
                conn.execute(chain_head.insert().values(id=1, seq=0, head_hash=GENESIS))

    def write_sync(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(conn, *args)`` in one write transaction, retrying PG conflicts."""
        for attempt in range(8):
            try:
                with self.engine.begin() as conn:
                    return fn(conn, *args)
            except sa.exc.OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRY_PGCODES or attempt == 7:
                    raise
        raise AssertionError("unreachable")

    def read_sync(self, fn: Callable[..., T], *args) -> T:
        with self.engine.connect().execution_options(gnx_readonly=True) as conn:
            with conn.begin():
                return fn(conn, *args)

    async def write(self, fn: Callable[..., T], *args) -> T:
        return await trio.to_thread.run_sync(functools.partial(self.write_sync, fn, *args), limiter=self.limiter)

    async def read(self, fn: Callable[..., T], *args) -> T:
        return await trio.to_thread.run_sync(functools.partial(self.read_sync, fn, *args), limiter=self.limiter)

    def dispose(self) -> None:
        self.engine.dispose()


def _add_missing_columns(engine: Engine) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each of :data:`_ADDED_COLUMNS` an existing table lacks.

    ``metadata.create_all`` creates missing tables only; a database made by an
    earlier release keeps its tables as they were.
    """
    with engine.begin() as conn:
        inspector = sa.inspect(conn)
        for column in _ADDED_COLUMNS:
            present = {c["name"] for c in inspector.get_columns(column.table.name)}
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {column.table.name} ADD COLUMN {column.name} {kind}")
