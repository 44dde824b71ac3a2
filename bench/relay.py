"""Relay overhead: the whole client path against the same source called directly.

Run: python bench/relay.py [--fast-rounds-1 N ...] [--skip-reference] [--out FILE]

Part 1 starts, as subprocesses on free loopback ports, the shared token
source (``shared/bench/token_source.py``), a host
(``gpunexus node serve --backend openai``) and a gateway, each with its own
temporary ``GPUNEXUS_HOME``; waits until the gateway lists the model; runs the
shared harness ``shared/bench/relay_bench.py`` (which alternates direct and
relayed batches so machine drift cancels, and charges the CPU of the gateway
and host processes to the relay); and prints a table of its rows next to the
figures of the two peers to beat (LiteLLM proxy, LocalLMarket).

Part 2 runs the reference backend (``gpunexus.verify``'s numpy model) in this
process: called directly, then through gateway -> libp2p -> host, with httpx
as the client, at 1 and 32 streams.

Every process started here is stopped on exit, Ctrl-C included. Progress goes
to stderr; the tables are printed last, on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
MODEL = "anchor-model"

# The figures to beat (shared/bench/README.md): (ttft added ms, agg ratio, cpu us/token), worst..best.
PEERS = {
    ("fast", 1): {"LiteLLM": ((16, 20), (0.05, 0.05), (700, 900)), "LocalLMarket": ((8, 9), (0.33, 0.33), (70, 77))},
    ("paced", 32): {"LiteLLM": ((373, 531), (0.68, 0.71), (800, 900)), "LocalLMarket": ((152, 172), (0.92, 0.92), (75, 75))},
}


def log(msg: str) -> None:
    print(f"[relay-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Child processes in their own process groups, stopped (TERM, then KILL) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None, stdout=None) -> subprocess.Popen:
        log(f"starting {name}: {' '.join(argv[:6])} ...")
        p = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.DEVNULL if stdout is None else None, start_new_session=True, text=True)
        self.procs.append((name, p))
        return p

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for name, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            log(f"stopped {name} (pid {p.pid})")
        self.procs.clear()


def wait_http(url: str, check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200 and check(r):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s")


def run_harness(args, procs: Procs, tmp: Path) -> list[dict]:
    py = sys.executable
    src_port, gw_port = free_port(), free_port()
    source = procs.start("token source", [py, str(SHARED_BENCH / "token_source.py"), "--port", str(src_port)])
    wait_http(f"http://127.0.0.1:{src_port}/_mode", lambda r: True, 30, "token source", source)

    env_host = dict(os.environ, GPUNEXUS_HOME=str(tmp / "host"), PYTHONUNBUFFERED="1")
    env_gw = dict(os.environ, GPUNEXUS_HOME=str(tmp / "gateway"), PYTHONUNBUFFERED="1")
    host = procs.start("host", [py, "-m", "gpunexus", "node", "serve", "--model", MODEL, "--backend", "openai",
                                "--upstream", f"http://127.0.0.1:{src_port}/v1", "--tokens-per-s", "1000",
                                "--listen", "/ip4/127.0.0.1/tcp/0"], env=env_host, stdout=subprocess.PIPE)
    peer = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = host.stdout.readline()
        if not line:
            raise SystemExit(f"host exited with {host.wait()} before printing its address")
        if line.startswith("peer: "):
            peer = line.split(" ", 1)[1].strip()
            break
    if peer is None:
        raise SystemExit("host printed no address")
    log(f"host is {peer}")
    gateway = procs.start("gateway", [py, "-m", "gpunexus", "node", "gateway", "--port", str(gw_port), "--bootstrap", peer],
                          env=env_gw, stdout=subprocess.DEVNULL)
    models = f"http://127.0.0.1:{gw_port}/v1/models"
    wait_http(models, lambda r: any(m["id"] == MODEL for m in r.json().get("data", [])), 90, "gateway (model listed)", gateway)
    log("gateway lists the model; running the harness")

    if args.serve_only:
        print(json.dumps({"source": f"http://127.0.0.1:{src_port}", "gateway": f"http://127.0.0.1:{gw_port}",
                          "source_pid": source.pid, "host_pid": host.pid, "gateway_pid": gateway.pid}), flush=True)
        log("serving until interrupted (--serve-only)")
        while all(p.poll() is None for _, p in procs.procs):
            time.sleep(0.5)
        raise SystemExit("a relay process exited")
    out = tmp / "relay.json"
    argv = [py, str(SHARED_BENCH / "relay_bench.py"),
            "--direct-url", f"http://127.0.0.1:{src_port}/v1/chat/completions",
            "--relay-url", f"http://127.0.0.1:{gw_port}/v1/chat/completions",
            "--mode-url", f"http://127.0.0.1:{src_port}/_mode",
            "--relay-pids", f"{gateway.pid},{host.pid}", "--source-pids", str(source.pid),
            "--out", str(out), "--label", "gpunexus"]
    for name in ("fast_rounds_1", "fast_rounds_32", "paced_rounds_1", "paced_rounds_32"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    harness = subprocess.Popen(argv, stdout=sys.stderr, start_new_session=True)
    procs.procs.append(("harness", harness))
    rc = harness.wait()
    if rc != 0:
        raise SystemExit(f"relay_bench.py exited with {rc}")
    results = json.loads(out.read_text())["results"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def _fmt_range(lo, hi, fmt):
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def harness_table(results: list[dict]) -> str:
    head = ("mode", "streams", "TTFT p50 direct", "relay", "added ms", "p99 added", "agg ratio", "CPU µs/tok",
            "LiteLLM (added/ratio/µs)", "LocalLMarket (added/ratio/µs)", "verdict")
    rows = []
    for r in results:
        d, rl, c = r["direct"], r["relay"], r["cmp"]
        peers = PEERS.get((r["mode"], r["conc"]))
        added, ratio, cpu = c["ttft_p50_added_ms"], c["agg_tps_ratio"], rl["relay_cpu_us_per_token"]
        cells = []
        verdict = "-"
        if peers:
            beats = []
            for name in ("LiteLLM", "LocalLMarket"):
                (t_lo, _), (_, r_hi), (u_lo, _) = peers[name]
                p_t, p_r, p_u = peers[name]
                cells.append(f"+{_fmt_range(*p_t, '{:g}')} / {_fmt_range(*p_r, '{:.2f}')} / {_fmt_range(*p_u, '{:g}')}")
                # beating a peer: better than its best figure on every column
                beats.append(added < t_lo and ratio > r_hi and cpu < u_lo)
            verdict = "beats both" if all(beats) else ("beats " + ", ".join(n for n, b in zip(("LiteLLM", "LocalLMarket"), beats) if b) if any(beats) else "not")
        else:
            cells = ["", ""]
        rows.append((r["mode"], str(r["conc"]), f"{d['ttft_p50_ms']:.1f}", f"{rl['ttft_p50_ms']:.1f}", f"{added:+.1f}",
                     f"{c['ttft_p99_added_ms']:+.1f}", f"{ratio:.3f}", f"{cpu:.0f}", *cells, verdict))
    return _table(head, rows)


def _table(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


# --- part 2: the reference backend, in process -------------------------------
def reference_bench(tokens: int, rounds: int) -> str:
    import logging

    import httpx
    import trio
    from gpunexus.node.backends.base import GenerationRequest
    from gpunexus.node.backends.reference import ReferenceBackend
    from gpunexus.node.gateway import GatewayConfig
    from gpunexus.node.p2p import P2PConfig
    from gpunexus.node.runtime import (
        GatewayOptions,
        HostOptions,
        open_gateway,
        open_host,
    )
    from gpunexus.protocol.messages import ChatMessage, Sampling

    logging.getLogger("httpx").setLevel(logging.WARNING)
    backend = ReferenceBackend("tiny")
    prompt = "Count tokens for me please."
    loop = ["/ip4/127.0.0.1/tcp/0"]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    async def direct_one(i: int):
        req = GenerationRequest("chat", (ChatMessage(role="user", content=prompt),), "", "",
                                Sampling(temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=i), tokens)
        send, receive = trio.open_memory_channel(float("inf"))
        t0 = time.perf_counter()
        first = None
        n = 0
        async with trio.open_nursery() as nursery:
            async def gen():
                async with send:
                    await backend.generate(req, send)
            nursery.start_soon(gen)
            async with receive:
                async for _ in receive:
                    n += 1
                    if first is None:
                        first = time.perf_counter()
        return first - t0, n, time.perf_counter() - t0

    async def relay_one(client, url, i: int):
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": tokens,
                "seed": i, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first = None
        n = 0
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or ()
                if choices and (choices[0].get("delta") or {}).get("content"):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
        return first - t0, n, time.perf_counter() - t0

    rows = []

    async def main():
        async with open_host(HostOptions(backend=backend, price_micro_per_mtok=200_000, p2p=P2PConfig(listen=loop),
                                         max_slots=32, tokens_per_s=100.0)) as host:
            addr = host.node.listen_addrs()[0]
            async with open_gateway(GatewayOptions(port=0, p2p=P2PConfig(listen=loop, bootstrap=[addr]),
                                                   config=GatewayConfig(first_token_timeout=30.0))) as gw:
                with trio.fail_after(30):
                    while not gw.book.for_model("tiny"):
                        await gw.book.changed.wait()
                url = gw.base_url + "/chat/completions"
                async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
                    # Warm-up, both ways: spare streams, connections, numpy's first calls.
                    await direct_one(0)
                    await relay_one(client, url, 0)
                    for conc in (1, 32):
                        acc = {"direct": ([], 0, 0.0), "relay": ([], 0, 0.0)}
                        for r in range(rounds):
                            for kind in (("direct", "relay") if r % 2 == 0 else ("relay", "direct")):
                                log(f"reference backend: {kind}, {conc} stream(s), round {r + 1}/{rounds}")
                                out = []
                                t0 = time.perf_counter()

                                async def one(i, kind=kind, out=out):
                                    out.append(await (direct_one(i) if kind == "direct" else relay_one(client, url, i)))

                                async with trio.open_nursery() as nursery:
                                    for i in range(conc):
                                        nursery.start_soon(one, 1000 * r + i)
                                wall = time.perf_counter() - t0
                                ttfts, n, w = acc[kind]
                                acc[kind] = (ttfts + [o[0] * 1000 for o in out], n + sum(o[1] for o in out), w + wall)
                        d, rl = acc["direct"], acc["relay"]
                        rows.append((str(conc), f"{pct(d[0], .5):.1f}", f"{pct(rl[0], .5):.1f}", f"{pct(rl[0], .5) - pct(d[0], .5):+.1f}",
                                     f"{pct(d[0], .99):.1f}", f"{pct(rl[0], .99):.1f}",
                                     f"{d[1] / d[2]:.0f}", f"{rl[1] / rl[2]:.0f}", f"{(rl[1] / rl[2]) / (d[1] / d[2]):.3f}"))

    trio.run(main)
    head = ("streams", "TTFT p50 direct ms", "relay", "added", "TTFT p99 direct", "relay", "tok/s direct", "relay", "ratio")
    return _table(head, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("fast-rounds-1", "fast-rounds-32", "paced-rounds-1", "paced-rounds-32"):
        ap.add_argument(f"--{name}", type=int, default=None, help="passed to relay_bench.py (default: the harness's own)")
    ap.add_argument("--out", default="", help="write the harness's JSON rows here")
    ap.add_argument("--skip-harness", action="store_true", help="only the reference-backend table")
    ap.add_argument("--skip-reference", action="store_true", help="only the harness table")
    ap.add_argument("--serve-only", action="store_true", help="start source, host and gateway, print their URLs and pids as JSON, wait (for profiling)")
    ap.add_argument("--ref-tokens", type=int, default=32, help="tokens per request for the reference backend (default 32)")
    ap.add_argument("--ref-rounds", type=int, default=2, help="rounds per concurrency for the reference backend (default 2)")
    args = ap.parse_args()
    if not SHARED_BENCH.is_dir() and not args.skip_harness:
        raise SystemExit(f"shared bench harness not found at {SHARED_BENCH}")

    procs = Procs()
    # Ctrl-C and SIGTERM both become KeyboardInterrupt, so the finally below stops the children
    # (SIGINT explicitly too: a shell's background job starts with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = None
    ref = None
    try:
        with tempfile.TemporaryDirectory(prefix="gpunexus-relay-") as tmp:
            if not args.skip_harness:
                results = run_harness(args, procs, Path(tmp))
                procs.stop()
            if not args.skip_reference:
                ref = reference_bench(args.ref_tokens, args.ref_rounds)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        procs.stop()
    if results:
        print("\nopenai SDK-style client -> gateway -> libp2p -> host (--backend openai) -> token source, vs the source directly")
        print(harness_table(results))
    if ref:
        print(f"\nreference backend (gpunexus.verify 'tiny', {args.ref_tokens} tokens/request): backend called directly vs HTTP -> gateway -> libp2p -> host")
        print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
