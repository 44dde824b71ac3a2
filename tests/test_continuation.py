"""Failover continues from the delivered token ids: the client's text is exactly the uninterrupted text.

Re-tokenizing delivered text is not exact: a byte token that is not whole
UTF-8 alone is held back or shown as U+FFFD, and text cut inside a possible
stop string was never shown at all. These tests cut a generation at every
kind of point and check the two halves join into the uninterrupted stream,
token for token and character for character.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunexus.verify.generate import generate
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams
from peers import GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers

model, tok = load_reference()
PROMPT = tok.chat_prompt([{"role": "user", "content": "héllo ✓ tell me a story"}])


def _continued(params: SamplingParams, whole: list, cut: int) -> tuple[list[int], str]:
    """(ids, text) of the uninterrupted tokens ``whole`` cut after ``cut`` and continued from the delivered ids alone."""
    first = whole[:cut]
    ids = [t.token_id for t in first]
    rest = list(generate(model, tok, PROMPT + ids, dataclasses.replace(params, max_tokens=params.max_tokens - cut), cut))
    return ids + [t.token_id for t in rest], "".join(t.text for t in first + rest)


def _split_run(params: SamplingParams, cut: int) -> tuple[list, str, list[int], str]:
    """(uninterrupted tokens, its text, ids joined across the cut, text joined across the cut)."""
    whole = list(generate(model, tok, PROMPT, params))
    ids, joined = _continued(params, whole, cut)
    return whole, "".join(t.text for t in whole), ids, joined


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), cut=st.integers(1, 23), temperature=st.sampled_from([0.7, 1.0, 1.5]),
       stop=st.sampled_from([(), ("e",), ("th", "\n"), ("ab",)]))
def test_continuing_from_ids_is_exact_at_any_cut(seed: int, cut: int, temperature: float, stop: tuple[str, ...]) -> None:
    params = SamplingParams(temperature=temperature, max_tokens=24, seed=seed, stop=stop)
    whole, text, ids, joined = _split_run(params, cut)
    if len(whole) <= cut:  # finished before the cut: nothing to continue
        return
    assert ids == [t.token_id for t in whole]
    assert joined == text


def test_the_cuts_that_re_tokenizing_got_wrong_are_exact() -> None:
    """High temperature over a byte vocabulary: outputs full of partial UTF-8, cut inside characters."""
    partial = 0
    for seed in range(12):
        params = SamplingParams(temperature=1.6, max_tokens=32, seed=seed)
        whole = list(generate(model, tok, PROMPT, params))  # once a seed: each cut continues the same text
        text = "".join(t.text for t in whole)
        for cut in range(1, len(whole)):
            shown = "".join(t.text for t in whole[:cut])
            ids = [t.token_id for t in whole[:cut]]
            partial += tok.decode(ids) != shown  # the delivered ids do not round-trip through the text
            _, joined = _continued(params, whole, cut)
            assert joined == text, (seed, cut)
    assert partial > 0  # the property is exercised where text alone would lose information


async def _stream(http: httpx.AsyncClient, body: dict) -> str:
    parts = []
    async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event.get("choices"):
                    parts.append(event["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


def _seed_and_cut_inside_a_character(max_tokens: int) -> tuple[int, int]:
    """A seed and a cut after which the delivered tokens end inside a character (held back, not shown)."""
    prompt = tok.chat_prompt([{"role": "user", "content": "Tell me a story"}])
    for seed in range(500):
        whole = list(generate(model, tok, prompt, SamplingParams(temperature=1.6, max_tokens=max_tokens, seed=seed)))
        for cut in range(2, len(whole) - 4):
            if tok.decode(t.token_id for t in whole[:cut]) != "".join(t.text for t in whole[:cut]):
                return seed, cut
    raise AssertionError("no seed cuts a character")


async def test_failover_through_real_peers_gives_the_uninterrupted_text():
    seed, cut = _seed_and_cut_inside_a_character(30)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 30,
            "temperature": 1.6, "seed": seed}
    dying = GatedBackend(reference_backend(), pause_after=cut)
    healthy = GatedBackend(reference_backend())
    async with running_host(healthy, price=300_000) as backup:
        async with running_gateway([backup.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                uninterrupted = await _stream(http, body)
                async with trio.open_nursery() as nursery:
                    cheap_scope = trio.CancelScope()

                    async def run_cheap_host(task_status=trio.TASK_STATUS_IGNORED):
                        with cheap_scope:
                            async with running_host(dying, price=100_000, bootstrap=[backup.node.listen_addrs()[0]]):
                                task_status.started()
                                await trio.sleep_forever()

                    await nursery.start(run_cheap_host)
                    await wait_for_offers(gateway, count=2)
                    result = {}

                    async def client():
                        result["text"] = await _stream(http, body)

                    async with trio.open_nursery() as clients:
                        clients.start_soon(client)
                        await dying.paused.wait()
                        cheap_scope.cancel()  # the cheap host dies inside a character
        assert gateway.service.stats.failovers == 1
        continued = healthy.requests[-1]
        # Whatever reached the gateway before the kill (the last chunk may still have been in flight) is continued by id.
        assert 0 < len(continued.continuation_ids) <= cut
        assert result["text"] == uninterrupted
