"""Round trips to the hub and to bootstrap peers, measured for the gate.

Real round trips only, over the same protocols the node uses: ``GET /v1/hub``
on the hub's HTTP API, and for a peer a libp2p dial (TCP, Noise, yamux: what
a gateway pays to reach this host) followed by libp2p pings
(``/ipfs/ping/1.0.0``, answered by every py-libp2p host) on the connection.
The ping is the latency figure; the dial is reported beside it because it is
several round trips plus handshake CPU, not a latency. The peer is dialled
from a throwaway identity, so a check leaves no trace of the host's own key.

Bandwidth to each peer is then measured over the same connection with
``/gpunexus/speedtest/1`` (:mod:`.speedtest`): megabytes each way, one peer
after another so they do not share the link. A peer of an older version that
does not speak it is still reachable; its bandwidth is "not measured".
Bandwidth to the hub is not measured: tokens flow peer to peer, the hub only
takes small batches of receipts, and it has no endpoint that moves megabytes.
Latency is what a streamed answer's first token pays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import multiaddr
import trio

from . import speedtest

PROBE_TIMEOUT_S = 5.0
ROUND_TRIPS = 3


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str
    """``hub`` or ``peer``."""
    target: str
    latency_ms: float | None = None
    """Median of ``ROUND_TRIPS`` round trips after the connection is up; None if unreachable."""
    connect_ms: float | None = None
    """Opening the connection (TCP, TLS or Noise and yamux for a peer), for the record."""
    error: str = ""
    samples_ms: tuple[float, ...] = field(default=())
    down_mbps: float | None = None
    """Peers only: Mbit/s from the peer to us, and from us to it (``up_mbps``); None if not measured."""
    up_mbps: float | None = None
    bandwidth_error: str = ""
    """Why bandwidth was not measured (the peer does not speak the protocol, the test broke)."""

    @property
    def reachable(self) -> bool:
        return self.latency_ms is not None


async def probe_hub(url: str, *, timeout: float = PROBE_TIMEOUT_S, round_trips: int = ROUND_TRIPS) -> Probe:
    """``GET /v1/hub`` once to connect, then ``round_trips`` more on the same connection."""
    base = url.rstrip("/")
    try:
        with trio.fail_after(timeout):
            async with httpx.AsyncClient(timeout=timeout) as client:
                start = time.perf_counter()
                first = await client.get(f"{base}/v1/hub")
                connect_ms = (time.perf_counter() - start) * 1000
                _check_hub_answer(first)
                samples = []
                for _ in range(round_trips):
                    start = time.perf_counter()
                    _check_hub_answer(await client.get(f"{base}/v1/hub"))
                    samples.append((time.perf_counter() - start) * 1000)
    except trio.TooSlowError:
        return Probe("hub", url, error=f"no answer within {timeout:g} s")
    except (httpx.HTTPError, ValueError) as exc:
        return Probe("hub", url, error=str(exc) or type(exc).__name__)
    return Probe("hub", url, statistics.median(samples), connect_ms, samples_ms=tuple(samples))


def _check_hub_answer(response: httpx.Response) -> None:
    """A gpunexus hub answers ``/v1/hub`` with its id: anything else is the wrong URL."""
    if response.status_code != 200:
        raise ValueError(f"GET /v1/hub answered {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "hub_id" not in body:
        raise ValueError("not a gpunexus hub: /v1/hub has no hub_id")


async def probe_peers(addrs: list[str], *, swarm_key: str | None = None, timeout: float = PROBE_TIMEOUT_S,
                      round_trips: int = ROUND_TRIPS, bandwidth_bytes: int = speedtest.DEFAULT_BYTES) -> list[Probe]:
    """Dial every peer at once from one throwaway libp2p node, ping each, then measure each one's bandwidth in turn."""
    if not addrs:
        return []
    from gpunexus.protocol.signing import Signer

    from .p2p import P2PConfig, open_p2p

    results: dict[str, Probe] = {}
    with _quiet_libp2p():
        async with open_p2p(Signer.generate(), P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"], swarm_key=swarm_key)) as node:
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    nursery.start_soon(_probe_peer, node, addr, timeout, round_trips, results)
            for addr in addrs:
                if results[addr].reachable and bandwidth_bytes:
                    results[addr] = await _probe_bandwidth(node, results[addr], bandwidth_bytes)
    return [results[a] for a in addrs]


def _not_supported(exc: BaseException | None) -> bool:
    """Whether libp2p's multistream negotiation said "na" somewhere down ``exc``'s chain."""
    while exc is not None:
        if "not supported" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def _probe_bandwidth(node, probe: Probe, size: int) -> Probe:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    peer_id = info_from_p2p_addr(multiaddr.Multiaddr(probe.target)).peer_id
    limit = 2 * speedtest.TIME_BUDGET_S + 2 * PROBE_TIMEOUT_S
    try:
        with trio.fail_after(limit):
            measured = await speedtest.measure(node.host, peer_id, round_trip_s=(probe.latency_ms or 0.0) / 1000, size=size)
    except trio.TooSlowError:
        return dataclasses.replace(probe, bandwidth_error=f"no answer within {limit:g} s")
    except Exception as exc:  # an older peer without the protocol, or a test cut off: reachable all the same
        text = f"an older peer: no {speedtest.PROTOCOL}" if _not_supported(exc) else str(exc) or type(exc).__name__
        return dataclasses.replace(probe, bandwidth_error=text)
    return dataclasses.replace(probe, down_mbps=measured.down_mbps, up_mbps=measured.up_mbps)


@contextlib.contextmanager
def _quiet_libp2p() -> Iterator[None]:
    """The probe reports a failed dial itself; libp2p's own ERROR line for it would say it twice.

    Kept when the root logger is at DEBUG (``-vv``): then libp2p logs everything, as asked.
    """
    logger = logging.getLogger("libp2p")
    before = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


async def _probe_peer(node, addr: str, timeout: float, round_trips: int, results: dict[str, Probe]) -> None:
    from libp2p.host.ping import ID as PING
    from libp2p.host.ping import perform_ping_roundtrip
    from libp2p.peer.peerinfo import info_from_p2p_addr

    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # a malformed address is the user's typo: say which
        results[addr] = Probe("peer", addr, error=f"not a peer address (/ip4/.../tcp/.../p2p/ID): {exc}")
        return
    try:
        with trio.fail_after(timeout):
            start = time.perf_counter()
            await node.connect(addr, timeout=timeout)
            connect_ms = (time.perf_counter() - start) * 1000
            stream = await node.host.new_stream(info.peer_id, [PING])
            samples = []
            try:
                for _ in range(round_trips):
                    start = time.perf_counter()
                    await perform_ping_roundtrip(stream)
                    samples.append((time.perf_counter() - start) * 1000)
            finally:
                await stream.close()
    except trio.TooSlowError:
        results[addr] = Probe("peer", addr, error=f"no answer within {timeout:g} s")
        return
    except Exception as exc:  # refused, wrong swarm key, wrong peer id: all mean "cannot use this peer"
        results[addr] = Probe("peer", addr, error=str(exc) or type(exc).__name__)
        return
    results[addr] = Probe("peer", addr, statistics.median(samples), connect_ms, samples_ms=tuple(samples))
