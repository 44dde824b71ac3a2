"""What the reference backend offers, through a real gateway and host, as the openai SDK sees it.

logprobs and top_logprobs (compared with the reference model's own values),
n choices, penalties and logit bias, JSON mode, embeddings; routing to the
host that offers what a request needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import openai
import pytest
import trio
from gpunexus.protocol.messages import PLAIN_TEXT
from gpunexus.verify.embedding import embed
from gpunexus.verify.generate import generate
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams, top_logprobs
from peers import reference_backend, running_gateway, running_host, wait_for_offers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
model, tok = load_reference()
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def market():
    async with running_host() as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            yield host, gateway


def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)


def reference_tokens(prompt_ids: list[int], **params):
    return list(generate(model, tok, prompt_ids, SamplingParams(**params)))


async def test_chat_logprobs_are_the_reference_models_streamed_or_not(market):
    _, gateway = market
    ask = dict(model="tiny", messages=HI, max_tokens=12, seed=7, temperature=0.8, logprobs=True, top_logprobs=3)

    def use():
        client = sdk(gateway)
        return client.chat.completions.create(**ask), list(client.chat.completions.create(**ask, stream=True))

    full, chunks = await trio.to_thread.run_sync(use)
    expected = reference_tokens(tok.chat_prompt(HI), temperature=0.8, max_tokens=12, seed=7)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == len(expected)
    for item, ref in zip(content, expected):
        assert item.bytes == ([ref.token_id] if ref.token_id < 256 else [])
        assert item.logprob == pytest.approx(ref.logprob, abs=1e-6)
        alternatives = top_logprobs(ref.logits, 3)
        assert [t.bytes for t in item.top_logprobs] == [[t] if t < 256 else [] for t, _ in alternatives]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([lp for _, lp in alternatives], abs=1e-6)
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]


async def test_completion_logprobs_in_the_legacy_shape(market):
    _, gateway = market

    def use():
        client = sdk(gateway)
        done = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0.0, logprobs=2)
        parts = list(client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0.0, logprobs=2, stream=True))
        return done, parts

    done, parts = await trio.to_thread.run_sync(use)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == done.usage.completion_tokens
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob)  # greedy: the token is the likeliest
    streamed = [t for p in parts if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


async def test_n_choices_are_independent_seeded_and_the_first_is_n1(market):
    _, gateway = market

    def use():
        client = sdk(gateway)
        one = client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, seed=3, temperature=1.0)
        three = client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, seed=3, temperature=1.0, n=3)
        stream = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, seed=3, temperature=1.0, n=3,
                                                     stream=True, stream_options={"include_usage": True}))
        return one, three, stream

    one, three, stream = await trio.to_thread.run_sync(use)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts[0] == one.choices[0].message.content and len(set(texts)) == 3
    streamed = ["", "", ""]
    finishes = {}
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert streamed == texts and set(finishes) == {0, 1, 2}
    assert stream[-1].usage.completion_tokens == three.usage.completion_tokens
    assert three.usage.prompt_tokens == 3 * one.usage.prompt_tokens  # each choice is its own order, billed its prompt


async def test_completions_batch_prompts_and_echo_them(market):
    _, gateway = market
    kw = dict(model="tiny", max_tokens=8, seed=11, temperature=1.0)

    def use():
        client = sdk(gateway)
        hi, bye = (client.completions.create(prompt=p, **kw) for p in ("Hi", "Bye"))
        batch = client.completions.create(prompt=["Hi", "Bye"], n=2, **kw)
        echoed = client.completions.create(prompt="Hi", echo=True, **kw)
        stream = list(client.completions.create(prompt=["Hi", "Bye"], echo=True, stream=True, **kw))
        return hi, bye, batch, echoed, stream

    hi, bye, batch, echoed, stream = await trio.to_thread.run_sync(use)
    # Choice i*n + j is prompt i's j-th; each prompt's first choice is the one-prompt request with the same seed.
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == hi.choices[0].text and batch.choices[2].text == bye.choices[0].text
    assert batch.choices[1].text != batch.choices[0].text
    assert batch.usage.prompt_tokens == 2 * (hi.usage.prompt_tokens + bye.usage.prompt_tokens)
    assert echoed.choices[0].text == "Hi" + hi.choices[0].text
    assert echoed.usage.completion_tokens == hi.usage.completion_tokens  # the echo is not billed as output
    streamed = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == ["Hi" + hi.choices[0].text, "Bye" + bye.choices[0].text]


async def test_token_id_prompts_are_the_same_request_as_their_text_on_a_byte_level_model(market):
    _, gateway = market
    kw = dict(model="tiny", max_tokens=8, seed=12, temperature=1.0)

    def use():
        client = sdk(gateway)
        text = client.completions.create(prompt=["Hi", "Bye"], **kw)
        ids = client.completions.create(prompt=[list(b"Hi"), list(b"Bye")], **kw)
        with pytest.raises(openai.BadRequestError) as special:
            client.completions.create(prompt=[256, 72], **kw)
        return text, ids, special.value

    text, ids, special = await trio.to_thread.run_sync(use)
    assert [c.text for c in ids.choices] == [c.text for c in text.choices]
    assert special.param == "prompt" and "special tokens" in special.message


async def test_penalties_and_logit_bias_reach_the_sampler(market):
    _, gateway = market

    def use():
        client = sdk(gateway)
        base = dict(model="tiny", messages=HI, max_tokens=20, temperature=0.0)
        return (client.chat.completions.create(**base), client.chat.completions.create(**base, logit_bias={str(ord("z")): 100}),
                client.chat.completions.create(**base, frequency_penalty=2.0, presence_penalty=1.0))

    plain, biased, penalised = await trio.to_thread.run_sync(use)
    assert biased.choices[0].message.content == "z" * 20
    expected = reference_tokens(tok.chat_prompt(HI), temperature=0.0, max_tokens=20, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised.choices[0].message.content == "".join(t.text for t in expected) != plain.choices[0].message.content


async def test_json_mode_output_parses_through_the_network(market):
    host, gateway = market

    def use():
        client = sdk(gateway)
        out = []
        for seed in range(6):
            ask = dict(model="tiny", messages=HI, max_tokens=(4, 30, 80)[seed % 3], seed=seed, response_format={"type": "json_object"})
            if seed % 2:
                out.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True) if c.choices))
            else:
                out.append(client.chat.completions.create(**ask).choices[0].message.content)
        return out

    for text in await trio.to_thread.run_sync(use):
        assert isinstance(json.loads(text), dict), text
    assert host.service.stats.served == 6


async def test_embeddings_through_the_market_sync_and_async(market):
    host, gateway = market

    def use():
        client = sdk(gateway)
        floats = client.embeddings.create(model="tiny", input=["hello", "world"], encoding_format="float")
        default = client.embeddings.create(model="tiny", input="hello")  # the SDK asks for base64 and decodes it

        async def go():
            async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0) as aclient:
                return await aclient.embeddings.create(model="tiny", input=["world"])

        return floats, default, asyncio.run(go())

    floats, default, async_one = await trio.to_thread.run_sync(use)
    hello = embed(model, tok.completion_prompt("hello"))
    assert [d.index for d in floats.data] == [0, 1]
    assert np.allclose(floats.data[0].embedding, hello, atol=1e-6)
    assert np.allclose(default.data[0].embedding, hello, atol=1e-6)
    assert np.allclose(async_one.data[0].embedding, floats.data[1].embedding, atol=1e-6)
    assert floats.usage.prompt_tokens == len(tok.completion_prompt("hello")) + len(tok.completion_prompt("world"))
    # One receipt per input, countersigned: the host's counts matched what the gateway received.
    assert host.service.stats.served == 4 and gateway.service.stats.receipts_rejected == 0
    assert all(r.tokens_out == 0 for r in gateway.service.stats.receipts)


async def test_the_async_sdk_gets_logprobs_and_n(market):
    _, gateway = market

    def use():
        async def go():
            async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0) as client:
                full = await client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, n=2, logprobs=True, top_logprobs=1)
                stream = await client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, logprobs=True, stream=True)
                return full, [c async for c in stream]

        return asyncio.run(go())

    full, chunks = await trio.to_thread.run_sync(use)
    assert len(full.choices) == 2 and all(len(c.logprobs.content) > 0 for c in full.choices)
    assert any(c.choices and c.choices[0].logprobs for c in chunks)


async def test_requests_go_only_to_hosts_that_offer_what_they_need():
    plain = reference_backend()
    plain.info = dataclasses.replace(plain.info, capabilities=PLAIN_TEXT)
    async with running_host(plain, price=100_000) as cheap, running_host(price=900_000) as capable:
        async with running_gateway([cheap.node.listen_addrs()[0], capable.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, count=2)

            def use():
                client = sdk(gateway)
                for _ in range(3):
                    client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, logprobs=True)
                    client.embeddings.create(model="tiny", input="x")
                client.chat.completions.create(model="tiny", messages=HI, max_tokens=4)

            await trio.to_thread.run_sync(use)
    assert capable.service.stats.served == 6  # every logprobs and embeddings request, though dearer
    assert cheap.service.stats.served == 1  # the plain one: cheapest first
