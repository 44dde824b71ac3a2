"""A client disputes a request on the dashboard; the hub audits it with the gateway's opening and refunds a cheat.

Real parts: a hub (SQLite, HTTP, dashboard), a host that samples with its own
seed instead of the order's (so its output cannot be replayed), a paid
gateway, the ``openai`` SDK; the dashboard is driven over HTTP like a browser
without JavaScript.
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import trio

from gpunexus.hub import accounts, keys
from gpunexus.hub.config import HubConfig
from gpunexus.hub.web import fmt
from gpunexus.node.runtime import HubLogin
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers
from test_honesty_network import WrongSeedBackend

USD = 1_000_000
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def _log_in(web: httpx.AsyncClient, email: str) -> None:
    page = await web.get("/login")
    r = await web.post("/login", data={"email": email, "password": PASSWORD, "csrf_token": _CSRF.search(page.text).group(1)})
    assert r.status_code == 200


async def test_a_disputed_request_of_a_cheating_host_is_audited_and_refunded(tmp_path):
    async with running_hub(tmp_path / "hub", HubConfig(audit_rate=0.0)) as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        host_key = hub.add_user("cheat@example.com", "host")
        for email in ("dev@example.com", "cheat@example.com"):
            user = hub.hub.db.read_sync(keys.get_user, email)
            hub.hub.db.write_sync(accounts.set_password, user.id, accounts.hash_password(PASSWORD), time.time())
        async with running_host(WrongSeedBackend(), hub=HubLogin(hub.url, host_key), price=1_000_000) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                client = openai.OpenAI(base_url=gateway.base_url, api_key=client_key, max_retries=0)
                await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=24, temperature=1.0))
                settlement = gateway.service.settlement
                await settlement.flush()
                [receipt] = gateway.service.stats.receipts
                rid = receipt.request_id
                host_share = receipt.cost_micro - hub.hub.config.fee(receipt.cost_micro)
                before = hub.balance("dev@example.com")

                async with httpx.AsyncClient(base_url=hub.url, timeout=30, follow_redirects=True) as cheat_web:
                    await _log_in(cheat_web, "cheat@example.com")
                    assert "Dispute this request" not in (await cheat_web.get(f"/requests/{rid}")).text  # the host's view

                async with httpx.AsyncClient(base_url=hub.url, timeout=30, follow_redirects=True) as web:
                    await _log_in(web, "dev@example.com")
                    page = await web.get(f"/requests/{rid}")
                    assert "Dispute this request" in page.text and "not selected for an audit" in page.text
                    r = await web.post(f"/requests/{rid}/dispute", data={"csrf_token": _CSRF.search(page.text).group(1)})
                    assert r.status_code == 200 and "Dispute sent" in r.text and "waiting for your gateway" in r.text
                    again = await web.post(f"/requests/{rid}/dispute", data={"csrf_token": _CSRF.search(r.text).group(1)})
                    assert again.status_code == 200 and again.text.count('id="dispute"') == 1

                    assert await settlement.answer_audits() == 1  # what the gateway's audit poll does every few seconds
                    page = (await web.get(f"/requests/{rid}")).text
                    assert "failed" in page and "refunded" in page and "seed" in page
                    assert f"{fmt.usd(host_share)} refunded" in page
                assert hub.balance("dev@example.com") == before + host_share
