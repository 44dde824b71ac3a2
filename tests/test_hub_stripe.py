"""Stripe billing: webhooks signed with the library's own helper, API calls answered by a fake Stripe.

No network: :class:`FakeStripe` is a ``stripe.HTTPClient`` that answers the
few endpoints the hub uses the way Stripe's API does (JSON objects, card
errors as HTTP 402 with an ``error`` body, a POST repeated with the same
``Idempotency-Key`` answered with the first answer again), and records every
call (a replayed POST is recorded once, as Stripe performs it once).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa
import stripe
from gpunexus.hub import ledger
from gpunexus.hub.app import create_app
from gpunexus.hub.db import stripe_events
from gpunexus.hub.stripe_billing import StripeBilling
from test_hub_support import Market, backend, db  # noqa: F401

SECRET = "whsec_test_secret"


class FakeStripe(stripe.HTTPClient):
    name = "fake-stripe"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, dict]] = []
        self.charge_error: str | None = None
        self.transfer_error = False
        self.retrieve_error = False
        self.charge_status = "succeeded"
        self.answered: dict[str, tuple[bytes, int, dict]] = {}  # idempotency key -> first answer
        self.replays = 0
        self.intents: dict[str, dict] = {}  # PaymentIntents created
        self.accounts: dict[str, dict] = {}  # Connect accounts created
        self.links: dict[str, dict] = {}  # Account Links: token -> account, refresh_url, return_url
        self.onboarding_base = "https://connect.stripe.com"
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n:04d}"

    def request(self, method, url, headers, post_data=None):
        key = {k.lower(): v for k, v in (headers or {}).items()}.get("idempotency-key") if method == "post" else None
        if key in self.answered:
            self.replays += 1
            return self.answered[key]
        answer = self._answer(method, url, post_data)
        if key:
            self.answered[key] = answer
        return answer

    def _answer(self, method, url, post_data):
        path = urlsplit(url).path
        form = {k: v[0] for k, v in parse_qs(post_data or "").items()}
        self.calls.append((method, path, form))
        status, body = 200, None
        if path == "/v1/customers":
            body = {"id": self._id("cus"), "object": "customer", "email": form.get("email")}
        elif path == "/v1/checkout/sessions":
            sid = self._id("cs_test")
            body = {"id": sid, "object": "checkout.session", "url": f"https://checkout.stripe.com/c/pay/{sid}",
                    "amount_total": int(form["line_items[0][price_data][unit_amount]"]), "payment_status": "unpaid"}
        elif path.startswith("/v1/payment_intents/") and self.retrieve_error:
            status, body = 500, {"error": {"type": "api_error", "message": "Stripe is down"}}
        elif path.startswith("/v1/payment_intents/"):
            body = {"id": path.rsplit("/", 1)[1], "object": "payment_intent", "payment_method": "pm_card_saved", "status": "succeeded"}
        elif path == "/v1/payment_intents":
            if self.charge_error:
                status = 402
                body = {"error": {"type": "card_error", "code": self.charge_error, "message": "Your card was declined.",
                                  "payment_intent": {"id": self._id("pi"), "object": "payment_intent", "status": "requires_payment_method"}}}
            else:
                received = int(form["amount"]) if self.charge_status == "succeeded" else 0
                body = {"id": self._id("pi"), "object": "payment_intent", "status": self.charge_status,
                        "amount": int(form["amount"]), "amount_received": received,
                        "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")}}
                self.intents[body["id"]] = body
        elif path == "/v1/accounts" and method == "post":
            body = {"id": self._id("acct"), "object": "account", "type": form.get("type"), "email": form.get("email"),
                    "charges_enabled": False, "payouts_enabled": False, "details_submitted": False,
                    "capabilities": {"transfers": "inactive"} if form.get("capabilities[transfers][requested]") else {},
                    "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")}}
            self.accounts[body["id"]] = body
        elif path.startswith("/v1/accounts/") and method == "get":
            account = self.accounts.get(path.rsplit("/", 1)[1])
            status, body = (200, account) if account else (404, {"error": {
                "type": "invalid_request_error", "code": "resource_missing",
                "message": f"No such account: '{path.rsplit('/', 1)[1]}'", "param": "account"}})
        elif path == "/v1/account_links":
            status, body = self._account_link(form)
        elif path == "/v1/transfers":
            if self.transfer_error:
                status, body = 400, {"error": {"type": "invalid_request_error", "message": "No such destination"}}
            else:
                body = {"id": self._id("tr"), "object": "transfer", "amount": int(form["amount"]), "destination": form["destination"]}
        else:
            status, body = 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({path})"}}
        return json.dumps(body).encode(), status, {"request-id": self._id("req")}

    def _account_link(self, form: dict) -> tuple[int, dict]:
        """Stripe's checks of ``POST /v1/account_links``, then a link valid for five minutes."""
        for param in ("account", "type", "refresh_url", "return_url"):
            if not form.get(param):
                return 400, {"error": {"type": "invalid_request_error", "message": f"Missing required param: {param}.",
                                       "param": param}}
        if form["account"] not in self.accounts:
            return 400, {"error": {"type": "invalid_request_error", "code": "account_invalid", "param": "account",
                                   "message": f"No such account: '{form['account']}'"}}
        if form["type"] not in ("account_onboarding", "account_update"):
            return 400, {"error": {"type": "invalid_request_error", "param": "type", "message": "Invalid type."}}
        token = self._id("link")
        self.links[token] = {"account": form["account"], "refresh_url": form["refresh_url"], "return_url": form["return_url"]}
        return 200, {"object": "account_link", "created": 1700000000, "expires_at": 1700000300,
                     "url": f"{self.onboarding_base}/setup/e/{form['account']}/{token}"}

    def onboard(self, account_id: str) -> dict:
        """The host finished Stripe's onboarding: the account is paid out from now on (its ``account.updated``)."""
        self.accounts[account_id].update(details_submitted=True, charges_enabled=True, payouts_enabled=True,
                                         capabilities={"transfers": "active"})
        return self.accounts[account_id]

    def close(self) -> None:
        pass


@pytest.fixture
def billed(db):
    market = Market(db)
    fake = FakeStripe()
    billing = StripeBilling.attach(market.hub, "sk_test_fake", SECRET, public_url="https://hub.example", http_client=fake)
    return market, billing, fake, create_app(market.hub, billing=billing)


def _event(event_id: str, kind: str, obj: dict) -> bytes:
    return json.dumps({"id": event_id, "object": "event", "type": kind, "api_version": stripe.api_version,
                       "created": 1700000000, "livemode": False, "data": {"object": obj}}).encode()


def _session(sid: str, user_id: int, cents: int, paid: bool = True) -> dict:
    return {"id": sid, "object": "checkout.session", "amount_total": cents, "customer": "cus_1",
            "payment_intent": "pi_checkout_1", "payment_status": "paid" if paid else "unpaid",
            "metadata": {"user_id": str(user_id)}}


async def _post_webhook(client, payload: bytes, secret: str = SECRET):
    header = stripe.WebhookSignature.generate_signature_header(payload.decode(), secret)
    return await client.post("/v1/stripe/webhook", data=payload, headers={"stripe-signature": header})


def _balance(market, user) -> int:
    return market.hub.db.read_sync(lambda c: ledger.balance(c, user.account_id))


async def test_checkout_and_webhook_credit_exactly_once(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    r = await client.post("/v1/checkout", json={"amount_micro": 20_000_000}, headers={"authorization": f"Bearer {market.client_key}"})
    assert r.status_code == 200
    session = await r.get_json()
    assert session["url"].startswith("https://checkout.stripe.com/")
    created = [f for m, p, f in fake.calls if p == "/v1/checkout/sessions"][0]
    assert created["line_items[0][price_data][unit_amount]"] == "2000"
    assert created["payment_intent_data[setup_future_usage]"] == "off_session"

    start = _balance(market, market.client)
    pending = _event("evt_1", "checkout.session.completed", _session(session["id"], market.client.id, 2000, paid=False))
    assert (await (await _post_webhook(client, pending)).get_json()) == {"applied": True}
    assert _balance(market, market.client) == start  # bank debit still pending: no credit yet
    paid = _event("evt_2", "checkout.session.async_payment_succeeded", _session(session["id"], market.client.id, 2000))
    assert (await _post_webhook(client, paid)).status_code == 200
    assert _balance(market, market.client) == start + 20_000_000
    # the same event again, and another event for the same session: nothing more
    assert (await (await _post_webhook(client, paid)).get_json()) == {"applied": False}
    again = _event("evt_3", "checkout.session.completed", _session(session["id"], market.client.id, 2000))
    assert (await _post_webhook(client, again)).status_code == 200
    assert _balance(market, market.client) == start + 20_000_000
    assert market.hub.db.read_sync(ledger.verify).ok
    status = await (await client.get("/v1/billing", headers={"authorization": f"Bearer {market.client_key}"})).get_json()
    assert status["auto_recharge"]["card_saved"] is True


async def test_bad_signature_changes_nothing(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    start = _balance(market, market.client)
    payload = _event("evt_9", "checkout.session.completed", _session("cs_x", market.client.id, 99_900))
    r = await _post_webhook(client, payload, secret="whsec_wrong")
    assert r.status_code == 400 and (await r.get_json())["error"]["code"] == "invalid_signature"
    header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)
    tampered = payload.replace(b"99900", b"99999")
    r = await client.post("/v1/stripe/webhook", data=tampered, headers={"stripe-signature": header})
    assert r.status_code == 400
    r = await client.post("/v1/stripe/webhook", data=payload)
    assert r.status_code == 400
    assert _balance(market, market.client) == start
    # the genuine one still applies afterwards: the refusals recorded nothing
    assert (await _post_webhook(client, payload)).status_code == 200
    assert _balance(market, market.client) == start + 999_000_000


async def test_auto_recharge_and_authentication_required(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    auth = {"authorization": f"Bearer {market.client_key}"}
    await _post_webhook(client, _event("evt_1", "checkout.session.completed", _session("cs_1", market.client.id, 100)))
    r = await client.put("/v1/billing/auto-recharge", json={"threshold_micro": 20_000_000, "amount_micro": 5_000_000}, headers=auth)
    assert (await r.get_json())["auto_recharge"]["threshold_micro"] == 20_000_000
    before = _balance(market, market.client)  # 10 USD granted + 1 USD: under the threshold
    assert await billing.recharge(market.client.id) == "succeeded"
    assert _balance(market, market.client) == before + 5_000_000
    charge = [f for m, p, f in fake.calls if p == "/v1/payment_intents"][-1]
    assert (charge["off_session"], charge["confirm"], charge["payment_method"]) == ("true", "true", "pm_card_saved")

    fake.charge_error = "authentication_required"
    assert await billing.recharge(market.client.id) == "authentication_required"
    n = len(fake.calls)
    assert await billing.recharge(market.client.id) is None  # not retried until the customer acts
    assert len(fake.calls) == n
    status = await (await client.get("/v1/billing", headers=auth)).get_json()
    assert status["auto_recharge"]["error"] == "authentication_required"
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_payout_when_over_threshold(billed):
    market, billing, fake, app = billed
    await market.register_host()
    await market.hub.set_payout_settings(market.host, 2_000, "acct_host")
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    await market.hub.submit([market.receipt().encode()])  # host earns 900
    assert await billing.payout(market.host.id) is None  # under the threshold
    await market.hub.submit([market.receipt(tokens_in=10_000, tokens_out=0).encode() for _ in range(2)])
    assert _balance(market, market.host) == 900 + 2 * 18_000
    fake.transfer_error = True
    assert await billing.payout(market.host.id) == "failed"
    assert _balance(market, market.host) == 36_900  # reversed
    fake.transfer_error = False
    assert await billing.payout(market.host.id) == "paid"
    transfer = [f for m, p, f in fake.calls if p == "/v1/transfers"][-1]
    assert (transfer["amount"], transfer["destination"]) == ("3", "acct_host")
    assert _balance(market, market.host) == 6_900  # whole cents paid, the rest stays
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_openapi_includes_stripe_routes(billed):
    market, billing, fake, app = billed
    doc = await (await app.test_client().get("/openapi.json")).get_json()
    routes = {(rule.rule, m.lower()) for rule in app.url_map.iter_rules() for m in rule.methods
              if m not in ("HEAD", "OPTIONS") and rule.rule.startswith("/v1/")}
    assert routes == {(p, m) for p, ops in doc["paths"].items() for m in ops}


async def test_settlement_triggers_recharge_and_payout(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    await market.register_host()
    await _post_webhook(client, _event("evt_1", "checkout.session.completed", _session("cs_1", market.client.id, 100)))
    await billing.set_auto_recharge(market.client, 11_000_000, 5_000_000)  # balance 11 USD: not yet
    await market.hub.set_payout_settings(market.host, 1_000, "acct_host")
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])  # 10 cents
    await billing.process_pending()
    calls = [p for _, p, _ in fake.calls]
    assert calls.count("/v1/payment_intents") == 1 and calls.count("/v1/transfers") == 1
    assert _balance(market, market.host) == 0  # 9 cents earned, all paid out
    assert [f["amount"] for _, p, f in fake.calls if p == "/v1/transfers"] == ["9"]
    assert _balance(market, market.client) == 11_000_000 - 1_000_000 + 5_000_000
    await billing.process_pending()  # nothing new noted: no more calls
    assert len(fake.calls) == len(calls)


def _recharged_event(event_id: str, pi: dict) -> bytes:
    return _event(event_id, "payment_intent.succeeded", {**pi, "status": "succeeded", "amount_received": pi["amount"]})


def _charges(fake) -> list[dict]:
    return [f for _, p, f in fake.calls if p == "/v1/payment_intents"]


async def test_a_settled_request_under_the_threshold_charges_the_saved_card_once(billed):
    """One drop under the threshold is one charge, however many settled batches see it before the credit lands."""
    market, billing, fake, app = billed
    client = app.test_client()
    await market.register_host()
    await _post_webhook(client, _event("evt_card", "checkout.session.completed", _session("cs_1", market.client.id, 100)))
    await billing.set_auto_recharge(market.client, 10_500_000, 5_000_000)
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)  # 11 USD less the 1 USD held
    fake.charge_status = "processing"  # the card's bank answers later: the credit comes by webhook
    for _ in range(3):  # three settled batches while the charge is processing
        await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])
        await billing.process_pending()
    assert len(_charges(fake)) == 1
    [charge] = _charges(fake)
    assert (charge["amount"], charge["payment_method"], charge["metadata[kind]"]) == ("500", "pm_card_saved", "auto_recharge")
    assert fake.replays == 2  # the later passes sent the same idempotency key and got the first answer back
    before = _balance(market, market.client)
    [pi] = fake.intents.values()
    assert (await (await _post_webhook(client, _recharged_event("evt_pi", pi))).get_json()) == {"applied": True}
    assert _balance(market, market.client) == before + 5_000_000
    assert (await (await _post_webhook(client, _recharged_event("evt_pi_again", pi))).get_json()) == {"applied": True}
    assert _balance(market, market.client) == before + 5_000_000  # another event for the same charge: no more

    fake.charge_status = "succeeded"  # above the threshold now: a settled batch charges nothing
    await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])
    await billing.process_pending()
    assert len(_charges(fake)) == 1
    await billing.set_auto_recharge(market.client, 20_000_000, 5_000_000)  # under again: a new charge, credited at once
    await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])
    before = _balance(market, market.client)
    await billing.process_pending()
    assert len(_charges(fake)) == 2 and _balance(market, market.client) == before + 5_000_000
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_connect_onboarding_through_account_links_then_payouts(billed):
    """One Express account per host, a fresh Account Link each time; payouts wait until Stripe enables them."""
    market, billing, fake, app = billed
    client = app.test_client()
    host_auth = {"authorization": f"Bearer {market.host_key}"}
    r = await client.post("/v1/connect/onboarding", headers={"authorization": f"Bearer {market.client_key}"})
    assert r.status_code == 403 and not fake.calls
    first = (await (await client.post("/v1/connect/onboarding", headers=host_auth)).get_json())["url"]
    second = (await (await client.post("/v1/connect/onboarding", headers=host_auth)).get_json())["url"]
    [account] = fake.accounts.values()
    assert first.startswith(f"https://connect.stripe.com/setup/e/{account['id']}/") and second != first
    created = [f for m, p, f in fake.calls if p == "/v1/accounts"]
    assert len(created) == 1 and created[0]["type"] == "express" and created[0]["metadata[user_id]"] == str(market.host.id)
    assert created[0]["capabilities[transfers][requested]"] == "true" and created[0]["email"] == "host@example.com"
    link = [f for m, p, f in fake.calls if p == "/v1/account_links"][-1]
    assert (link["type"], link["account"]) == ("account_onboarding", account["id"])
    assert (link["refresh_url"], link["return_url"]) == ("https://hub.example/earnings/connect/refresh",
                                                         "https://hub.example/earnings/connect/return")
    status = await (await client.get("/v1/connect/account", headers=host_auth)).get_json()
    assert status == {"connect_account_id": account["id"], "payouts_enabled": False, "details_submitted": False}

    await market.register_host()
    await market.hub.set_payout_settings(market.host, 1_000, account["id"])  # the threshold form keeps the account
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])
    assert await billing.payout(market.host.id) is None  # onboarding not finished: nothing is sent to Stripe
    assert not [p for _, p, _ in fake.calls if p == "/v1/transfers"]

    stale = dict(account)  # the event's copy says "not yet"; the hub reads the account back and sees it enabled
    fake.onboard(account["id"])
    r = await _post_webhook(client, _event("evt_acct", "account.updated", stale))
    assert (await r.get_json()) == {"applied": True}
    assert (await market.hub.payouts(market.host))["payouts_enabled"] is True
    assert await billing.payout(market.host.id) == "paid"
    assert [f["destination"] for _, p, f in fake.calls if p == "/v1/transfers"] == [account["id"]]
    for obj in ({"id": "acct_someone_else", "object": "account"}, {"id": "cus_1", "object": "customer"}):
        answer = await (await _post_webhook(client, _event(f"evt_{obj['id']}", "account.updated", obj))).get_json()
        assert answer["applied"] is False and answer["ignored"], obj  # acknowledged, nothing changes
    assert (await market.hub.payouts(market.host))["payouts_enabled"] is True
    fake.accounts.pop(account["id"])  # Stripe no longer knows the account: onboarding says so, changes nothing
    r = await client.post("/v1/connect/onboarding", headers=host_auth)
    assert r.status_code == 409 and account["id"] in (await r.get_json())["error"]["message"]
    r = await client.get("/v1/connect/account", headers=host_auth)
    assert r.status_code == 409 and (await r.get_json())["error"]["code"] == "connect_account_unknown"
    answer = await (await _post_webhook(client, _event("evt_gone", "account.updated", stale))).get_json()
    assert answer["applied"] is False and "does not know" in answer["ignored"]
    assert (await market.hub.payouts(market.host))["payouts_enabled"] is True  # unchanged
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_a_pasted_connect_account_id_still_works_and_its_state_is_unknown(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    r = await client.put("/v1/payout-settings", json={"threshold_micro": 1_000, "connect_account_id": "acct_pasted"},
                         headers={"authorization": f"Bearer {market.host_key}"})
    assert r.status_code == 200
    summary = await market.hub.payouts(market.host)
    assert (summary["connect_account_id"], summary["payouts_enabled"]) == ("acct_pasted", None)


def _malformed_events(user_id: int) -> dict[str, bytes]:
    def checkout(**changes) -> bytes:
        obj = {**_session("cs_bad", user_id, 2000), **changes}
        return _event("evt_bad", "checkout.session.completed", obj)

    def recharge(metadata, amount) -> bytes:
        return _event("evt_bad", "payment_intent.succeeded", {"id": "pi_bad", "object": "payment_intent",
                                                               "amount_received": amount, "metadata": metadata})

    return {
        "no metadata": checkout(metadata=None),
        "metadata without user": checkout(metadata={}),
        "non-numeric user": checkout(metadata={"user_id": "abc"}),
        "negative user": checkout(metadata={"user_id": "-1"}),
        "huge user": checkout(metadata={"user_id": "9" * 40}),
        "unknown user": checkout(metadata={"user_id": "987654"}),
        "non-numeric amount": checkout(amount_total="2000"),
        "negative amount": checkout(amount_total=-2000),
        "zero amount": checkout(amount_total=0),
        "float amount": checkout(amount_total=20.5),
        "overflowing amount": checkout(amount_total=2**70),
        "no object id": checkout(id=None),
        "recharge, unknown user": recharge({"kind": "auto_recharge", "user_id": "987654"}, 500),
        "recharge, no amount": recharge({"kind": "auto_recharge", "user_id": str(user_id)}, None),
        "not an event": b'{"hello": "world"}',
        "not JSON": b"{nope",
        "too deep": b"[" * 100_000 + b"]" * 100_000,
    }


async def test_signed_but_malformed_events_are_acknowledged_and_change_nothing(billed, caplog):
    """Stripe retries every non-2xx: a permanently malformed event is a 200 that applies nothing."""
    market, billing, fake, app = billed
    client = app.test_client()
    start = _balance(market, market.client)
    for name, payload in _malformed_events(market.client.id).items():
        caplog.clear()
        r = await _post_webhook(client, payload)
        body = await r.get_json()
        assert r.status_code == 200 and body["applied"] is False and body["ignored"], (name, body)
        assert any(rec.levelname == "WARNING" and "ignored" in rec.getMessage() for rec in caplog.records), name
    assert _balance(market, market.client) == start
    assert market.hub.db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(stripe_events)).scalar()) == 0
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_unsigned_garbage_is_400_not_500(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    for payload, header in [(b"\xff\xfe", "t=1,v1=abc"), (b"{}", "t=1,v1=\u00ff"), (b"{}", "garbage"), (b"{}", "t=x,v1=1")]:
        r = await client.post("/v1/stripe/webhook", data=payload, headers={"stripe-signature": header})
        assert r.status_code == 400 and (await r.get_json())["error"]["code"] == "invalid_signature"


async def test_stripe_api_failure_is_a_retryable_503(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    fake.retrieve_error = True
    start = _balance(market, market.client)
    payload = _event("evt_1", "checkout.session.completed", _session("cs_1", market.client.id, 100))
    r = await _post_webhook(client, payload)
    assert r.status_code == 503 and (await r.get_json())["error"]["code"] == "stripe_unavailable"
    assert _balance(market, market.client) == start
    fake.retrieve_error = False  # Stripe's retry of the same event applies it
    assert (await (await _post_webhook(client, payload)).get_json()) == {"applied": True}
    assert _balance(market, market.client) == start + 1_000_000


async def test_bodies_are_checked_before_stripe_is_called(billed):
    market, billing, fake, app = billed
    client = app.test_client()
    auth = {"authorization": f"Bearer {market.client_key}"}
    for amount in (2**63, 499_999, 500_001, "5", None):
        r = await client.post("/v1/checkout", json={"amount_micro": amount}, headers=auth)
        assert r.status_code == 400 and (await r.get_json())["error"]["param"] == "amount_micro", amount
    r = await client.put("/v1/billing/auto-recharge", json={"threshold_micro": 1}, headers=auth)
    assert r.status_code == 400
    r = await client.put("/v1/billing/auto-recharge", json={"threshold_micro": 2**63, "amount_micro": 500_000}, headers=auth)
    assert r.status_code == 400 and (await r.get_json())["error"]["param"] == "threshold_micro"
    assert fake.calls == []
