"""Top-up through Stripe Checkout on the dashboard: the real ``stripe`` library answered by a test HTTP
client (as tests/test_hub_stripe.py does), the webhook signed with the library's own helper.

The success page reads the session back from Stripe and credits it once,
whether it is reloaded or the webhook comes before or after it.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import stripe
from gpunexus.hub.app import create_app
from gpunexus.hub.stripe_billing import StripeBilling
from test_hub_stripe import SECRET, FakeStripe
from web_support import Visitor


class CheckoutStripe(FakeStripe):
    """:class:`FakeStripe` that also remembers Checkout Sessions, so they can be retrieved (and paid)."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, dict] = {}

    def request(self, method, url, headers, post_data=None):
        path = urlsplit(url).path
        if method == "get" and path.startswith("/v1/checkout/sessions/"):
            sid = path.rsplit("/", 1)[1]
            self.calls.append((method, path, {}))
            if sid not in self.sessions:
                body = {"error": {"type": "invalid_request_error", "message": f"No such checkout.session: '{sid}'"}}
                return json.dumps(body).encode(), 404, {"request-id": "req_x"}
            return json.dumps(self.sessions[sid]).encode(), 200, {"request-id": "req_x"}
        body, status, hdrs = super().request(method, url, headers, post_data)
        if path == "/v1/checkout/sessions" and status == 200:
            session = json.loads(body)
            form = self.calls[-1][2]
            session.update(metadata={"user_id": form["metadata[user_id]"]}, customer=form["customer"],
                           payment_intent=f"pi_{session['id']}", success_url=form["success_url"])
            self.sessions[session["id"]] = session
            body = json.dumps(session).encode()
        return body, status, hdrs

    def pay(self, sid: str) -> dict:
        self.sessions[sid]["payment_status"] = "paid"
        return self.sessions[sid]


@pytest.fixture
def billed(site):
    fake = CheckoutStripe()
    billing = StripeBilling.attach(site.hub, "sk_test_fake", SECRET, public_url="http://127.0.0.1:1", http_client=fake)
    site.app = create_app(site.hub, billing=billing)
    return site, fake


async def _webhook(site, session: dict, event_id: str) -> dict:
    payload = json.dumps({"id": event_id, "object": "event", "type": "checkout.session.completed",
                          "data": {"object": session}}).encode()
    header = stripe.WebhookSignature.generate_signature_header(payload.decode(), SECRET)
    r = await site.app.test_client().post("/v1/stripe/webhook", data=payload, headers={"stripe-signature": header})
    return await r.get_json()


async def _checkout(v: Visitor, amount: str):
    return await v.post("/billing/checkout", {"amount": amount}, csrf_from="/billing")


async def test_top_up_credits_once_on_reload_and_with_the_webhook(billed):
    site, fake = billed
    v = site.visitor()
    await v.sign_up("payer@example.com")
    payer = site.user("payer@example.com")
    r = await _checkout(v, "25")
    assert r.status == 303 and r.headers["location"].startswith("https://checkout.stripe.com/")
    [sid] = fake.sessions
    created = [f for m, p, f in fake.calls if p == "/v1/checkout/sessions"][0]
    assert created["line_items[0][price_data][unit_amount]"] == "2500"
    success = urlsplit(fake.sessions[sid]["success_url"])
    done = f"{success.path}?session={sid}"
    pending = await v.get(done)
    assert pending.status == 200 and pending.has("Waiting for your bank")
    assert (await site.hub.balance(payer))["available_micro"] == 0
    session = fake.pay(sid)
    first = await v.get(done)
    assert first.has("$25.00 added") and first.has("$25.00")
    again = await v.get(done)  # reloaded
    assert again.has("already credited")
    assert (await _webhook(site, session, "evt_after")) == {"applied": True}  # the event is recorded, no money moves
    assert (await site.hub.balance(payer))["available_micro"] == 25_000_000
    assert (await v.get("/admin")).status == 403
    site.admin()
    admin = site.visitor()
    await admin.log_in("admin@example.com")
    assert (await admin.get("/admin")).has("Conservation holds")


async def test_the_webhook_first_then_the_page_credits_once(billed):
    site, fake = billed
    v = site.visitor()
    await v.sign_up("payer@example.com")
    await _checkout(v, "10.50")
    [sid] = fake.sessions
    await _webhook(site, fake.pay(sid), "evt_first")
    page = await v.get(f"/billing/done?session={sid}")
    assert page.has("$10.50 added") and page.has("already credited")
    assert (await site.hub.balance(site.user("payer@example.com")))["available_micro"] == 10_500_000


async def test_bad_amounts_foreign_sessions_and_cancel(billed):
    site, fake = billed
    v, other = site.visitor(), site.visitor()
    await v.sign_up("payer@example.com")
    await other.sign_up("other@example.com")
    for amount, message in (("0.10", "between 0.50"), ("12.345", "whole cents"), ("ten", "US dollars")):
        r = await _checkout(v, amount)
        assert r.status == 400 and r.has(message), amount
    assert not fake.sessions
    await _checkout(v, "5")
    [sid] = fake.sessions
    fake.pay(sid)
    assert (await other.get(f"/billing/done?session={sid}")).status == 404  # someone else's payment
    assert (await other.get("/billing/done?session=cs_unknown")).status == 404
    assert (await site.hub.balance(site.user("other@example.com")))["available_micro"] == 0
    cancelled = await v.get("/billing/cancelled")
    assert cancelled.status == 200 and cancelled.has("Nothing was charged")


async def test_manual_credits_mode_has_no_checkout(site):
    v = site.visitor()
    await v.sign_up("payer@example.com")
    page = await v.get("/billing")
    assert page.has("manual-credits mode") and "Pay with Stripe" not in page.text
    assert (await _checkout(v, "5")).status == 409


async def test_auto_recharge_is_set_on_the_billing_page_and_bad_input_changes_nothing(billed):
    site, fake = billed
    v = site.visitor()
    await v.sign_up("payer@example.com")
    payer = site.user("payer@example.com")
    page = await v.get("/billing")
    assert page.has("Auto-recharge") and page.has("No card saved yet")
    for form, message in (({"recharge_threshold": "5", "recharge_amount": ""}, "Enter both a threshold and an amount"),
                          ({"recharge_threshold": "5", "recharge_amount": "0.10"}, "between 0.50"),
                          ({"recharge_threshold": "five", "recharge_amount": "10"}, "US dollars"),
                          ({"recharge_threshold": "5", "recharge_amount": "10.005"}, "whole cents")):
        r = await v.post("/billing/auto-recharge", form, csrf_from="/billing")
        assert r.status == 400 and r.has(message), form
        assert r.has(form["recharge_threshold"])  # what was typed stays in the form
    assert (await site.hub.billing.status(payer))["auto_recharge"]["threshold_micro"] is None
    assert (await v.post("/billing/auto-recharge", {"recharge_threshold": "5", "recharge_amount": "20"},
                         csrf=False)).status == 400  # no CSRF token: refused
    assert (await site.hub.billing.status(payer))["auto_recharge"]["threshold_micro"] is None

    r = await v.post("/billing/auto-recharge", {"recharge_threshold": "5", "recharge_amount": "20"}, csrf_from="/billing")
    assert r.status == 303
    page = await v.get("/billing")
    assert page.has("Auto-recharge on: $20.00 whenever your balance falls under $5.00.")
    assert page.has('value="5.00"') and page.has('value="20.00"')
    assert (await site.hub.billing.status(payer))["auto_recharge"] == {
        "threshold_micro": 5_000_000, "amount_micro": 20_000_000, "card_saved": False, "error": None}

    await _checkout(v, "10")
    [sid] = fake.sessions
    await _webhook(site, fake.pay(sid), "evt_card")  # the Checkout top-up saves the card
    assert (await v.get("/billing")).has("A card is saved")
    fake.charge_error = "authentication_required"
    await site.hub.billing.set_auto_recharge(payer, 50_000_000, 20_000_000)  # 10 USD is under 50: charge now
    assert await site.hub.billing.recharge(payer.id) == "authentication_required"
    page = await v.get("/billing")
    assert page.has("The last recharge failed") and page.has("authentication_required")
    r = await v.post("/billing/auto-recharge", {"recharge_threshold": "", "recharge_amount": ""}, csrf_from="/billing")
    assert r.status == 303 and (await v.get("/billing")).has("Auto-recharge switched off.")
    assert (await site.hub.billing.status(payer))["auto_recharge"]["threshold_micro"] is None


async def test_a_host_sets_up_payouts_through_a_stripe_account_link(billed):
    site, fake = billed
    site.password_for("host@example.com")
    host = site.visitor()
    await host.log_in("host@example.com")
    for path in ("/earnings", "/host"):  # the button is on both host pages
        assert (await host.get(path)).has("Set up payouts"), path
    assert (await host.get("/earnings/connect/refresh")).status == 303 and not fake.accounts  # no account: no link
    assert (await host.post("/earnings/connect", {}, csrf=False)).status == 400 and not fake.accounts  # CSRF
    r = await host.post("/earnings/connect", {}, csrf_from="/earnings")
    [account] = fake.accounts
    assert r.status == 303 and r.headers["location"].startswith(f"https://connect.stripe.com/setup/e/{account}/")
    link = fake.links[r.headers["location"].rsplit("/", 1)[1]]
    assert urlsplit(link["return_url"]).path == "/earnings/connect/return"
    back = await host.get(urlsplit(link["return_url"]).path)  # left Stripe before finishing
    assert back.has("Payouts not enabled yet") and back.has("Continue on Stripe")
    assert (await host.get("/earnings")).has("onboarding not finished")
    again = await host.get(urlsplit(link["refresh_url"]).path)  # the link expired: a fresh one, the same account
    assert again.status == 303 and again.headers["location"] != r.headers["location"] and len(fake.accounts) == 1
    fake.onboard(account)
    done = await host.get("/earnings/connect/return")
    assert done.has("Payouts enabled") and done.has(account)
    assert (await host.get("/earnings")).has("payouts enabled") and (await host.get("/host")).has("payouts enabled")

    client = site.visitor()
    await client.sign_up("payer@example.com")
    assert (await client.post("/earnings/connect", {}, csrf_from="/billing")).status == 403
    assert (await client.get("/earnings/connect/return")).status == 403
    assert len(fake.accounts) == 1
