"""Tools, JSON schemas and images through the market to an ``--backend openai`` host, as the openai SDK sees them.

The host forwards to a real OpenAI-compatible engine on loopback
(tests/upstream.py: the reference model behind the streaming API, with
forced tool choice by constrained decoding), and the same request sent to
that engine directly is the yardstick: what reaches the SDK through
gateway, libp2p and host must be what the engine streamed.
"""

from __future__ import annotations

import json

import openai
import pytest
import trio
from gpunexus.hub.honesty import opening_problem
from gpunexus.node.backends.openai_upstream import OpenAIUpstreamBackend, parse_supports
from gpunexus.node.gateway.settlement import FreeSettlement
from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import Opening
from peers import running_gateway, running_host, wait_for_offers
from upstream import running_upstream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
async def market():
    async with running_upstream() as (url, engine):
        backend = OpenAIUpstreamBackend(url, "engine", upstream_model="tiny", supports=parse_supports("tools,json_mode,json_schema,vision,logprobs"))
        async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, model="engine")
            yield engine, url, gateway
        await backend.aclose()


def _streamed_calls(stream) -> tuple[list[dict], str | None, object]:
    """Every tool-call delta item in arrival order, the finish reason and the usage of an SDK stream."""
    items, reason, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                items.append(call.model_dump(exclude_none=True))
            reason = choice.finish_reason or reason
    return items, reason, usage


async def test_streamed_tool_calls_arrive_as_the_engine_sent_them(market):
    engine, url, gateway = market
    body = dict(messages=ASK, tools=[WEATHER], tool_choice=FORCED, max_tokens=24, seed=7, temperature=0.8)

    def use():
        relayed = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        direct = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        via_market = _streamed_calls(relayed.chat.completions.create(model="engine", stream=True, stream_options={"include_usage": True}, **body))
        at_engine = _streamed_calls(direct.chat.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **body))
        whole = relayed.chat.completions.create(model="engine", **body)
        return via_market, at_engine, whole

    (items, reason, usage), (direct_items, _, direct_usage), whole = await trio.to_thread.run_sync(use)
    assert items == direct_items and len(items) > 2
    assert items[0]["id"].startswith("call_") and items[0]["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(i["function"].get("arguments", "") for i in items)
    assert isinstance(json.loads(arguments), dict)  # constrained decoding: always a JSON object
    assert reason == "tool_calls"
    assert usage.completion_tokens == direct_usage.completion_tokens and usage.prompt_tokens == direct_usage.prompt_tokens

    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert message.tool_calls[0].function.arguments == arguments and message.tool_calls[0].id == items[0]["id"]

    sent = engine.requests[-1]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == FORCED
    receipt = gateway.service.stats.receipts[-1]
    assert receipt.finish_reason == "tool_calls" and receipt.tokens_out == whole.usage.completion_tokens


class _Retaining(FreeSettlement):
    """A private swarm's settlement that keeps what a hub would audit (as HubSettlement.retain does)."""

    def __init__(self) -> None:
        super().__init__()
        self.openings = {}

    def retain(self, opening, grant=None) -> None:
        self.openings[opening.request_id] = opening


async def test_the_opening_of_a_tool_call_receipt_checks_out_for_an_audit():
    settlement = _Retaining()
    async with running_upstream() as (url, _):
        backend = OpenAIUpstreamBackend(url, "engine", upstream_model="tiny", supports=parse_supports("tools"))
        async with running_host(backend) as host, running_gateway([host.node.listen_addrs()[0]], settlement=settlement) as gateway:
            await wait_for_offers(gateway, model="engine")

            def use():
                sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
                return list(sdk.chat.completions.create(model="engine", messages=ASK, tools=[WEATHER], tool_choice=FORCED,
                                                        max_tokens=16, seed=9, stream=True))

            await trio.to_thread.run_sync(use)
            receipt = gateway.service.stats.receipts[-1]
        await backend.aclose()
    opening = decode_as(Opening, settlement.openings[receipt.request_id].encode())
    assert json.loads(opening.upstream)["tools"] == [WEATHER] and json.loads(opening.output_tool_calls)
    assert opening_problem(opening, receipt) == ""  # prompt and output hashes bind the tools and the calls


async def test_a_tool_result_conversation_reaches_the_engine_verbatim(market):
    engine, _, gateway = market
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C and rain"}]

    def use():
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        return sdk.chat.completions.create(model="engine", messages=turns, tools=[WEATHER], max_tokens=8, seed=1)

    answer = await trio.to_thread.run_sync(use)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    sent = engine.requests[-1]
    assert sent["messages"] == turns and sent["tools"] == [WEATHER] and "tool_choice" not in sent


async def test_json_schema_and_image_parts_reach_the_engine_verbatim(market):
    engine, _, gateway = market
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
    image = [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]

    def use():
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        return sdk.chat.completions.create(model="engine", messages=[{"role": "user", "content": image}], response_format=fmt, max_tokens=16, seed=3)

    answer = await trio.to_thread.run_sync(use)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    sent = engine.requests[-1]
    assert sent["response_format"] == fmt and sent["messages"] == [{"role": "user", "content": image}]


async def test_a_host_without_tools_is_never_sent_them():
    async with running_host() as plain, running_gateway([plain.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)

        def use():
            sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
            return refused.value

        error = await trio.to_thread.run_sync(use)
    assert error.code == "capability_not_offered" and "No host offers tools for model 'tiny'" in error.message
    assert plain.service.stats.served == 0


async def test_token_id_prompts_to_a_host_of_unknown_tokenizer_are_refused(market):
    _, _, gateway = market

    def use():
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.completions.create(model="engine", prompt=[72, 105], max_tokens=4)
        return refused.value

    error = await trio.to_thread.run_sync(use)
    assert error.param == "prompt" and "tokenizer this gateway knows" in error.message


async def test_the_engines_logprobs_reach_the_sdk_as_the_engine_sent_them(market):
    _, url, gateway = market
    body = dict(messages=ASK, max_tokens=10, seed=5, temperature=0.9, logprobs=True, top_logprobs=3)

    def use():
        relayed = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
        direct = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        streamed = [c for chunk in relayed.chat.completions.create(model="engine", stream=True, **body)
                    for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
        whole = relayed.chat.completions.create(model="engine", **body)
        at_engine = [c for chunk in direct.chat.completions.create(model="tiny", stream=True, **body)
                     for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
        return streamed, whole, at_engine

    streamed, whole, at_engine = await trio.to_thread.run_sync(use)
    assert len(at_engine) == whole.usage.completion_tokens > 0
    mine = [(c.bytes, round(c.logprob, 6), [(t.bytes, round(t.logprob, 6)) for t in c.top_logprobs]) for c in whole.choices[0].logprobs.content]
    theirs = [(c.bytes, round(c.logprob, 6), [(t.bytes, round(t.logprob, 6)) for t in c.top_logprobs]) for c in at_engine]
    assert mine == theirs and [c.bytes for c in streamed] == [c.bytes for c in at_engine]
    assert all(len(c.top_logprobs) == 3 for c in whole.choices[0].logprobs.content)

