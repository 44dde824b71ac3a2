"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by selenium).

A real hub (SQLite file, hypercorn on a loopback port) runs in a thread of
its own under trio; the browser signs up, logs in, makes and revokes a key
(the JSON API then answers 401 for it), sees a request settled through the
service layer on the usage page, and the admin sees conservation hold.
Every main page is screenshotted into one folder (its path is printed) and
each shot is checked not to be blank. Chromium is kept off the network: every
host name but the loopback one resolves to nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from gpunexus.hub import accounts, keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.service import Hub
from gpunexus.protocol.messages import host_registration_statement
from gpunexus.protocol.signing import Signer
from test_hub_support import make_offer, make_receipt
from web_support import PASSWORD, SCREENSHOTS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does)")
from selenium.webdriver.common.by import By  # noqa: E402


@dataclass
class LiveHub:
    """A hub served on loopback from a thread, and a way to run its service calls from the test."""

    hub: Hub
    url: str
    token: trio.lowlevel.TrioToken

    def call(self, fn, *args):
        return trio.from_thread.run(functools.partial(fn, *args), trio_token=self.token)


@contextlib.contextmanager
def served(make_app: Callable[[Hub], Any], **hub_kw: Any) -> Iterator[LiveHub]:
    """A fresh hub (``Hub.open(home, **hub_kw)``) in a temporary home, serving ``make_app(hub)`` on a loopback
    port from a thread of its own."""
    home = tempfile.mkdtemp(prefix="gpunexus-web-")
    hub = Hub.open(home, **hub_kw)
    app = make_app(hub)
    ready: queue.Queue = queue.Queue()
    stop: list[trio.Event] = []

    async def main() -> None:
        stop.append(trio.Event())
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, hub, app, host="127.0.0.1", port=0,
                                                          shutdown_trigger=stop[0].wait))
            ready.put((binds[0], trio.lowlevel.current_trio_token()))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    url, token = ready.get(timeout=30)
    try:
        yield LiveHub(hub, url, token)
    finally:
        trio.from_thread.run_sync(stop[0].set, trio_token=token)
        thread.join(timeout=30)
        hub.db.dispose()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveHub]:
    with served(create_app) as hub:
        yield hub


@pytest.fixture(scope="module")
def shots() -> str:
    folder = tempfile.mkdtemp(prefix="gpunexus-screenshots-")
    SCREENSHOTS.append(folder)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(live):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _shot(driver, folder: str, name: str) -> str:
    """Save a full-page screenshot and check it is not blank (varied pixels, many colours).

    The window is sized so that its *viewport* holds the whole page: the
    window's own frame takes some height, and a screenshot of a window
    merely as tall as the page cut off its bottom (the last chart's legend).
    """
    from PIL import Image, ImageStat

    height = min(max(driver.execute_script("return document.documentElement.scrollHeight"), 700), 4000)
    driver.set_window_size(1400, height)
    frame = height - driver.execute_script("return window.innerHeight")
    if frame > 0:
        driver.set_window_size(1400, height + frame)
    path = os.path.join(folder, f"{name}.png")
    driver.save_screenshot(path)
    driver.set_window_size(1400, 1000)
    with Image.open(path) as image:
        assert image.height >= height, f"{path} is {image.height} pixels tall, the page {height}: its bottom is cut off"
        gray = image.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 8, f"{path} looks blank"
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 30, f"{path} has almost no colours"
    print(f"screenshot {path}")
    return path


def _submit(driver, by: str, what: str) -> None:
    """Click a form's button and wait until the answer's page has replaced this one."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, what).click()

    def replaced(_driver) -> bool:
        # Mid-navigation, chromedriver may say the node left the document
        # instead of raising StaleElementReferenceException: both mean replaced.
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    WebDriverWait(driver, 15).until(replaced)


def _fill(driver, fields: dict[str, str]) -> None:
    for element_id, value in fields.items():
        box = driver.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(value)


def _log_in(driver, live: LiveHub, email: str) -> None:
    driver.delete_all_cookies()
    driver.get(live.url + "/login")
    _fill(driver, {"email": email, "password": PASSWORD})
    _submit(driver, By.ID, "login")
    assert "Overview" in driver.title, driver.page_source[:500]


def _user_with_password(live: LiveHub, email: str, role: str, credit_micro: int = 0) -> tuple[keys.User, str]:
    user, key = live.hub.db.write_sync(keys.add_user, email, role)
    live.hub.db.write_sync(accounts.set_password, user.id, accounts.hash_password(PASSWORD), time.time())
    if credit_micro:
        live.hub.grant_sync(email, credit_micro, uuid.uuid4().hex)
    return user, key


def _settle(live: LiveHub, client: keys.User, host: keys.User, count: int = 2) -> list[str]:
    """Settle ``count`` receipts of ``client`` served by ``host`` through the service layer (real signatures)."""
    host_signer, gateway = Signer.generate(), Signer.generate()

    async def work() -> list[str]:
        hub = live.hub
        proof = host_signer.sign(host_registration_statement(hub.hub_id, host_signer.peer_id))
        await hub.register_host(host, host_signer.peer_id, proof)
        await hub.post_offer(host, make_offer(host_signer, issued_at=time.time()).encode())
        await hub.allowance(client, gateway.peer_id, 1_000_000)
        receipts = [make_receipt(host_signer, gateway, issued_at=time.time(), tokens_in=300 * (i + 1), tokens_out=900)
                    for i in range(count)]
        outcomes = await hub.submit([r.encode() for r in receipts])
        assert [o.status for o in outcomes] == ["settled"] * count, outcomes
        return [r.request_id for r in receipts]

    return live.call(work)


def test_a_client_signs_up_makes_a_key_sees_usage_and_revokes_it(live, browser, shots):
    d = browser
    d.get(live.url + "/login")
    _shot(d, shots, "01-login")
    d.get(live.url + "/signup")
    _fill(d, {"email": "dev@example.com", "password": PASSWORD, "confirm": PASSWORD})
    d.find_element(By.ID, "terms").click()
    _shot(d, shots, "02-signup")
    _submit(d, By.ID, "signup")
    assert "Welcome to gpunexus" in d.page_source

    d.get(live.url + "/keys")
    _fill(d, {"key-name": "laptop gateway"})
    _submit(d, By.ID, "create-key")
    key = d.find_element(By.ID, "new-key").text.strip()
    assert key.startswith("gnx_")
    _shot(d, shots, "03-key-created")
    d.get(live.url + "/keys")
    assert key not in d.page_source  # shown once
    assert httpx.get(live.url + "/v1/balance", headers={"authorization": f"Bearer {key}"}).status_code == 200

    client = live.hub.db.read_sync(keys.get_user, "dev@example.com")
    live.hub.grant_sync("dev@example.com", 5_000_000, uuid.uuid4().hex)
    host, _ = _user_with_password(live, "gpu@example.com", "host")
    request_ids = _settle(live, client, host)
    d.get(live.url + "/usage")
    table = d.find_element(By.ID, "by-model").text
    assert "ref-tiny" in table and "2,700" in table and "$0.0054" in table
    assert d.find_element(By.CSS_SELECTOR, "#spend-chart svg")
    _shot(d, shots, "04-usage")
    d.get(live.url + "/requests")
    assert request_ids[0][:12] in d.page_source
    _shot(d, shots, "05-requests")
    d.get(live.url + "/")
    _shot(d, shots, "06-overview")
    d.get(live.url + "/billing")
    _shot(d, shots, "07-billing")

    d.get(live.url + "/keys")
    _submit(d, By.ID, f"revoke-{key.split('_')[1]}")
    assert "revoked" in d.find_element(By.CLASS_NAME, "notice").text
    _shot(d, shots, "08-key-revoked")
    r = httpx.get(live.url + "/v1/balance", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_client_cannot_reach_admin_pages_or_others_requests(live, browser, shots):
    client, _ = _user_with_password(live, "nosy@example.com", "client", 1_000_000)
    victim, _ = _user_with_password(live, "victim@example.com", "client", 1_000_000)
    host, _ = _user_with_password(live, "gpu2@example.com", "host")
    [foreign] = _settle(live, victim, host, count=1)
    d = browser
    _log_in(d, live, "nosy@example.com")
    for path in ("/admin", "/admin/users", "/admin/models", "/earnings"):
        d.get(live.url + path)
        assert "Not available" in d.page_source and "Conservation" not in d.page_source, path
    d.get(live.url + f"/requests/{foreign}")
    assert "Not found" in d.page_source and foreign not in d.page_source
    _shot(d, shots, "09-client-denied")


def test_the_admin_sees_conservation_users_hosts_and_the_catalogue(live, browser, shots):
    _user_with_password(live, "ops@example.com", "admin")
    d = browser
    _log_in(d, live, "ops@example.com")
    d.get(live.url + "/admin")
    assert "Conservation holds" in d.find_element(By.ID, "conservation").text
    _shot(d, shots, "10-admin-ledger")
    d.get(live.url + "/admin/users")
    _fill(d, {"user-search": "example.com"})
    _submit(d, By.CSS_SELECTOR, "form.range button")
    assert "dev@example.com" in d.page_source
    _shot(d, shots, "11-admin-users")
    d.get(live.url + "/admin/hosts")
    assert "gpu@example.com" in d.page_source
    _shot(d, shots, "12-admin-hosts")
    d.get(live.url + "/admin/models")
    _fill(d, {"model-id": "ref-tiny", "model-name": "Reference tiny (numpy)"})
    _submit(d, By.ID, "save-model")
    _submit(d, By.ID, "toggle-1")
    assert "switched off" in d.find_element(By.CLASS_NAME, "notice").text
    _shot(d, shots, "13-admin-models")
    d.get(live.url + "/models")
    assert "unavailable" in d.page_source


def test_a_host_sees_earnings_and_offers(live, browser, shots):
    d = browser
    _log_in(d, live, "gpu@example.com")
    d.get(live.url + "/earnings")
    assert d.find_element(By.CSS_SELECTOR, "#earnings-chart svg") and "ref-tiny" in d.page_source
    _shot(d, shots, "14-host-earnings")
    d.get(live.url + "/host")
    assert "live" in d.page_source
    _shot(d, shots, "15-host-offers")


def test_a_client_accepts_a_licence_limits_a_key_and_disputes_a_request(live, browser, shots):
    from gpunexus.hub import catalogue

    client, client_key = _user_with_password(live, "careful@example.com", "client", 1_000_000)
    host, _ = _user_with_password(live, "gpu3@example.com", "host")
    live.hub.db.write_sync(catalogue.set_available, "ref-tiny", True, time.time())  # the admin test switched it off
    [request_id] = _settle(live, client, host, count=1)
    live.hub.db.write_sync(catalogue.upsert, catalogue.Model(
        "licensed-7b", "Licensed 7B", "Example Community Licence", "https://example.com/licence", 8192, True,
        time.time(), family="example", licence_ack=True))
    d = browser
    _log_in(d, live, "careful@example.com")

    d.get(live.url + "/models")
    row = next(r for r in d.find_elements(By.CSS_SELECTOR, "#models tbody tr") if "Licensed 7B" in r.text)
    _submit(d, By.ID, row.find_element(By.CSS_SELECTOR, "button").get_attribute("id"))
    assert "You accepted the licence of Licensed 7B" in d.find_element(By.CLASS_NAME, "notice").text
    _shot(d, shots, "16-models-licence-accepted")
    assert "licensed-7b" in live.hub.db.read_sync(catalogue.acceptances, client.id)

    d.get(live.url + "/keys")
    _fill(d, {"key-name": "capped", "key-limit-day": "2.50", "key-limit-month": "20"})
    _submit(d, By.ID, "create-key")
    assert d.find_element(By.ID, "new-key").text.startswith("gnx_")
    d.get(live.url + "/keys")
    assert "$0.00 / $2.50" in d.page_source and "$0.00 / $20.00" in d.page_source
    _shot(d, shots, "17-key-limits")

    d.get(live.url + f"/requests/{request_id}")
    _submit(d, By.ID, "dispute-button")
    assert "waiting for your gateway" in d.find_element(By.ID, "dispute").text
    # The client's gateway answers the hub's audit request over the JSON API: it kept nothing of this one.
    r = httpx.post(live.url + "/v1/audits/openings", headers={"authorization": f"Bearer {client_key}"},
                   json={"request_id": request_id, "opening": None, "reason": "expired"})
    assert r.status_code == 200, r.text
    d.get(live.url + f"/requests/{request_id}")
    assert "unopened" in d.find_element(By.ID, "dispute").text and "gateway: expired" in d.page_source
    _shot(d, shots, "18-request-disputed")
