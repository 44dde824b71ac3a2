"""Offer propagation in a 30-peer star: our router against py-libp2p's GossipSub.

Run: python bench/gossip.py [--peers 30] [--messages 20] [--interval 0.6] [--seed 1] [--grace 3]

For each router, in one process on 127.0.0.1: N libp2p hosts, every one
dialling the same bootstrap peer, all subscribed to ``gpunexus/offers/1``.
Both routers get the same parameters (``gossipsub_options()``: degree
6/4/12, heartbeat 1 s, PX on, 16 PX peers); only the code differs. After the
network settles (ours: the mesh connects every peer and no PX dial or
pubsub registration is pending; upstream: the bootstrap's first heartbeat
has pruned its mesh, which is what breaks it), M
offer-sized messages (300 bytes) are published by random peers, one every
``--interval`` seconds, and every peer records when each arrives; after the
last one there are 3 s for stragglers.

Columns: delivered = deliveries / (M x (N-1)); to-all = messages every other
peer got; latency = publish to arrival over all deliveries; spread = publish
to the last peer's arrival, over the messages that reached all. All N peers
share one Python thread, so times include the simulation's own CPU
queueing; on separate machines they are network-bound.

A second table times how long a gateway's offer book keeps a host that
leaves: real ``gpunexus node serve`` processes and a gateway in this
process, the host either disabled politely (signed Withdraw), killed with
SIGKILL while the gateway holds a connection to it (the dead connection
drops it), or killed while the gateway only hears of it through another
peer (it lasts until its offer expires, at most the small plan's 10 s). Progress goes
to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import tempfile
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AsyncExitStack

import multiaddr
import trio
from gpunexus.node.net.gossip import gossipsub_options, make_gossipsub
from gpunexus.node.net.p2p import P2PConfig
from gpunexus.node.runtime import GatewayOptions, open_gateway
from gpunexus.protocol.discovery import SMALL, offer_topic

TOPIC = offer_topic("tiny")
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
# libp2p's auto-connector redials the whole peerstore every 10 s below 50
# connections; in one process that storm would be measured instead of gossip.
QUIET_HOSTS = ConnectionConfig(min_connections=0, auto_connect_interval=3600)
OFFER_SIZE = 300
GRACE = 3.0


def log(msg: str) -> None:
    print(f"[gossip-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def strongly_connected(pubsubs: list[Pubsub]) -> bool:
    index = {p.my_id: i for i, p in enumerate(pubsubs)}
    fwd: dict[int, set[int]] = defaultdict(set)
    bwd: dict[int, set[int]] = defaultdict(set)
    for i, p in enumerate(pubsubs):
        for q in p.router.mesh.get(TOPIC, ()):  # type: ignore[attr-defined]
            if q in index and q in p.peers:
                fwd[i].add(index[q])
                bwd[index[q]].add(i)

    def reach(edges: dict[int, set[int]]) -> int:
        seen, todo = {0}, [0]
        while todo:
            for j in edges[todo.pop()] - seen:
                seen.add(j)
                todo.append(j)
        return len(seen)

    return reach(fwd) == len(pubsubs) == reach(bwd)


def mesh_settled(pubsubs: list[Pubsub]) -> bool:
    """The mesh connects everyone and the PX churn is over: no dial in flight,
    every connected peer registered with pubsub (else the first offers queue
    behind connection handshakes on the one Python thread)."""
    for p in pubsubs:
        if getattr(p.router, "_px_dialing", None) or set(p.host.get_network().connections) - set(p.peers):
            return False
    return strongly_connected(pubsubs)


def bootstrap_pruned(pubsubs: list[Pubsub]) -> bool:
    boot = pubsubs[0].my_id
    return any(p.router._check_back_off(boot, TOPIC) for p in pubsubs[1:])  # type: ignore[attr-defined]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_one(name: str, make_router: Callable[[], GossipSub], settled: Callable[[list[Pubsub]], bool], args) -> dict:
    rng = random.Random(args.seed)
    n, m = args.peers, args.messages
    async with trio.open_nursery() as hosts_nursery:
        hosts = [new_host(connection_config=QUIET_HOSTS) for _ in range(n)]

        async def serve(host, task_status=trio.TASK_STATUS_IGNORED):
            async with host.run([LOOPBACK]):
                task_status.started()
                await trio.sleep_forever()

        for host in hosts:
            await hosts_nursery.start(serve, host)
        async with AsyncExitStack() as services:
            pubsubs, subs = [], []
            for host in hosts:
                router = make_router()
                pubsub = Pubsub(host, router)
                await services.enter_async_context(background_trio_service(pubsub))
                await services.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
                pubsubs.append(pubsub)
                subs.append(await pubsub.subscribe(TOPIC))
            t0 = trio.current_time()
            boot = info_from_p2p_addr(hosts[0].get_addrs()[0])
            async with trio.open_nursery() as nursery:
                for host in hosts[1:]:
                    nursery.start_soon(host.connect, boot)
            async with trio.open_nursery() as nursery:
                for p in pubsubs[1:]:
                    nursery.start_soon(pubsubs[0].wait_for_subscription, p.my_id, TOPIC, 30)
            with trio.move_on_after(40):
                while not settled(pubsubs):
                    await trio.sleep(0.05)
            settle = trio.current_time() - t0
            log(f"{name}: settled={settled(pubsubs)} after {settle:.1f} s")

            sent: dict[bytes, tuple[int, float]] = {}
            arrivals: dict[bytes, dict[int, float]] = defaultdict(dict)

            async def reader(i: int) -> None:
                async for msg in subs[i]:
                    if msg.data in sent and sent[msg.data][0] != i:
                        arrivals[msg.data].setdefault(i, trio.current_time())

            async with trio.open_nursery() as readers:
                for i in range(n):
                    readers.start_soon(reader, i)
                for k in range(m):
                    src = rng.randrange(n)
                    data = k.to_bytes(4, "big") + rng.randbytes(OFFER_SIZE - 4)
                    sent[data] = (src, trio.current_time())
                    await pubsubs[src].publish(TOPIC, data)
                    await trio.sleep(args.interval)
                with trio.move_on_after(args.grace):
                    while sum(len(a) for a in arrivals.values()) < m * (n - 1):
                        await trio.sleep(0.05)
                readers.cancel_scope.cancel()
            conns = statistics.mean(len(h.get_network().connections) for h in hosts)
            # Close the hosts before the pubsub services stop: the other way round a
            # late message crashes its host ("Nursery is closed to new arrivals").
            async with trio.open_nursery() as closing:
                for host in hosts:
                    closing.start_soon(host.close)
        hosts_nursery.cancel_scope.cancel()

    latencies = [t - sent[d][1] for d, got in arrivals.items() for t in got.values()]
    spreads = [max(got.values()) - sent[d][1] for d, got in arrivals.items() if len(got) == n - 1]
    return {
        "router": name,
        "settle_s": settle,
        "conns": conns,
        "delivered": len(latencies) / (m * (n - 1)),
        "to_all": len(spreads),
        "lat_p50": pct(latencies, 0.5) if latencies else None,
        "lat_p95": pct(latencies, 0.95) if latencies else None,
        "spread_p50": pct(spreads, 0.5) if spreads else None,
        "spread_max": max(spreads) if spreads else None,
    }


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


async def main(args) -> None:
    options = gossipsub_options()
    rows = [
        await run_one("OfferGossipSub", make_gossipsub, mesh_settled, args),
        await run_one("GossipSub (upstream)", lambda: GossipSub(**options), bootstrap_pruned, args),
    ]
    n, m = args.peers, args.messages
    print(f"\n{n}-peer star, {m} x {OFFER_SIZE} B offers from random peers every {args.interval} s, "
          f"degree 6/4/12, heartbeat 1 s (times in ms)")
    head = f"{'router':22} {'settle s':>8} {'conns/peer':>10} {'delivered':>9} {'to-all':>7} {'lat p50':>8} {'lat p95':>8} {'spread p50':>10} {'spread max':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['router']:22} {r['settle_s']:8.1f} {r['conns']:10.1f} {r['delivered']:9.1%} {r['to_all']:>4}/{m:<2} "
              f"{fmt_ms(r['lat_p50']):>8} {fmt_ms(r['lat_p95']):>8} {fmt_ms(r['spread_p50']):>10} {fmt_ms(r['spread_max']):>10}")
    ours, stock = rows
    ratio = ours["delivered"] / stock["delivered"] if stock["delivered"] else float("inf")
    print(f"delivered, ours / upstream: {ratio:.2f}x")
    await leaving_hosts(args.leave_rounds)


def serve_host(home: str, bootstrap: str | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "gpunexus", "node", "serve", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--tokens-per-s", "100"]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, GPUNEXUS_HOME=home))
    return proc, proc.stdout.readline().strip().split(" ", 1)[1]


async def time_to_leave(how: str) -> float:
    """Seconds from the host leaving (``how``) until the gateway's book no longer lists it."""
    with tempfile.TemporaryDirectory() as relay_home, tempfile.TemporaryDirectory() as home:
        relay = None
        if how == "killed, heard via a relay":
            relay, relay_addr = await trio.to_thread.run_sync(serve_host, relay_home)
            host, addr = await trio.to_thread.run_sync(serve_host, home, relay_addr)
            bootstrap = relay_addr
        else:
            host, addr = await trio.to_thread.run_sync(serve_host, home)
            bootstrap = addr
        peer = addr.rsplit("/", 1)[1]
        try:
            async with open_gateway(GatewayOptions(port=0, p2p=P2PConfig(bootstrap=[bootstrap]))) as gateway:
                with trio.fail_after(60):
                    while not any(o.peer_id == peer for o in gateway.book.live()):
                        await gateway.book.changed.wait()
                start = time.perf_counter()
                if how == "disabled (Withdraw)":
                    await trio.run_process([sys.executable, "-m", "gpunexus", "node", "disable"], env=dict(os.environ, GPUNEXUS_HOME=home), capture_stdout=True)
                else:
                    host.send_signal(signal.SIGKILL)
                with trio.fail_after(SMALL.ttl_s + 30):
                    while any(o.peer_id == peer for o in gateway.book.live()):
                        with trio.move_on_after(0.05):  # expiry is a clock, not an event
                            await gateway.book.changed.wait()
                return time.perf_counter() - start
        finally:
            for proc in (host, relay):
                if proc is not None:
                    proc.kill()
                    proc.wait()


async def leaving_hosts(rounds: int) -> None:
    rows = []
    for how in ("disabled (Withdraw)", "killed, gateway connected", "killed, heard via a relay"):
        times = []
        for i in range(rounds):
            log(f"leaving host: {how}, round {i + 1}/{rounds}")
            times.append(await time_to_leave(how))
        rows.append((how, statistics.median(times), max(times)))
    print(f"\ntime until a leaving host is out of the gateway's offer book ({rounds} rounds; offers re-announced every {SMALL.refresh_s:g} s, expire after {SMALL.ttl_s:g} s)")
    print(f"{'how the host left':28} {'median s':>9} {'max s':>7}")
    for how, median, worst in rows:
        print(f"{how:28} {median:9.3f} {worst:7.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=30)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grace", type=float, default=GRACE, help="seconds to wait for stragglers after the last offer")
    parser.add_argument("--leave-rounds", type=int, default=3, help="rounds of each way a host leaves (second table)")
    trio.run(main, parser.parse_args())
