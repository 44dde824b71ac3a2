"""Latency the hub adds to the request path: the same market with and without it.

Run: python bench/hub_latency.py [--requests 200] [--tokens 16]

One process, loopback: two swarms of one host (reference model) and one
gateway each, one in private-swarm mode (no hub), one paying through a hub
(SQLite; the gateway holds its allowance locally and queues receipts on disk
for background delivery; the host checks each order's allowance). Requests
alternate between the two gateways so machine drift cancels; each is a
streamed chat completion. Reports time to first token and to the last byte
(p50, p99) and the difference. The gateway never calls the hub on the request
path; what is left is the durable receipt write after the last token.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

from gpunexus.hub import keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.service import Hub
from gpunexus.node.backends.reference import ReferenceBackend
from gpunexus.node.net.p2p import P2PConfig
from gpunexus.node.runtime import GatewayOptions, HostOptions, HubLogin, open_gateway, open_host

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


async def one(http: httpx.AsyncClient, url: str, key: str, tokens: int) -> tuple[float, float]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "time me"}], "max_tokens": tokens, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    first = None
    async with http.stream("POST", f"{url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
    return (first or time.perf_counter()) - start, time.perf_counter() - start


async def main(args) -> None:
    with tempfile.TemporaryDirectory() as home:
        hub = Hub.open(home)
        _, client_key = hub.db.write_sync(keys.add_user, "dev@bench", "client")
        _, host_key = hub.db.write_sync(keys.add_user, "gpu@bench", "host")
        hub.grant_sync("dev@bench", 100_000_000, uuid.uuid4().hex)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            hub_url = (await nursery.start(functools.partial(serve, hub, create_app(hub), host="127.0.0.1", port=0, shutdown_trigger=stop.wait)))[0]
            common = dict(backend=ReferenceBackend("tiny"), price_micro_per_mtok=200_000, max_slots=4, tokens_per_s=100.0, p2p=P2PConfig(LOOPBACK))
            # Two separate swarms: a paid host checks allowances, so it cannot serve the free gateway.
            async with open_host(HostOptions(**common)) as free_host, \
                    open_host(HostOptions(**common, home=Path(home, "host"), hub=HubLogin(hub_url, host_key))) as paid_host:
                free_boot = P2PConfig(LOOPBACK, [free_host.node.listen_addrs()[0]])
                paid_boot = P2PConfig(LOOPBACK, [paid_host.node.listen_addrs()[0]])
                async with open_gateway(GatewayOptions(port=0, p2p=free_boot)) as free, \
                        open_gateway(GatewayOptions(port=0, p2p=paid_boot, home=Path(home, "gw"), hub=HubLogin(hub_url, client_key))) as paid:
                    for gw in (free, paid):
                        with trio.fail_after(30):
                            while not gw.book.for_model("tiny"):
                                await gw.book.changed.wait()
                    results = {"without hub": ([], []), "with hub": ([], [])}
                    targets = {"without hub": (free.base_url, "unused"), "with hub": (paid.base_url, client_key)}
                    async with httpx.AsyncClient(timeout=60) as http:
                        for name, (url, key) in targets.items():  # warm-up
                            for _ in range(5):
                                await one(http, url, key, args.tokens)
                        for i in range(args.requests):
                            order = list(targets) if i % 2 == 0 else list(reversed(targets))
                            for name in order:
                                ttft, total = await one(http, *targets[name], args.tokens)
                                results[name][0].append(ttft * 1000)
                                results[name][1].append(total * 1000)
                            if i % 50 == 0:
                                print(f"{i}/{args.requests}", file=sys.stderr, flush=True)
                    await paid.service.settlement.flush()
            stop.set()
    print(f"\nstreamed chat completions of {args.tokens} tokens, {args.requests} per side, alternating (ms)")
    print(f"{'':14} {'TTFT p50':>9} {'TTFT p99':>9} {'total p50':>10} {'total p99':>10}")
    for name, (ttft, total) in results.items():
        print(f"{name:14} {pct(ttft, .5):9.2f} {pct(ttft, .99):9.2f} {pct(total, .5):10.2f} {pct(total, .99):10.2f}")
    (t0, l0), (t1, l1) = results.values()
    print(f"{'hub adds':14} {pct(t1, .5) - pct(t0, .5):+9.2f} {'':9} {pct(l1, .5) - pct(l0, .5):+10.2f}")
    print(f"paired median difference: TTFT {statistics.median(b - a for a, b in zip(t0, t1)):+.2f} ms, total {statistics.median(b - a for a, b in zip(l0, l1)):+.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=16)
    trio.run(main, parser.parse_args())
