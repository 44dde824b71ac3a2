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

With ``--many-streams 128,512`` (the default) the same processes then run
paced batches (50 tokens/s per stream) at those concurrencies, one round
each (``--paced-rounds-many``), with the host's ``--slots`` raised to match.
The harness measures the token source's and its own (the client's) CPU next
to the relay's; this script samples the gateway's and host's resident memory
during each row for the memory per stream, and names the limit of each row:
"machine" when the direct batches already fall short of the paced demand
(source and client cannot keep up) or relay, source and client together use
at least 90 % of the cores, "relay" when the ratio falls short otherwise. The harness's HTTP client keeps at most 256
connections, so a 512-stream batch is 256 streams at a time on the client side.

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
import threading
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
                                "--slots", str(max([64, *args.many_streams])),
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
    gateway = procs.start("gateway", [py, "-m", "gpunexus", "node", "gateway", "--port", str(gw_port), "--bootstrap", peer,
                                      *(["--no-sessions"] if args.no_sessions else [])],
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
    results = _run_harness_once(argv, procs, out)
    pids = {"gateway": gateway.pid, "host": host.pid}
    for conc in args.many_streams:  # one harness run per concurrency, so each row has its own memory peak
        many_out = tmp / f"relay-{conc}.json"
        many = argv[: argv.index("--out")] + [
            "--out", str(many_out), "--label", "gpunexus", "--conc", str(conc),
            "--fast-rounds-32", "0", "--paced-rounds-32", str(args.paced_rounds_many)]
        idle = {name: rss_bytes(pid) for name, pid in pids.items()}
        with RssPeak(pids) as peak:
            rows = _run_harness_once(many, procs, many_out)
        for row in rows:
            row["rss_idle"] = idle
            row["rss_peak"] = dict(peak.peak)
        results += rows
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def _run_harness_once(argv: list[str], procs: Procs, out: Path) -> list[dict]:
    harness = subprocess.Popen(argv, stdout=sys.stderr, start_new_session=True)
    procs.procs.append(("harness", harness))
    rc = harness.wait()
    if rc != 0:
        raise SystemExit(f"relay_bench.py exited with {rc}")
    return json.loads(out.read_text())["results"]


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (Linux /proc), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssPeak:
    """Samples the peak resident memory of named processes in a thread while the block runs."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.2) -> None:
        self.pids = pids
        self.every_s = every_s
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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


def many_streams_table(results: list[dict]) -> str:
    """The paced rows past 32 streams: ratio, TTFT, the relay's CPU against the source's and the client's, memory."""
    cores = os.cpu_count() or 1
    head = ("streams", "agg ratio", "TTFT p50 added ms", "relay CPU µs/tok", "relay CPU %", "source CPU %",
            "client CPU %", "gateway+host MB per stream", "relay errors", "limit")
    rows = []
    for r in results:
        if r["mode"] != "paced" or r["conc"] <= 32:
            continue
        d, rl, c = r["direct"], r["relay"], r["cmp"]
        relay, source, client = rl["relay_cpu_pct"], rl["source_cpu_pct"], rl["client_cpu_pct"]
        direct_share = (d["agg_tps"] or 0) / (r["conc"] * r["rate"])
        if direct_share < 0.95 or relay + source + client >= 90 * cores:
            limit = f"machine (direct: {direct_share:.0%} of {r['conc'] * r['rate']:,.0f} tok/s asked)"
        else:
            limit = "relay" if (c["agg_tps_ratio"] or 0) < 0.98 else "-"
        grown = sum(r["rss_peak"].values()) - sum(r["rss_idle"].values()) if "rss_peak" in r else None
        per_stream = f"{grown / r['conc'] / 1e6:.2f}" if grown is not None else "-"
        rows.append((str(r["conc"]), f"{c['agg_tps_ratio']:.3f}", f"{c['ttft_p50_added_ms']:+.1f}",
                     f"{rl['relay_cpu_us_per_token']:.0f}", f"{relay:.0f}", f"{source:.0f}", f"{client:.0f}",
                     per_stream, str(rl["errors"]), limit))
    return _table(head, rows) + (f"\n(this machine: {cores} cores = {100 * cores} %. The limit is the machine "
                                 "when the direct batches themselves fall short of the paced demand (the source "
                                 "and the client cannot keep up, so the relay's ratio says little) or the three "
                                 "together use 90 % of the cores. Memory per stream: peak resident growth of "
                                 "gateway + host over idle during that row, divided by its streams.)")


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
    from gpunexus.node.gateway.service import GatewayConfig
    from gpunexus.node.net.p2p import P2PConfig
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
    ap.add_argument("--many-streams", default="128,512",
                    help="paced concurrencies past 32 to run after the harness's own rows, comma-separated "
                         "(default 128,512; empty to skip)")
    ap.add_argument("--paced-rounds-many", type=int, default=1,
                    help="rounds of each --many-streams concurrency (default 1)")
    ap.add_argument("--no-sessions", action="store_true", help="the gateway opens one stream per request (as before sessions), for comparison")
    ap.add_argument("--out", default="", help="write the harness's JSON rows here")
    ap.add_argument("--skip-harness", action="store_true", help="only the reference-backend table")
    ap.add_argument("--skip-reference", action="store_true", help="only the harness table")
    ap.add_argument("--serve-only", action="store_true", help="start source, host and gateway, print their URLs and pids as JSON, wait (for profiling)")
    ap.add_argument("--ref-tokens", type=int, default=32, help="tokens per request for the reference backend (default 32)")
    ap.add_argument("--ref-rounds", type=int, default=2, help="rounds per concurrency for the reference backend (default 2)")
    args = ap.parse_args()
    try:
        args.many_streams = [int(c) for c in args.many_streams.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--many-streams takes comma-separated integers, not {args.many_streams!r}")
    if any(c <= 32 for c in args.many_streams) or args.paced_rounds_many < 1:
        ap.error("--many-streams values must be above 32 (the harness's own rows cover 1 and 32), "
                 "--paced-rounds-many at least 1")
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
        print(harness_table([r for r in results if r["conc"] <= 32]))
        if any(r["conc"] > 32 for r in results):
            print("\npaced 50 tokens/s per stream, many streams on one gateway and one host")
            print(many_streams_table(results))
    if ref:
        print(f"\nreference backend (gpunexus.verify 'tiny', {args.ref_tokens} tokens/request): backend called directly vs HTTP -> gateway -> libp2p -> host")
        print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
