"""The paid path end to end: SDK -> gateway (allowance) -> host -> receipt -> hub ledger."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

import sqlalchemy as sa

from gpunexus.hub import keys, ledger
from gpunexus.hub.db import receipt_log
from gpunexus.node.runtime import HubLogin
from gpunexus.protocol.money import cost_micro
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

USD = 1_000_000


async def test_requests_are_paid_from_credits_and_earned_by_the_host(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        client_key = hub.add_user("dev@example.com", "client", 5 * USD)
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key), price=250_000) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)

                def use_sdk():
                    client = openai.OpenAI(base_url=gateway.base_url, api_key=client_key, max_retries=0)
                    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pay me"}], max_tokens=30)
                    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}], max_tokens=20, stream=True))
                    with pytest.raises(openai.AuthenticationError):
                        openai.OpenAI(base_url=gateway.base_url, api_key="gnx_wrong_key", max_retries=0).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
                    return a, b

                full, streamed = await trio.to_thread.run_sync(use_sdk)
                assert full.usage.completion_tokens > 0 and streamed
                settlement = gateway.service.settlement
                await settlement.flush()
                assert len(settlement.queue) == 0
                receipts = gateway.service.stats.receipts
                billed = sum(r.cost_micro for r in receipts)
                assert billed == sum(cost_micro(r.tokens_in + r.tokens_out, 250_000) for r in receipts)
                fee = sum(hub.hub.config.fee(r.cost_micro) for r in receipts)
                # Client paid exactly the receipts (the rest is held for its allowance or free).
                spent = hub.hub.db.read_sync(lambda c: _spent(c, "dev@example.com"))
                assert spent == billed
                earnings = await host.hub.earnings()
                assert earnings["amount_micro"] == billed - fee
                assert earnings["requests"] == 2


def _spent(conn, email):
    user = keys.get_user(conn, email)
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(receipt_log.c.cost), 0)).where(receipt_log.c.client_user_id == user.id)).scalar())


async def test_out_of_credits_is_402_and_a_revoked_key_is_401(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        broke_key = hub.add_user("broke@example.com", "client")
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, broke_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers={"authorization": f"Bearer {broke_key}"}) as http:
                    r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 402
                assert r.headers["x-should-retry"] == "false"
                assert r.json()["error"]["code"] == "insufficient_quota"
            rich_key = hub.add_user("rich@example.com", "client", USD)
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, rich_key), home=tmp_path / "gw2") as gateway:
                await wait_for_offers(gateway)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers={"authorization": f"Bearer {rich_key}"}) as http:
                    ok = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
                    assert ok.status_code == 200
                    key_id = rich_key.split("_")[1]
                    assert hub.hub.db.write_sync(keys.revoke_key, key_id)
                    # The gateway hears of it through its long poll, with no renewal: the next requests get 401.
                    with trio.fail_after(10):
                        while (r := await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})).status_code == 200:
                            pass
                    assert r.status_code == 401
                # Everything served before the revocation is still paid to the host.
                settlement = gateway.service.settlement
                await settlement.flush()
                assert len(settlement.queue) == 0 and not settlement.queue.refused()
                assert (await host.hub.earnings())["requests"] == len(gateway.service.stats.receipts)


async def test_a_small_balance_under_load_never_leaves_a_host_unpaid(tmp_path):
    """Concurrent requests on a balance that covers only some of them: each is paid or refused up front."""
    async with running_hub(tmp_path / "hub") as hub:
        client_key = hub.add_user("small@example.com", "client", 500)  # 500 micro-USD: a few dozen requests
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key), max_slots=8, max_queue=200) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                codes: list[int] = []
                body = {"model": "tiny", "messages": [{"role": "user", "content": "spend it"}], "max_tokens": 16}
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers={"authorization": f"Bearer {client_key}"},
                                             limits=httpx.Limits(max_connections=100)) as http:

                    async def ask() -> None:
                        codes.append((await http.post("/chat/completions", json=body)).status_code)

                    for _ in range(2):
                        async with trio.open_nursery() as nursery:
                            for _ in range(40):
                                nursery.start_soon(ask)
                    for _ in range(20):
                        await ask()
                settlement = gateway.service.settlement
                await settlement.flush()
                served = codes.count(200)
                assert set(codes) <= {200, 402} and served and codes.count(402)
                # Every request a host served was paid; none was refused for lack of funds.
                assert len(settlement.queue) == 0 and settlement.queue.refused() == []
                assert host.service.stats.served == served
                assert (await host.hub.earnings())["requests"] == served
                assert hub.hub.db.read_sync(ledger.verify).ok
                assert hub.balance("small@example.com") >= 0


async def test_a_paid_host_refuses_orders_without_an_allowance(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]]) as free_gateway:
                await wait_for_offers(free_gateway)
                async with httpx.AsyncClient(base_url=free_gateway.base_url, timeout=30) as http:
                    r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 503 and "allowance" in r.json()["error"]["message"]
                assert host.service.stats.refused == 1 and host.service.stats.served == 0


async def test_a_host_started_while_its_hub_is_down_waits_and_then_serves(tmp_path):
    import functools
    import logging
    import socket

    from gpunexus.hub.app import create_app, serve
    from gpunexus.hub.service import Hub

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = Hub.open(str(tmp_path / "hub"))
    _, host_key = hub.db.write_sync(keys.add_user, "gpu@example.com", "host")
    retried = trio.Event()

    class OnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not reachable yet" in record.getMessage():
                retried.set()

    handler = OnRetry()
    logging.getLogger("gpunexus.node").addHandler(handler)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                up = trio.Event()

                async def host() -> None:
                    async with running_host(hub=HubLogin(f"http://127.0.0.1:{port}", host_key)) as runtime:
                        assert runtime.hub is not None and runtime.hub.hub_id == hub.hub_id
                        up.set()

                nursery.start_soon(host)
                await retried.wait()  # the hub is down: the host waits instead of exiting
                stop = trio.Event()
                await nursery.start(functools.partial(serve, hub, create_app(hub), port=port, shutdown_trigger=stop.wait))
                await up.wait()
                stop.set()
    finally:
        logging.getLogger("gpunexus.node").removeHandler(handler)
