"""Failures are the gateway's problem: hosts that hang, refuse or die mid-stream."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import httpx
import trio

from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.node.net.offers import next_seq
from gpunexus.protocol.messages import Offer
from gpunexus.protocol.signing import Signer
from peers import GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 40, "temperature": 0.9, "seed": 3}


async def _stream_text(http: httpx.AsyncClient, body: dict) -> tuple[str, list[dict]]:
    events = []
    async with http.stream("POST", "/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
    return text, events


async def test_host_killed_mid_stream_client_sees_a_whole_stream():
    dying = GatedBackend(reference_backend(), pause_after=6)
    healthy = GatedBackend(reference_backend())
    async with running_host(healthy, price=300_000) as backup:
        async with trio.open_nursery() as nursery:
            cheap_scope = trio.CancelScope()

            async def run_cheap_host(task_status=trio.TASK_STATUS_IGNORED):
                with cheap_scope:
                    async with running_host(dying, price=100_000, bootstrap=[backup.node.listen_addrs()[0]]) as cheap:
                        task_status.started(cheap)
                        await trio.sleep_forever()

            cheap = await nursery.start(run_cheap_host)
            async with running_gateway([backup.node.listen_addrs()[0], cheap.node.listen_addrs()[0]]) as gateway:
                await wait_for_offers(gateway, count=2)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                    result = {}

                    async def client():
                        result["text"], result["events"] = await _stream_text(http, CHAT)

                    async with trio.open_nursery() as clients:
                        clients.start_soon(client)
                        await dying.paused.wait()
                        cheap_scope.cancel()  # the cheap host dies with 6 tokens delivered
                assert gateway.service.stats.failovers == 1
                # The backup continued from exactly what the client had already received.
                assert len(healthy.requests) == 1
                continued = healthy.requests[0]
                assert continued.continuation and result["text"].startswith(continued.continuation)
                # What the dead host delivered before dying (at most the 6 it produced) is not asked again.
                assert 0 < CHAT["max_tokens"] - continued.max_tokens <= 6
                usage = result["events"][-1]["usage"]
                assert usage["completion_tokens"] > 6
                finishes = [e["choices"][0]["finish_reason"] for e in result["events"] if e.get("choices") and e["choices"][0]["finish_reason"]]
                assert finishes in (["stop"], ["length"])
                # Only the backup's receipt is countersigned: the dead host is not paid.
                assert [r.host_id for r in gateway.service.stats.receipts] == [backup.node.peer_id]


async def test_no_first_token_in_time_moves_to_next_host():
    hanging = GatedBackend(reference_backend(), hang_before_first=True)
    async with running_host(price=300_000) as good, running_host(hanging, price=100_000, bootstrap=[good.node.listen_addrs()[0]]):
        config = GatewayConfig(first_token_timeout=1.0)
        async with running_gateway([good.node.listen_addrs()[0]], config=config) as gateway:
            await wait_for_offers(gateway, count=2)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/chat/completions", json=CHAT)
            assert r.status_code == 200
            assert hanging.paused.is_set()
            assert good.service.stats.served == 1
            assert r.json()["usage"]["completion_tokens"] > 0


async def test_every_host_failing_gives_a_clean_503():
    hanging = GatedBackend(reference_backend(), hang_before_first=True)
    async with running_host(hanging) as host:
        async with running_gateway([host.node.listen_addrs()[0]], config=GatewayConfig(first_token_timeout=0.5)) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/chat/completions", json=CHAT)
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "no_host_available"
                r = await http.post("/chat/completions", json={**CHAT, "stream": True})
                assert r.status_code == 503


async def test_busy_host_is_skipped_invisibly():
    slow = GatedBackend(reference_backend(), pause_after=1)
    async with running_host(price=300_000) as spare, running_host(slow, price=100_000, max_slots=1, max_queue=0, bootstrap=[spare.node.listen_addrs()[0]]) as busy:
        async with running_gateway([spare.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway, count=2)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                async with trio.open_nursery() as nursery:
                    first = {}

                    async def occupy():
                        first["r"] = await http.post("/chat/completions", json=CHAT)

                    nursery.start_soon(occupy)
                    await slow.paused.wait()
                    # The cheap host's only slot is taken: this one must land on the spare.
                    r = await http.post("/chat/completions", json=CHAT)
                    assert r.status_code == 200
                    assert busy.service.stats.refused == 1 and spare.service.stats.served == 1
                    slow.release.set()
                assert first["r"].status_code == 200


async def test_orders_past_the_slots_queue_instead_of_failing():
    slow = GatedBackend(reference_backend(), pause_after=1)
    async with running_host(slow, max_slots=1, max_queue=2) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                results = []

                async def ask():
                    results.append(await http.post("/chat/completions", json=CHAT))

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(ask)
                    await slow.paused.wait()
                    with trio.fail_after(10):
                        while host.service.stats.in_flight < 3:
                            await trio.sleep(0.01)
                    assert host.service.status()["queued"] == 2
                    slow.release.set()
            assert [r.status_code for r in results] == [200, 200, 200]
            assert host.service.stats.refused == 0 and host.service.stats.served == 3


# --- issue 8: hosts that are gone, hosts that are full ------------------------


@asynccontextmanager
async def killable_host(backend, **kw):
    """A host in its own cancel scope: ``kill()`` takes it off the network whatever it is doing."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                async with running_host(backend, **kw) as runtime:
                    task_status.started(runtime)
                    await trio.sleep_forever()

        runtime = await nursery.start(run)
        yield runtime, scope.cancel
        scope.cancel()


async def _until(condition, timeout: float = 20.0) -> None:
    """Wait for a condition the peers reach on their own (no event to wait on)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def _announced_full(gateway, host) -> None:
    """Until the gateway's book holds an offer of ``host`` with no free slot."""
    with trio.fail_after(20):
        while (offer := gateway.book.get(host.node.peer_id, "tiny")) is None or offer.free_slots > 0:
            await gateway.book.changed.wait()


def _completed(events: list[dict]) -> bool:
    """A whole stream: a finish_reason and no error event."""
    finished = any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events)
    return finished and not any("error" in e for e in events)


async def test_host_killed_mid_stream_fails_over_into_a_busy_survivors_queue():
    """The measured scenario: every stream of the killed host completes on the busy survivor.

    The survivor has 1 slot (held by a keeper stream) and a queue of 20. Its
    queue holds the failed-over streams longer than ``first_token_timeout``:
    they complete only if the gateway keeps waiting for a host that says it
    is full, and if ranking offers the survivor at all (the dead host's last
    offer still advertises free slots).
    """
    n = 4
    holding = GatedBackend(reference_backend(), pause_after=2)
    dying = GatedBackend(reference_backend(), pause_after=6)
    config = GatewayConfig(first_token_timeout=1.0)
    async with running_host(holding, price=300_000, max_slots=1, max_queue=20) as survivor:
        async with running_gateway([survivor.node.listen_addrs()[0]], config=config) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http, trio.open_nursery() as clients:
                results: dict[str, list[dict]] = {}

                async def client(name: str, started: trio.Event | None = None) -> None:
                    events = []
                    async with http.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r:
                        assert r.status_code == 200, await r.aread()
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                events.append(json.loads(line[6:]))
                                if started is not None and events[-1].get("choices") and events[-1]["choices"][0]["delta"].get("content"):
                                    started.set()
                    results[name] = events

                clients.start_soon(client, "keeper")  # the survivor's only slot, held
                with trio.fail_after(20):
                    await holding.paused.wait()
                await _announced_full(gateway, survivor)
                async with killable_host(dying, price=100_000, max_slots=n, bootstrap=[survivor.node.listen_addrs()[0]]) as (cheap, kill):
                    await wait_for_offers(gateway, count=2)
                    started = [trio.Event() for _ in range(n)]
                    for i in range(n):
                        clients.start_soon(client, f"s{i}", started[i])
                    with trio.fail_after(20):
                        for event in started:
                            await event.wait()
                    await _until(lambda: len(dying.requests) == n)
                    assert cheap.service.stats.in_flight == n
                    kill()  # the cheap host dies with 6 tokens of each stream delivered
                # Every stream is now queued on the survivor behind the keeper, past its first-token deadline.
                await _until(lambda: survivor.service.status()["queued"] == n)
                await _until(lambda: gateway.service.stats.queue_waits >= n)
                holding.release.set()
    assert sorted(results) == ["keeper"] + [f"s{i}" for i in range(n)]
    assert all(_completed(events) for events in results.values())
    assert gateway.service.stats.failovers == n
    assert survivor.service.stats.served == n + 1 and survivor.service.stats.refused == 0
    assert {r.host_id for r in gateway.service.stats.receipts} == {survivor.node.peer_id}


async def test_new_requests_queue_on_a_busy_survivor_not_503():
    """Requests arriving after the cheap host died wait in the busy survivor's queue and are served."""
    holding = GatedBackend(reference_backend(), pause_after=2)
    config = GatewayConfig(first_token_timeout=1.0)
    async with running_host(holding, price=300_000, max_slots=1, max_queue=20) as survivor:
        async with running_gateway([survivor.node.listen_addrs()[0]], config=config) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http, trio.open_nursery() as clients:
                answers: list[httpx.Response] = []

                async def ask() -> None:
                    answers.append(await http.post("/chat/completions", json=CHAT))

                clients.start_soon(ask)  # the keeper: holds the survivor's only slot
                with trio.fail_after(20):
                    await holding.paused.wait()
                await _announced_full(gateway, survivor)
                async with killable_host(reference_backend(), price=100_000, bootstrap=[survivor.node.listen_addrs()[0]]) as (cheap, kill):
                    await wait_for_offers(gateway, count=2)
                    kill()
                for _ in range(3):
                    clients.start_soon(ask)
                await _until(lambda: survivor.service.status()["queued"] == 3)
                await _until(lambda: gateway.service.stats.queue_waits >= 3)
                holding.release.set()
    assert [r.status_code for r in answers] == [200] * 4
    assert survivor.service.stats.served == 4 and survivor.service.stats.refused == 0


async def test_unreachable_host_leaves_the_book_at_once():
    """A dial failure takes the host out of the candidate set now, not when its offer expires."""
    ghost = Signer.generate()
    now = time.time()
    async with running_host(price=300_000) as live:
        async with running_gateway([live.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            # A cheaper host that advertises free slots at an address where nobody listens.
            stale = Offer(
                peer_id=ghost.peer_id, model="tiny", model_hash=live.service.terms.model_hash, price_micro_per_mtok=100_000,
                tokens_per_s=100.0, free_slots=4, max_slots=4, max_context=2048, region="", license="", follows_market=False,
                addrs=("/ip4/127.0.0.1/tcp/1",), seq=next_seq(), issued_at=now, expires_at=now + 60,
            ).signed(ghost)
            assert gateway.book.apply(stale)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/chat/completions", json=CHAT)
            assert r.status_code == 200 and live.service.stats.served == 1
            assert gateway.book.get(ghost.peer_id, "tiny") is None
            assert not gateway.book.apply(stale)  # its stale offer cannot bring it back
            assert gateway.service.matcher.backed_off(ghost.peer_id, time.monotonic())


async def test_busy_answer_is_asked_again_after_the_hosts_next_offer():
    """A host whose slots and queue are full is not dropped from the request: it is asked again later."""
    holding = GatedBackend(reference_backend(), pause_after=1)
    async with running_host(holding, max_slots=1, max_queue=0) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http, trio.open_nursery() as clients:
                answers: list[httpx.Response] = []

                async def ask() -> None:
                    answers.append(await http.post("/chat/completions", json=CHAT))

                clients.start_soon(ask)
                with trio.fail_after(20):
                    await holding.paused.wait()
                clients.start_soon(ask)
                await _until(lambda: host.service.stats.refused >= 1)
                # Refused as full, yet neither out of the book nor backed off: it is alive.
                assert gateway.book.get(host.node.peer_id, "tiny") is not None
                assert not gateway.service.matcher.backed_off(host.node.peer_id, time.monotonic())
                holding.release.set()
    assert [r.status_code for r in answers] == [200, 200]
    assert host.service.stats.served == 2


async def test_stream_begun_waits_out_a_full_market_instead_of_breaking():
    """Mid-stream, every survivor busy more times than ``max_attempts``: the stream waits and completes.

    Before content a full market is a quick 503 the client may retry; after
    the first token the client cannot retry, so the gateway keeps asking the
    busy survivor (bounded by ``queue_timeout``) until a place frees up.
    """
    holding = GatedBackend(reference_backend(), pause_after=2)
    dying = GatedBackend(reference_backend(), pause_after=6)
    config = GatewayConfig(max_attempts=2, busy_retry_s=0.2)
    async with running_host(holding, price=300_000, max_slots=1, max_queue=0) as survivor:
        async with running_gateway([survivor.node.listen_addrs()[0]], config=config) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http, trio.open_nursery() as clients:
                results: dict[str, list[dict]] = {}

                async def client(name: str) -> None:
                    results[name] = (await _stream_text(http, CHAT))[1]

                clients.start_soon(client, "keeper")  # the survivor's only slot, held; no queue
                with trio.fail_after(20):
                    await holding.paused.wait()
                async with killable_host(dying, price=100_000, bootstrap=[survivor.node.listen_addrs()[0]]) as (cheap, kill):
                    await wait_for_offers(gateway, count=2)
                    clients.start_soon(client, "stream")
                    with trio.fail_after(20):
                        await dying.paused.wait()
                    kill()  # 6 tokens delivered; the only survivor is full
                # Refused as busy more often than max_attempts allows failures, and still waiting.
                await _until(lambda: survivor.service.stats.refused > config.max_attempts)
                assert "stream" not in results
                holding.release.set()
    assert all(_completed(events) for events in results.values()), results
    assert gateway.service.stats.failovers == 1
    assert survivor.service.stats.served == 2
