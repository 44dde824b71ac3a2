"""A team's gateway: one gateway peer, every member paying with their own hub key (real hub, host, SDK)."""

from __future__ import annotations

import httpx
import openai
import pytest
import sqlalchemy as sa
import trio
from prometheus_client.parser import text_string_to_metric_families
from gpunexus.hub import keys
from gpunexus.hub.db import receipt_log
from gpunexus.node.runtime import HubLogin
from gpunexus.node.gateway.team import TeamSettlement
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers

USD = 1_000_000
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "team work"}], "max_tokens": 8}


def _billed(hub, email: str) -> tuple[int, int]:
    """(receipts, micro-USD) the hub's log charges to ``email``'s account."""
    def read(conn):
        user = keys.get_user(conn, email)
        q = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(receipt_log.c.cost), 0)).where(receipt_log.c.client_user_id == user.id)
        return tuple(int(x) for x in conn.execute(q).one())
    return hub.hub.db.read_sync(read)


async def test_each_member_pays_with_their_own_key_on_one_gateway(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        ana = hub.add_user("ana@team.example", "client", USD)
        ben = hub.add_user("ben@team.example", "client", USD)
        broke = hub.add_user("broke@team.example", "client")
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, ""), team=True, home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                team = gateway.service.settlement
                assert isinstance(team, TeamSettlement)

                def use():
                    out = {}
                    for name, key, count in (("ana", ana, 3), ("ben", ben, 2)):
                        sdk = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
                        out[name] = [sdk.chat.completions.create(**ASK) for _ in range(count - 1)]
                        out[name].append("".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**ASK, stream=True)))
                    for key, status in (("gnx_nobody_knows", 401), (broke, 402)):
                        with pytest.raises(openai.APIStatusError) as refused:
                            openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0).chat.completions.create(**ASK)
                        assert refused.value.status_code == status
                    return out

                answers = await trio.to_thread.run_sync(use)
                assert all(answers["ana"]) and all(answers["ben"])
                assert team.members == 3  # ana, ben, broke (a key the hub knows, without credit); not the unknown one
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                    anonymous = await http.post("/chat/completions", json=ASK)
                    scraped = (await http.get(gateway.base_url.removesuffix("/v1") + "/metrics")).text
                keys_shown = {s.labels["key"]: s.value for f in text_string_to_metric_families(scraped) for s in f.samples
                              if s.name == "gpunexus_gateway_allowance_micro_usd"}
                assert {ana.split("_")[1], ben.split("_")[1]} <= set(keys_shown) and keys_shown[ana.split("_")[1]] > 0
                assert anonymous.status_code == 401 and "your own hub API key" in anonymous.json()["error"]["message"]
                for member in team._members.values():
                    await member.flush()
                # Each member's requests were billed to that member's account alone.
                assert _billed(hub, "ana@team.example")[0] == 3 and _billed(hub, "ben@team.example")[0] == 2
                assert _billed(hub, "broke@team.example") == (0, 0)
                # Each member speaks through an identity of its own (the hub binds one account per gateway id).
                speakers = {r.gateway_id for r in gateway.service.stats.receipts}
                assert len(speakers) == 2 and gateway.node.peer_id not in speakers
                earned = (await host.hub.earnings())["requests"]
                assert earned == 5 == host.service.stats.served

                # Revoking ben's key stops ben's requests at once; ana's go on.
                assert hub.hub.db.write_sync(keys.revoke_key, ben.split("_")[1])
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                    with trio.fail_after(10):
                        while (r := await http.post("/chat/completions", json=ASK, headers={"authorization": f"Bearer {ben}"})).status_code == 200:
                            pass
                    assert r.status_code == 401
                    ok = await http.post("/chat/completions", json=ASK, headers={"authorization": f"Bearer {ana}"})
                    assert ok.status_code == 200


async def test_a_refused_key_is_remembered_and_not_asked_again(tmp_path):
    async with running_hub(tmp_path / "hub") as hub:
        host_key = hub.add_user("gpu@example.com", "host")
        async with running_host(hub=HubLogin(hub.url, host_key)) as host:
            async with running_gateway([host.node.listen_addrs()[0]], hub=HubLogin(hub.url, ""), team=True, home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway)
                asked = []
                team = gateway.service.settlement
                real_admit = team._admit

                async def counting_admit(bearer):
                    asked.append(bearer)
                    await real_admit(bearer)

                team._admit = counting_admit
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers={"authorization": "Bearer gnx_bad_key"}) as http:
                    codes = [(await http.post("/chat/completions", json=ASK)).status_code for _ in range(5)]
                assert codes == [401] * 5 and asked == ["gnx_bad_key"] and team.members == 0
