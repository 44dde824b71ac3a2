"""The gateway as the official openai SDK sees it: real host, real gateway, real SDK."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from peers import running_gateway, running_host, wait_for_offers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
async def market():
    async with running_host() as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            yield host, gateway


async def test_sync_sdk_non_stream_and_stream(market):
    host, gateway = market

    def use_sdk():
        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list()]
        full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, seed=7, temperature=0.8)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, seed=7, temperature=0.8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        return models, full, chunks

    models, full, chunks = await trio.to_thread.run_sync(use_sdk)
    assert models == ["tiny"]
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    # Same seed, same output, streamed or not: the seeded sampler is deterministic.
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1
    assert host.service.stats.served == 2


async def test_async_sdk_completions_and_max_tokens(market):
    host, gateway = market
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)

    def run_async_client():
        # The async SDK runs on asyncio; drive it on its own loop in a thread.
        import asyncio

        async def go():
            done = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0.0)
            stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go"}], max_completion_tokens=3, stream=True, temperature=0.0)
            pieces = [c async for c in stream]
            await client.close()
            return done, pieces

        return asyncio.run(go())

    done, pieces = await trio.to_thread.run_sync(run_async_client)
    assert done.object == "text_completion"
    assert done.usage.completion_tokens <= 5
    assert done.choices[0].finish_reason in ("stop", "length")
    finish = [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")


async def test_errors_in_openai_shape(market):
    _, gateway = market
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        r = await http.post("/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post("/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 17})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await http.post("/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await http.post("/chat/completions", content=b"x" * (3 * 1024 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "error" in r.json()
        r = await http.post("/chat/completions", content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
        r = await http.post("/completions", content=b'{"model": "tiny", "prompt": "x\\udc00"}')
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
        r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "tool", "content": "1", "tool_call_id": "a"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "capability_not_offered" and "tools" in r.json()["error"]["message"]
        r = await http.get(gateway.base_url.removesuffix("/v1") + "/health")
        assert r.status_code == 200 and r.json()["ok"] is True

    def sdk_error():
        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
        return info.value

    error = await trio.to_thread.run_sync(sdk_error)
    assert error.status_code == 404 and error.code == "model_not_found"


async def test_a_need_no_host_offers_is_a_400_naming_it():
    import dataclasses

    from gpunexus.protocol.messages import PLAIN_TEXT
    from peers import reference_backend

    backend = reference_backend()
    backend.info = dataclasses.replace(backend.info, capabilities=PLAIN_TEXT)
    async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)

        def use_sdk():
            client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
            errors = {}
            msgs = [{"role": "user", "content": "Hi"}]
            asks = {
                "tools": dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
                "logprobs": dict(logprobs=True),
                "n": dict(n=2),
                "response_format": dict(response_format={"type": "json_object"}),
                "logit_bias": dict(logit_bias={"65": 10}),
            }
            for name, ask in asks.items():
                with pytest.raises(openai.BadRequestError) as info:
                    client.chat.completions.create(model="tiny", messages=msgs, **ask)
                errors[name] = info.value
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="tiny", prompt="x", logprobs=1)
            errors["completion logprobs"] = info.value
            return errors, client.models.list().data

        errors, models = await trio.to_thread.run_sync(use_sdk)
    assert "No host offers tools for model 'tiny'" in errors["tools"].message
    for name, error in errors.items():
        assert error.code == "capability_not_offered", name
    assert errors["n"].param == "n" and "n=2" in errors["n"].message
    assert errors["response_format"].param == "response_format" and "json_mode" in errors["response_format"].message
    assert errors["completion logprobs"].param == "logprobs"
    caps = models[0].model_extra["capabilities"]
    assert caps["tools"] is False and caps["logprobs"] is False and caps["max_n"] == 1 and caps["max_context"] > 0
