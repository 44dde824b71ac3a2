"""Shared helpers for tests with real peers: hosts and gateways on loopback."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from gpunexus.node.backends.base import GenerationRequest, GenerationResult, Token
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.gateway.service import GatewayConfig
from gpunexus.node.net.p2p import P2PConfig
from gpunexus.node.runtime import GatewayOptions, HostOptions, open_gateway, open_host

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def reference_backend() -> ReferenceBackend:
    return ReferenceBackend("tiny")


@asynccontextmanager
async def running_host(backend=None, *, price=200_000, bootstrap=(), swarm_key=None, max_slots=4, tokens_per_s=100.0, **kw):
    options = HostOptions(
        backend=backend or reference_backend(),
        price_micro_per_mtok=price,
        p2p=P2PConfig(listen=LOOPBACK, bootstrap=list(bootstrap), swarm_key=swarm_key),
        max_slots=max_slots,
        tokens_per_s=tokens_per_s,
        **kw,
    )
    async with open_host(options) as runtime:
        yield runtime


@asynccontextmanager
async def running_gateway(bootstrap=(), *, swarm_key=None, config=None, **kw):
    options = GatewayOptions(
        port=0,
        p2p=P2PConfig(listen=LOOPBACK, bootstrap=list(bootstrap), swarm_key=swarm_key),
        config=config or GatewayConfig(first_token_timeout=5.0),
        **kw,
    )
    async with open_gateway(options) as runtime:
        yield runtime


async def wait_for_offers(gateway, model="tiny", count=1, timeout=20.0):
    """Wait (event-driven) until the gateway's book holds ``count`` hosts for ``model``."""
    with trio.fail_after(timeout):
        while len(gateway.book.for_model(model)) < count:
            await gateway.book.changed.wait()


class GatedBackend:
    """Wraps a backend: after ``pause_after`` tokens it stops and waits for ``release``.

    ``paused`` fires when it stops, so a test can kill the host exactly
    mid-stream without sleeping.
    """

    def __init__(self, inner, pause_after: int | None = None, hang_before_first: bool = False) -> None:
        self.inner = inner
        self.info = inner.info
        self.pause_after = pause_after
        self.hang_before_first = hang_before_first
        self.paused = trio.Event()
        self.release = trio.Event()
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest, tokens: trio.MemorySendChannel[Token]) -> GenerationResult:
        self.requests.append(request)
        if self.hang_before_first:
            self.paused.set()
            await trio.sleep_forever()
        send, receive = trio.open_memory_channel(float("inf"))
        result = None

        async def run_inner() -> None:
            nonlocal result
            async with send:
                result = await self.inner.generate(request, send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_inner)
            count = 0
            async with receive:
                async for token in receive:
                    if self.pause_after is not None and count == self.pause_after:
                        self.paused.set()
                        await self.release.wait()
                    tokens.send_nowait(token)
                    count += 1
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()
