"""Stripe billing against localstripe: the real ``stripe`` library talks HTTP to a stateful local Stripe server.

localstripe (``localstripe`` on PyPI, started per test by
``localstripe_server.py`` on a loopback port) keeps customers, payment
methods and PaymentIntents, charges test cards the way Stripe's test mode
does, and delivers webhook events signed with the endpoint's secret. The
hub's :class:`StripeClient` is built as :meth:`StripeBilling.attach` builds
it, with localstripe as its API base. Which call goes where, and why:

* **localstripe**, over HTTP: ``POST /v1/customers`` (the hub's customer
  for a user); ``POST /v1/payment_methods`` and ``.../attach`` and the first
  ``POST /v1/payment_intents`` (the test standing in for Stripe's hosted
  Checkout page, which takes the card and pays); ``GET
  /v1/payment_intents/{id}`` (the hub reading a paid Checkout's card);
  ``POST /v1/payment_intents`` off-session with the saved card (auto-recharge:
  success, decline); and the ``payment_intent.succeeded`` webhook, sent by
  localstripe to the hub's route on a live loopback server and signed by
  localstripe.
* **FakeStripe** (``test_hub_stripe``'s ``stripe.HTTPClient``), for what
  localstripe does not have: Checkout Sessions (``/v1/checkout/sessions``),
  Connect accounts (``/v1/accounts``), Account Links and Transfers. A
  Checkout Session's events therefore cannot come from localstripe; they are
  signed with the library's helper, as in ``test_hub_stripe``.
* Left to ``test_hub_stripe`` (FakeStripe only), since localstripe behaves
  unlike Stripe there: it ignores ``Idempotency-Key`` (a repeated POST
  makes a second object), so the one-charge-per-drop replay test needs the
  fake; and an off-session charge of a card that needs authentication
  leaves localstripe's PaymentIntent in ``requires_action`` where Stripe
  answers 402 ``authentication_required``.

localstripe lacks ``PaymentIntent.amount_received``, which Stripe always
sends and the hub credits from; the launcher adds it (see its docstring).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
import stripe
import trio
from gpunexus.hub import ledger
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.db import stripe_events, users
from gpunexus.hub.stripe_billing import StripeBilling
from test_hub_stripe import SECRET, FakeStripe, _event, _post_webhook, _session
from test_hub_support import Market, backend, db  # noqa: F401

LAUNCHER = Path(__file__).with_name("localstripe_server.py")
API_KEY = "sk_test_localstripe"
START_S = 30.0  # the launcher's start (an interpreter importing aiohttp) on a loaded 2-core machine
VISA = "4242424242424242"  # Stripe's test card that always succeeds
DECLINES = "4000000000000341"  # attaches to a customer; every charge of it is declined (card_declined)


class Localstripe:
    """One localstripe process: its URL, and the webhook deliveries it has logged."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(LAUNCHER)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._port = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(START_S) or not self.lines or not self.lines[0].strip().isdigit():
            self.stop()
            raise RuntimeError(f"localstripe did not start: {''.join(self.lines)!r:.2000}")
        self.url = f"http://127.0.0.1:{int(self.lines[0])}"
        self._wait_until_it_answers()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self._port.set()
        self._port.set()  # exited before printing a port: the constructor reports its output

    def _wait_until_it_answers(self) -> None:
        with httpx.Client(base_url=self.url, timeout=2, auth=(API_KEY, "")) as http:
            for _ in range(int(START_S / 0.1)):
                try:
                    if http.get("/v1/balance").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"localstripe does not answer at {self.url}: {''.join(self.lines)!r:.2000}")

    def send_webhooks_to(self, endpoint: str, url: str, events: list[str]) -> None:
        """Register a webhook endpoint (localstripe's ``/_config/webhooks/<id>``) signed with the hub's secret."""
        r = httpx.post(f"{self.url}/_config/webhooks/{endpoint}", json={"url": url, "secret": SECRET, "events": events},
                       timeout=10)
        r.raise_for_status()

    def deliveries(self, kind: str) -> tuple[int, int]:
        """(answered 2xx, failed) deliveries of ``kind`` events so far."""
        ok = sum(f'webhook "{kind}" successfully delivered' in line for line in self.lines)
        failed = sum(f'webhook "{kind}" failed' in line for line in self.lines)
        return ok, failed

    async def wait_for_deliveries(self, kind: str, n: int) -> tuple[int, int]:
        with trio.fail_after(60):
            while sum(self.deliveries(kind)) < n:
                await trio.sleep(0.05)
        return self.deliveries(kind)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def localstripe():
    server = Localstripe()
    yield server
    server.stop()


class LocalstripeOrFake(stripe.HTTPClient):
    """The hub's HTTP client: localstripe over HTTP, except the endpoints it lacks, which FakeStripe answers."""

    name = "localstripe-or-fake"
    FAKE_PATHS = ("/v1/checkout/", "/v1/accounts", "/v1/account_links", "/v1/transfers")

    def __init__(self, fake: FakeStripe) -> None:
        super().__init__()
        self.fake = fake
        self.http = stripe.HTTPXClient(timeout=20, allow_sync_methods=True)

    def request(self, method, url, headers, post_data=None):
        target = self.fake if urlsplit(url).path.startswith(self.FAKE_PATHS) else self.http
        return target.request(method, url, headers, post_data)

    def close(self) -> None:
        self.http.close()


def _stripe_client(localstripe: Localstripe, http_client: stripe.HTTPClient) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, http_client=http_client, base_addresses={"api": localstripe.url},
                               max_network_retries=2)


@pytest.fixture
def billed(db, localstripe):
    """(market, billing, FakeStripe, app, localstripe as the test's own Stripe client)."""
    market, fake = Market(db), FakeStripe()
    billing = StripeBilling(market.hub, _stripe_client(localstripe, LocalstripeOrFake(fake)), SECRET,
                            public_url="https://hub.example")
    market.hub.billing = billing
    ours = _stripe_client(localstripe, stripe.HTTPXClient(timeout=20, allow_sync_methods=True))
    return market, billing, fake, create_app(market.hub, billing=billing), ours


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _balance(market, user) -> int:
    return market.hub.db.read_sync(lambda c: ledger.balance(c, user.account_id))


def _stored(market, user):
    return market.hub.db.read_sync(lambda c: c.execute(sa.select(users).where(users.c.id == user.id)).one())


async def _open_checkout(client, market, cents: int = 2000) -> str:
    r = await client.post("/v1/checkout", json={"amount_micro": cents * 10_000}, headers=_auth(market.client_key))
    assert r.status_code == 200, await r.get_data()
    return (await r.get_json())["id"]


def _pay_on_checkout_page(ours: stripe.StripeClient, customer: str, method: dict, *, cents: int = 2000,
                          confirm: bool = True) -> stripe.PaymentIntent:
    """What Stripe's hosted Checkout page does with the card the person types: save it on the customer and pay.

    ``confirm=False`` leaves the payment unconfirmed, for a card whose every
    charge localstripe declines (the hub reads only which card paid).
    """
    pm = ours.v1.payment_methods.create(params=method)
    ours.v1.payment_methods.attach(pm.id, params={"customer": customer})
    return ours.v1.payment_intents.create(params={
        "amount": cents, "currency": "usd", "customer": customer, "payment_method": pm.id, "confirm": confirm})


def _recharges(ours: stripe.StripeClient) -> list[stripe.PaymentIntent]:
    return [pi for pi in ours.v1.payment_intents.list().data if pi.metadata.to_dict().get("kind") == "auto_recharge"]


def _card(number: str) -> dict:
    return {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}


async def _checkout_saving(client, market, ours, method: dict, *, confirm: bool = True) -> str:
    """A paid Checkout whose card the hub saves: session from FakeStripe, card and payment in localstripe."""
    session = await _open_checkout(client, market)
    customer = _stored(market, market.client).stripe_customer_id
    pi = _pay_on_checkout_page(ours, customer, method, confirm=confirm)
    obj = {**_session(session, market.client.id, 2000), "customer": customer, "payment_intent": pi.id}
    r = await _post_webhook(client, _event("evt_checkout", "checkout.session.completed", obj))
    assert (await r.get_json()) == {"applied": True}
    return pi.payment_method


async def test_a_user_gets_one_customer_in_localstripe(billed):
    """The hub's customer for a user is created in localstripe once; the Checkout Session (FakeStripe) names it."""
    market, billing, fake, app, ours = billed
    client = app.test_client()
    await _open_checkout(client, market)
    customer_id = _stored(market, market.client).stripe_customer_id
    customer = ours.v1.customers.retrieve(customer_id)
    assert (customer.email, customer.metadata.to_dict()) == ("client@example.com", {"user_id": str(market.client.id)})
    await _open_checkout(client, market)  # a second top-up reuses the customer
    assert _stored(market, market.client).stripe_customer_id == customer_id
    assert [c.id for c in ours.v1.customers.list(params={"email": "client@example.com"}).data] == [customer_id]
    sessions = [f for m, p, f in fake.calls if p == "/v1/checkout/sessions"]
    assert [s["customer"] for s in sessions] == [customer_id, customer_id]
    assert not [p for _, p, _ in fake.calls if not p.startswith("/v1/checkout/")]  # everything else went to localstripe


async def test_the_saved_card_is_charged_off_session_and_credited(billed):
    market, billing, fake, app, ours = billed
    client = app.test_client()
    card = await _checkout_saving(client, market, ours, _card(VISA))
    assert card.startswith("pm_") and _stored(market, market.client).payment_method_id == card  # read back from localstripe
    status = await billing.set_auto_recharge(market.client, 50_000_000, 5_000_000)
    assert status["auto_recharge"]["card_saved"] is True
    before = _balance(market, market.client)  # the Checkout credited 20 USD: 30 USD, under the threshold
    assert await billing.recharge(market.client.id) == "succeeded"
    assert _balance(market, market.client) == before + 5_000_000
    [charge] = _recharges(ours)
    assert (charge.status, charge.amount, charge.amount_received) == ("succeeded", 500, 500)
    assert (charge.customer, charge.payment_method) == (_stored(market, market.client).stripe_customer_id, card)
    assert charge.metadata.to_dict() == {"user_id": str(market.client.id), "kind": "auto_recharge"}
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_a_declined_card_records_the_error_and_is_not_charged_again(billed):
    market, billing, fake, app, ours = billed
    client = app.test_client()
    await _checkout_saving(client, market, ours, _card(DECLINES), confirm=False)
    await billing.set_auto_recharge(market.client, 50_000_000, 5_000_000)
    before, intents = _balance(market, market.client), len(ours.v1.payment_intents.list().data)
    assert await billing.recharge(market.client.id) == "card_declined"
    assert _balance(market, market.client) == before
    r = await client.get("/v1/billing", headers=_auth(market.client_key))
    assert (await r.get_json())["auto_recharge"]["error"] == "card_declined"
    [declined] = ours.v1.payment_intents.list().data[intents:]
    assert (declined.status, declined.amount_received, declined.last_payment_error.code) == (
        "requires_payment_method", 0, "card_declined")
    assert await billing.recharge(market.client.id) is None  # not retried until a new Checkout saves a card
    assert len(ours.v1.payment_intents.list().data) == intents + 1
    assert market.hub.db.read_sync(ledger.verify).ok


@pytest.fixture
async def served_billed(billed, nursery):
    """``billed`` with the hub on a live loopback port (background billing running): (..., its URL)."""
    market, billing, fake, app, ours = billed
    stop = trio.Event()
    binds = await nursery.start(lambda task_status: serve(market.hub, app, port=0, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
    yield market, billing, fake, app, ours, binds[0]
    stop.set()


def _recorded_events(market) -> list[str]:
    return market.hub.db.read_sync(lambda c: c.execute(sa.select(stripe_events.c.event_id)).scalars().all())


async def test_localstripes_payment_intent_succeeded_webhook_credits_once(served_billed, localstripe):
    """localstripe's signed ``payment_intent.succeeded``, delivered twice, credits a recharge once.

    Two endpoints at the hub's one URL get every event, each delivery signed
    by localstripe: the second is the same event id again, as a Stripe retry.
    First a settled batch recharges the saved card; localstripe answers
    ``succeeded`` at once, so the hub credits then and both deliveries add
    nothing. Then a recharge whose answer the hub never got (it stopped, or
    its request timed out, after Stripe charged): the webhook alone credits it.
    """
    market, billing, fake, app, ours, url = served_billed
    client = app.test_client()
    # unconfirmed, so that the recharges' are the only payment_intent.succeeded events localstripe sends
    card = await _checkout_saving(client, market, ours, _card(VISA), confirm=False)
    for endpoint in ("hub", "hub-again"):
        localstripe.send_webhooks_to(endpoint, f"{url}/v1/stripe/webhook", ["payment_intent.succeeded"])
    await market.register_host()
    await billing.set_auto_recharge(market.client, 29_500_000, 5_000_000)
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)  # 30 USD less the 1 USD held
    before = _balance(market, market.client)  # 29 USD: the next settled batch finds it under 29.50 USD
    await market.hub.submit([market.receipt(tokens_in=50_000, tokens_out=0).encode()])
    assert await localstripe.wait_for_deliveries("payment_intent.succeeded", 2) == (2, 0)  # both answered 2xx
    [charge] = _recharges(ours)
    assert (charge.status, charge.amount_received, charge.payment_method) == ("succeeded", 500, card)
    assert _balance(market, market.client) == before + 5_000_000  # credited once
    assert f"recharge:{charge.id}" in _recorded_events(market)  # by the recharge itself, at once

    lost = ours.v1.payment_intents.create(params={  # what billing.recharge sends
        "amount": 500, "currency": "usd", "customer": _stored(market, market.client).stripe_customer_id,
        "payment_method": card, "off_session": True, "confirm": True,
        "metadata": {"user_id": str(market.client.id), "kind": "auto_recharge"}})
    before = _balance(market, market.client)
    assert await localstripe.wait_for_deliveries("payment_intent.succeeded", 4) == (4, 0)
    assert _balance(market, market.client) == before + 5_000_000  # credited once, by the webhook
    events = ours.v1.events.list(params={"type": "payment_intent.succeeded"}).data
    assert sorted(e.data.object.id for e in events) == sorted([charge.id, lost.id])
    recorded = _recorded_events(market)
    assert all(recorded.count(e.id) == 1 for e in events) and f"recharge:{lost.id}" not in recorded
    assert market.hub.db.read_sync(ledger.verify).ok
