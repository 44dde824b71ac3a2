"""The logprob path: ``--backend openai`` hosts verify each other through their upstreams' echo logprobs.

The upstreams are real local HTTP servers computing with the reference
model (tests/upstream.py); the cheat's upstream runs another weight
seed under the same model name, so its offers and receipts carry the same
model hash. The hub has no reference for an upstream model's hash, so every
audit goes to peer verifiers without any setting.
"""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from gpunexus.hub import honesty, ledger
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import audit_jobs
from gpunexus.node.backends.openai_upstream import OpenAIUpstreamBackend
from gpunexus.node.runtime import HubLogin
from upstream import running_upstream
from market import running_hub
from peers import running_gateway, running_host, wait_for_offers
from test_peer_verifiers_network import NEVER, PRICE, USD, _open_audits, _statuses, _work


async def _complete(http: httpx.AsyncClient, text: str) -> None:
    r = await http.post("/completions", json={"model": "tiny-up", "prompt": text, "max_tokens": 40,
                                              "temperature": 0.8, "seed": 11})
    assert r.status_code == 200, r.text


def _backend(url: str) -> OpenAIUpstreamBackend:
    return OpenAIUpstreamBackend(url, "tiny-up", upstream_model="tiny")


async def test_an_upstream_serving_another_model_fails_and_an_honest_one_passes_on_logprobs(tmp_path):
    config = HubConfig(reference_price_micro_per_mtok=10 * PRICE, audit_rate=1.0, known_answer_rate=0.0)
    async with (
        running_upstream() as (honest_url, honest_app),
        running_upstream(weight_seed=99) as (cheat_url, _),
        running_hub(tmp_path / "hub", config) as hub,
    ):
        client_key = hub.add_user("dev@example.com", "client", USD)
        keys = {name: hub.add_user(f"{name}@example.com", "host") for name in ("cheat", "gpu", "v1")}
        async with (
            running_host(_backend(cheat_url), hub=HubLogin(hub.url, keys["cheat"]), price=PRICE,
                         verify_poll_s=NEVER) as cheat,
            running_host(_backend(honest_url), hub=HubLogin(hub.url, keys["gpu"]), price=2 * PRICE,
                         verify_poll_s=NEVER) as host,
            running_host(_backend(honest_url), hub=HubLogin(hub.url, keys["v1"]), price=3 * PRICE,
                         verify_poll_s=NEVER) as v1,
        ):
            assert cheat.service.first.backend.info.model_hash == host.service.first.backend.info.model_hash
            boot = [h.node.listen_addrs()[0] for h in (cheat, host, v1)]
            async with running_gateway(boot, hub=HubLogin(hub.url, client_key), home=tmp_path / "gw") as gateway:
                await wait_for_offers(gateway, model="tiny-up", count=3)
                settlement = gateway.service.settlement
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60,
                                             headers={"authorization": f"Bearer {client_key}"}) as http:
                    for i in range(2):
                        await _complete(http, f"Once upon a time number {i}")
                    assert {r.host_id for r in gateway.service.stats.receipts} == {cheat.node.peer_id}
                    await _open_audits(gateway)
                    await _work(hub, [host, v1, cheat])
                    assert _statuses(hub) == {"failed": 2}
                    await settlement.refresh_reputation()
                    assert settlement.excluded_host(cheat.node.peer_id)
                    await _complete(http, "The honest host answers this")
                    assert gateway.service.stats.receipts[-1].host_id == host.node.peer_id
                    await _open_audits(gateway)
                    await _work(hub, [host, v1, cheat])
                    assert _statuses(hub) == {"failed": 2, "passed": 1}
                report = {h["peer_id"]: h for h in hub.hub.db.read_sync(honesty.host_report, 10)}
                reasons = [r for v in report[cheat.node.peer_id]["recent"] for r in v["reasons"]]
                assert reasons and all(": logprobs: " in r for r in reasons)
                jobs = hub.hub.db.read_sync(lambda c: c.execute(sa.select(audit_jobs.c.verifier_id)).scalars().all())
                assert cheat.node.peer_id not in jobs  # excluded by then, and never its own auditor
                assert honest_app.scored  # the verifiers really asked their upstream
                assert hub.hub.db.read_sync(ledger.verify).ok


async def test_the_logprob_path_scores_completions_only_and_names_what_it_cannot_do():
    import dataclasses

    import pytest

    from gpunexus.node.backends.base import BackendError
    from gpunexus.protocol.messages import ChatMessage
    from gpunexus.protocol.signing import Signer
    from gpunexus.verify.registry import load_reference
    from peer_jobs import generate_job

    hub = Signer.generate()
    job = generate_job(load_reference("tiny")[0], "Hello there", hub=hub, verifier=Signer.generate().peer_id)
    async with running_upstream() as (url, _):
        backend = _backend(url)
        report = await backend.prefill(job)
        assert (report.engine, report.seed_replayed, report.commitment) == ("openai", False, b"")
        assert report.prompt_tokens == job.tokens_in and len(report.logprobs) == job.tokens_out
        assert all(lp <= 0 for lp in report.logprobs) and all(0 <= r < 5 or r == 255 for r in report.ranks)
        chat = dataclasses.replace(job, opening=dataclasses.replace(job.opening, kind="chat",
                                                                    messages=(ChatMessage("user", "Hi"),)))
        with pytest.raises(BackendError, match="completions only"):
            await backend.prefill(chat)
        await backend.aclose()
    with pytest.raises(BackendError, match="unreachable"):
        await _backend("http://127.0.0.1:9/v1").prefill(job)
