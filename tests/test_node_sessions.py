"""Sessions: every request between a gateway and a host on one ``/gpunexus/session/1`` stream.

Real peers on loopback. What is checked: requests share one session and
old peers (per-request streams only) still work both ways round; on one
session, one cancelled request, one stalled reader and one host failure
leave the other requests whole; a session torn down mid-stream fails over
like a stream; hostile session frames get errors and the host stays up.
"""

from __future__ import annotations

import dataclasses

import httpx
import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from gpunexus.node.backends.base import BackendError, GenerationRequest, GenerationResult, Token
from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.node.gateway.openai_api import APIError, parse_request
from gpunexus.node.net.session import Session
from gpunexus.node.net.p2p import P2PConfig, open_p2p
from gpunexus.node.net.wire import FramedStream, PeerGone
from gpunexus.protocol.codec import decode
from gpunexus.protocol.messages import Chunk, Error, Receipt
from gpunexus.protocol.session import END, MAX_BATCH_ENTRIES, MAX_SESSION_FRAME_BYTES, MESSAGE, SESSION_PROTOCOL, Entry, decode_batch, encode_frames
from gpunexus.protocol.signing import Signer
from peers import LOOPBACK, GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers
from test_node_host import make_order


def chat(content: str, max_tokens: int = 24, seed: int = 1) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.9, "seed": seed}


async def post_chat(http: httpx.AsyncClient, body: dict) -> dict:
    r = await http.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_one_session_carries_every_request_to_a_host():
    async with running_host(max_slots=8) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                answers = []

                async def one(i: int) -> None:
                    answers.append(await post_chat(http, chat(f"story {i}", seed=i)))

                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(one, i)
                answers.append(await post_chat(http, chat("one more")))
            assert len(answers) == 9 and all(a["choices"][0]["message"]["content"] for a in answers)
            assert host.service.status()["sessions"] == 1
            assert gateway.service.open_sessions == 1
            assert host.service.stats.served == 9
            assert len(gateway.service.stats.receipts) == 9 and gateway.service.stats.receipts_rejected == 0


async def test_old_and_new_peers_interoperate_both_ways():
    async with running_host(sessions=False) as old_host:
        async with running_gateway([old_host.node.listen_addrs()[0]]) as new_gateway:
            await wait_for_offers(new_gateway)
            async with httpx.AsyncClient(base_url=new_gateway.base_url, timeout=30) as http:
                for i in range(3):
                    assert (await post_chat(http, chat(f"old host {i}")))["usage"]["completion_tokens"] > 0
            assert new_gateway.service.open_sessions == 0
            assert old_host.service.stats.served == 3 and new_gateway.service.stats.receipts_rejected == 0
    async with running_host() as new_host:
        config = GatewayConfig(first_token_timeout=5.0, sessions=False)
        async with running_gateway([new_host.node.listen_addrs()[0]], config=config) as old_gateway:
            await wait_for_offers(old_gateway)
            async with httpx.AsyncClient(base_url=old_gateway.base_url, timeout=30) as http:
                for i in range(3):
                    assert (await post_chat(http, chat(f"old gateway {i}")))["usage"]["completion_tokens"] > 0
            assert new_host.service.status()["sessions"] == 0
            assert new_host.service.stats.served == 3 and old_gateway.service.stats.receipts_rejected == 0


class FailsMidStream:
    """The reference model, except that a prompt saying FAIL breaks the engine after five tokens."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        if "FAIL" not in request.messages[-1].content:
            return await self.inner.generate(request, tokens)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.inner.generate, request, send)
            for _ in range(5):
                tokens.send_nowait(await receive.receive())
            nursery.cancel_scope.cancel()
        raise BackendError("the engine crashed")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_32_requests_on_one_session_with_a_cancel_a_stalled_reader_and_a_host_failure():
    backup_backend = GatedBackend(reference_backend())
    async with running_host(backup_backend, price=300_000, max_slots=4) as backup:
        async with running_host(FailsMidStream(reference_backend()), price=100_000, max_slots=32, bootstrap=[backup.node.listen_addrs()[0]]) as cheap:
            config = GatewayConfig(first_token_timeout=10.0, reader_limit_bytes=2048)
            async with running_gateway([backup.node.listen_addrs()[0], cheap.node.listen_addrs()[0]], config=config) as gateway:
                await wait_for_offers(gateway, count=2)
                service = gateway.service
                texts: dict[int, str] = {}
                errors: dict[int, APIError] = {}
                first_delta = {0: trio.Event(), 1: trio.Event()}
                reading_again = trio.Event()
                cancel_zero = trio.CancelScope()

                async def one(i: int) -> None:
                    body = chat("FAIL please", max_tokens=30, seed=7) if i == 2 else chat(f"story {i}", max_tokens=400 if i == 1 else 24, seed=i)
                    parts: list[str] = []

                    async def emit(delta) -> None:
                        parts.append(delta.text)
                        if i in first_delta:
                            first_delta[i].set()
                        if i == 1:
                            await reading_again.wait()  # a client that stops reading

                    try:
                        await service.complete(parse_request(body, "chat"), None, emit)
                    except APIError as error:
                        errors[i] = error
                    texts[i] = "".join(parts)

                async def zero() -> None:
                    with cancel_zero:
                        await one(0)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(zero)
                    for i in range(1, 32):
                        nursery.start_soon(one, i)
                    await first_delta[0].wait()
                    cancel_zero.cancel()  # the client of request 0 goes away
                    # The stalled reader is cut at the host too: its slot comes back while it still does not read.
                    with trio.fail_after(30):
                        while cheap.service.stats.in_flight or cheap.service.stats.served + cheap.service.stats.failed < 31:
                            await trio.sleep(0.05)
                    reading_again.set()
                assert 0 not in texts  # cancelled: nothing more happened for it
                cut = errors.pop(1)
                assert cut.status == 503 and "too slowly" in cut.message
                assert not errors, errors
                assert all(texts[i] for i in range(3, 32))
                # The host failure mid-stream was continued on the backup, exactly as if nothing had failed.
                assert service.stats.failovers == 1
                continued = backup_backend.requests[-1]
                assert continued.continuation_ids
                whole = dataclasses.replace(continued, continuation="", continuation_ids=(), max_tokens=30)
                assert texts[2] == await _generated(backup_backend.inner, whole)
                # Everything at the cheap host went over one session, and every receipt there checked out.
                assert cheap.service.status()["sessions"] == 1
                assert cheap.service.stats.served == 29  # 32 less the cancelled, the cut and the failed one
                assert cheap.service.stats.failed == 3
                assert service.stats.receipts_rejected == 0


async def _generated(backend, request: GenerationRequest) -> str:
    send, receive = trio.open_memory_channel(float("inf"))
    async with send:
        await backend.generate(request, send)
    return "".join([t.text async for t in receive])


async def test_a_session_torn_down_mid_stream_fails_over_like_a_stream():
    dying = GatedBackend(reference_backend(), pause_after=6)
    async with running_host(price=300_000) as backup:
        async with running_host(dying, price=100_000, bootstrap=[backup.node.listen_addrs()[0]]) as cheap:
            async with running_gateway([backup.node.listen_addrs()[0], cheap.node.listen_addrs()[0]]) as gateway:
                await wait_for_offers(gateway, count=2)
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                    result = {}

                    async def client() -> None:
                        result["answer"] = await post_chat(http, chat("Tell me a story", max_tokens=30, seed=3))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client)
                        await dying.paused.wait()
                        for session in list(cheap.service.open_sessions):
                            await session.framed.reset()  # the session dies; the connection stays up
                        dying.release.set()
                assert gateway.service.stats.failovers == 1
                assert result["answer"]["usage"]["completion_tokens"] == 30
                assert gateway.node.is_connected(cheap.node.peer_id)
                # The next request opens a fresh session with the same host.
                async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                    await post_chat(http, chat("again"))
                assert cheap.service.status()["sessions"] == 1


async def _session(client, host) -> FramedStream:
    await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(host.node.listen_addrs()[0])))
    stream = await client.host.new_stream(ID.from_base58(host.node.peer_id), [SESSION_PROTOCOL])
    return FramedStream(stream, max_frame=MAX_SESSION_FRAME_BYTES)


async def _send(framed: FramedStream, *entries: Entry) -> None:
    for frame in encode_frames(entries):
        await framed.send_raw(frame)


async def _replies(framed: FramedStream, until_request: int) -> dict[int, list]:
    """Entries from the host, by request, until ``until_request`` ends (or the session does)."""
    out: dict[int, list] = {}
    with trio.fail_after(10):
        try:
            while True:
                for entry in decode_batch(await framed.receive_body()):
                    out.setdefault(entry.request, []).append(decode(entry.body) if entry.op == MESSAGE else entry.op)
                    if entry.request == until_request and entry.op != MESSAGE:
                        return out
        except PeerGone:
            return out


async def test_hostile_session_frames_get_errors_and_the_host_stays_up():
    async with running_host() as host, open_p2p(Signer.generate(), P2PConfig(LOOPBACK)) as client:
        me = client.signer
        order = make_order(me, host.node.peer_id).signed(me)
        framed = await _session(client, host)
        # An honest request, then one whose body is not a message, then an old id again, then an honest one.
        await _send(framed, Entry(5, MESSAGE, order.encode()))
        first = await _replies(framed, 5)
        assert isinstance(first[5][-2], Receipt) and first[5][-1] == END and any(isinstance(m, Chunk) for m in first[5])
        await _send(framed, Entry(6, MESSAGE, b"\xc1\xc1"))
        assert (await _replies(framed, 6))[6][0].code == "protocol"
        await _send(framed, Entry(3, MESSAGE, dataclasses.replace(order, request_id="1f" * 16).signed(me).encode()))
        old = await _replies(framed, 3)
        assert isinstance(old[3][0], Error) and "unknown request id" in old[3][0].message
        await _send(framed, Entry(9, MESSAGE, dataclasses.replace(order, request_id="2f" * 16).signed(me).encode()))
        assert isinstance((await _replies(framed, 9))[9][-2], Receipt)
        # A frame that is no batch: the host says why on request 0 and drops this session only.
        await framed.send_raw(len(b"\x93\x01").to_bytes(4, "big") + b"\x93\x01")
        dropped = await _replies(framed, -1)
        assert dropped[0][0].code == "protocol"
        # A batch of too many entries, and a frame over the session limit.
        framed = await _session(client, host)
        await framed.send_raw(_oversize_batch())
        assert (await _replies(framed, -1))[0][0].code == "protocol"
        framed = await _session(client, host)
        await framed.send_raw((MAX_SESSION_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert (await _replies(framed, -1))[0][0].code == "protocol"
        # After all that, a new session is served as ever.
        framed = await _session(client, host)
        await _send(framed, Entry(1, MESSAGE, dataclasses.replace(order, request_id="3f" * 16).signed(me).encode()))
        assert isinstance((await _replies(framed, 1))[1][-2], Receipt)
        assert host.service.stats.served == 3


def _oversize_batch() -> bytes:
    import msgpack

    body = msgpack.packb([[i + 1, END, b""] for i in range(MAX_BATCH_ENTRIES + 1)])
    return len(body).to_bytes(4, "big") + body


async def test_requests_opened_together_and_sent_in_any_order_are_all_served():
    """Request ids are given at the first send, so they reach the host in order whichever request sends first."""
    async with running_host(max_slots=16) as host, open_p2p(Signer.generate(), P2PConfig(LOOPBACK)) as client:
        me = client.signer
        await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(host.node.listen_addrs()[0])))
        session = Session(await client.host.new_stream(ID.from_base58(host.node.peer_id), [SESSION_PROTOCOL]))
        receipts = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            channels = [session.open() for _ in range(16)]

            async def one(i: int) -> None:
                await trio.sleep(0.01 * (16 - i))  # the last opened sends first
                await channels[i].send(make_order(me, host.node.peer_id, request_id=f"{i:02x}" * 16).signed(me))
                while not isinstance(msg := await channels[i].receive(), (Receipt, Error)):
                    pass
                receipts.append(msg)
                await channels[i].close()

            with trio.fail_after(20):
                async with trio.open_nursery() as requests:
                    for i in range(16):
                        requests.start_soon(one, i)
            await session.close()
        assert len(receipts) == 16 and all(isinstance(r, Receipt) for r in receipts)
