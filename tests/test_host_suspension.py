"""An operator suspends a host: gateways stop using it (hub-signed reputation) and it earns nothing more."""

from __future__ import annotations

import time

import httpx
from gpunexus.hub import accounts, keys
from gpunexus.node.runtime import HubLogin
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers
from test_hub_support import backend, db, market  # noqa: F401  (fixtures)

USD = 1_000_000
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "who serves me?"}], "max_tokens": 6}


async def test_a_suspended_host_is_excluded_by_gateways_and_paid_nothing_more(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        client_key = hub.add_user("dev@example.com", "client", USD)
        cheap_key, other_key = hub.add_user("cheap@example.com", "host"), hub.add_user("other@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, cheap_key), price=100_000) as cheap, \
                running_host(hub=HubLogin(hub.url, other_key), price=300_000) as other:
            async with running_gateway([cheap.node.listen_addrs()[0], other.node.listen_addrs()[0]],
                                       hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, count=2)
                settlement = gateway.service.settlement
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    assert (await http.post("/chat/completions", json=ASK)).status_code == 200
                    assert cheap.service.stats.served == 1  # the cheaper host gets the traffic

                    suspended = hub.hub.db.read_sync(keys.get_user, "cheap@example.com")
                    assert hub.hub.db.write_sync(accounts.set_suspended, suspended.id, True, time.time())
                    await settlement.refresh_reputation()  # the gateway's periodic poll, now
                    assert settlement.excluded_host(cheap.node.peer_id) and not settlement.excluded_host(other.node.peer_id)
                    for _ in range(3):
                        assert (await http.post("/chat/completions", json=ASK)).status_code == 200
                assert cheap.service.stats.served == 1 and other.service.stats.served == 3
                await settlement.flush()
                assert settlement.queue.refused() == []
        earned = {email: hub.balance(email) for email in ("cheap@example.com", "other@example.com")}
    assert earned["cheap@example.com"] > 0 and earned["other@example.com"] > 0  # what each served before, and after


async def test_a_receipt_from_a_suspended_host_is_refused_and_its_reputation_excludes_it(market):
    await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
    market.clock.now += 5
    before = market.receipt(issued_at=market.clock.now - 2)  # signed before the suspension: still paid
    market.hub.db.write_sync(accounts.set_suspended, market.host.id, True, market.clock.now)
    after = market.receipt()
    outcomes = await market.hub.submit([before.encode(), after.encode()])
    assert [o.status for o in outcomes] == ["settled", "refused"] and "suspended" in outcomes[1].reason
    reputations = {r.peer_id: r for r in await market.hub.reputations()}
    assert reputations[market.host_signer.peer_id].excluded
