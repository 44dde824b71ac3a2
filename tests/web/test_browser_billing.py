"""The money pages in a real headless Chromium (auto-recharge, Connect onboarding and payouts, the operator's
market and fee charts), against a live hub whose Stripe is the test HTTP client.

The hub (served on loopback as in ``test_browser``) has its Stripe layer
answered by the test HTTP client of ``test_billing_pages``; webhooks reach it
over HTTP, signed with the ``stripe`` library's own helper. Stripe's hosted
Connect onboarding is stood in for by a two-page loopback server (the
browser reaches nothing else): the Account Link's URL points at it, and its
"finish" link marks the account onboarded, as Stripe's would, and sends the
browser to the link's ``return_url``. Screenshots go to the same folder as
``test_browser``'s.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import stripe
from gpunexus.hub.app import create_app
from gpunexus.hub.stripe_billing import StripeBilling
from test_billing_pages import CheckoutStripe
from test_browser import (CHROMIUM, DRIVER, LiveHub, _fill, _log_in, _settle, _shot, _submit, _user_with_password,
                          browser,  # noqa: F401
                          served, shots)
from gpunexus.protocol.messages import host_registration_statement
from gpunexus.protocol.signing import Signer
from test_hub_stripe import SECRET
from test_hub_support import Clock, make_offer, make_receipt

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does)")
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def fake() -> CheckoutStripe:
    return CheckoutStripe()


@pytest.fixture(scope="module")
def onboarding(fake):
    """Stripe's hosted onboarding, on loopback: ``/setup/e/ACCT/LINK`` shows a page, ``/finish/LINK`` completes it."""

    class Onboarding(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts[:2] == ["setup", "e"] and len(parts) == 4 and parts[3] in fake.links:
                body = (f"<!doctype html><title>Stripe onboarding</title><h1>Fake Stripe: onboarding {html.escape(parts[2])}</h1>"
                        f"<p>Business details, bank account ...</p><a id='finish' href='/finish/{html.escape(parts[3])}'>Agree and submit</a>")
                self._answer(200, {"content-type": "text/html"}, body.encode())
            elif parts[0] == "finish" and len(parts) == 2 and parts[1] in fake.links:
                link = fake.links[parts[1]]
                fake.onboard(link["account"])
                self._answer(303, {"location": link["return_url"]}, b"")
            else:
                self._answer(404, {}, b"no such link")

        def _answer(self, status: int, headers: dict, body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Onboarding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.onboarding_base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    thread.join(timeout=10)


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


def test_a_host_sets_up_payouts_on_stripe_and_comes_back_with_payouts_enabled(live, browser, shots, fake, onboarding):
    host, _ = _user_with_password(live, "payee@example.com", "host")
    d = browser
    _log_in(d, live, "payee@example.com")
    d.get(live.url + "/host")
    assert "Set up payouts" in d.find_element(By.ID, "payout-account").text
    _shot(d, shots, "21-host-page-payouts-not-set-up")
    _submit(d, By.ID, "set-up-payouts")
    [account] = [a for a, body in fake.accounts.items() if body["email"] == "payee@example.com"]
    assert d.current_url.startswith(f"{fake.onboarding_base}/setup/e/{account}/")
    assert "Fake Stripe: onboarding" in d.page_source
    _shot(d, shots, "22-stripe-onboarding-stand-in")
    _submit(d, By.ID, "finish")
    assert d.current_url == live.url + "/earnings/connect/return"
    assert "Payouts enabled" in d.find_element(By.ID, "connect-result").text and account in d.page_source
    _shot(d, shots, "23-host-payouts-enabled")
    d.get(live.url + "/earnings")
    assert "payouts enabled" in d.find_element(By.ID, "payout-account").text

    client, _ = _user_with_password(live, "payer-of-payee@example.com", "client", 1_000_000)
    _settle(live, client, host, count=4)  # 1.19 cents earned: one whole cent to pay out
    _fill(d, {"threshold": "0.01"})
    _submit(d, By.CSS_SELECTOR, "form[action$='/earnings/threshold'] button")
    assert live.call(live.hub.billing.payout, host.id) == "paid"
    d.get(live.url + "/earnings")
    [transfer] = [f for _, p, f in fake.calls if p == "/v1/transfers" and f["destination"] == account]
    history = d.find_element(By.ID, "payouts").text
    assert "paid" in history and f"${int(transfer['amount']) / 100:.2f}" in history
    _shot(d, shots, "24-host-earnings-payouts")


MODELS = [f"example-org/very-long-model-name-{n}b-instruct-v0.{n}" for n in range(1, 9)]
_LEGEND_BOXES = """
return [...document.querySelectorAll('.chart svg')].map(svg => ({
  id: svg.closest('.chart').id, svg: svg.getBoundingClientRect().toJSON(),
  texts: [...svg.querySelectorAll('.legends text')].map(t => t.getBoundingClientRect().toJSON())}));
"""


def _seed_market(live: LiveHub, clock: Clock, hours: int) -> None:
    """A host offers eight models for ``hours`` hours; ref-tiny is bought each hour; the hub closes an epoch hourly."""
    host_signer, gateway = Signer.generate(), Signer.generate()
    host, _ = _user_with_password(live, "market-host@example.com", "host")
    client, _ = _user_with_password(live, "market-client@example.com", "client", 5_000_000)
    now = time.time()

    async def work() -> None:
        hub = live.hub
        clock.now = now - hours * 3600
        await hub.register_host(host, host_signer.peer_id,
                                host_signer.sign(host_registration_statement(hub.hub_id, host_signer.peer_id)))
        for h in range(hours + 1):
            clock.now = now - (hours - h) * 3600
            for i, model in enumerate(["ref-tiny", *MODELS]):
                await hub.post_offer(host, make_offer(host_signer, model=model, issued_at=clock.now, ttl=300,
                                                      seq=h * 10 + i + 1, tokens_per_s=20.0 + 5 * i).encode())
            await hub.allowance(client, gateway.peer_id, 1_000_000)
            receipt = make_receipt(host_signer, gateway, issued_at=clock.now, tokens_in=20_000 * (1 + h % 3), tokens_out=0)
            [outcome] = await hub.submit([receipt.encode()])
            assert outcome.status == "settled", outcome
            await hub.market.close_epoch(hub.market.current_epoch() + 1)
        clock.now = now

    live.call(work)


def test_the_admin_sees_market_and_fees_over_time_with_whole_legends(browser, shots):
    clock = Clock(time.time() - 7 * 3600)  # the hub's market loop closes its first epoch then; the seed goes forward
    with served(create_app, clock=clock) as market_hub:
        _seed_market(market_hub, clock, hours=6)
        _user_with_password(market_hub, "ops-market@example.com", "admin")
        d = browser
        _log_in(d, market_hub, "ops-market@example.com")
        yesterday = dt.datetime.fromtimestamp(clock.now, dt.UTC).date() - dt.timedelta(days=1)
        d.get(f"{market_hub.url}/admin/market?from={yesterday.isoformat()}")
        assert "averaged per hour" in d.page_source
        for chart in ("price-chart", "demand-chart", "supply-chart", "fee-chart"):
            assert d.find_element(By.CSS_SELECTOR, f"#{chart} svg"), chart
        assert "Platform fee earned in range" in d.page_source
        _shot(d, shots, "25-admin-market-over-time")
        charts = d.execute_script(_LEGEND_BOXES)
        assert {c["id"] for c in charts} == {"price-chart", "demand-chart", "supply-chart", "fee-chart"}
        for chart in charts:
            box, texts = chart["svg"], chart["texts"]
            assert len(texts) >= 1, chart["id"]
            for t in texts:  # every legend entry lies whole inside its chart's drawing
                assert box["left"] <= t["left"] and t["right"] <= box["right"] + 0.5, (chart["id"], t, box)
                assert box["top"] <= t["top"] and t["bottom"] <= box["bottom"] + 0.5, (chart["id"], t, box)
            for a in texts:  # and no two entries overlap
                for b in texts:
                    if a is not b and abs(a["top"] - b["top"]) < 1:
                        assert a["right"] <= b["left"] + 0.5 or b["right"] <= a["left"] + 0.5, (chart["id"], a, b)
