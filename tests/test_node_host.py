"""The host under hostile or unusual peers, and its owner taking the GPU back."""

from __future__ import annotations

import dataclasses
import struct
import time

import httpx
import multiaddr
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from gpunexus.node.net.p2p import P2PConfig, open_p2p
from gpunexus.node.net.wire import FramedStream, PeerGone
from gpunexus.protocol.messages import INFER_PROTOCOL, ChatMessage, Chunk, Error, Order, Receipt, Sampling
from gpunexus.protocol.signing import Signer
from peers import LOOPBACK, GatedBackend, reference_backend, running_gateway, running_host, wait_for_offers


def make_order(signer: Signer, host_id: str, **changes) -> Order:
    base = Order(request_id="0f" * 16, gateway_id=signer.peer_id, host_id=host_id, model="tiny", price_micro_per_mtok=200_000, max_tokens=8, kind="chat", messages=(ChatMessage("user", "hello"),), prompt="", continuation="", sampling=Sampling(0.0, 1.0, 0, (), 1), allowance=b"", issued_at=time.time())
    return dataclasses.replace(base, **changes)


async def raw_stream(client, host) -> FramedStream:
    await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(host.node.listen_addrs()[0])))
    stream = await client.host.new_stream(ID.from_base58(host.node.peer_id), [INFER_PROTOCOL])
    return FramedStream(stream)


async def answer(framed: FramedStream):
    """Everything the host sends until it closes the stream."""
    out = []
    with trio.fail_after(10):
        try:
            while True:
                out.append(await framed.receive())
        except PeerGone:
            return out


async def test_garbage_and_forgeries_get_errors_and_the_host_stays_up():
    async with running_host() as host, open_p2p(Signer.generate(), P2PConfig(LOOPBACK)) as client:
        me = client.signer
        # 1. random bytes that happen to be a small frame
        framed = await raw_stream(client, host)
        await framed.send_raw(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        reply = await answer(framed)
        assert isinstance(reply[0], Error) and reply[0].code == "protocol"
        # 2. a frame that announces 100 MB
        framed = await raw_stream(client, host)
        await framed.send_raw(struct.pack(">I", 100_000_000))
        assert isinstance((await answer(framed))[0], Error)
        # 3. an order signed by someone else than its gateway_id
        framed = await raw_stream(client, host)
        forged = make_order(me, host.node.peer_id).signed(me)
        forged = dataclasses.replace(forged, gateway_id=Signer.generate().peer_id)
        await framed.send(forged)
        reply = await answer(framed)
        assert isinstance(reply[0], Error) and "signature" in reply[0].message
        # 4. an order for another host, and one under the asking price
        framed = await raw_stream(client, host)
        await framed.send(make_order(me, Signer.generate().peer_id).signed(me))
        assert (await answer(framed))[0].code == "bad_request"
        framed = await raw_stream(client, host)
        await framed.send(make_order(me, host.node.peer_id, price_micro_per_mtok=1).signed(me))
        assert (await answer(framed))[0].code == "price"
        # 5. a chunk where an order belongs
        framed = await raw_stream(client, host)
        await framed.send(Chunk("x", 1, (), ()))
        assert (await answer(framed))[0].code == "protocol"
        # ... and after all that, an honest order is served with a valid receipt.
        framed = await raw_stream(client, host)
        good = make_order(me, host.node.peer_id).signed(me)
        await framed.send(good)
        reply = await answer(framed)
        chunks, receipt = reply[:-1], reply[-1]
        assert all(isinstance(c, Chunk) for c in chunks) and isinstance(receipt, Receipt)
        receipt.verify("host_sig")
        assert receipt.tokens_out == sum(c.n_tokens for c in chunks) == 8
        assert receipt.prompt_hash == good.prompt_hash()
        assert host.service.stats.refused == 6 and host.service.stats.served == 1


async def test_disable_drains_then_withdraws():
    gated = GatedBackend(reference_backend(), pause_after=2)
    async with running_host(gated) as host:
        async with running_gateway([host.node.listen_addrs()[0]]) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http, trio.open_nursery() as nursery:
                result = {}

                async def in_flight():
                    result["r"] = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6})

                nursery.start_soon(in_flight)
                await gated.paused.wait()
                disabled = trio.Event()

                async def disable():
                    await host.service.disable()
                    disabled.set()

                nursery.start_soon(disable)
                await trio.testing.wait_all_tasks_blocked()
                assert not disabled.is_set() and not host.service.enabled  # draining, not yet withdrawn
                assert host.service.free_slots() == 0
                gated.release.set()
                await disabled.wait()
            assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 6
            with trio.fail_after(10):
                while gateway.book.for_model("tiny"):
                    await gateway.book.changed.wait()
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 404
            await host.service.enable()
            await wait_for_offers(gateway)


async def test_private_swarm_keeps_strangers_out():
    key = "ab" * 32
    async with running_host(swarm_key=key) as host:
        addr = host.node.listen_addrs()[0]
        async with open_p2p(Signer.generate(), P2PConfig(LOOPBACK)) as stranger:
            with pytest.raises(trio.TooSlowError):
                await stranger.connect(addr, timeout=2)
        async with open_p2p(Signer.generate(), P2PConfig(LOOPBACK, swarm_key="cd" * 32)) as wrong_key:
            with pytest.raises(trio.TooSlowError):
                await wrong_key.connect(addr, timeout=2)
        async with running_gateway([addr], swarm_key=key) as gateway:
            await wait_for_offers(gateway)
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                r = await http.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
