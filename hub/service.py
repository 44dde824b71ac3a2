"""The hub as one object: the async face of the ledger, keys, allowances and receipts.

The HTTP app and the CLI both drive this class; it owns the database, the
hub's signing key and the policy, and runs the periodic work (releasing
expired holds, billing checks, closing market epochs) in :meth:`Hub.run`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import sqlalchemy as sa
import trio
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.ids import public_key_from_peer_id
from gpunexus.protocol.messages import (
    Allowance,
    HostReputation,
    Offer,
    Receipt,
    ReceiptRoot,
    Revocation,
    VerifierResult,
    Withdraw,
    host_registration_statement,
)
from gpunexus.protocol.signing import Signer, verify_signature
from sqlalchemy.engine import Connection

from . import accounts, allowances, catalogue, disputes, honesty, keys, ledger, market, peer_audit, receipts, reports
from .config import HubConfig
from .db import Database, default_url, hosts, receipt_log, users
from .db import allowances as allowance_table
from .keys import User
from .ledger import Journal

VERSION = "1"
M = TypeVar("M", ReceiptRoot, Withdraw)
"""A message a host signs about itself and posts through its account (:meth:`Hub._own_host_message`)."""
REVOCATION_POLL_S = 0.2
"""How often the hub looks for revocations made by other processes (a revocation reaches gateways within this)."""


class HubError(Exception):
    """A request the hub refuses: HTTP status, OpenAI-style error type/code, message."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


class Billing(Protocol):
    """What the Stripe layer plugs into the hub; absent in manual-credits mode."""

    def after_settlement(self, clients: set[int], hosts: set[int]) -> None:
        """Note the users a settled batch touched (no I/O: work is queued for ``run``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background billing work: auto-recharges and payouts."""


class Hub:
    """Database, signing key and policy of one hub; every operation of the API."""

    def __init__(self, db: Database, signer: Signer, config: HubConfig | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.signer = signer
        self.config = config or HubConfig()
        self.clock = clock
        self.billing: Billing | None = None
        self.market = market.Market(db, signer, self.config, clock)
        """Offers, epochs and published prices (:mod:`gpunexus.hub.market`)."""
        self.precheck: Callable[[list[bytes], HubConfig], list[receipts.Checked]] = receipts.precheck
        """Swap in :class:`~gpunexus.hub.receipts.ParallelPrecheck` to verify on several cores."""
        self._revoked = trio.Event()
        """Set (and replaced) each time a revocation lands: wakes :meth:`revocations`."""

    @classmethod
    def open(cls, home: str, db_url: str | None = None, config: HubConfig | None = None, **kw) -> Hub:
        """The hub of ``$GPUNEXUS_HOME``: its key under ``hub/``, its database (schema ensured)."""
        signer = Signer.load_or_create(Path(home, "hub", "hub.key"))
        db = Database(db_url or default_url(home))
        db.create_schema()
        return cls(db, signer, config, **kw)

    @property
    def hub_id(self) -> str:
        return self.signer.peer_id

    # --- auth -------------------------------------------------------------
    async def authenticate(self, token: str | None, *, allow_revoked: bool = False) -> User:
        try:
            return await self.db.read(keys.authenticate, token, allow_revoked)
        except keys.AuthError as exc:
            raise HubError(401, "invalid_api_key", str(exc)) from None

    async def revocations(self, user: User, after: float, wait_s: float,
                          terms: str | None = None) -> tuple[list[Revocation], str]:
        """Signed revocations of ``user``'s keys after ``after``, and the account's terms stamp.

        A long poll: it waits up to ``wait_s`` for a revocation, or for the
        account's :func:`~gpunexus.hub.catalogue.terms_stamp` to differ from
        ``terms`` (what the gateway's allowance was issued under: a model
        switched off, a licence accepted). The gateway keeps one open, so
        either reaches it within :attr:`REVOCATION_POLL_S` of the database
        write, whichever hub process (or ``gpunexus hub key revoke``) made it.
        """
        def look(conn: Connection) -> tuple[list[tuple[str, float]], str]:
            return keys.revocations_since(conn, user.id, after), catalogue.terms_stamp(conn, user.id)

        seen = None
        with trio.move_on_after(wait_s):
            while True:
                changed = self._revoked
                seen = await self.db.read(look)
                if seen[0] or (terms is not None and seen[1] != terms):
                    break
                await changed.wait()
                seen = None
        found, stamp = seen if seen is not None else await self.db.read(look)
        return [Revocation(self.hub_id, key_id, user.account, at).signed(self.signer) for key_id, at in found], stamp

    async def _watch_revocations(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the long polls whenever the latest revocation, or the catalogue and its acceptances, change.

        Polled, because these are written by other processes too (the CLI,
        other hub processes on one PostgreSQL); a few cheap max() and count()
        per interval for the whole hub, however many gateways are waiting.
        """
        def marker(conn: Connection) -> tuple:
            return keys.last_revocation(conn), catalogue.change_marker(conn)

        last = await self.db.read(marker)
        task_status.started()
        while True:
            await trio.sleep(REVOCATION_POLL_S)
            now = await self.db.read(marker)
            if now != last:
                last = now
                self._revoked.set()
                self._revoked = trio.Event()

    # --- allowances -------------------------------------------------------
    async def allowance(self, user: User, gateway_id: str, budget_micro: int | None, key_id: str | None = None) -> Allowance:
        """The signed allowance of :meth:`issue_allowance` alone."""
        return (await self.issue_allowance(user, gateway_id, budget_micro, key_id)).allowance

    async def issue_allowance(self, user: User, gateway_id: str, budget_micro: int | None,
                              key_id: str | None = None) -> allowances.Issued:
        """A fresh allowance for ``gateway_id`` and what its gateway is told beside it (refused models' reasons).

        ``key_id``: the API key that asks; its spend limits cap the budget and its expiry the allowance's.
        """
        try:
            public_key_from_peer_id(gateway_id)
        except ProtocolError:
            raise HubError(400, "invalid_request_error", "gateway_id is not a peer id", "gateway_id") from None
        try:
            return await self.db.write(allowances.issue, self.signer, self.config, user, gateway_id, budget_micro,
                                       self.clock(), key_id)
        except allowances.AllowanceRefused as exc:
            raise HubError(exc.status, exc.code, exc.message) from None

    async def release_expired(self) -> int:
        return await self.db.write(allowances.release_expired, self.config, self.clock())

    # --- receipts ---------------------------------------------------------
    async def submit(self, blobs: list[bytes]) -> list[receipts.Outcome]:
        """Verify and settle one batch; signature checks run in the worker thread too."""
        if len(blobs) > self.config.max_batch:
            raise HubError(413, "batch_too_large", f"at most {self.config.max_batch} receipts per batch")

        def work() -> list[receipts.Outcome]:
            checked = self.precheck(blobs, self.config)
            now = self.clock()
            outcomes = self.db.write_sync(receipts.settle, self.signer, self.config, checked, now)
            settled = {o.request_id for o in outcomes if o.status == "settled"}
            picked = [(c.receipt, c.data) for c in checked if c.receipt is not None and c.receipt.request_id in settled]
            if picked:  # audit selection (see hub/honesty.py); settlement stands whatever happens here
                self.db.write_sync(honesty.select_settled, self.config, picked, now)
            return outcomes

        outcomes = await trio.to_thread.run_sync(work, limiter=self.db.limiter)
        if self.billing and any(o.status == "settled" for o in outcomes):
            self.billing.after_settlement(*await self.db.read(_touched_users, [o.seq for o in outcomes if o.seq]))
        return outcomes

    async def export(self) -> list[tuple[int, bytes, bytes, bytes]]:
        return await self.db.read(receipts.export)

    # --- audits (hub/honesty.py) -----------------------------------------
    async def audit_commitments(self) -> dict:
        out = await self.db.write(honesty.commitments, self.config, self.clock())
        return {"hub_id": self.hub_id, **out}

    async def pending_audits(self, user: User) -> list[str]:
        await self.decide_overdue()
        return await self.db.read(honesty.pending_for, user.id)

    async def decide_overdue(self) -> list[str]:
        """Select the receipts whose host published no root by its period's deadline (all of them)."""
        return await self.db.write(honesty.decide_overdue, self.config, self.clock())

    async def _own_host_message(self, user: User, cls: type[M], blob: bytes, name: str, peer_of: Callable[[M], str]) -> M:
        """Decode and verify a message a host signed about itself, posted by the account its peer id is registered to.

        403 for a non-host account or another account's peer id; 400
        (``invalid_<name>``) for a message that does not decode, verify, or
        was issued in the future.
        """
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", f"only a host account can post a {name}")
        try:
            msg = decode_as(cls, blob)
            msg.verify()
        except ProtocolError as exc:
            raise HubError(400, f"invalid_{name}", f"{name} refused: {exc}", name) from None
        if msg.issued_at > self.clock() + self.config.clock_skew_s:
            raise HubError(400, f"invalid_{name}", f"{name} issued in the future", name)
        peer_id = peer_of(msg)
        owner = self.market.offer_cache.owners.get(peer_id) or await self.db.read(_host_owner, peer_id)
        if owner != user.id:
            raise HubError(403, "permission_denied", "this peer id is not registered to this account", name)
        return msg

    async def post_root(self, user: User, blob: bytes) -> dict:
        """A host's signed receipt root for one period (``POST /v1/audits/roots``)."""
        msg = await self._own_host_message(user, ReceiptRoot, blob, "root", lambda m: m.host_id)
        now = self.clock()
        if now > honesty.root_deadline(self.config, msg.period):
            raise HubError(409, "root_too_late", "this period's roots were due by "
                           f"{honesty.root_deadline(self.config, msg.period):.0f}; its receipts are all audited", "root")
        return await self.db.write(honesty.accept_root, self.config, msg, blob, now)

    async def open_audit(self, user: User, request_id: str, blob: bytes | None, reason: str = "") -> dict:
        """A gateway's opening of a selected receipt (None: it has none); audits it and returns the verdict."""
        pending = await self.db.read(honesty.load_pending, request_id)
        if pending is None or pending.gateway_owner != user.id:
            raise HubError(404, "not_found", "no audit of this request is waiting for this account's gateways", "request_id")
        if pending.status != "pending":
            return {"request_id": request_id, "status": pending.status, "already": True}
        if blob is None:
            return await self.db.write(honesty.record_verdict, request_id, "unopened", [f"gateway: {reason or 'no opening'}"], self.clock())
        receipt = decode_as(Receipt, pending.receipt)
        try:
            opening = honesty.decode_opening(blob)
        except ProtocolError as exc:
            raise HubError(400, "invalid_opening", f"opening refused: {exc}", "opening") from None
        problem = honesty.opening_problem(opening, receipt)
        if problem:
            raise HubError(400, "invalid_opening", f"opening refused: {problem}", "opening")
        if not (self.config.hub_replay and honesty.reference_for(receipt.model_hash)):
            if opening.kind == "embedding":  # peer verifiers replay generations, not vectors
                return await self.db.write(honesty.record_verdict, request_id, "skipped",
                                           ["embedding: no reference here, and peer verifiers replay generations only"],
                                           self.clock(), blob)
            out = await self.db.write(peer_audit.open_jobs, self.config, request_id, receipt, blob, self.clock())
            await self.db.write(peer_audit.assign, self.config, self.signer, self.clock())
            return out
        status, verdict = await trio.to_thread.run_sync(honesty.run_audit, opening, receipt)
        reasons = list(verdict.reasons) if verdict else [f"model: no reference model with hash {receipt.model_hash[:16]}..."]
        return await self.db.write(honesty.record_verdict, request_id, status, reasons, self.clock(), blob)

    async def audit_jobs(self, user: User, peer_id: str, model_hashes: list[str]) -> list[bytes]:
        """A verifier host's signed jobs (``GET /v1/audits/jobs``); polling marks it available for its models."""
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", "only a host account can verify")
        if not 1 <= len(model_hashes) <= 16 or not all(0 < len(h) <= 256 for h in model_hashes):
            raise HubError(400, "invalid_request_error", "give 1 to 16 model_hash parameters", "model_hash")
        try:
            return await self.db.write(peer_audit.jobs_for, self.config, self.signer, user.id, peer_id,
                                       model_hashes, self.clock())
        except peer_audit.JobRefused as exc:
            raise HubError(403, "permission_denied", str(exc), "peer_id") from None

    async def post_verifier_result(self, user: User, blob: bytes) -> dict:
        """A verifier's signed result (``POST /v1/audits/results``): judged, escalated, paid."""
        try:
            result = decode_as(VerifierResult, blob)
            result.verify()
        except ProtocolError as exc:
            raise HubError(400, "invalid_result", f"result refused: {exc}", "result") from None
        if result.hub_id != self.hub_id:
            raise HubError(400, "invalid_result", "result refused: it names another hub", "result")
        try:
            return await self.db.write(peer_audit.accept_result, self.config, user.id, result, blob, self.clock())
        except peer_audit.JobRefused as exc:
            raise HubError(409, "job_refused", f"result refused: {exc}", "result") from None

    async def reputations(self) -> list[HostReputation]:
        """Every audited host's reputation, signed by the hub."""
        from gpunexus.verify import reputation as rep_mod

        now = self.clock()
        records = dict(await self.db.read(honesty.reputations))
        suspended = set(await self.db.read(accounts.suspended_host_peers))
        return [
            HostReputation(self.hub_id, peer, r.p_honest, rep_mod.excluded(r) or peer in suspended, r.passes + r.fails, r.fails, now)
            .signed(self.signer)
            for peer, r in sorted({**{p: rep_mod.Reputation() for p in suspended}, **records}.items())
        ]

    # --- hosts ------------------------------------------------------------
    async def register_host(self, user: User, peer_id: str, proof: bytes) -> None:
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", "only a host account can register a host peer id")
        try:
            verify_signature(peer_id, host_registration_statement(self.hub_id, peer_id), proof)
        except (ProtocolError, ValueError):
            raise HubError(400, "invalid_request_error", "proof is not the peer's signature of the registration", "proof") from None
        owner = await self.db.write(_bind_host, peer_id, user.id, self.clock())
        if owner != user.id:
            raise HubError(409, "host_bound", "this peer id is registered to another account")

    async def post_offer(self, user: User, blob: bytes) -> None:
        """Record a host's signed offer: market supply, and the prices its receipts may carry."""
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", "only a host account can post offers")
        try:
            offer = decode_as(Offer, blob)
            offer.verify()
        except ProtocolError as exc:
            raise HubError(400, "invalid_offer", f"offer refused: {exc}", "offer") from None
        now, cfg = self.clock(), self.config
        if offer.expires_at <= now:
            raise HubError(400, "offer_expired", "offer expired", "offer")
        if offer.issued_at > now + cfg.clock_skew_s:
            raise HubError(400, "invalid_offer", "offer issued in the future", "offer")
        if offer.expires_at - offer.issued_at > cfg.max_offer_ttl_s:
            raise HubError(400, "invalid_offer", f"offer lives longer than {cfg.max_offer_ttl_s:g} s", "offer")
        cache = self.market.offer_cache
        owner = cache.owners.get(offer.peer_id)
        if owner is None:
            owner = await self.db.read(_host_owner, offer.peer_id)
            if owner is not None:
                cache.owners[offer.peer_id] = owner  # a binding never changes once made
        if owner != user.id:
            raise HubError(403, "permission_denied", "this peer id is not registered to this account "
                           "(POST /v1/hosts/register first)", "offer")
        if cache.needs_write(offer):
            if await self.db.write(market.record_offer, offer, user.id, blob, now):
                self.market.offers_changed()  # a new host: gateways catching up now must get it, not a cached list
            cache.wrote(offer)

    async def post_withdraw(self, user: User, blob: bytes) -> int:
        """A host's signed withdrawal: its offers leave market supply and the catch-up lists at once."""
        withdraw = await self._own_host_message(user, Withdraw, blob, "withdraw", lambda m: m.peer_id)
        self.market.offer_cache.forget(withdraw.peer_id)
        ended = await self.db.write(market.record_withdraw, withdraw, self.clock())
        self.market.offers_changed()
        return ended

    async def set_payout_settings(self, user: User, threshold_micro: int | None, connect_account_id: str | None) -> dict:
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", "payout settings are for host accounts")
        if threshold_micro is not None and threshold_micro < 0:
            raise HubError(400, "invalid_request_error", "threshold must be >= 0", "threshold_micro")

        def update(conn: Connection) -> None:
            same = users.c.connect_account_id == connect_account_id  # a new account id's payout state is not known yet
            conn.execute(sa.update(users).where(users.c.id == user.id).values(
                payout_threshold_micro=threshold_micro, connect_account_id=connect_account_id,
                connect_payouts_enabled=sa.case((same, users.c.connect_payouts_enabled), else_=None)))

        await self.db.write(update)
        return {"threshold_micro": threshold_micro, "connect_account_id": connect_account_id}

    # --- queries ----------------------------------------------------------
    async def balance(self, user: User) -> dict:
        return await self.db.read(_balance, user)

    async def usage(self, user: User) -> dict:
        return await self.db.read(_summary, user, receipt_log.c.client_user_id)

    async def earnings(self, user: User) -> dict:
        return await self.db.read(_summary, user, receipt_log.c.host_user_id)

    # --- people: dashboard accounts, keys, reports (hub/accounts.py, hub/reports.py) ---------
    async def sign_up(self, email: str, password: str, role: str, *, terms_version: str, address: str = "") -> User:
        """A new client or host account with a password; refused whole (HubError 400 naming the field) or made whole."""
        try:
            email = accounts.normalise_email(email)
            problem = accounts.password_problem(password, email)
            if problem:
                raise accounts.AccountError("password", problem)
            encoded = await trio.to_thread.run_sync(accounts.hash_password, password)
            return await self.db.write(accounts.sign_up, email, role, encoded, terms_version, address, self.clock())
        except accounts.AccountError as exc:
            raise HubError(400, "invalid_request_error", exc.message, exc.field) from None
        except sa.exc.IntegrityError:  # the same email signed up at the same moment elsewhere
            raise HubError(400, "invalid_request_error", "An account with this email already exists. Log in instead.",
                           "email") from None

    async def log_in(self, email: str, password: str) -> tuple[User, str]:
        """(user, session token) for a right password; 401 with one message for any wrong email or password."""
        wrong = HubError(401, "invalid_login", "Wrong email or password.", "password")
        try:
            email = accounts.normalise_email(email)
        except accounts.AccountError:
            raise wrong from None
        login = await self.db.read(accounts.login_record, email)
        if not await trio.to_thread.run_sync(accounts.verify_password, login, password):
            raise wrong
        assert login is not None and login.hash is not None
        if login.suspended:
            raise HubError(403, "account_suspended", "This account is suspended. Contact the operator.", "email")
        if accounts.needs_rehash(login.hash):
            encoded = await trio.to_thread.run_sync(accounts.hash_password, password)
            await self.db.write(accounts.set_password, login.user.id, encoded, self.clock())
        return login.user, await self.db.write(accounts.open_session, login.user.id, self.clock())

    async def session_user(self, token: str) -> User | None:
        return await self.db.read(accounts.session_user, token, self.clock())

    async def log_out(self, token: str) -> None:
        await self.db.write(accounts.close_session, token)

    async def create_key(self, user: User, name: str, expires_at: float | None, nonce: str, *,
                         limit_day_micro: int | None = None, limit_month_micro: int | None = None) -> str | None:
        """A new API key (the only copy of its secret), or None if this form ``nonce`` already made one.

        ``limit_day_micro`` / ``limit_month_micro``: the most it may spend per UTC day / calendar month.
        """
        if expires_at is not None and expires_at <= time.time():
            raise HubError(400, "invalid_request_error", "The expiry must be in the future.", "expires")
        try:
            return await self.db.write(functools.partial(accounts.create_key_once, limit_day_micro=limit_day_micro,
                                                         limit_month_micro=limit_month_micro),
                                       user, name, expires_at, nonce)
        except keys.UserError as exc:
            raise HubError(400, "invalid_request_error", str(exc), "limit_day") from None

    async def list_keys(self, user: User) -> list[keys.KeyInfo]:
        return await self.db.read(functools.partial(keys.list_keys, user_id=user.id))

    async def key_spend(self, user: User) -> dict[str, keys.Spend]:
        """key id -> what each of ``user``'s keys spent today and this month, with its limits."""
        def read(conn: Connection) -> dict[str, keys.Spend]:
            return keys.spend(conn, [k.key_id for k in keys.list_keys(conn, user_id=user.id)], self.clock())

        return await self.db.read(read)

    async def revoke_key(self, user: User, key_id: str) -> None:
        """Revoke one of ``user``'s own keys (404 for a key that is not theirs or not active)."""
        if not await self.db.write(functools.partial(keys.revoke_key, user_id=user.id), key_id):
            raise HubError(404, "not_found", "No active key with this id on your account.", "key_id")

    async def daily(self, user: User, side: str, start: float, end: float) -> list[reports.DayModel]:
        return await self.db.read(reports.daily, user.id, side, start, end)

    async def request_log(self, user: User, side: str, start: float, end: float, *, limit: int = 100,
                          before_seq: int | None = None) -> list[reports.LoggedRequest]:
        return await self.db.read(functools.partial(reports.request_log, limit=limit, before_seq=before_seq),
                                  user.id, side, start, end)

    async def request_detail(self, user: User, request_id: str) -> tuple[reports.LoggedRequest, str, list[str]]:
        """One of ``user``'s settled requests (as client or host); 404 for any other id."""
        found = await self.db.read(reports.request_detail, user.id, request_id)
        if found is None:
            raise HubError(404, "not_found", "No request with this id on your account.", "request_id")
        return found

    async def dispute(self, user: User, request_id: str) -> disputes.Dispute:
        """Ask for an audit of one of ``user``'s settled requests (see :mod:`gpunexus.hub.disputes`)."""
        try:
            return await self.db.write(disputes.open_dispute, self.config, user.id, request_id, self.clock())
        except disputes.DisputeError as exc:
            raise HubError(exc.status, "not_found" if exc.status == 404 else "rate_limited", exc.message,
                           "request_id") from None

    async def dispute_of(self, request_id: str) -> disputes.Dispute | None:
        """The dispute of a request, if any: for its request page (which checked the request is the viewer's)."""
        return await self.db.read(disputes.dispute_of, request_id)

    async def receipt_extract(self, user: User) -> list[tuple[int, bytes, bytes, bytes]]:
        """The signed log entries ``user`` paid or earned: ``chain.write_log`` rows that ``gpunexus audit`` checks."""
        return await self.db.read(reports.receipt_extract, user.id)

    async def host_view(self, user: User) -> dict:
        self._require(user, "host")
        return await self.db.read(reports.host_view, user.id)

    async def payouts(self, user: User) -> dict:
        self._require(user, "host")
        return await self.db.read(reports.payout_summary, user.id)

    async def models(self) -> list[catalogue.Model]:
        return await self.db.read(catalogue.list_models)

    async def licence_acceptances(self, user: User) -> dict[str, float]:
        """model -> when ``user``'s account accepted its current licence."""
        return await self.db.read(catalogue.acceptances, user.id)

    async def accept_licence(self, user: User, model: str) -> catalogue.Model:
        """Record that ``user``'s account accepts ``model``'s licence: its keys may use it from their next allowance."""
        try:
            return await self.db.write(catalogue.accept_licence, user.id, model, self.clock())
        except catalogue.CatalogueError as exc:
            raise HubError(404, "not_found", str(exc), "model") from None

    # --- admin --------------------------------------------------------------
    @staticmethod
    def _require(user: User, role: str) -> None:
        """403 unless ``user`` has ``role`` (an admin has every role)."""
        if user.role not in (role, "admin"):
            raise HubError(403, "permission_denied", f"This needs a {role} account.")

    async def ledger_totals(self, admin: User) -> dict:
        self._require(admin, "admin")
        return await self.db.read(reports.ledger_totals)

    async def fees_daily(self, admin: User, start: float, end: float) -> list[reports.DayModel]:
        """The platform fee earned per (day, model) in [start, end)."""
        self._require(admin, "admin")
        return await self.db.read(reports.fees_daily, start, end)

    async def market_history(self, admin: User, start: float, end: float, bucket_s: float) -> list[reports.MarketPoint]:
        """Published market prices, demand and supply per model over time (averaged per ``bucket_s``)."""
        self._require(admin, "admin")
        return await self.db.read(reports.market_history, start, end, bucket_s)

    async def users(self, admin: User, query: str = "") -> list[dict]:
        self._require(admin, "admin")
        return await self.db.read(reports.user_rows, query)

    async def set_suspended(self, admin: User, user_id: int, suspended: bool) -> None:
        """Suspend or restore a user (see :func:`accounts.set_suspended`); an admin cannot suspend itself."""
        self._require(admin, "admin")
        if user_id == admin.id and suspended:
            raise HubError(400, "invalid_request_error", "You cannot suspend your own account.", "user_id")
        if not await self.db.write(accounts.set_suspended, user_id, suspended, self.clock()):
            raise HubError(404, "not_found", "No such user.", "user_id")

    async def grant(self, admin: User, user_id: int, micro: int, key: str) -> bool:
        """Manual credits (no Stripe): once per ``key``; False if that key was used already."""
        self._require(admin, "admin")
        if self.billing is not None:
            raise HubError(409, "stripe_configured", "Credits come from Stripe top-ups on this hub, not grants.")
        if micro <= 0:
            raise HubError(400, "invalid_request_error", "Grant a positive amount.", "usd")
        try:
            return await self.db.write(_grant, user_id, micro, key)
        except keys.UserError as exc:
            raise HubError(404, "not_found", str(exc), "user_id") from None

    async def admin_hosts(self, admin: User) -> list[dict]:
        self._require(admin, "admin")
        return await self.db.read(reports.admin_hosts)

    async def save_model(self, admin: User, entry: catalogue.Model) -> None:
        self._require(admin, "admin")
        await self.db.write(catalogue.upsert, entry)

    async def set_model_available(self, admin: User, model: str, available: bool) -> None:
        self._require(admin, "admin")
        if not await self.db.write(catalogue.set_available, model, available, self.clock()):
            raise HubError(404, "not_found", "No such model in the catalogue.", "model")

    async def uncatalogued_models(self, admin: User) -> list[str]:
        self._require(admin, "admin")
        return await self.db.read(catalogue.uncatalogued, self.clock())

    # --- operator ---------------------------------------------------------
    def grant_sync(self, email: str, micro: int, key: str) -> bool:
        """Manual credits: move ``micro`` from ``platform:grants`` to the user (once per key)."""
        return self.db.write_sync(lambda conn: _grant(conn, keys.get_user(conn, email).id, micro, key))

    async def run(self, *, period_s: float = 30.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duties: return unspent holds of long-expired allowances; billing; market epochs."""
        async with trio.open_nursery() as nursery:
            if self.billing:
                await nursery.start(self.billing.run)
            await nursery.start(self.market.run)
            await nursery.start(self._watch_revocations)
            task_status.started()
            while True:
                await self.release_expired()
                await self.decide_overdue()
                await trio.sleep(period_s)


def _grant(conn: Connection, user_id: int, micro: int, key: str) -> bool:
    """Move ``micro`` from ``platform:grants`` to the user, once per ``key``."""
    account = conn.execute(sa.select(users.c.account_id).where(users.c.id == user_id)).scalar()
    if account is None:
        raise keys.UserError(f"no user {user_id}")
    src = ledger.system_account(conn, ledger.GRANTS)
    return ledger.post(conn, Journal(f"grant:{key}", "grant", ((src, -micro), (account, micro))))


def _bind_host(conn: Connection, peer_id: str, user_id: int, now: float) -> int:
    conn.execute(ledger.insert_ignore(conn, hosts).values(peer_id=peer_id, user_id=user_id, registered_at=now))
    return conn.execute(sa.select(hosts.c.user_id).where(hosts.c.peer_id == peer_id)).scalar_one()


def _host_owner(conn: Connection, peer_id: str) -> int | None:
    return conn.execute(sa.select(hosts.c.user_id).where(hosts.c.peer_id == peer_id)).scalar()


def _balance(conn: Connection, user: User) -> dict:
    held = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(allowance_table.c.remaining), 0))
        .where(allowance_table.c.user_id == user.id, allowance_table.c.live)
    ).scalar_one()
    return {"account": user.account, "available_micro": ledger.balance(conn, user.account_id), "held_micro": int(held)}


def _summary(conn: Connection, user: User, column) -> dict:
    amount = receipt_log.c.cost if column is receipt_log.c.client_user_id else receipt_log.c.cost - receipt_log.c.fee
    rows = conn.execute(
        sa.select(receipt_log.c.model, sa.func.count(), sa.func.sum(receipt_log.c.tokens), sa.func.sum(amount))
        .where(column == user.id)
        .group_by(receipt_log.c.model)
        .order_by(receipt_log.c.model)
    ).all()
    models = [{"model": m, "requests": n, "tokens": int(t), "amount_micro": int(a)} for m, n, t, a in rows]
    out = {
        "account": user.account,
        "requests": sum(m["requests"] for m in models),
        "tokens": sum(m["tokens"] for m in models),
        "amount_micro": sum(m["amount_micro"] for m in models),
        "by_model": models,
    }
    if column is receipt_log.c.host_user_id:
        out["balance_micro"] = ledger.balance(conn, user.account_id)
    return out


def _touched_users(conn: Connection, seqs: list[int]) -> tuple[set[int], set[int]]:
    rows = conn.execute(
        sa.select(receipt_log.c.client_user_id, receipt_log.c.host_user_id).where(receipt_log.c.seq.in_(seqs))
    ).all()
    return {r[0] for r in rows}, {r[1] for r in rows}

