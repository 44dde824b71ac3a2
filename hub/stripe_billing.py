"""Money in and out through Stripe: Checkout top-ups, auto-recharge, Connect payouts.

Money in. ``POST /v1/checkout`` opens a Checkout Session (the card is saved
for later off-session use). Credit is posted only from the *verified*
webhook: the signature is checked on the raw body with the library's
``stripe.Webhook.construct_event``, each event id is recorded once
(``stripe_events``) in the same transaction as its postings, and the credit's
journal key is the Checkout Session id, so ``checkout.session.completed`` and
a later ``checkout.session.async_payment_succeeded`` for one session can never
credit twice. A session completed with its payment still pending credits
nothing until the async success event.

Auto-recharge. A client who set a threshold and an amount is charged
off-session with the saved card when a settled batch leaves their balance
under the threshold. A card that needs the customer present
(``authentication_required``) is not retried: the error is kept and shown in
``GET /v1/billing`` until a new Checkout saves a usable card.

Money out. When a host's balance reaches its payout threshold and it has a
Connect account, the amount (whole cents) is first moved to the Stripe
clearing account in the ledger (so it cannot be paid twice or spent), then a
Transfer is created with the payout id as idempotency key; if Stripe refuses,
the ledger move is reversed.

Stripe's API is called with the sync client in worker threads (the library's
async layer is asyncio-bound; trio runs it no better than aiosqlite), with a
20-second timeout.
"""

from __future__ import annotations

import functools
import json
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
from .body import Body, Int, Nullable
from .db import payouts, stripe_events, users
from .keys import User, user_by_id
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
        """Verify and apply one webhook event, exactly once; {"applied": bool}."""
        try:
            stripe.WebhookSignature.verify_header(payload, signature, self.webhook_secret, stripe.Webhook.DEFAULT_TOLERANCE)
            event = json.loads(payload)  # the bytes the signature covers, so plain dicts are safe to read
            obj = event["data"]["object"]
        except stripe.SignatureVerificationError as exc:
            raise HubError(400, "invalid_signature", f"webhook rejected: {exc.user_message or exc}") from None
        except (ValueError, KeyError, TypeError):
            raise HubError(400, "invalid_request_error", "webhook body is not a Stripe event") from None
        credit: tuple[str, int, int] | None = None  # (journal key, user id, micro)
        save_card: tuple[int, str, str] | None = None
        if event["type"] in CREDIT_EVENTS and obj.get("payment_status") == "paid":
            user_id = int(obj["metadata"]["user_id"])
            credit = (f"stripe:checkout:{obj['id']}", user_id, int(obj["amount_total"]) * MICRO_PER_CENT)
            if obj.get("payment_intent") and obj.get("customer"):
                pi = await self._stripe(self.client.v1.payment_intents.retrieve, obj["payment_intent"])
                if pi.payment_method:
                    save_card = (user_id, obj["customer"], pi.payment_method)
        elif event["type"] == "payment_intent.succeeded" and obj.get("metadata", {}).get("kind") == "auto_recharge":
            credit = (f"stripe:pi:{obj['id']}", int(obj["metadata"]["user_id"]), int(obj["amount_received"]) * MICRO_PER_CENT)
        applied = await self.hub.db.write(_apply_event, event["id"], event["type"], credit, save_card, time.time())
        return {"applied": applied}

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
        row, balance = await self.hub.db.read(_user_and_balance, user_id)
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
            pi = await self._stripe(self.client.v1.payment_intents.create, params=params,
                                    options={"idempotency_key": f"recharge-{secrets.token_hex(12)}"})
        except stripe.CardError as exc:
            reason = exc.code or "card_error"
            log.warning("auto-recharge of user %s failed: %s", user_id, reason)
            await self.hub.db.write(lambda c: c.execute(
                sa.update(users).where(users.c.id == user_id).values(recharge_error=reason[:200])))
            return reason
        if pi.status == "succeeded":
            await self.hub.db.write(_apply_event, f"recharge:{pi.id}", "auto_recharge",
                                    (f"stripe:pi:{pi.id}", user_id, int(pi.amount_received) * MICRO_PER_CENT), None, time.time())
        return pi.status

    # --- money out ------------------------------------------------------------
    async def payout(self, user_id: int) -> str | None:
        """Transfer a host's balance to its Connect account once over the threshold."""
        row, balance = await self.hub.db.read(_user_and_balance, user_id)
        amount = balance - balance % MICRO_PER_CENT
        if row.connect_account_id is None or row.payout_threshold_micro is None or amount <= 0 \
                or balance < row.payout_threshold_micro:
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
            "/v1/stripe/webhook": {"post": operation(
                "Stripe webhook (Stripe-Signature checked on the raw body)",
                {"type": "object", "required": ["applied"], "properties": {"applied": {"type": "boolean"}}},
                body={"type": "object", "description": "a Stripe event, exactly as Stripe signed it"},
                auth=False, parameters=[signature])},
        }


def _apply_event(conn: Connection, event_id: str, kind: str, credit: tuple[str, int, int] | None,
                 save_card: tuple[int, str, str] | None, now: float) -> bool:
    """Record a Stripe event once, with its credit and saved card, in one transaction."""
    fresh = conn.execute(ledger.insert_ignore(conn, stripe_events)
                         .values(event_id=event_id, type=kind, received_at=now).returning(stripe_events.c.event_id)).first()
    if fresh is None:
        return False
    if credit:
        key, user_id, micro = credit
        account = user_by_id(conn, user_id).account_id
        ledger.post(conn, Journal(key, "topup", ((ledger.system_account(conn, ledger.CLEARING), -micro), (account, micro))), now=now)
    if save_card:
        user_id, customer, method = save_card
        conn.execute(sa.update(users).where(users.c.id == user_id)
                     .values(stripe_customer_id=customer, payment_method_id=method, recharge_error=None))
    return True


def _user_and_balance(conn: Connection, user_id: int):
    row = conn.execute(sa.select(users).where(users.c.id == user_id)).one()
    return row, ledger.balance(conn, row.account_id)


def _reserve_payout(conn: Connection, payout_id: str, user_id: int, account_id: int, amount: int, now: float) -> None:
    conn.execute(payouts.insert().values(payout_id=payout_id, user_id=user_id, amount=amount, status="pending", created_at=now))
    clearing = ledger.system_account(conn, ledger.CLEARING)
    ledger.post(conn, Journal(f"payout:{payout_id}", "payout", ((account_id, -amount), (clearing, amount))), now=now)


def _reverse_payout(conn: Connection, payout_id: str, account_id: int, amount: int, now: float) -> None:
    clearing = ledger.system_account(conn, ledger.CLEARING)
    ledger.post(conn, Journal(f"payout-reversal:{payout_id}", "payout_reversal", ((clearing, -amount), (account_id, amount))), now=now)
    conn.execute(sa.update(payouts).where(payouts.c.payout_id == payout_id).values(status="failed"))
