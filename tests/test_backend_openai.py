"""The openai backend against a real OpenAI-compatible server: another gpunexus gateway."""

from __future__ import annotations

import httpx

from gpunexus.node.backends.openai_upstream import OpenAIUpstreamBackend
from peers import running_gateway, running_host, wait_for_offers


async def test_host_forwards_to_an_openai_compatible_upstream():
    async with running_host() as origin, running_gateway([origin.node.listen_addrs()[0]]) as upstream:
        await wait_for_offers(upstream)
        backend = OpenAIUpstreamBackend(upstream.base_url, "relayed", upstream_model="tiny", license="Apache-2.0")
        async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, model="relayed")
            body = {"model": "relayed", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "seed": 5, "temperature": 0.7}
            async with httpx.AsyncClient(timeout=30) as http:
                relayed = (await http.post(f"{gateway.base_url}/chat/completions", json=body)).json()
                direct = (await http.post(f"{upstream.base_url}/chat/completions", json={**body, "model": "tiny"})).json()
                models = (await http.get(f"{gateway.base_url}/models")).json()
            # Same seed through the extra hop: the very same text, counted the same.
            assert relayed["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
            assert relayed["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
            assert relayed["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
            assert models["data"][0]["license"] == "Apache-2.0"
            receipt = gateway.service.stats.receipts[-1]
            assert receipt.model_hash.startswith("upstream-") and receipt.tokens_out == relayed["usage"]["completion_tokens"]
        await backend.aclose()


async def test_unreachable_upstream_is_a_clean_503():
    backend = OpenAIUpstreamBackend("http://127.0.0.1:9/v1", "nowhere")
    async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway, model="nowhere")
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{gateway.base_url}/chat/completions", json={"model": "nowhere", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503
        assert "upstream unreachable" in r.json()["error"]["message"]
        assert host.service.stats.failed == 1
    await backend.aclose()
