"""What applications build on: langchain-openai and litellm against a gateway, plain text and tools.

Both speak to the gateway as to api.openai.com (a base URL and a key), so
they are run unchanged: chat invoked and streamed, embeddings, and, through
an ``--backend openai`` host in front of an engine with tool calling
(tests/upstream.py), langchain's bound tools.
"""

from __future__ import annotations

import os

import pytest
import trio
from gpunexus.node.backends.openai_upstream import OpenAIUpstreamBackend, parse_supports
from peers import running_gateway, running_host, wait_for_offers
from upstream import running_upstream

# litellm fetches a model price list from the internet at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def market():
    async with running_host() as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)
        yield gateway


async def test_langchain_chat_invoked_and_streamed(market):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    def use():
        chat = ChatOpenAI(base_url=market.base_url, api_key="unused", model="tiny", max_tokens=12, seed=4, temperature=0.9, max_retries=0)
        whole = chat.invoke("Hi")
        streamed = "".join(chunk.content for chunk in chat.stream("Hi"))
        vectors = OpenAIEmbeddings(base_url=market.base_url, api_key="unused", model="tiny", check_embedding_ctx_length=False).embed_documents(["a", "b"])
        return whole, streamed, vectors

    whole, streamed, vectors = await trio.to_thread.run_sync(use)
    assert whole.content and streamed == whole.content
    assert whole.usage_metadata["output_tokens"] > 0 and whole.response_metadata["finish_reason"] in ("stop", "length")
    assert len(vectors) == 2 and len(vectors[0]) > 0 and vectors[0] != vectors[1]


async def test_litellm_completion_streaming_and_embedding(market):
    import litellm

    kw = dict(model="openai/tiny", api_base=market.base_url, api_key="unused", max_tokens=12, seed=4, temperature=0.9)

    def use():
        whole = litellm.completion(messages=HI, **kw)
        streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=HI, stream=True, **kw))
        vectors = litellm.embedding(model="openai/tiny", api_base=market.base_url, api_key="unused", input=["a"])
        return whole, streamed, vectors

    whole, streamed, vectors = await trio.to_thread.run_sync(use)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0
    assert len(vectors.data[0]["embedding"]) > 0


async def test_langchain_bound_tools_through_an_upstream_host():
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "12 C"

    async with running_upstream() as (url, engine):
        backend = OpenAIUpstreamBackend(url, "engine", upstream_model="tiny", supports=parse_supports("tools"))
        async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, model="engine")

            def use():
                chat = ChatOpenAI(base_url=gateway.base_url, api_key="unused", model="engine", max_tokens=24, seed=2, max_retries=0)
                return chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Oslo?")

            answer = await trio.to_thread.run_sync(use)
        await backend.aclose()
    assert [c["name"] for c in answer.tool_calls] == ["get_weather"] and isinstance(answer.tool_calls[0]["args"], dict)
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert engine.requests[-1]["tools"][0]["function"]["name"] == "get_weather"
    assert engine.requests[-1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
