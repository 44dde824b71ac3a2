"""The money pages in a real headless Chromium, against a live hub whose Stripe is the test HTTP client.

The hub (served on loopback as in ``test_browser``) has its Stripe layer
answered by :class:`ConnectStripe`; webhooks reach it over HTTP, signed with
the ``stripe`` library's own helper. Screenshots go to the same folder as
``test_browser``'s.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import stripe
from gpunexus.hub.app import create_app
from gpunexus.hub.stripe_billing import StripeBilling
from test_billing_pages import CheckoutStripe
from test_browser import (CHROMIUM, DRIVER, LiveHub, _fill, _log_in, _shot, _submit, _user_with_password, browser,  # noqa: F401
                          served, shots)
from test_hub_stripe import SECRET

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does)")
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def fake() -> CheckoutStripe:
    return CheckoutStripe()


@pytest.fixture(scope="module")
def live(fake):
    def make_app(hub):
        return create_app(hub, billing=StripeBilling.attach(hub, "sk_test_fake", SECRET, public_url="http://127.0.0.1:1",
                                                             http_client=fake))

    with served(make_app) as hub:
        hub.hub.billing.public_url = hub.url  # Stripe sends the browser back here
        yield hub


def _webhook(live: LiveHub, event_id: str, kind: str, obj: dict) -> dict:
    payload = json.dumps({"id": event_id, "object": "event", "type": kind, "data": {"object": obj}})
    header = stripe.WebhookSignature.generate_signature_header(payload, SECRET)
    r = httpx.post(live.url + "/v1/stripe/webhook", content=payload, headers={"stripe-signature": header})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_client_sets_auto_recharge_after_a_top_up_saved_the_card(live, browser, shots):
    client, _ = _user_with_password(live, "recharger@example.com", "client")
    d = browser
    _log_in(d, live, "recharger@example.com")
    d.get(live.url + "/billing")
    assert "No card saved yet" in d.find_element(By.ID, "card-saved").text
    _webhook(live, "evt_browser_card", "checkout.session.completed", {
        "id": "cs_browser_1", "object": "checkout.session", "amount_total": 2500, "customer": "cus_browser",
        "payment_intent": "pi_browser_1", "payment_status": "paid", "metadata": {"user_id": str(client.id)}})
    d.get(live.url + "/billing")
    assert "A card is saved" in d.find_element(By.ID, "card-saved").text

    _fill(d, {"recharge-threshold": "5", "recharge-amount": "0.10"})
    _submit(d, By.ID, "save-recharge")
    assert "between 0.50" in d.find_element(By.ID, "recharge-error").text
    assert d.find_element(By.ID, "recharge-amount").get_attribute("value") == "0.10"
    _fill(d, {"recharge-threshold": "5", "recharge-amount": "20"})
    _submit(d, By.ID, "save-recharge")
    assert "Auto-recharge on: $20.00" in d.find_element(By.CLASS_NAME, "notice").text
    assert "$25.00" in d.page_source
    state = d.find_element(By.ID, "recharge-state").text
    assert "on" in state and "$20.00 when the balance falls under $5.00" in state
    _shot(d, shots, "20-billing-auto-recharge")
