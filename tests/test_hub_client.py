"""The node side of settlement against a real hub server: allowances, durable queue, host link."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio
from gpunexus.hub import catalogue, keys, ledger
from gpunexus.node.hub_client import HostHubLink, HubRefused, HubSettlement, HubUnavailable
from gpunexus.node.gateway.settlement import SettlementRefused
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.ids import new_request_id
from gpunexus.protocol.messages import Allowance, ChatMessage, Order, Sampling
from gpunexus.protocol.signing import Signer
from test_hub_support import Clock, backend, db, served  # noqa: F401


class FlakyHub(httpx.AsyncBaseTransport):
    """Forwards to the real hub unless ``down``; the answers to the first
    ``lose_answers`` receipt batches are lost on the way back (the hub did the work)."""

    def __init__(self, lose_answers: int = 0) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.down = False
        self.lose_answers = lose_answers
        self.failures = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            self.failures += 1
            raise httpx.ConnectError("connection refused", request=request)
        resp = await self.inner.handle_async_request(request)
        if request.url.path == "/v1/receipts" and self.lose_answers > 0:
            await resp.aread()
            self.lose_answers -= 1
            raise httpx.ReadError("hub went away before answering", request=request)
        return resp


def _host_earned(market) -> int:
    return market.hub.db.read_sync(lambda c: ledger.balance(c, market.host.account_id))


async def _register(market, url) -> HostHubLink:
    link = HostHubLink(url, market.host_key, market.host_signer, clock=market.clock)
    assert await link.connect() == market.hub.hub_id
    await market.post_offer()  # receipts settle only at a price the host offered
    return link


def _order(gateway: Signer, host: Signer, allowance: bytes) -> Order:
    return Order(
        request_id=new_request_id(), gateway_id=gateway.peer_id, host_id=host.peer_id, model="ref-tiny",
        price_micro_per_mtok=2_000_000, max_tokens=16, kind="chat", messages=(ChatMessage("user", "hi"),),
        prompt="", continuation="", sampling=Sampling(0.7, 1.0, 0, (), 1), allowance=allowance, issued_at=1000.0,
    ).signed(gateway)


async def test_gateway_pays_host_through_hub(served, tmp_path, nursery):
    market, url, _ = served
    link = await _register(market, url)
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "q.db", budget_micro=1_000_000, clock=market.clock)
    await nursery.start(gw.run)

    grant = gw.authorize(market.client_key, "ref-tiny")
    allowance = decode_as(Allowance, grant.allowance)
    assert allowance.budget_micro == 1_000_000 and allowance.hub_id == market.hub.hub_id
    order = _order(market.gateway, market.host_signer, grant.allowance)
    await link.check_order(order)
    stranger = Signer.generate()
    with pytest.raises(ProtocolError, match="another gateway"):
        await link.check_order(_order(stranger, market.host_signer, grant.allowance))
    with pytest.raises(ProtocolError, match="no allowance"):
        await link.check_order(_order(market.gateway, market.host_signer, b""))
    link.clock = lambda: allowance.expires_at + 3600
    with pytest.raises(ProtocolError, match="expired"):
        await link.check_order(order)

    for _ in range(3):
        gw.record(market.receipt())
    assert gw.status()["allowance_remaining_micro"] == 1_000_000 - 3000
    assert await gw.flush() == 3
    assert len(gw.queue) == 0 and _host_earned(market) == 2700
    assert (await link.earnings())["amount_micro"] == 2700
    await link.aclose()

    with pytest.raises(SettlementRefused) as e:
        gw.authorize("wrong key", "ref-tiny")
    assert e.value.status == 401


async def test_the_allowance_refuses_models_switched_off_or_under_a_licence_not_accepted(served, tmp_path, nursery):
    market, url, _ = served
    link = await _register(market, url)
    hub = market.hub
    hub.db.write_sync(catalogue.upsert, catalogue.Model(
        "ref-tiny", "Reference tiny", "Tiny Licence", "https://example.com/tiny", 2048, True, 0.0, licence_ack=True))
    hub.db.write_sync(catalogue.upsert, catalogue.Model("old", "Old", "", "", None, False, 0.0))
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "m.db", clock=market.clock)
    await nursery.start(gw.run)
    with pytest.raises(SettlementRefused) as e:
        gw.authorize(market.client_key, "ref-tiny")
    assert (e.value.status, e.value.code) == (403, "licence_not_accepted")
    assert "Tiny Licence (https://example.com/tiny)" in e.value.message and f"{url}/models" in e.value.message
    with pytest.raises(SettlementRefused) as e:
        gw.authorize(market.client_key, "old")
    assert (e.value.status, e.value.code) == (403, "model_unavailable") and "'old' is unavailable" in e.value.message
    grant = gw.authorize(market.client_key, "uncatalogued-model")  # the catalogue is no whitelist
    # A host refuses an order for a refused model even from a gateway that skipped the check.
    with pytest.raises(ProtocolError, match="refuses model 'ref-tiny'"):
        await link.check_order(_order(market.gateway, market.host_signer, grant.allowance))

    # Accepting binds from the next allowance, which a refusal asks for at once: retrying gets through.
    await hub.accept_licence(market.client, "ref-tiny")
    with trio.fail_after(10):
        while True:
            try:
                grant = gw.authorize(market.client_key, "ref-tiny")
                break
            except SettlementRefused:
                await trio.sleep(0.01)
    await link.check_order(_order(market.gateway, market.host_signer, grant.allowance))
    # A new licence must be accepted again.
    hub.db.write_sync(catalogue.upsert, catalogue.Model(
        "ref-tiny", "Reference tiny", "Tiny Licence v2", "https://example.com/tiny", 2048, True, 0.0, licence_ack=True))
    await gw.renew()
    with pytest.raises(SettlementRefused, match="Tiny Licence v2"):
        gw.authorize(market.client_key, "ref-tiny")
    await link.aclose()


async def test_refusals_from_local_state(served, tmp_path, nursery):
    market, url, _ = served
    # a key with no credit: the hub says 402, the gateway then answers 402 without asking again
    broke = HubSettlement(url, market.host_key, Signer.generate().peer_id, tmp_path / "a.db", clock=market.clock)
    await nursery.start(broke.run)
    with pytest.raises(SettlementRefused) as e:
        broke.authorize(market.host_key, "ref-tiny")
    assert (e.value.status, e.value.code) == (402, "insufficient_quota")

    # a revoked key: 401 from the next renewal on
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "b.db", budget_micro=2000, clock=market.clock)
    await nursery.start(gw.run)
    grant = gw.authorize(market.client_key, "ref-tiny")
    gw.record(market.receipt(tokens_in=500, tokens_out=0))  # 1000 of 2000 spent
    gw.reserve(grant, 600)
    with pytest.raises(SettlementRefused) as e:
        gw.reserve(grant, 600)  # 600 of the 1000 left is held by a request in flight
    # The account has more credit than this allowance holds: retry, a larger one is asked for.
    assert (e.value.status, e.value.code) == (503, "allowance_renewing")
    with trio.fail_after(10):
        while gw.available_micro() < 600:
            await trio.sleep(0.01)
    assert gw.available_micro() == 2 * (600 + 600 + 1000) - 1000 - 600
    gw.release(grant, 600)
    market.hub.db.write_sync(keys.revoke_key, market.client_key)
    with pytest.raises(HubRefused):
        await gw.renew()
    with pytest.raises(SettlementRefused) as e:
        gw.authorize(market.client_key, "ref-tiny")
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")


async def test_reservations_never_promise_more_than_the_balance(served, tmp_path, nursery):
    market, url, _ = served
    _, key = market.hub.db.write_sync(keys.add_user, "small@example.com", "client")
    market.hub.grant_sync("small@example.com", 500, "small")
    gw = HubSettlement(url, key, Signer.generate().peer_id, tmp_path / "s.db", clock=market.clock)
    await nursery.start(gw.run)
    grant = gw.authorize(key, "ref-tiny")
    for _ in range(4):
        gw.reserve(grant, 120)  # 480 of 500 held by requests in flight
    assert gw.available_micro() == 20
    with pytest.raises(SettlementRefused) as e:
        gw.reserve(grant, 120)  # the allowance holds the whole balance: a real 402, before any host works
    assert (e.value.status, e.value.code) == (402, "insufficient_quota")
    gw.release(grant, 120)
    gw.reserve(grant, 120)


async def test_hub_down_then_gateway_killed_then_restarted(served, tmp_path):
    market, url, _ = served
    await _register(market, url)
    queue = tmp_path / "receipts.db"
    # an allowance fetched while the hub was up, then the hub goes away
    clock = Clock(market.clock.now)
    hub_link = FlakyHub()
    first = HubSettlement(url, market.client_key, market.gateway.peer_id, queue, clock=clock, transport=hub_link)
    allowance = await first.renew()
    hub_link.down = True
    receipts = [market.receipt() for _ in range(5)]
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        first.authorize(market.client_key, "ref-tiny")  # still serving inside the allowance
        for r in receipts:
            first.record(r)
        with pytest.raises(HubUnavailable):
            await first.flush()
        clock.now = allowance.expires_at + 1
        with pytest.raises(SettlementRefused) as e:
            first.authorize(market.client_key, "ref-tiny")
        assert e.value.status == 503
        nursery.cancel_scope.cancel()  # the gateway is killed with 5 receipts queued
    assert _host_earned(market) == 0

    second = HubSettlement(url, market.client_key, market.gateway.peer_id, queue, clock=market.clock)
    assert len(second.queue) == 5
    assert await second.flush() == 5
    assert await second.flush() == 0
    assert _host_earned(market) == 5 * 900
    await second.aclose()


async def test_answer_lost_mid_batch_is_redelivered_once(served, tmp_path):
    market, url, _ = served
    await _register(market, url)
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "q.db",
                       batch_size=2, transport=FlakyHub(lose_answers=1), clock=market.clock)
    await gw.renew()
    for _ in range(5):
        gw.record(market.receipt())
    with pytest.raises(HubUnavailable):
        await gw.flush()  # the hub settled the first batch of 2, the answer never came
    assert len(gw.queue) == 5 and _host_earned(market) == 2 * 900
    assert await gw.flush() == 5
    assert len(gw.queue) == 0 and _host_earned(market) == 5 * 900
    assert market.hub.db.read_sync(ledger.verify).ok
    await gw.aclose()


async def test_refused_receipts_are_set_aside(served, tmp_path):
    market, url, _ = served
    await _register(market, url)
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "q.db", clock=market.clock)
    await gw.renew()
    good = market.receipt()
    forged = dataclasses.replace(market.receipt(), cost_micro=1)
    gw.record(good)
    gw.record(forged)
    assert await gw.flush() == 2
    assert len(gw.queue) == 0
    assert [rid for rid, _ in gw.queue.refused()] == [forged.request_id]
    assert _host_earned(market) == 900
    await gw.aclose()


async def test_revocation_reaches_the_gateway_at_once_and_served_work_still_pays(served, tmp_path, nursery):
    market, url, _ = served
    await _register(market, url)
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "q.db",
                       flush_interval_s=3600, clock=market.clock)
    await nursery.start(gw.run)
    gw.authorize(market.client_key, "ref-tiny")
    served_before = [market.receipt() for _ in range(3)]
    for r in served_before:
        gw.record(r)  # served, countersigned, not delivered yet

    # Revoked the way `gpunexus hub key revoke` does it: a write to the database by another process.
    market.hub.db.write_sync(keys.revoke_key, market.client_key)
    with trio.fail_after(10):  # the long poll hears of it; no renewal needed
        while True:
            try:
                gw.authorize(market.client_key, "ref-tiny")
            except SettlementRefused as refused:
                assert (refused.status, refused.code) == (401, "invalid_api_key")
                break
            await trio.sleep(0.01)
    assert gw._budget is not None and market.clock() < gw._budget.allowance.expires_at  # the allowance itself still ran

    # What was served under the allowance before the revocation still settles and pays its host
    # (delivered by the background already, or by this flush).
    await gw.flush()
    assert len(gw.queue) == 0 and not gw.queue.refused()
    assert _host_earned(market) == 3 * 900
    assert market.hub.db.read_sync(ledger.verify).ok


async def test_receipts_go_out_as_soon_as_the_hub_is_back(served, tmp_path, nursery):
    market, url, _ = served
    await _register(market, url)
    hub_link = FlakyHub()
    gw = HubSettlement(url, market.client_key, market.gateway.peer_id, tmp_path / "q.db",
                       flush_interval_s=0.05, clock=market.clock, transport=hub_link)
    await nursery.start(gw.run)
    hub_link.down = True
    for _ in range(4):
        gw.record(market.receipt())
    with trio.fail_after(10):  # several failed deliveries: the back-off has grown
        while hub_link.failures < 6:
            await trio.sleep(0.01)
    hub_link.down = False
    with trio.fail_after(10):
        while len(gw.queue):
            await trio.sleep(0.01)
    assert _host_earned(market) == 4 * 900
