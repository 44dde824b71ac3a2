"""Money in and out through Stripe: Checkout top-ups, auto-recharge, Connect payouts.

Money in. ``POST /v1/checkout`` opens a Checkout Session (the card is saved
for later off-session use). Credit is posted only from the *verified*
webhook: the signature is checked on the raw body with the library's
``stripe.Webhook.construct_event``, each event id is recorded once
(``stripe_events``) in the same transaction as its postings, and the credit's
journal key is the Checkout Session id, so ``checkout.session.completed`` and
a later ``checkout.session.async_payment_succeeded`` for one session can never
credit twice. A session completed with its payment still pending credits
nothing until the async success event. The dashboard's success page credits
through the same journal key (:meth:`StripeBilling.confirm_checkout`, which
reads the session back from Stripe), so the person sees the credit at once,
and however often the page is reloaded and whichever of page and webhook
comes first, the session credits once.

Auto-recharge. A client who set a threshold and an amount is charged
off-session with the saved card when a settled batch leaves their balance
under the threshold. One drop under the threshold is one charge: the
PaymentIntent's idempotency key names the user, how many recharges were
credited so far, the card and the amount, so another pass before the credit
lands (a second settled batch while the charge is still ``processing``,
another hub process) gets Stripe's first answer back, not a second charge;
the credit's journal key is the PaymentIntent id, shared with the
``payment_intent.succeeded`` webhook. A card that needs the customer present
(``authentication_required``) is not retried: the error is kept and shown in
``GET /v1/billing`` and on the billing page until a new Checkout saves a
usable card.

Connect onboarding. A host never pastes an account id: "Set up payouts"
(:meth:`StripeBilling.connect_onboarding`) creates one Express connected
account per host (``POST /v1/accounts``, idempotency key named after the
hub and the user, stored only where none is stored yet), then an Account
Link (``POST /v1/account_links``, ``account_onboarding``) whose
``refresh_url`` and ``return_url`` are the hub's public URL; the browser is
sent there. On return (and on every ``account.updated`` webhook) the hub
reads the account back (``GET /v1/accounts/{id}``) rather than trusting the
event's copy, since Stripe does not promise events in order, and stores
whether payouts are enabled. An account id set through
``PUT /v1/payout-settings`` still works; its payout state is unknown until
Stripe is asked.

Money out. When a host's balance reaches its payout threshold and it has a
Connect account (not one Stripe said cannot be paid out yet), the amount
(whole cents) is first moved to the Stripe clearing account in the ledger
(so it cannot be paid twice or spent), then a
Transfer is created with the payout id as idempotency key; if Stripe refuses,
the ledger move is reversed.

Webhook answers follow Stripe's retry rules (it retries every non-2xx answer
for days): see :meth:`StripeBilling.webhook`.

Stripe's API is called with the sync client in worker threads (the library's
async layer is asyncio-bound; trio runs it no better than aiosqlite), with a
20-second timeout.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from typing import Any

import sqlalchemy as sa
import stripe
import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from sqlalchemy.engine import Connection

from . import ledger
from .body import MAX_INT, Body, Int, Nullable, decode_object
from .db import journal, payouts, postings, stripe_events, users
from .keys import User
from .ledger import Journal
from .openapi import operation
from .service import Hub, HubError

log = logging.getLogger(__name__)

MICRO_PER_CENT = 10_000
MIN_TOPUP_MICRO = 500_000  # Stripe's card minimum is 0.50 USD
MAX_CHARGE_MICRO = 99_999_999 * MICRO_PER_CENT  # Stripe's maximum charge: 999,999.99 USD
CREDIT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")

_CHARGE = Int(MIN_TOPUP_MICRO, MAX_CHARGE_MICRO, MICRO_PER_CENT, description="micro-USD, whole cents, 0.50 USD at least")
CHECKOUT = Body({"amount_micro": _CHARGE}, required=("amount_micro",))
AUTO_RECHARGE = Body({
    "threshold_micro": Nullable(Int(description="recharge when the balance falls under this (micro-USD)")),
    "amount_micro": Nullable(_CHARGE),
}, together=("threshold_micro", "amount_micro"), description="both set, or both null/absent (auto-recharge off)")


class Ignored(Exception):
    """A correctly signed webhook event the hub cannot use (malformed, unknown user): acknowledged, not applied."""


class StripeBilling:
    """The Stripe layer of one hub; ``attach`` plugs it in as ``hub.billing``."""

    def __init__(self, hub: Hub, client: stripe.StripeClient, webhook_secret: str, *, public_url: str,
                 currency: str = "usd") -> None:
        self.hub = hub
        self.client = client
        self.webhook_secret = webhook_secret
        self.public_url = public_url.rstrip("/")
        self.currency = currency
        self._clients: set[int] = set()
        self._hosts: set[int] = set()
        self._wake = trio.Event()

    @classmethod
    def attach(cls, hub: Hub, api_key: str, webhook_secret: str, *, public_url: str,
               http_client: stripe.HTTPClient | None = None) -> StripeBilling:
        client = stripe.StripeClient(api_key, http_client=http_client or stripe.HTTPXClient(timeout=20, allow_sync_methods=True),
                                     max_network_retries=2)
        billing = cls(hub, client, webhook_secret, public_url=public_url)
        hub.billing = billing
        return billing

    async def _stripe(self, fn, *args, **kw) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw))

    # --- money in -----------------------------------------------------------
    async def checkout(self, user: User, amount_micro: int) -> dict:
        if amount_micro < MIN_TOPUP_MICRO or amount_micro % MICRO_PER_CENT:
            raise HubError(400, "invalid_request_error", "amount_micro must be whole cents, at least 0.50 USD", "amount_micro")
        customer = await self._customer(user)
        session = await self._stripe(self.client.v1.checkout.sessions.create, params={
            "mode": "payment",
            "customer": customer,
            "client_reference_id": str(user.id),
            "line_items": [{"quantity": 1, "price_data": {
                "currency": self.currency, "unit_amount": amount_micro // MICRO_PER_CENT,
                "product_data": {"name": "gpunexus credits"}}}],
            "payment_intent_data": {"setup_future_usage": "off_session", "metadata": {"user_id": str(user.id)}},
            "metadata": {"user_id": str(user.id)},
            "success_url": f"{self.public_url}/billing/done?session={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{self.public_url}/billing/cancelled",
        })
        return {"id": session.id, "url": session.url}

    async def confirm_checkout(self, user: User, session_id: str) -> dict:
        """Read a Checkout Session back from Stripe and credit it if paid (once: its journal key is the session's).

        Only the amount Stripe reports counts, and only for a session made
        for ``user`` (404 for anyone else's or an unknown id).
        """
        unknown = HubError(404, "not_found", "No such payment on your account.", "session")
        if not session_id.startswith("cs_") or len(session_id) > 150:
            raise unknown
        try:
            session = await self._stripe(self.client.v1.checkout.sessions.retrieve, session_id)
        except stripe.InvalidRequestError:
            raise unknown from None
        except stripe.StripeError as exc:
            raise HubError(503, "stripe_unavailable", f"Could not reach Stripe to confirm the payment: {exc}") from None
        data = session.to_dict()
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or metadata.get("user_id") != str(user.id):
            raise unknown
        paid = data.get("payment_status") == "paid"
        cents = data.get("amount_total")
        if not paid or type(cents) is not int or cents <= 0:
            return {"paid": False, "amount_micro": 0, "credited": False}
        micro = cents * MICRO_PER_CENT
        credited = await self.hub.db.write(_credit, f"stripe:checkout:{session_id}", user.id, micro, time.time())
        return {"paid": True, "amount_micro": micro, "credited": credited}

    async def _customer(self, user: User) -> str:
        existing = await self.hub.db.read(lambda c: c.execute(
            sa.select(users.c.stripe_customer_id).where(users.c.id == user.id)).scalar_one())
        if existing:
            return existing
        customer = await self._stripe(self.client.v1.customers.create,
                                      params={"email": user.email, "metadata": {"user_id": str(user.id)}},
                                      options={"idempotency_key": f"customer-{self.hub.hub_id}-{user.id}"})
        await self.hub.db.write(lambda c: c.execute(
            sa.update(users).where(users.c.id == user.id, users.c.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer.id)))
        return customer.id

    async def webhook(self, payload: bytes, signature: str | None) -> dict:
        """Verify and apply one webhook event, exactly once.

        The answer tells Stripe whether to retry (it retries every non-2xx):

        * 400 ``invalid_signature``: the signature does not verify (or the
          body is not even UTF-8); nothing from Stripe looks like that.
        * 200 ``{"applied": true}``: applied now; ``{"applied": false}``: this
          event id was applied before.
        * 200 ``{"applied": false, "ignored": reason}``: correctly signed but
          unusable (not an event, no or non-numeric ``metadata.user_id``, a user
          that does not exist, an amount that is not a positive integer, a
          Connect account no host has or Stripe does not know). A retry
          would carry the same bytes, so it is acknowledged, logged at
          WARNING and changes nothing, not even the record of event ids.
        * 503 ``stripe_unavailable``: a transient failure (Stripe's API failed
          while the card or the Connect account was being looked up);
          nothing was recorded, so Stripe's retry applies it later. Database errors answer 500 and
          are retried the same way.
        """
        try:
            stripe.WebhookSignature.verify_header(payload, signature, self.webhook_secret, stripe.Webhook.DEFAULT_TOLERANCE)
        except stripe.SignatureVerificationError as exc:
            raise HubError(400, "invalid_signature", f"webhook rejected: {exc.user_message or exc}") from None
        except (UnicodeError, TypeError):  # a body that is not UTF-8, a header that is not ASCII
            raise HubError(400, "invalid_signature", "webhook rejected: not a signed Stripe event") from None
        try:
            event_id, kind, credit, card, account = _read_event(payload)
            save_card = await self._card_to_save(*card) if card else None
            connect = await self._connect_update(account) if account else None
            applied = await self.hub.db.write(_apply_event, event_id, kind, credit, save_card, connect, time.time())
        except Ignored as exc:
            log.warning("Stripe webhook event ignored: %s", exc)
            return {"applied": False, "ignored": str(exc)}
        return {"applied": applied}

    async def _card_to_save(self, user_id: int, customer: str, payment_intent: str) -> tuple[int, str, str] | None:
        """(user, customer, payment method) of a paid Checkout's card, for auto-recharge."""
        try:
            pi = await self._stripe(self.client.v1.payment_intents.retrieve, payment_intent)
        except stripe.StripeError as exc:
            raise HubError(503, "stripe_unavailable", f"could not read the payment from Stripe: {exc}") from None
        return (user_id, customer, pi.payment_method) if isinstance(pi.payment_method, str) else None

    # --- auto-recharge --------------------------------------------------------
    async def set_auto_recharge(self, user: User, threshold_micro: int | None, amount_micro: int | None) -> dict:
        if (threshold_micro is None) != (amount_micro is None):
            raise HubError(400, "invalid_request_error", "set both threshold_micro and amount_micro, or neither")
        if amount_micro is not None and (amount_micro < MIN_TOPUP_MICRO or amount_micro % MICRO_PER_CENT):
            raise HubError(400, "invalid_request_error", "amount_micro must be whole cents, at least 0.50 USD", "amount_micro")
        await self.hub.db.write(lambda c: c.execute(sa.update(users).where(users.c.id == user.id).values(
            recharge_threshold_micro=threshold_micro, recharge_amount_micro=amount_micro, recharge_error=None)))
        return await self.status(user)

    async def status(self, user: User) -> dict:
        row = await self.hub.db.read(lambda c: c.execute(sa.select(users).where(users.c.id == user.id)).one())
        return {"auto_recharge": {"threshold_micro": row.recharge_threshold_micro, "amount_micro": row.recharge_amount_micro,
                                  "card_saved": row.payment_method_id is not None, "error": row.recharge_error}}

    async def recharge(self, user_id: int) -> str | None:
        """Charge the saved card if the balance is under the threshold; the PaymentIntent status."""
        row, balance, credited = await self.hub.db.read(_recharge_state, user_id)
        if (row.recharge_threshold_micro is None or row.payment_method_id is None or row.recharge_error
                or balance >= row.recharge_threshold_micro):
            return None
        params = {
            "amount": row.recharge_amount_micro // MICRO_PER_CENT, "currency": self.currency,
            "customer": row.stripe_customer_id, "payment_method": row.payment_method_id,
            "off_session": True, "confirm": True,
            "metadata": {"user_id": str(user_id), "kind": "auto_recharge"},
        }
        try:
            key = f"recharge-{self.hub.hub_id}-{user_id}-{credited}-{row.payment_method_id}-{params['amount']}"
            pi = await self._stripe(self.client.v1.payment_intents.create, params=params,
                                    options={"idempotency_key": key[:255]})
        except stripe.CardError as exc:
            reason = exc.code or "card_error"
            log.warning("auto-recharge of user %s failed: %s", user_id, reason)
            await self.hub.db.write(lambda c: c.execute(
                sa.update(users).where(users.c.id == user_id).values(recharge_error=reason[:200])))
            return reason
        if pi.status == "succeeded":
            await self.hub.db.write(_apply_event, f"recharge:{pi.id}", "auto_recharge",
                                    (f"stripe:pi:{pi.id}", user_id, int(pi.amount_received) * MICRO_PER_CENT), None, None,
                                    time.time())
        return pi.status

    # --- Connect onboarding -----------------------------------------------------
    async def connect_onboarding(self, user: User) -> str:
        """The URL of a fresh Account Link that onboards ``user``'s Express account (created the first time)."""
        if user.role not in ("host", "admin"):
            raise HubError(403, "permission_denied", "payouts are for host accounts")
        account = await self._connect_account(user)
        try:
            link = await self._stripe(self.client.v1.account_links.create, params={
                "account": account, "type": "account_onboarding",
                "refresh_url": f"{self.public_url}/earnings/connect/refresh",
                "return_url": f"{self.public_url}/earnings/connect/return"})
        except stripe.InvalidRequestError as exc:
            raise HubError(409, "connect_account_unknown",
                           f"Stripe cannot onboard the Connect account {account}: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise HubError(503, "stripe_unavailable", f"Could not reach Stripe to start onboarding: {exc}") from None
        return link.url

    async def _connect_account(self, user: User) -> str:
        existing = await self.hub.db.read(_connect_account_of, user.id)
        if existing:
            return existing
        try:
            account = await self._stripe(self.client.v1.accounts.create, params={
                "type": "express", "email": user.email, "capabilities": {"transfers": {"requested": True}},
                "metadata": {"user_id": str(user.id)}}, options={"idempotency_key": f"connect-{self.hub.hub_id}-{user.id}"})
        except stripe.StripeError as exc:
            raise HubError(503, "stripe_unavailable", f"Could not reach Stripe to create the payout account: {exc}") from None

        def store(conn: Connection) -> str:
            conn.execute(sa.update(users).where(users.c.id == user.id, users.c.connect_account_id.is_(None))
                         .values(connect_account_id=account.id, connect_payouts_enabled=account.payouts_enabled is True))
            return _connect_account_of(conn, user.id)

        return await self.hub.db.write(store)

    async def connect_status(self, user: User) -> dict:
        """Read ``user``'s Connect account back from Stripe and store whether it can be paid out."""
        account = await self.hub.db.read(_connect_account_of, user.id)
        if account is None:
            return {"connect_account_id": None, "payouts_enabled": None, "details_submitted": False}
        found = await self._account(account)
        await self.hub.db.write(_set_payouts_enabled, account, found.payouts_enabled is True)
        return {"connect_account_id": account, "payouts_enabled": found.payouts_enabled is True,
                "details_submitted": found.details_submitted is True}

    async def _connect_update(self, account_id: str) -> tuple[str, bool]:
        """(account, payouts enabled) of an ``account.updated`` event's account, read back from Stripe."""
        known = await self.hub.db.read(lambda c: c.execute(
            sa.select(users.c.id).where(users.c.connect_account_id == account_id)).first())
        if known is None:
            raise Ignored(f"account.updated: no host has the Connect account {account_id!r:.60}")
        try:
            found = await self._account(account_id)
        except HubError as exc:
            if exc.code != "connect_account_unknown":
                raise  # transient: Stripe retries the event
            raise Ignored(f"account.updated: {exc.message}") from None
        return account_id, found.payouts_enabled is True

    async def _account(self, account_id: str):
        try:
            return await self._stripe(self.client.v1.accounts.retrieve, account_id)
        except stripe.InvalidRequestError as exc:
            raise HubError(409, "connect_account_unknown", f"Stripe does not know the Connect account {account_id}: "
                           f"{exc.user_message or exc}. Set the right one with PUT /v1/payout-settings.") from None
        except stripe.StripeError as exc:
            raise HubError(503, "stripe_unavailable", f"Could not read the payout account from Stripe: {exc}") from None

    # --- money out ------------------------------------------------------------
    async def payout(self, user_id: int) -> str | None:
        """Transfer a host's balance to its Connect account once over the threshold."""
        row, balance = await self.hub.db.read(_user_and_balance, user_id)
        amount = balance - balance % MICRO_PER_CENT
        if row.connect_account_id is None or row.connect_payouts_enabled is False \
                or row.payout_threshold_micro is None or amount <= 0 or balance < row.payout_threshold_micro:
            return None
        payout_id = secrets.token_hex(16)
        try:
            await self.hub.db.write(_reserve_payout, payout_id, row.id, row.account_id, amount, time.time())
        except ledger.InsufficientFunds:
            return None  # spent or paid out by a concurrent task
        try:
            transfer = await self._stripe(self.client.v1.transfers.create, params={
                "amount": amount // MICRO_PER_CENT, "currency": self.currency, "destination": row.connect_account_id,
                "metadata": {"payout_id": payout_id, "user_id": str(user_id)}}, options={"idempotency_key": f"payout-{payout_id}"})
        except stripe.StripeError as exc:
            log.warning("payout %s to user %s failed: %s", payout_id, user_id, exc)
            await self.hub.db.write(_reverse_payout, payout_id, row.account_id, amount, time.time())
            return "failed"
        await self.hub.db.write(lambda c: c.execute(
            sa.update(payouts).where(payouts.c.payout_id == payout_id).values(status="paid", transfer_id=transfer.id)))
        return "paid"

    # --- the hub's hooks --------------------------------------------------------
    def after_settlement(self, clients: set[int], hosts: set[int]) -> None:
        self._clients |= clients
        self._hosts |= hosts
        self._wake.set()

    async def process_pending(self) -> None:
        """Recharge and pay out for every user noted since the last pass (each once)."""
        clients, self._clients = self._clients, set()
        hosts, self._hosts = self._hosts, set()
        for fn, ids in ((self.recharge, clients), (self.payout, hosts)):
            for uid in sorted(ids):
                try:
                    await fn(uid)
                except stripe.StripeError as exc:
                    log.warning("billing for user %s: %s", uid, exc)
                except Exception:  # an answer of a shape we did not expect: this user waits, billing goes on
                    log.exception("billing for user %s failed on an unexpected answer", uid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One pass after each settled batch, one at a time, off the request path."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.process_pending()

    # --- HTTP -------------------------------------------------------------------
    def routes(self, app: QuartTrio, current_user, read) -> None:
        @app.post("/v1/checkout")
        async def checkout() -> Response:
            user = await current_user()
            return jsonify(await self.checkout(user, (await read(CHECKOUT))["amount_micro"]))

        @app.get("/v1/billing")
        async def billing_status() -> Response:
            return jsonify(await self.status(await current_user()))

        @app.put("/v1/billing/auto-recharge")
        async def auto_recharge() -> Response:
            user = await current_user()
            data = await read(AUTO_RECHARGE)
            return jsonify(await self.set_auto_recharge(user, data["threshold_micro"], data["amount_micro"]))

        @app.post("/v1/connect/onboarding")
        async def connect_onboarding() -> Response:
            return jsonify({"url": await self.connect_onboarding(await current_user())})

        @app.get("/v1/connect/account")
        async def connect_account() -> Response:
            user = await current_user()
            if user.role not in ("host", "admin"):
                raise HubError(403, "permission_denied", "payouts are for host accounts")
            return jsonify(await self.connect_status(user))

        @app.post("/v1/stripe/webhook")
        async def webhook() -> Response:
            return jsonify(await self.webhook(await request.get_data(), request.headers.get("stripe-signature")))

    def openapi_paths(self) -> dict[str, Any]:
        status = {"type": "object", "required": ["auto_recharge"], "properties": {"auto_recharge": {
            "type": "object", "required": ["threshold_micro", "amount_micro", "card_saved", "error"],
            "properties": {"threshold_micro": {"type": ["integer", "null"]}, "amount_micro": {"type": ["integer", "null"]},
                           "card_saved": {"type": "boolean"}, "error": {"type": ["string", "null"]}}}}}
        signature = {"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"}}
        return {
            "/v1/checkout": {"post": operation(
                "Open a Stripe Checkout Session to buy credits (card saved for auto-recharge)",
                {"type": "object", "required": ["id", "url"], "properties": {"id": {"type": "string"}, "url": {"type": "string"}}},
                body=CHECKOUT.schema())},
            "/v1/billing": {"get": operation("Auto-recharge settings and state", status)},
            "/v1/billing/auto-recharge": {"put": operation(
                "Recharge amount_micro when the balance falls under threshold_micro", status, body=AUTO_RECHARGE.schema())},
            "/v1/connect/onboarding": {"post": operation(
                "Stripe Connect onboarding: the URL of a fresh Account Link for this host's Express account (created once)",
                {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}, errors=(403, 409, 503))},
            "/v1/connect/account": {"get": operation(
                "This host's Connect account as Stripe reports it now (payouts_enabled is stored for payouts)",
                {"type": "object", "required": ["connect_account_id", "payouts_enabled", "details_submitted"],
                 "properties": {"connect_account_id": {"type": ["string", "null"]},
                                "payouts_enabled": {"type": ["boolean", "null"]}, "details_submitted": {"type": "boolean"}}},
                errors=(403, 409, 503))},
            "/v1/stripe/webhook": {"post": operation(
                "Stripe webhook (Stripe-Signature checked on the raw body). 200 also for a correctly signed event the hub "
                "ignores (ignored says why), so Stripe does not retry it; 503 for a transient failure, which it does.",
                {"type": "object", "required": ["applied"],
                 "properties": {"applied": {"type": "boolean"}, "ignored": {"type": "string"}}},
                body={"type": "object", "description": "a Stripe event, exactly as Stripe signed it"},
                auth=False, errors=(400, 503), parameters=[signature])},
        }


def _read_event(payload: bytes) -> tuple[str, str, tuple[str, int, int] | None, tuple[int, str, str] | None, str | None]:
    """(event id, type, credit, card to look up, Connect account to look up) of a verified event, or :class:`Ignored`.

    ``credit`` is (journal key, user id, micro-USD); ``card`` is (user id,
    customer, PaymentIntent id) of a paid Checkout whose card is saved;
    the account is the id of an ``account.updated`` event's account.
    """
    try:
        event = decode_object(payload)
    except HubError as exc:
        raise Ignored(exc.message) from None
    event_id, kind, data = event.get("id"), event.get("type"), event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not (_short_str(event_id, stripe_events.c.event_id) and _short_str(kind, stripe_events.c.type)
            and isinstance(obj, dict)):
        raise Ignored("not a Stripe event (id, type or data.object missing or malformed)")
    label = f"{kind} {event_id}"
    if kind in CREDIT_EVENTS and obj.get("payment_status") == "paid":
        user_id = _user_id(obj, label)
        credit = (f"stripe:checkout:{_object_id(obj, label)}", user_id, _cents(obj, "amount_total", label) * MICRO_PER_CENT)
        pi, customer = obj.get("payment_intent"), obj.get("customer")
        card = (user_id, customer, pi) if isinstance(pi, str) and pi and isinstance(customer, str) and customer else None
        return event_id, kind, credit, card, None
    if kind == "account.updated":
        account = _object_id(obj, label)
        if not account.startswith("acct_"):
            raise Ignored(f"{label}: not a Connect account id ({account!r:.40})")
        return event_id, kind, None, None, account
    metadata = obj.get("metadata")
    if kind == "payment_intent.succeeded" and isinstance(metadata, dict) and metadata.get("kind") == "auto_recharge":
        credit = (f"stripe:pi:{_object_id(obj, label)}", _user_id(obj, label),
                  _cents(obj, "amount_received", label) * MICRO_PER_CENT)
        return event_id, kind, credit, None, None
    return event_id, kind, None, None, None


def _short_str(value: Any, column) -> bool:
    return isinstance(value, str) and 0 < len(value) <= column.type.length


def _object_id(obj: dict, label: str) -> str:
    oid = obj.get("id")
    if not isinstance(oid, str) or not 0 < len(oid) <= 150:  # the journal key holds 200 characters
        raise Ignored(f"{label}: the object has no usable id")
    return oid


def _user_id(obj: dict, label: str) -> int:
    metadata = obj.get("metadata")
    raw = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise Ignored(f"{label}: metadata.user_id is missing or not a user id ({raw!r:.40})")
    return int(raw)


def _cents(obj: dict, name: str, label: str) -> int:
    value = obj.get(name)
    if type(value) is not int or not 0 < value <= MAX_INT // MICRO_PER_CENT:
        raise Ignored(f"{label}: {name} is not a positive number of cents ({value!r:.40})")
    return value


def _apply_event(conn: Connection, event_id: str, kind: str, credit: tuple[str, int, int] | None,
                 save_card: tuple[int, str, str] | None, connect: tuple[str, bool] | None, now: float) -> bool:
    """Record a Stripe event once, with its credit, saved card and Connect account state, in one transaction
    (:class:`Ignored`: none of it)."""
    fresh = conn.execute(ledger.insert_ignore(conn, stripe_events)
                         .values(event_id=event_id, type=kind, received_at=now).returning(stripe_events.c.event_id)).first()
    if fresh is None:
        return False
    if credit:
        key, user_id, micro = credit
        if _credit(conn, key, user_id, micro, now) is None:
            raise Ignored(f"{kind} {event_id}: no user {user_id}")  # rolls the event record back too
    if save_card:
        user_id, customer, method = save_card
        conn.execute(sa.update(users).where(users.c.id == user_id)
                     .values(stripe_customer_id=customer, payment_method_id=method, recharge_error=None))
    if connect:
        _set_payouts_enabled(conn, *connect)
    return True


def _connect_account_of(conn: Connection, user_id: int) -> str | None:
    return conn.execute(sa.select(users.c.connect_account_id).where(users.c.id == user_id)).scalar_one()


def _set_payouts_enabled(conn: Connection, account_id: str, enabled: bool) -> None:
    conn.execute(sa.update(users).where(users.c.connect_account_id == account_id).values(connect_payouts_enabled=enabled))


def _credit(conn: Connection, key: str, user_id: int, micro: int, now: float) -> bool | None:
    """Credit a top-up from the Stripe clearing account once per ``key``: posted now, posted before (False), no such user (None)."""
    account = conn.execute(sa.select(users.c.account_id).where(users.c.id == user_id)).scalar()
    if account is None:
        return None
    return ledger.post(conn, Journal(key, "topup", ((ledger.system_account(conn, ledger.CLEARING), -micro), (account, micro))), now=now)


def _user_and_balance(conn: Connection, user_id: int):
    row = conn.execute(sa.select(users).where(users.c.id == user_id)).one()
    return row, ledger.balance(conn, row.account_id)


def _recharge_state(conn: Connection, user_id: int):
    """(user row, balance, auto-recharges credited so far): what names the next recharge's charge."""
    row, balance = _user_and_balance(conn, user_id)
    credited = conn.execute(
        sa.select(sa.func.count()).select_from(postings.join(journal, journal.c.key == postings.c.journal_key))
        .where(postings.c.account_id == row.account_id, journal.c.key.like("stripe:pi:%"))).scalar_one()
    return row, balance, credited


def _reserve_payout(conn: Connection, payout_id: str, user_id: int, account_id: int, amount: int, now: float) -> None:
    conn.execute(payouts.insert().values(payout_id=payout_id, user_id=user_id, amount=amount, status="pending", created_at=now))
    clearing = ledger.system_account(conn, ledger.CLEARING)
    ledger.post(conn, Journal(f"payout:{payout_id}", "payout", ((account_id, -amount), (clearing, amount))), now=now)


def _reverse_payout(conn: Connection, payout_id: str, account_id: int, amount: int, now: float) -> None:
    clearing = ledger.system_account(conn, ledger.CLEARING)
    ledger.post(conn, Journal(f"payout-reversal:{payout_id}", "payout_reversal", ((clearing, -amount), (account_id, amount))), now=now)
    conn.execute(sa.update(payouts).where(payouts.c.payout_id == payout_id).values(status="failed"))
