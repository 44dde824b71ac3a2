"""What a key may do binds end to end: SDK -> gateway -> host, with the hub's dashboard in between.

A model whose licence must be accepted is refused (403, naming the licence)
until the account accepts it on the dashboard; a model the operator switches
off is refused as unavailable; a key past its spend limit gets 402 naming the
limit, and one past its expiry 401. No host works on a refused request, and
every request a host served is paid.
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import trio

from gpunexus.hub import accounts, catalogue, keys
from gpunexus.node.runtime import HubLogin
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

USD = 1_000_000
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def _accept_on_dashboard(hub_url: str, email: str, model: str) -> str:
    """Log in to the hub's dashboard over HTTP and press "I accept this licence"; the page shown after."""
    async with httpx.AsyncClient(base_url=hub_url, timeout=30, follow_redirects=True) as web:
        login = await web.get("/login")
        r = await web.post("/login", data={"email": email, "password": PASSWORD,
                                           "csrf_token": _CSRF.search(login.text).group(1)})
        assert r.status_code == 200
        page = await web.get("/models")
        assert "I accept this licence" in page.text
        r = await web.post("/models/accept", data={"model": model, "csrf_token": _CSRF.search(page.text).group(1)})
        assert r.status_code == 200
        return r.text


async def test_licence_and_availability_are_enforced_before_any_host_works(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        host_key = hub.add_user("gpu@example.com", "host")
        dev = hub.hub.db.read_sync(keys.get_user, "dev@example.com")
        hub.hub.db.write_sync(accounts.set_password, dev.id, accounts.hash_password(PASSWORD), time.time())
        hub.hub.db.write_sync(catalogue.upsert, catalogue.Model(
            "tiny", "Reference tiny", "Tiny Community Licence", "https://example.com/tiny-licence", 2048, True,
            time.time(), family="reference", licence_ack=True))
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                client = openai.OpenAI(base_url=gateway.base_url, api_key=client_key, max_retries=0)
                # /v1/models shows the catalogue's licence, not the host's own claim.
                listed = (await trio.to_thread.run_sync(lambda: httpx.get(f"{gateway.base_url}/models").json()))["data"][0]
                assert listed["license"] == "Tiny Community Licence" and listed["license_url"] == "https://example.com/tiny-licence"
                assert listed["licence_must_be_accepted"] is True and listed["available"] is True

                def ask() -> str:
                    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                    return r.choices[0].message.content

                with pytest.raises(openai.PermissionDeniedError) as refused:
                    await trio.to_thread.run_sync(ask)
                err = refused.value.body
                assert err["code"] == "licence_not_accepted"
                assert "'tiny'" in err["message"] and "Tiny Community Licence" in err["message"]
                assert "https://example.com/tiny-licence" in err["message"] and f"{hub.url}/models" in err["message"]
                assert host.service.stats.served == 0

                page = await _accept_on_dashboard(hub.url, "dev@example.com", "tiny")
                assert "You accepted the licence" in page and "accepted" in page
                # The refusal asked the hub for a fresh allowance: a retry is served.
                with trio.fail_after(15):
                    while True:
                        try:
                            await trio.to_thread.run_sync(ask)
                            break
                        except openai.PermissionDeniedError:
                            await trio.sleep(0.05)
                assert host.service.stats.served == 1

                admin = hub.hub.db.write_sync(keys.create_user, "ops@example.com", "admin")
                await hub.hub.set_model_available(admin, "tiny", False)
                # The gateway hears of it through its revocation long poll and renews: no waiting for half-life.
                with trio.fail_after(10):
                    while True:
                        try:
                            await trio.to_thread.run_sync(ask)
                        except openai.PermissionDeniedError as exc:
                            refused = exc
                            break
                        await trio.sleep(0.05)
                assert refused.body["code"] == "model_unavailable"
                assert "'tiny' is unavailable" in refused.body["message"]
                served = host.service.stats.served
                with pytest.raises(openai.PermissionDeniedError):
                    await trio.to_thread.run_sync(ask)
                assert host.service.stats.served == served  # refused before any host works
                async with httpx.AsyncClient(base_url=hub.url) as web:
                    models = (await web.get("/models")).text
                assert "Reference tiny" in models and "unavailable" in models


async def test_a_key_over_its_day_limit_gets_402_naming_it_and_every_served_request_is_paid(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        hub.add_user("dev@example.com", "client", 5 * USD)
        host_key = hub.add_user("gpu@example.com", "host")
        dev = hub.hub.db.read_sync(keys.get_user, "dev@example.com")
        capped = hub.hub.db.write_sync(lambda c: keys.create_key(c, dev, "capped", limit_day_micro=300))
        async with running_host(hub=HubLogin(hub.url, host_key), price=1_000_000) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, capped),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                client = openai.OpenAI(base_url=gateway.base_url, api_key=capped, max_retries=0)

                def spend_it() -> tuple[int, openai.APIStatusError]:
                    served = 0
                    while True:
                        try:
                            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=8)
                            served += 1
                        except openai.APIStatusError as exc:
                            return served, exc

                served, refused = await trio.to_thread.run_sync(spend_it)
                assert served >= 1 and refused.status_code == 402
                assert refused.body["code"] == "key_limit_reached"
                assert "daily spend limit of 0.0003 USD" in refused.body["message"]
                settlement = gateway.service.settlement
                await settlement.flush()
                assert len(settlement.queue) == 0 and settlement.queue.refused() == []
                assert host.service.stats.served == served
                spent = hub.hub.db.read_sync(keys.spend, [keys.key_id_of(capped)], hub.hub.clock())
                assert 0 < spent[keys.key_id_of(capped)].day_micro <= 300


async def test_an_expired_key_gets_401_from_the_gateway(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        hub.add_user("dev@example.com", "client", 5 * USD)
        host_key = hub.add_user("gpu@example.com", "host")
        dev = hub.hub.db.read_sync(keys.get_user, "dev@example.com")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            expires_at = time.time() + 8
            short = hub.hub.db.write_sync(lambda c: keys.create_key(c, dev, "short", expires_at))
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, short),
                                       home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30,
                                             headers={"authorization": f"Bearer {short}"}) as http:
                    assert (await http.post("/chat/completions", json=body)).status_code == 200
                    await trio.sleep(max(0.0, expires_at - time.time()) + 0.1)
                    r = await http.post("/chat/completions", json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
