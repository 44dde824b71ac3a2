"""Offer topics per model and shard: the plan, the hub's directory and catch-up, real peers following their shards."""

from __future__ import annotations

import httpx
import pytest
import trio

from gpunexus.hub.config import HubConfig
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.node.runtime import HubLogin, ModelOptions
from gpunexus.protocol.discovery import (
    FAST_REFRESH_S,
    SLOW_REFRESH_S,
    SMALL,
    DiscoveryPlan,
    offer_topic,
    parse_offer_topic,
    shard_of,
)
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.signing import Signer
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

def nano() -> ModelOptions:
    return ModelOptions(ReferenceBackend("nano"), price_micro_per_mtok=300_000, max_slots=1, tokens_per_s=50.0)


CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 7}


# --- the plan every peer computes alike ---------------------------------------------------

@pytest.mark.parametrize(("hosts", "shards", "refresh"), [
    (0, 1, FAST_REFRESH_S), (1, 1, FAST_REFRESH_S), (8, 1, FAST_REFRESH_S), (9, 1, SLOW_REFRESH_S),
    (32, 1, SLOW_REFRESH_S), (33, 2, SLOW_REFRESH_S), (64, 2, SLOW_REFRESH_S), (65, 4, SLOW_REFRESH_S),
    (1_928, 64, SLOW_REFRESH_S), (10**9, 1024, SLOW_REFRESH_S),
])
def test_the_plan_follows_the_host_count(hosts, shards, refresh):
    plan = DiscoveryPlan.for_hosts(hosts)
    assert (plan.shards, plan.refresh_s) == (shards, refresh)
    plan.check()
    assert plan.ttl_s == (10.0 if refresh == FAST_REFRESH_S else 360.0)


def test_a_split_moves_a_host_nowhere_or_to_the_new_half():
    for _ in range(200):
        peer = Signer.generate().peer_id
        before, after = shard_of(peer, 4), shard_of(peer, 8)
        assert after in (before, before + 4)


def test_topics_name_the_model_and_shard_and_parse_back():
    assert offer_topic("org/model-7b", 3) == "gpunexus/offers/2/org/model-7b/3"
    assert parse_offer_topic(offer_topic("org/model-7b", 3)) == ("org/model-7b", 3)
    for other in ("gpunexus/prices/1", "gpunexus/offers/1", "gpunexus/offers/2/tiny", "gpunexus/offers/2//0",
                  "gpunexus/offers/2/tiny/x"):
        assert parse_offer_topic(other) is None


@pytest.mark.parametrize("plan", [DiscoveryPlan(3), DiscoveryPlan(0), DiscoveryPlan(2048), DiscoveryPlan(1, 0.5)])
def test_a_bad_plan_is_refused(plan):
    with pytest.raises(ProtocolError):
        plan.check()


# --- the hub: directory and one shard's offers ----------------------------------------------

async def test_the_hub_lists_models_and_serves_one_shards_offers_for_catch_up(tmp_path):
    async with running_hub(tmp_path / "hub", HubConfig()) as hub:
        key = hub.add_user("host@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, key), models=[nano()]) as host:
            peer = host.node.peer_id
            async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
                with trio.fail_after(20):
                    while len((await http.get("/v1/directory")).json()["models"]) < 2:
                        await trio.sleep(0.1)
                directory = (await http.get("/v1/directory")).json()
                assert directory["hub_id"] == hub.hub.hub_id
                assert directory["models"] == [
                    {"model": "nano", "hosts": 1, "shards": 1, "refresh_s": SMALL.refresh_s},
                    {"model": "tiny", "hosts": 1, "shards": 1, "refresh_s": SMALL.refresh_s},
                ]
                one = (await http.get("/v1/offers", params={"model": "tiny"})).json()
                assert (one["model"], one["shard"], one["shards"], len(one["offers"])) == ("tiny", 0, 1, 1), one
                mine = shard_of(peer, 4)
                for shard in range(4):
                    got = (await http.get("/v1/offers", params={"model": "tiny", "shard": shard, "shards": 4})).json()
                    assert len(got["offers"]) == (1 if shard == mine else 0)
                assert (await http.get("/v1/offers", params={"model": "huge"})).json()["offers"] == []
                for bad in ({}, {"model": "tiny", "shards": 3}, {"model": "tiny", "shard": 4, "shards": 4},
                            {"model": "tiny", "shard": "x"}, {"model": "m" * 300}):
                    r = await http.get("/v1/offers", params=bad)
                    assert r.status_code == 400, bad
                    assert r.json()["error"]["code"] == "invalid_request_error"
                # A host that withdraws leaves the directory and the catch-up lists at once, not when its offers expire.
                await host.service.disable()
                assert (await http.get("/v1/offers", params={"model": "tiny"})).json()["offers"] == []
                assert (await http.get("/v1/directory")).json()["models"] == []
                await host.service.enable()  # the same terms again: written, though the hub saw them before
                with trio.fail_after(20):
                    while len((await http.get("/v1/offers", params={"model": "tiny"})).json()["offers"]) != 1:
                        await trio.sleep(0.1)


# --- real peers -------------------------------------------------------------------------------

async def test_a_gateway_that_follows_only_what_it_uses_joins_on_first_request_and_catches_up(tmp_path):
    """No offer reaches it by gossip before it asks: the heartbeat is off, so only the hub's catch-up can fill its book."""
    async with running_hub(tmp_path / "hub", HubConfig()) as hub:
        host_key = hub.add_user("host@example.com", "host")
        client_key = hub.add_user("dev@example.com", "client", 5_000_000)
        async with running_host(hub=HubLogin(hub.url, host_key), models=[nano()]) as host:
            async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
                with trio.fail_after(20):
                    while len((await http.get("/v1/directory")).json()["models"]) < 2:
                        await trio.sleep(0.1)
            host.service.announcer.active = False  # no more heartbeats: the offers the hub holds stay live 10 s
            config = GatewayConfig(first_token_timeout=5.0, follow_known=False)
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, client_key),
                                       home=tmp_path / "gw", config=config) as gateway:
                assert gateway.service.topics.following == set() and not gateway.book.live()
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30,
                                             headers={"authorization": f"Bearer {client_key}"}) as client:
                    listed = {m["id"]: m["hosts"] for m in (await client.get("/models")).json()["data"]}
                    assert listed == {"nano": 1, "tiny": 1}  # from the hub's directory, followed or not
                    r = await client.post("/chat/completions", json={"model": "nano", **CHAT})
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
                    assert gateway.service.topics.following == {"nano"}
                    assert [o.model for o in gateway.book.live()] == ["nano"]
                    # A name the network does not have is refused without joining a topic for it.
                    r = await client.post("/chat/completions", json={"model": "no-such-model", **CHAT})
                    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
                    assert gateway.service.topics.following == {"nano"}
                    subscribed = set(gateway.node.pubsub.topic_ids)
                    assert offer_topic("nano") in subscribed and offer_topic("tiny") not in subscribed


def _ids_in_shards(shards: int, wanted: dict[int, int]) -> dict[int, list[Signer]]:
    found: dict[int, list[Signer]] = {s: [] for s in wanted}
    while any(len(found[s]) < n for s, n in wanted.items()):
        signer = Signer.generate()
        shard = shard_of(signer.peer_id, shards)
        if shard in found and len(found[shard]) < wanted[shard]:
            found[shard].append(signer)
    return found


def _plant(home, role: str, signer: Signer):
    path = home / "node" / role
    path.mkdir(parents=True)
    (path / "identity.key").write_bytes(signer.seed)
    return home


async def test_when_a_model_splits_into_shards_every_peer_moves_and_a_gateway_sees_only_its_shard(tmp_path):
    ids = _ids_in_shards(2, {0: 3, 1: 2})
    homes = [_plant(tmp_path / f"h{i}", "host", s) for i, s in enumerate(ids[0][:2] + ids[1])]
    gateway_home = _plant(tmp_path / "gw", "gateway", ids[0][2])
    async with running_host(home=homes[0]) as first:
        boot = [first.node.listen_addrs()[0]]
        async with running_host(home=homes[1], bootstrap=boot) as second, \
                running_host(home=homes[2], bootstrap=boot) as third, \
                running_host(home=homes[3], bootstrap=boot) as fourth, \
                running_gateway(boot, home=gateway_home) as gateway:
            hosts = [first, second, third, fourth]
            # The gateway reads as a light gossip member; hosts carry the topics at the full degree.
            assert (gateway.node.pubsub.router.degree, gateway.node.pubsub.router.degree_low) == (3, 2)
            assert first.node.pubsub.router.degree == 6
            await wait_for_offers(gateway, count=4)  # one shard: everyone sees everyone
            split = {"tiny": (40, DiscoveryPlan(2, FAST_REFRESH_S))}  # what the hub says past 32 hosts
            for peer in hosts:
                peer.service.directory.update(split)
            gateway.service.topics.directory.update(split)
            shard0 = {first.node.peer_id, second.node.peer_id}
            # The moved hosts' last offers expire from the gateway's book; fresh ones come from its shard only.
            with trio.fail_after(30):
                while {o.peer_id for o in gateway.book.for_model("tiny")} != shard0:
                    await gateway.book.changed.wait()
            assert set(gateway.node.pubsub.topic_ids) >= {offer_topic("tiny", 0)}
            assert offer_topic("tiny", 1) not in gateway.node.pubsub.topic_ids
            for peer in (third, fourth):
                assert peer.service.announcer.topic("tiny") == offer_topic("tiny", 1)
                assert offer_topic("tiny", 1) in peer.node.pubsub.topic_ids
                assert offer_topic("tiny", 0) not in peer.node.pubsub.topic_ids
            # Hosts of the other shard see each other there.
            with trio.fail_after(30):
                while {o.peer_id for o in third.service.market.for_model("tiny")} != {third.node.peer_id, fourth.node.peer_id}:
                    await third.service.market.changed.wait()
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
                r = await client.post("/chat/completions", json={"model": "tiny", **CHAT})
                assert r.status_code == 200
            assert {o.peer_id for o in gateway.book.for_model("tiny")} == shard0
