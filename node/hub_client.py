"""The node's side of the hub: a gateway's allowance and receipt queue, a host's link.

:class:`HubSettlement` is the gateway's :class:`~gpunexus.node.gateway.settlement.Settlement`
when it runs with ``--hub URL --api-key KEY``:

* ``authorize`` answers from local state only: the current hub-signed
  allowance and what is left of it. 401 once the hub has called the key bad or
  revoked, or the key's expiry (which the hub sends with the allowance) has
  passed (or the caller's bearer is not the key), 402 ``insufficient_quota``
  when the hub has no more credit to give, 402 ``key_limit_reached`` naming
  the key's daily or monthly spend limit when that capped the allowance, 503 ``hub_unreachable`` when the
  allowance ran out of time while the hub could not be reached.
* ``authorize`` also refuses (403) a model the allowance names in
  ``refused_models``: switched off by the operator (``model_unavailable``)
  or under a licence the account has not accepted (``licence_not_accepted``,
  the message names the licence and where to accept it); a licence refusal
  asks for a fresh allowance at once, so a retry after accepting is served.
* ``reserve`` holds each order's worst-case cost before the order is sent,
  ``release`` gives it back when the order ends (its receipt is recorded
  right after): the orders in flight plus the receipts not yet delivered
  never promise more than the allowance holds, so a host is never sent an
  order the allowance cannot pay.
* Revocations arrive through a long poll (``GET /v1/revocations``): the key
  is refused from the moment the hub's signed revocation arrives, while the
  receipts already served under its allowance are still delivered (the hub
  takes them from a revoked key: the allowance, not the key, pays).
* The same long poll answers when the account's catalogue terms moved (a
  model switched off, a licence accepted; the stamp came with the allowance):
  the allowance is renewed at once, so a switch-off binds within about a
  second while the hub is reachable.
* ``record`` appends the countersigned receipt to a SQLite queue on disk
  (``synchronous=FULL``) before it returns, so a killed gateway loses nothing.
* :meth:`HubSettlement.run` renews the allowance in the background (at half
  its lifetime or half its budget, whichever comes first) and delivers the
  queue in batches, with a short, capped back-off while the hub is
  unreachable that ends the moment the hub answers any call. A receipt
  leaves the queue only once the hub answered for it (settled, duplicate, or
  refused for good); the hub settles each request id once, so redelivering
  after a crash or a lost response never bills twice.
* ``retain`` keeps, next to the queue and for ``audit_retention_s`` (1 h by
  default), what an audit of each countersigned receipt needs: the order's
  request and the output received (an :class:`~gpunexus.protocol.messages.Opening`).
  The background work answers the hub's opening requests
  (``GET /v1/audits/pending`` -> ``POST /v1/audits/openings``) and fetches
  the hub-signed host reputations (``GET /v1/reputation``); ``excluded_host``
  is the matcher's hook, so excluded hosts get no traffic.

:class:`HostHubLink` is a host's: it learns the hub's peer id, proves its own
peer id to bind it to the host account (so receipts naming it pay that
account), checks each order's allowance offline, reads earnings for
``gpunexus node status``, and, as a peer verifier (``node/host/verifier.py``),
fetches its audit jobs and posts its signed results.

Nothing here imports the hub: the two meet on HTTP, speaking
``gpunexus.protocol`` messages (base64 in JSON).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.discovery import DiscoveryPlan
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import (
    Allowance,
    AuditJob,
    HostReputation,
    Offer,
    Opening,
    Order,
    PriceUpdate,
    Receipt,
    ReceiptRoot,
    Revocation,
    VerifierResult,
    Withdraw,
    host_registration_statement,
)
from gpunexus.protocol.signing import Signer

from .gateway.settlement import Grant, SettlementRefused
from .quietlog import QuietLog

log = logging.getLogger(__name__)

CLOCK_SKEW_S = 60.0
NO_RETENTION_MIN_P_HONEST = 0.5
"""Reputation bar of a gateway that keeps no audit openings (see ``HubSettlement.excluded_host``)."""
_MAX_BACKOFF_S = 30.0
_MAX_DELIVERY_BACKOFF_S = 5.0
"""Receipts are money owed to hosts: never wait long to retry them."""
REVOCATION_WAIT_S = 20.0
"""How long one revocation long poll waits at the hub before it is renewed."""


class HubUnavailable(Exception):
    """The hub could not be reached, or answered with a transient error."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HubRefused(Exception):
    """The hub answered with a definitive error (its OpenAI-shaped body is kept)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def _call(http: httpx.AsyncClient, method: str, path: str, timeout_s: float, **kw: Any) -> Any:
    """One hub request under a deadline: its JSON, HubRefused (4xx) or HubUnavailable."""
    try:
        with trio.fail_after(timeout_s):
            resp = await http.request(method, path, **kw)
    except (trio.TooSlowError, httpx.TransportError) as exc:
        raise HubUnavailable(f"{method} {path}: {type(exc).__name__} {exc}") from None
    if resp.status_code == 429 or resp.status_code >= 500:
        retry = resp.headers.get("retry-after")
        raise HubUnavailable(f"{method} {path}: HTTP {resp.status_code}", float(retry) if retry and retry.isdigit() else None)
    try:
        data = resp.json()
    except ValueError:
        raise HubUnavailable(f"{method} {path}: HTTP {resp.status_code} with a non-JSON body") from None
    if resp.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise HubRefused(resp.status_code, str(err.get("code") or resp.status_code), str(err.get("message") or "refused"))
    return data


class ReceiptQueue:
    """Countersigned receipts not yet acknowledged by the hub, in a SQLite file.

    A queued receipt is durable when :meth:`append` returns (WAL,
    ``synchronous=FULL``). Request ids are unique, so recording the same
    receipt twice queues it once.
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY, request_id TEXT UNIQUE NOT NULL, "
            "cost_micro INTEGER NOT NULL, receipt BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused (request_id TEXT PRIMARY KEY, reason TEXT NOT NULL, "
            "receipt BLOB NOT NULL, at REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS openings (request_id TEXT PRIMARY KEY, at REAL NOT NULL, opening BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS openings_by_age ON openings (at)")

    # --- audit openings (kept for ``retention_s``, see HubSettlement) ------
    def keep_opening(self, opening: Opening, at: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO openings (request_id, at, opening) VALUES (?, ?, ?)",
                         (opening.request_id, at, opening.encode()))

    def opening(self, request_id: str) -> bytes | None:
        row = self._db.execute("SELECT opening FROM openings WHERE request_id = ?", (request_id,)).fetchone()
        return row[0] if row else None

    def prune_openings(self, before: float) -> int:
        return self._db.execute("DELETE FROM openings WHERE at < ?", (before,)).rowcount

    def append(self, receipt: Receipt, opening: Opening | None = None, at: float = 0.0) -> None:
        """Queue the receipt, and keep its audit opening in the same transaction (one sync)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR IGNORE INTO pending (request_id, cost_micro, receipt) VALUES (?, ?, ?)",
                (receipt.request_id, receipt.cost_micro, receipt.encode()),
            )
            if opening is not None:
                self.keep_opening(opening, at)

    def peek(self, limit: int) -> list[tuple[str, bytes]]:
        """The oldest ``limit`` receipts: (request id, encoded receipt)."""
        return self._db.execute("SELECT request_id, receipt FROM pending ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def acknowledge(self, done: list[str], refused: list[tuple[str, str]]) -> None:
        """Drop receipts the hub answered for; keep refused ones aside for inspection."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO refused (request_id, reason, receipt, at) "
                "SELECT request_id, ?, receipt, ? FROM pending WHERE request_id = ?",
                [(reason, time.time(), rid) for rid, reason in refused],
            )
            self._db.executemany("DELETE FROM pending WHERE request_id = ?", [(rid,) for rid in done] + [(rid,) for rid, _ in refused])

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM pending").fetchone()[0]

    def pending_cost(self) -> int:
        return self._db.execute("SELECT coalesce(sum(cost_micro), 0) FROM pending").fetchone()[0]

    def refused(self) -> list[tuple[str, str]]:
        return self._db.execute("SELECT request_id, reason FROM refused ORDER BY at").fetchall()

    def close(self) -> None:
        self._db.close()


@dataclass(slots=True)
class _Budget:
    allowance: Allowance
    encoded: bytes
    remaining: int
    """The budget less the cost of receipts recorded but not yet acknowledged by the hub."""
    limited_by_balance: bool
    """The hub gave less than asked: this allowance holds all the account's credit."""
    refusals: dict[str, tuple[str, str]]
    """model -> (error code, message) of the 403 for it, for each model the allowance refuses."""
    limit: str | None = None
    """The key's spend limit that capped this budget, in the hub's words (the 402 says it)."""
    key_expires_at: float | None = None


_NO_CREDIT = ("insufficient_quota", "You exceeded your current quota, please add credits.")


def _text_or_none(value: Any) -> str | None:
    return value[:500] if isinstance(value, str) and value else None


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _refusal_messages(refused: tuple[str, ...], reasons: Any, hub_url: str) -> dict[str, tuple[str, str]]:
    """The 403 (code, message) of each model the signed allowance refuses.

    The signed ``refused_models`` decide what is refused; the answer's
    unsigned ``refused_models`` list only says why (licence name and URL).
    A model the reasons do not cover is refused all the same.
    """
    why = {r.get("model"): r for r in reasons if isinstance(r, dict)} if isinstance(reasons, list) else {}
    out = {}
    for model in refused:
        r = why.get(model, {})
        if r.get("reason") == "unavailable":
            out[model] = ("model_unavailable", f"The model '{model}' is unavailable: the hub's operator has switched it off.")
            continue
        name, url = str(r.get("licence_name") or ""), str(r.get("licence_url") or "")
        licence = f"{name} ({url})" if name and url else name or url
        out[model] = ("licence_not_accepted",
                      f"The model '{model}' is published under the licence {licence}: accept it at {hub_url}/models, "
                      "then retry." if licence else
                      f"The model '{model}' is not open to this API key's account; see {hub_url}/models.")
    return out


class HubSettlement:
    """A gateway's settlement through a hub (see the module docstring).

    Start it with ``await nursery.start(settlement.run)`` before serving: it
    makes one attempt to fetch an allowance, reports started either way (the
    gateway must come up even while the hub is down) and keeps renewing and
    delivering until cancelled. ``queue_path`` should live under
    ``$GPUNEXUS_HOME`` (e.g. ``node/gateway/receipts.db``).
    """

    def __init__(self, hub_url: str, api_key: str, gateway_id: str, queue_path: str | Path, *,
                 budget_micro: int | None = None, batch_size: int = 100, flush_interval_s: float = 2.0,
                 timeout_s: float = 10.0, require_bearer: bool = True,
                 audit_retention_s: float | None = 3600.0, audit_poll_s: float = 5.0,
                 reputation_poll_s: float = 15.0,
                 transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.time) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.api_key = api_key
        self.gateway_id = gateway_id
        self.queue = ReceiptQueue(queue_path)
        self.audit_retention_s = audit_retention_s
        """How long the request and output of each countersigned receipt are kept
        for the hub's audits; None: keep nothing (``--no-audit-retention``, see
        :meth:`excluded_host` for what that costs)."""
        self.audit_poll_s = audit_poll_s
        self.reputation_poll_s = reputation_poll_s
        self._openings: dict[str, Opening] = {}
        self.reputations: dict[str, HostReputation] = {}
        """The hub's latest signed reputation per host peer id (verified)."""
        self.budget_micro = budget_micro
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.timeout_s = timeout_s
        self.require_bearer = require_bearer
        self.clock = clock
        self._http = httpx.AsyncClient(base_url=self.hub_url, headers={"authorization": f"Bearer {api_key}"},
                                       transport=transport, timeout=timeout_s)
        self._budget: _Budget | None = None
        self._reserved = 0
        """Worst-case cost of the orders in flight (see :meth:`reserve`)."""
        self._want_micro: int | None = None
        """A larger budget to ask at the next renewal, when requests in flight need it."""
        self._no_credit_reason = _NO_CREDIT
        """(code, message) of the hub's last 402: no credit, or the key's spend limit reached."""
        self._refused_seen: set[str] = set()
        """Models refused under the current allowance that already asked for a renewal."""
        self._terms: str | None = None
        """The account's catalogue terms stamp the allowance came with (see the revocation poll)."""
        self._revocation_cursor = 0.0
        self._key_refused: str | None = None
        self._quiet = QuietLog(log)
        """Failures of the background loops, each logged once per window (a hub down for an hour is one line)."""
        self._no_credit = False
        self._hub_reached = False
        self.key_id = api_key.split("_")[1] if api_key.count("_") >= 2 else ""
        self._renew_now = trio.Event()
        self._deliver_now = trio.Event()
        self._hub_back = trio.Event()
        self._deliver_lock = trio.Lock()
        self._audit_lock = trio.Lock()

    # --- request path (no I/O but the local queue) ------------------------
    def authorize(self, bearer: str | None, model: str) -> Grant:
        if self._key_refused is not None:
            raise SettlementRefused(401, "invalid_api_key", self._key_refused)
        if self.require_bearer and not hmac.compare_digest((bearer or "").encode(), self.api_key.encode()):
            raise SettlementRefused(401, "invalid_api_key", "Incorrect API key provided.")
        b = self._budget
        if b is not None and b.key_expires_at is not None and self.clock() >= b.key_expires_at:
            raise SettlementRefused(401, "invalid_api_key", "Incorrect API key provided.")  # expired: as if revoked
        if b is None or self.clock() >= b.allowance.expires_at:
            self._renew_now.set()
            if self._no_credit or (b is None and self._hub_reached):
                raise SettlementRefused(402, *self._no_credit_reason)
            raise SettlementRefused(503, "hub_unreachable", "The settlement hub cannot be reached right now; retry shortly.")
        refusal = b.refusals.get(model)
        if refusal is not None:
            if model not in self._refused_seen:
                # A licence accepted just now binds from the next allowance: ask for it at once,
                # so a retry after accepting is served. Once per model and allowance, not per request.
                self._refused_seen.add(model)
                self._renew_now.set()
            raise SettlementRefused(403, *refusal)
        if self.available_micro() <= 0 and b.limited_by_balance:
            self._renew_now.set()
            raise SettlementRefused(402, *self._out_of_budget(b))
        return Grant(allowance=b.encoded)

    @staticmethod
    def _out_of_budget(b: _Budget) -> tuple[str, str]:
        """The 402 of an allowance that holds all there is: the key's limit, or the account's credit."""
        return ("key_limit_reached", b.limit) if b.limit else _NO_CREDIT

    @property
    def refused_key(self) -> str | None:
        """The hub's reason when it refused this key (401: unknown, revoked, expired); None while it is accepted."""
        return self._key_refused

    def allowance_balances(self) -> dict[str, int]:
        """``{key id: available_micro()}`` for the gateway's ``/metrics``."""
        return {self.key_id: self.available_micro()}

    def available_micro(self) -> int:
        """What the allowance can still promise: budget less queued receipts and requests in flight."""
        b = self._budget
        return 0 if b is None else b.remaining - self._reserved

    def reserve(self, grant: Grant, micro: int) -> None:
        """Hold one order's worst-case cost, or refuse it before any host works.

        402 when the allowance already holds all the credit the account has;
        503 (retry) when requests in flight hold the allowance but the account
        has more: a larger allowance is asked for at once.
        """
        if micro <= self.available_micro():
            self._reserved += micro
            return
        self._renew_now.set()
        b = self._budget
        if b is None or b.limited_by_balance or self._no_credit:
            code, message = self._no_credit_reason if self._no_credit or b is None else self._out_of_budget(b)
            raise SettlementRefused(402, code, f"{message} (This request may cost up to {micro} micro-USD.)")
        self._want_micro = max(self._want_micro or 0, 2 * (self._reserved + micro + self.queue.pending_cost()))
        raise SettlementRefused(503, "allowance_renewing", "Requests in flight hold this gateway's allowance; a larger one is on its way, retry shortly.")

    def release(self, grant: Grant, micro: int) -> None:
        self._reserved -= micro

    def record(self, receipt: Receipt, grant: Grant | None = None) -> None:
        opening = self._openings.pop(receipt.request_id, None)
        self.queue.append(receipt, opening, self.clock())
        b = self._budget
        if b is not None:
            b.remaining -= receipt.cost_micro
            if b.remaining * 2 < b.allowance.budget_micro:
                self._renew_now.set()
        if len(self.queue) >= self.batch_size:
            self._deliver_now.set()

    def retain(self, opening: Opening, grant: Grant | None = None) -> None:
        """Keep what an audit of this receipt needs (unless the client opted out).

        Called just before :meth:`record` of the same request: the opening is
        written with the receipt, in one transaction.
        """
        if self.audit_retention_s is not None:
            self._openings[opening.request_id] = opening
            if len(self._openings) > 1000:  # retain without record: never expected; stay bounded
                self._openings.pop(next(iter(self._openings)))

    def excluded_host(self, peer_id: str) -> bool:
        """The matcher's reputation hook.

        Hosts the hub marked excluded never get traffic. A gateway that keeps no
        openings (``audit_retention_s=None``) cannot have its receipts audited,
        so it is stricter: it only uses hosts whose reputation is at least
        ``NO_RETENTION_MIN_P_HONEST`` (a host is admitted until the hub has
        reason to suspect it; a single failed audit not yet outweighed by passes
        keeps it out).
        """
        rep = self.reputations.get(peer_id)
        if rep is None:
            return False
        if rep.excluded:
            return True
        return self.audit_retention_s is None and rep.p_honest < NO_RETENTION_MIN_P_HONEST

    def status(self) -> dict:
        b = self._budget
        return {
            "hub": self.hub_url, "pending_receipts": len(self.queue), "key_refused": self._key_refused is not None,
            "allowance_remaining_micro": b.remaining if b else 0, "reserved_micro": self._reserved,
            "allowance_expires_at": b.allowance.expires_at if b else None,
        }

    # --- background -------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            try:
                await self.renew()
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                log.warning("no allowance from %s yet: %s", self.hub_url, exc)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_loop)
                nursery.start_soon(self._deliver_loop)
                nursery.start_soon(self._audit_loop)
                nursery.start_soon(self._reputation_loop)
                nursery.start_soon(self._revocation_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and the queue (``run`` does this when it ends)."""
        await self._http.aclose()
        self.queue.close()

    async def renew(self) -> Allowance:
        """Ask the hub for a fresh allowance now (also called by the background loop)."""
        body: dict[str, Any] = {"gateway_id": self.gateway_id}
        want = max(self.budget_micro or 0, self._want_micro or 0)
        if want:
            body["budget_micro"] = want
        # Under the delivery lock: the budget left is the new allowance less the
        # receipts still queued, which a concurrent delivery must not change between
        # the hub's answer and the count.
        async with self._deliver_lock:
            return await self._renew(body)

    async def _renew(self, body: dict[str, Any]) -> Allowance:
        try:
            data = await _call(self._http, "POST", "/v1/allowances", self.timeout_s, json=body)
        except HubRefused as exc:
            self._hub_reached = True
            if exc.status == 401:
                self._key_refused = exc.message
            elif exc.status == 402:
                self._no_credit = True
                self._no_credit_reason = (exc.code, exc.message)
            raise
        self._hub_reached = True
        try:
            encoded = base64.b64decode(data["allowance"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise ProtocolError("the hub's allowance answer has no base64 allowance") from None
        allowance = decode_as(Allowance, encoded)
        allowance.verify()
        if allowance.gateway_id != self.gateway_id:
            raise ProtocolError("the hub issued an allowance for another gateway")
        self._budget = _Budget(allowance, encoded, allowance.budget_micro - self.queue.pending_cost(),
                               data.get("limited_by_balance") is True,
                               _refusal_messages(allowance.refused_models, data.get("refused_models"), self.hub_url),
                               _text_or_none(data.get("limit")), _number_or_none(data.get("key_expires_at")))
        self._refused_seen = set()
        self._terms = data.get("terms")[:200] if isinstance(data.get("terms"), str) else None
        self._want_micro = None
        self._key_refused = None
        self._no_credit = False
        self._hub_answered()
        return allowance

    def _renew_due_in(self) -> float:
        b = self._budget
        if b is None:
            return 0.0
        a = b.allowance
        return max(0.0, a.issued_at + (a.expires_at - a.issued_at) / 2 - self.clock())

    async def _renew_loop(self) -> None:
        backoff = 1.0
        while True:
            with trio.move_on_after(self._renew_due_in() if self._budget else backoff):
                await self._renew_now.wait()
            self._renew_now = trio.Event()
            try:
                await self.renew()
                backoff = 1.0
                self._quiet.resolved("renewal", "allowance renewed again")
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                self._quiet.warning("renewal", "allowance renewal failed: %s", exc)
                # Back-off: never hammer a hub that is down or says no, but retry as
                # soon as it answers anything else (it is back).
                with trio.move_on_after(backoff):
                    await self._hub_back.wait()
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _hub_answered(self) -> None:
        """Any hub answer ends a delivery back-off at once: queued receipts go now."""
        self._hub_back.set()
        self._hub_back = trio.Event()
        if len(self.queue):
            self._deliver_now.set()

    async def _deliver_loop(self) -> None:
        """Deliver every ``flush_interval_s``, at once when a batch fills, and right after an outage.

        A failed delivery waits (doubling, capped at ``_MAX_DELIVERY_BACKOFF_S``)
        but no longer than until the hub answers any other call (a renewal,
        the revocation poll): the queue drains as soon as the hub is back.
        """
        backoff = 0.5
        while True:
            with trio.move_on_after(self.flush_interval_s):
                await self._deliver_now.wait()
            self._deliver_now = trio.Event()
            try:
                await self.flush()
                backoff = 0.5
                self._quiet.resolved("delivery", "receipts delivered again (%d queued)", len(self.queue))
                continue
            except HubUnavailable as exc:
                self._quiet.warning("delivery", "receipt delivery failed (%d queued): %s", len(self.queue), exc)
                delay = max(backoff, exc.retry_after or 0.0)
            except HubRefused as exc:
                log.warning("hub refused a receipt batch: %s", exc)
                delay = backoff
            backoff = min(backoff * 2, _MAX_DELIVERY_BACKOFF_S)
            with trio.move_on_after(delay):
                await self._hub_back.wait()
            self._deliver_now.set()

    async def _revocation_loop(self) -> None:
        """Hold a long poll on ``GET /v1/revocations``: a revoked key stops serving within a second.

        Stops once this gateway's key is refused (nothing left to hear).
        """
        backoff = 0.5
        while self._key_refused is None:
            try:
                params: dict[str, Any] = {"after": self._revocation_cursor, "wait_s": REVOCATION_WAIT_S}
                if self._terms is not None:
                    params["terms"] = self._terms
                data = await _call(self._http, "GET", "/v1/revocations", REVOCATION_WAIT_S + self.timeout_s,
                                   params=params, timeout=REVOCATION_WAIT_S + self.timeout_s)
                self._hub_answered()
                self._take_revocations(data)
                backoff = 0.5
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                if isinstance(exc, HubRefused) and exc.status == 401:
                    self._key_refused = exc.message
                    return
                log.debug("revocation poll: %s", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _take_revocations(self, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("revocations"), list):
            raise ProtocolError("the hub's revocations answer is not a list")
        hub_id = self._budget.allowance.hub_id if self._budget else data.get("hub_id")
        for blob in data["revocations"]:
            try:
                revocation = decode_as(Revocation, base64.b64decode(blob, validate=True))
                revocation.verify()
            except (ProtocolError, binascii.Error, TypeError, ValueError) as exc:
                log.warning("hub sent an unreadable revocation: %s", exc)
                continue
            if revocation.hub_id == hub_id and revocation.key_id == self.key_id:
                log.warning("API key %s was revoked at the hub: refusing its requests from now on", self.key_id)
                self._key_refused = "Incorrect API key provided."
        terms = data.get("terms")
        if isinstance(terms, str) and self._terms is not None and terms != self._terms:
            # The catalogue or this account's acceptances moved since the allowance: its
            # refused models may be stale. Renew now (and poll with the new stamp, not spin).
            self._terms = terms
            self._renew_now.set()
        cursor = data.get("cursor")
        if isinstance(cursor, (int, float)) and math.isfinite(cursor):
            self._revocation_cursor = max(self._revocation_cursor, float(cursor))

    async def _audit_loop(self) -> None:
        while True:
            await trio.sleep(self.audit_poll_s)
            try:
                await self.answer_audits()
                self._quiet.resolved("audits", "audit openings answered again")
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                self._quiet.warning("audits", "audit openings: %s", exc)

    async def _reputation_loop(self) -> None:
        while True:
            try:
                await self.refresh_reputation()
                self._quiet.resolved("reputation", "host reputations fetched again")
            except (HubUnavailable, HubRefused, ProtocolError, KeyError) as exc:
                self._quiet.warning("reputation", "host reputations: %s", exc)
            await trio.sleep(self.reputation_poll_s)

    async def answer_audits(self) -> int:
        """Prune expired openings, then answer every opening the hub asks for; how many were sent.

        A receipt whose opening is gone (expired, or never kept) is answered
        with ``opening: null`` and a reason, so the hub stops asking.
        """
        async with self._audit_lock:  # the background poll and an explicit call never answer twice
            return await self._answer_audits()

    async def _answer_audits(self) -> int:
        if self.audit_retention_s is not None:
            self.queue.prune_openings(self.clock() - self.audit_retention_s)
        data = await _call(self._http, "GET", "/v1/audits/pending", self.timeout_s)
        if not isinstance(data, dict):
            raise ProtocolError("the hub's pending audits are not a JSON object")
        sent = 0
        for rid in data.get("request_ids", []):
            if not isinstance(rid, str):
                continue
            blob = self.queue.opening(rid)
            body: dict[str, Any] = {"request_id": rid}
            if blob is None:
                body.update(opening=None, reason="not retained" if self.audit_retention_s is None else "expired")
            else:
                body["opening"] = base64.b64encode(blob).decode()
            try:
                await _call(self._http, "POST", "/v1/audits/openings", self.timeout_s, json=body)
            except HubRefused as exc:  # one bad opening must not hold up the others
                log.warning("hub refused the opening of %s: %s", rid, exc)
                continue
            sent += blob is not None
        return sent

    async def refresh_reputation(self) -> int:
        """Fetch the hub's signed host reputations (``GET /v1/reputation``); how many are kept."""
        data = await _call(self._http, "GET", "/v1/reputation", self.timeout_s)
        if not isinstance(data, dict) or not isinstance(data.get("hub_id"), str):
            raise ProtocolError("the hub's reputation answer has no hub_id")
        hub_id = data["hub_id"]
        fresh: dict[str, HostReputation] = {}
        for blob in data.get("reputations", []):
            try:
                rep = decode_as(HostReputation, base64.b64decode(blob, validate=True))
                rep.verify()
            except (ProtocolError, binascii.Error) as exc:
                log.warning("hub sent an unreadable reputation: %s", exc)
                continue
            if rep.hub_id == hub_id:
                fresh[rep.peer_id] = rep
        self.reputations = fresh
        return len(fresh)

    async def flush(self) -> int:
        """Deliver the whole queue now, batch by batch; the number acknowledged.

        Raises HubUnavailable / HubRefused if a batch cannot be delivered; what
        was acknowledged before stays acknowledged, the rest stays queued.
        """
        done_total = 0
        async with self._deliver_lock:
            while batch := self.queue.peek(self.batch_size):
                data = await _call(self._http, "POST", "/v1/receipts", self.timeout_s,
                                   json={"receipts": [base64.b64encode(r).decode() for _, r in batch]})
                results = data["results"]
                if len(results) != len(batch):
                    raise HubUnavailable("the hub answered for a different number of receipts")
                done, refused = [], []
                for (rid, _), res in zip(batch, results, strict=True):
                    if res["status"] in ("settled", "duplicate"):
                        done.append(rid)
                    else:
                        log.warning("hub refused receipt %s: %s", rid, res.get("reason"))
                        refused.append((rid, str(res.get("reason", ""))))
                self.queue.acknowledge(done, refused)
                done_total += len(batch)
        return done_total


class HostHubLink:
    """A host's connection to the hub: identity, registration, order checks, earnings."""

    def __init__(self, hub_url: str, api_key: str, signer: Signer, *, timeout_s: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.time) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.signer = signer
        self.timeout_s = timeout_s
        self.clock = clock
        self.hub_id: str | None = None
        self.audit_period_s = 3600.0
        """The hub's audit period (``GET /v1/hub``); receipts are grouped by ``floor(issued_at / audit_period_s)``."""
        self.leaves: dict[int, list[bytes]] = {}
        """Per period not yet published: ``merkle.receipt_leaf`` of each receipt signed, in issue order."""
        self.roots: dict[int, ReceiptRoot] = {}
        """Roots published (or refused by the hub) for the last periods, by period."""
        self._quiet = QuietLog(log)
        self._http = httpx.AsyncClient(base_url=self.hub_url, headers={"authorization": f"Bearer {api_key}"},
                                       transport=transport, timeout=timeout_s)

    async def connect(self) -> str:
        """Learn the hub's peer id and register this host's peer id; returns the hub id.

        Raises HubRefused (bad key, peer id taken by another account) or
        HubUnavailable; a host should not take paid orders before this worked.
        """
        info = await _call(self._http, "GET", "/v1/hub", self.timeout_s)
        hub_id = info["hub_id"]
        period = info.get("audit_period_s")
        if isinstance(period, (int, float)) and period > 0:
            self.audit_period_s = float(period)
        proof = self.signer.sign(host_registration_statement(hub_id, self.signer.peer_id))
        await _call(self._http, "POST", "/v1/hosts/register", self.timeout_s,
                    json={"peer_id": self.signer.peer_id, "proof": base64.b64encode(proof).decode()})
        self.hub_id = hub_id
        return hub_id

    async def check_order(self, order: Order) -> None:
        """An :data:`~gpunexus.node.host.service.OrderCheck`: the order's allowance, verified offline.

        Raises ProtocolError unless the allowance is signed by this hub, issued
        to the ordering gateway, unexpired, non-empty and does not refuse the
        order's model: a host serves only work the hub has promised to pay for.
        """
        if self.hub_id is None:
            raise ProtocolError("host is not connected to its hub yet")
        if not order.allowance:
            raise ProtocolError("order carries no allowance")
        allowance = decode_as(Allowance, order.allowance)
        if allowance.hub_id != self.hub_id:
            raise ProtocolError("allowance is not from this host's hub")
        allowance.verify()
        if allowance.gateway_id != order.gateway_id:
            raise ProtocolError("allowance was issued to another gateway")
        if allowance.expires_at + CLOCK_SKEW_S < self.clock():
            raise ProtocolError("allowance expired")
        if allowance.budget_micro <= 0:
            raise ProtocolError("allowance has no budget")
        if order.model in allowance.refused_models:
            raise ProtocolError(f"the hub refuses model {order.model!r} to this allowance's account")

    async def earnings(self) -> dict:
        """The host account's earnings summary (``GET /v1/earnings``)."""
        return await _call(self._http, "GET", "/v1/earnings", self.timeout_s)

    async def post_offer(self, offer: Offer) -> None:
        """Tell the hub what this host offers: market supply, and the prices its receipts may carry."""
        await _call(self._http, "POST", "/v1/offers", self.timeout_s, json={"offer": base64.b64encode(offer.encode()).decode()})

    async def post_withdraw(self, withdraw: Withdraw) -> None:
        """Tell the hub this host stopped: gateways catching up from it must not be sent here any more."""
        await _call(self._http, "POST", "/v1/offers/withdraw", self.timeout_s,
                    json={"withdraw": base64.b64encode(withdraw.encode()).decode()})

    # --- receipt roots (hub/honesty.py selects audits with them) ----------
    def record_receipt(self, receipt: Receipt) -> None:
        """Note a receipt this host signed (host signature only) for its period's Merkle root."""
        from gpunexus.verify.merkle import receipt_leaf

        period = math.floor(receipt.issued_at / self.audit_period_s)
        signed = dataclasses.replace(receipt, gateway_sig=b"")
        self.leaves.setdefault(period, []).append(receipt_leaf(receipt.request_id, signed.encode()))

    def root_for(self, period: int) -> ReceiptRoot:
        from gpunexus.verify.merkle import merkle_root

        leaves = self.leaves.get(period, [])
        return ReceiptRoot(self.signer.peer_id, period, len(leaves), merkle_root(leaves), self.clock()).signed(self.signer)

    async def publish_roots(self, now: float | None = None) -> list[ReceiptRoot]:
        """Post the signed root of every period that ended by ``now`` (default: the clock); the ones posted.

        A period the hub refuses (too late, say) is dropped; one it cannot be
        reached for stays for the next try.
        """
        now = self.clock() if now is None else now
        done = []
        for period in sorted(p for p in self.leaves if (p + 1) * self.audit_period_s <= now):
            root = self.root_for(period)
            try:
                await _call(self._http, "POST", "/v1/audits/roots", self.timeout_s,
                            json={"root": base64.b64encode(root.encode()).decode()})
            except HubRefused as exc:
                log.warning("hub refused the receipt root of period %d: %s", period, exc)
            except HubUnavailable as exc:
                self._quiet.info("root", "receipt root of period %d not published yet: %s", period, exc)
                continue
            else:
                done.append(root)
            self.roots[period] = root
            del self.leaves[period]
        for old in sorted(self.roots)[:-8]:
            del self.roots[old]
        return done

    async def run_roots(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Each period: make sure the hub committed to its secret, then publish the root once the period ends."""
        task_status.started()
        while True:
            try:  # the first use of a period creates its secret: before this host's root, as it must be
                await _call(self._http, "GET", "/v1/audits/commitment", self.timeout_s)
            except (HubRefused, HubUnavailable) as exc:
                self._quiet.info("commitment", "audit commitment not fetched: %s", exc)
            await self.publish_roots()
            now = self.clock()
            next_end = (math.floor(now / self.audit_period_s) + 1) * self.audit_period_s
            await trio.sleep(max(0.5, min(next_end - now + 0.5, 60.0)))

    # --- peer verification (hub/peer_audit.py draws the verifiers) -------
    async def fetch_jobs(self, model_hashes: list[str]) -> list[AuditJob]:
        """This host's verifier jobs (``GET /v1/audits/jobs``); polling also tells the hub it verifies these models.

        Only jobs signed by this host's hub, addressed to this peer and unexpired are kept.
        """
        params = [("peer_id", self.signer.peer_id), *(("model_hash", h) for h in model_hashes)]
        data = await _call(self._http, "GET", "/v1/audits/jobs", self.timeout_s, params=params)
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            raise ProtocolError("the hub's jobs answer is not a JSON object with a jobs list")
        jobs = []
        for blob in data["jobs"]:
            try:
                job = decode_as(AuditJob, base64.b64decode(blob, validate=True))
                job.verify()
            except (ProtocolError, binascii.Error, TypeError) as exc:
                log.warning("hub sent an unreadable audit job: %s", exc)
                continue
            if job.hub_id == self.hub_id and job.verifier_id == self.signer.peer_id \
                    and job.expires_at + CLOCK_SKEW_S >= self.clock():
                jobs.append(job)
        return jobs

    async def post_result(self, result: VerifierResult) -> dict:
        """Deliver a signed verifier result (``POST /v1/audits/results``); the hub's answer."""
        return await _call(self._http, "POST", "/v1/audits/results", self.timeout_s,
                           json={"result": base64.b64encode(result.encode()).decode()})

    async def aclose(self) -> None:
        await self._http.aclose()



async def fetch_prices(http: httpx.AsyncClient, timeout_s: float = 10.0) -> tuple[str, list[PriceUpdate]]:
    """The hub's id and its latest signed price per model (``GET /v1/prices``), decoded, unverified."""
    data = await _call(http, "GET", "/v1/prices", timeout_s)
    updates = []
    for blob in data.get("prices", []):
        try:
            updates.append(decode_as(PriceUpdate, base64.b64decode(blob, validate=True)))
        except (ProtocolError, binascii.Error) as exc:
            log.warning("hub sent an unreadable price update: %s", exc)
    return data["hub_id"], updates


async def fetch_market(hub_url: str, timeout_s: float = 10.0) -> dict:
    """The hub's market table (``GET /v1/market``)."""
    async with httpx.AsyncClient(base_url=hub_url.rstrip("/")) as http:
        return await _call(http, "GET", "/v1/market", timeout_s)


async def fetch_directory(http: httpx.AsyncClient, timeout_s: float = 10.0) -> dict[str, tuple[int, DiscoveryPlan]]:
    """Every model the hub sees live offers for: its host count and discovery plan (``GET /v1/directory``).

    An entry that does not parse or whose plan is out of range is left out
    (its peers keep the one-shard plan), so one bad row cannot split a model.
    """
    data = await _call(http, "GET", "/v1/directory", timeout_s)
    out: dict[str, tuple[int, DiscoveryPlan]] = {}
    for row in data.get("models", []) if isinstance(data, dict) else []:
        try:
            plan = DiscoveryPlan(int(row["shards"]), float(row["refresh_s"]))
            plan.check()
            out[str(row["model"])] = (int(row["hosts"]), plan)
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            log.warning("hub sent an unreadable directory entry: %s", exc)
    return out


async def fetch_shard_offers(http: httpx.AsyncClient, model: str, shard: int, shards: int, timeout_s: float = 5.0) -> list[Offer]:
    """The live offers of one shard of ``model`` the hub holds (``GET /v1/offers``), decoded, unverified."""
    data = await _call(http, "GET", "/v1/offers", timeout_s, params={"model": model, "shard": shard, "shards": shards})
    found = []
    for blob in data.get("offers", []) if isinstance(data, dict) else []:
        try:
            found.append(decode_as(Offer, base64.b64decode(blob, validate=True)))
        except (ProtocolError, binascii.Error, TypeError) as exc:
            log.warning("hub sent an unreadable offer: %s", exc)
    return found
