"""Market prices across the network: hub epochs -> signed prices -> gateways and hosts."""

from __future__ import annotations

import functools

import httpx
import trio

from gpunexus.hub.config import HubConfig
from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.node.runtime import HubLogin
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

EPOCH_S = 1.0
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16}


async def _next_price(book, model, after_epoch, timeout=30.0):
    with trio.fail_after(timeout):
        while (update := book.get(model)) is None or update.epoch <= after_epoch:
            await book.changed.wait()
    return update


async def test_demand_at_the_hub_moves_the_price_gateways_and_market_hosts_see(tmp_path):
    config = HubConfig(epoch_s=EPOCH_S, reference_prices={"tiny": 600_000})
    async with running_hub(tmp_path / "hub", config) as hub:
        client_key = hub.add_user("dev@example.com", "client", 5_000_000)
        fixed_key = hub.add_user("fixed@example.com", "host")
        follower_key = hub.add_user("follower@example.com", "host")
        # Hosts announce 1 token/s and one slot: a few requests are more demand than supply.
        small = dict(tokens_per_s=1.0, max_slots=1, max_queue=64, price_poll_s=0.2)
        async with running_host(hub=HubLogin(hub.url, fixed_key), price=200_000, **small) as fixed, \
                running_host(hub=HubLogin(hub.url, follower_key), price=100_000, follow_market=True, bootstrap=[fixed.node.listen_addrs()[0]], **small) as follower:
            gateway_config = GatewayConfig(price_poll_s=0.2)
            async with running_gateway([fixed.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key), home=tmp_path / "gw", config=gateway_config) as gateway:
                await wait_for_offers(gateway, count=2)
                prices = gateway.service.prices
                idle = await _next_price(prices, "tiny", -1)
                idle.verify()
                assert idle.hub_id == hub.hub.hub_id
                # Idle capacity lowers the price, epoch by epoch, never under the fixed host's ask.
                idle = await _next_price(prices, "tiny", idle.epoch)
                assert 200_000 <= idle.price_micro_per_mtok <= 300_000
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers={"authorization": f"Bearer {client_key}"}) as http:
                    models = (await http.get("/models")).json()["data"]
                    assert models[0]["market_price_usd_per_mtok"] * 1_000_000 >= 200_000
                    # A lasting demand of many tokens per second against 2 tokens/s of supply:
                    # the price must climb above where idleness left it.
                    with trio.move_on_after(30):
                        while True:
                            async with trio.open_nursery() as nursery:
                                for _ in range(4):
                                    nursery.start_soon(functools.partial(http.post, "/chat/completions", json=CHAT))
                            await gateway.service.settlement.flush()
                            latest = prices.get("tiny")
                            if latest.price_micro_per_mtok > idle.price_micro_per_mtok:
                                break
                risen = prices.get("tiny")
                assert risen.epoch > idle.epoch and risen.price_micro_per_mtok > idle.price_micro_per_mtok
                assert risen.price_micro_per_mtok <= 600_000  # never over the reference ceiling
                # The market-following host follows, and announces it follows.
                with trio.fail_after(20):
                    while follower.service.terms.price_micro_per_mtok < risen.price_micro_per_mtok:
                        await follower.service.prices.changed.wait()
                assert follower.service.terms.follows_market
