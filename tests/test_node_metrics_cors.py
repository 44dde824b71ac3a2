"""The gateway's /metrics (Prometheus text) after real traffic, and CORS: off by default, on per origin."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from peers import running_gateway, running_host, wait_for_offers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HI = [{"role": "user", "content": "Hi"}]
APP = "http://app.example"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_requests_tokens_latencies_errors_and_hosts():
    async with running_host() as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)

        def use():
            client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
            full = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0.0)
            streamed = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0.0, stream=True))
            client.embeddings.create(model="tiny", input="x")
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="missing", messages=HI)
            return full, streamed

        full, _ = await trio.to_thread.run_sync(use)
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(gateway.base_url.removesuffix("/v1") + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert m[("gpunexus_gateway_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 2
    assert m[("gpunexus_gateway_requests_total", (("route", "/v1/chat/completions"), ("status", "404")))] == 1
    assert m[("gpunexus_gateway_requests_total", (("route", "/v1/embeddings"), ("status", "200")))] == 1
    assert m[("gpunexus_gateway_errors_total", (("code", "model_not_found"),))] == 1
    assert m[("gpunexus_gateway_tokens_total", (("kind", "completion"), ("model", "tiny")))] == 2 * full.usage.completion_tokens
    assert m[("gpunexus_gateway_tokens_total", (("kind", "prompt"), ("model", "tiny")))] > 2 * full.usage.prompt_tokens
    assert m[("gpunexus_gateway_time_to_first_token_seconds_count", (("model", "tiny"),))] == 2
    assert m[("gpunexus_gateway_inter_token_seconds_count", (("model", "tiny"),))] >= 1
    assert m[("gpunexus_gateway_hosts", (("model", "tiny"),))] == 1


def _preflight(origin: str) -> dict:
    return {"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}


async def test_cors_is_off_by_default_and_on_for_the_configured_origin():
    async with running_host() as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as closed, \
                running_gateway([host.node.listen_addrs()[0]], cors_origins=(APP,)) as opened:
            await wait_for_offers(closed)
            await wait_for_offers(opened)
            body = {"model": "tiny", "messages": HI, "max_tokens": 2}
            async with httpx.AsyncClient(timeout=20) as http:
                r = await http.post(f"{closed.base_url}/chat/completions", json=body, headers={"origin": APP})
                assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
                r = await http.options(f"{closed.base_url}/chat/completions", headers=_preflight(APP))
                assert r.status_code == 405 and "access-control-allow-origin" not in r.headers

                r = await http.options(f"{opened.base_url}/chat/completions", headers=_preflight(APP))
                assert r.status_code == 204 and r.headers["access-control-allow-origin"] == APP
                assert "POST" in r.headers["access-control-allow-methods"]
                assert r.headers["access-control-allow-headers"] == "authorization, content-type"
                for path in ("/chat/completions", "/models"):
                    r = await (http.post(f"{opened.base_url}{path}", json=body, headers={"origin": APP}) if path != "/models"
                               else http.get(f"{opened.base_url}{path}", headers={"origin": APP}))
                    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
                r = await http.get(f"{opened.base_url}/models", headers={"origin": "http://evil.example"})
                assert "access-control-allow-origin" not in r.headers


async def test_host_metrics_count_orders_tokens_and_billing_per_model_and_health_follows_disable():
    async with running_host(metrics=("127.0.0.1", 0), price=300_000) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)

        def use():
            client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
            return [client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, seed=i) for i in range(3)]

        answers = await trio.to_thread.run_sync(use)
        async with httpx.AsyncClient(base_url=host.metrics_url, timeout=10) as http:
            r = await http.get("/metrics")
            healthy = await http.get("/health")
            await host.service.disable()
            drained = await http.get("/health")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert m[("gpunexus_host_requests_total", (("model", "tiny"), ("outcome", "served")))] == 3
    assert m[("gpunexus_host_tokens_total", (("model", "tiny"),))] == sum(a.usage.completion_tokens for a in answers)
    assert m[("gpunexus_host_billed_micro_usd_total", (("model", "tiny"),))] == sum(r.cost_micro for r in gateway.service.stats.receipts)
    assert m[("gpunexus_host_price_micro_usd_per_mtok", (("model", "tiny"),))] == 300_000
    assert m[("gpunexus_host_in_flight", (("model", "tiny"),))] == 0 and m[("gpunexus_host_enabled", (("model", "tiny"),))] == 1
    assert healthy.status_code == 200 and healthy.json()["taking_orders"] is True
    assert drained.status_code == 503 and drained.json()["taking_orders"] is False
