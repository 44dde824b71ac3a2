"""Chaos suite: real processes on loopback, a seeded schedule of failures, then the invariants.

``python -m gpunexus.chaos --seed 1 --rounds 3`` starts a hub (SQLite in a
temporary folder), three hosts (``--backend reference``, one slot each so a
burst saturates them) and one gateway per client account (a gateway serves
one ``--api-key`` today), every one a separate ``gpunexus`` process with its
own ``$GPUNEXUS_HOME``, exactly as a user starts them. Clients are the
official ``openai`` SDK, streaming with usage, each call under a deadline.

The schedule (:func:`make_schedule`) is a pure function of the seed: per
round, client streams at random offsets plus events drawn from kill -9 and
restart of a host, kill -9 and restart of the hub (same database, port and
home, so its signing key persists), a burst of concurrent streams that makes
hosts busy, a grant of a few hundred micro-USD to a client living on a small
balance, and (once per run) ``hub key revoke`` of a client's key.

Afterwards everything is stopped gracefully and the run is judged only from
outside, from what the processes left behind: what each client saw, the
hub's exported receipt log (``gpunexus audit`` must accept it), the
gateways' receipt queues and the hub's ledger, read directly from SQLite.
The invariants (:meth:`ChaosResult.violations`):

* every stream either completed with the exact uninterrupted text (the
  reference backend is deterministic given the seed; each request's text is
  taken from two runs on the healthy swarm before any chaos) or got an HTTP
  error status before its first token; a stream that broke after content, or
  hung past its deadline, is a violation;
* no receipt lost (countersigned by a gateway, then neither settled nor
  refused by the hub) or settled twice, and every stream a client saw
  complete has a settled receipt (unpaid work otherwise), except where the
  gateway refused to countersign;
* no balance below zero, all accounts sum to zero, every cached balance is
  the sum of its postings, the holds equal the live allowances, and each
  client was charged exactly its settled receipts;
* no process left running.

A receipt is matched to the stream it paid for by (gateway peer id, seed):
every distinct request of a run has its own seed, the gateway passes the
client's seed through to every host it tries, and each receipt carries it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import openai
import sqlalchemy as sa
import trio

from gpunexus.protocol.codec import decode_as
from gpunexus.protocol.messages import Receipt

log = logging.getLogger("gpunexus.chaos")

MODEL = "tiny"
TEMPERATURE = 0.8
HOST_PRICE_USD = "0.50"
"""At 0.50 USD per million tokens a 400-token request costs about 210 micro-USD,
so a balance of a few hundred micro-USD runs out within a round."""
SMALL_GRANT_USD = "0.0003"
"""``hub credits grant`` takes USD: this is 300 micro-USD."""
PROMPTS = (
    "Tell me about the sea.",
    "List three prime numbers.",
    "Write a haiku about routers.",
    "Why is the sky blue?",
    "Explain double-entry bookkeeping.",
    "Say something nice.",
)
MAX_TOKENS = (48, 200, 400)
CLIENTS = {"rich": "5", "poor": SMALL_GRANT_USD, "revoked": "1"}
"""Client accounts (name -> initial credits in USD): ``rich`` also runs the
reference streams and the bursts, ``poor`` lives on a few hundred micro-USD,
``revoked`` loses its key during the run."""
CLIENT_WEIGHTS = {"rich": 4, "poor": 3, "revoked": 3}
START_S = 30.0
STOP_S = 10.0
CLI_S = 60.0
ROUND_S = 8.0


# --- the schedule: a pure function of the seed ---------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """One distinct request of a run; its own seed ties receipts to streams."""

    index: int
    prompt: str
    seed: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Stream:
    at: float
    """Seconds after the round starts."""
    client: str
    request: int


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str
    """``kill_host``, ``kill_hub``, ``busy``, ``grant`` or ``revoke``."""
    target: str = ""
    down_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Round:
    index: int
    streams: tuple[Stream, ...]
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    requests: tuple[Request, ...]
    rounds: tuple[Round, ...]


_REPEATABLE = ("kill_host", "kill_hub", "busy", "grant")


def make_schedule(seed: int, rounds: int, round_s: float, hosts: int = 3) -> Schedule:
    """The run's requests and rounds, from ``random.Random(seed)`` alone.

    Every event kind occurs at least once when the run has room for it (the
    first events are a shuffled permutation of all kinds), so even a short
    run exercises each failure; the revocation happens exactly once.
    """
    rng = random.Random(seed)
    seeds = rng.sample(range(1, 2**31), len(PROMPTS))
    requests = tuple(Request(i, p, s, rng.choice(MAX_TOKENS)) for i, (p, s) in enumerate(zip(PROMPTS, seeds)))
    longest = [r.index for r in requests if r.max_tokens == max(r.max_tokens for r in requests)]
    per_round = max(2, min(3, -(-(len(_REPEATABLE) + 1) // rounds)))  # room for every kind, 2 or 3 a round
    kinds = [*_REPEATABLE, "revoke"]
    rng.shuffle(kinds)
    kinds += [rng.choice(("kill_host", "kill_host", "kill_hub", "busy", "grant")) for _ in range(per_round * rounds)]
    names, weights = list(CLIENT_WEIGHTS), list(CLIENT_WEIGHTS.values())
    out = []
    for r in range(rounds):
        streams = [Stream(round(rng.uniform(0, 0.7 * round_s), 2), rng.choices(names, weights)[0], rng.randrange(len(requests)))
                   for _ in range(rng.randint(4, 7))]
        events = []
        for kind in kinds[r * per_round:(r + 1) * per_round]:
            at = round(rng.uniform(0.1, 0.6) * round_s, 2)
            if kind == "kill_host":
                events.append(Event(at, kind, f"host{rng.randrange(hosts)}", round(rng.uniform(0.5, 2.5), 2)))
                # Long streams just before the kill, one per host, so the killed one dies mid-stream.
                streams += [Stream(round(max(0.0, at - 0.6), 2), "rich", rng.choice(longest)) for _ in range(hosts)]
            elif kind == "kill_hub":
                events.append(Event(at, kind, "hub", round(rng.uniform(1.0, 3.0), 2)))
            elif kind == "busy":
                events.append(Event(at, kind, "rich"))
                streams += [Stream(at, "rich", rng.choice(longest)) for _ in range(rng.randint(7, 10))]
            elif kind == "grant":
                events.append(Event(at, kind, "poor"))
            else:
                events.append(Event(at, kind, "revoked"))
        out.append(Round(r, tuple(sorted(streams, key=lambda s: s.at)), tuple(sorted(events, key=lambda e: e.at))))
    return Schedule(requests, tuple(out))


# --- results ---------------------------------------------------------------------------
@dataclass(slots=True)
class StreamResult:
    """What one client call saw."""

    phase: str
    """``reference`` (healthy swarm, before any chaos) or ``chaos``."""
    round: int
    client: str
    request: int
    started_s: float
    status: str = "pending"
    """``completed``, ``clean_error`` (HTTP status before the first token), or a
    violation: ``broken`` (ended badly after content, or without an HTTP status),
    ``hung`` (deadline), ``wrong_text``, ``no_usage``, ``truncated`` (no finish)."""
    http_status: int | None = None
    detail: str = ""
    text: str = ""
    completion_tokens: int | None = None
    elapsed_s: float = 0.0

    @property
    def saw_complete(self) -> bool:
        """The client received a finished stream: the work must be paid."""
        return self.status in ("completed", "wrong_text", "no_usage")

    @property
    def violation(self) -> bool:
        return self.status not in ("completed", "clean_error")


@dataclass(slots=True)
class ReceiptFigures:
    countersigned: int = 0
    """Request ids the gateways countersigned (their queues keep every one with its audit opening)."""
    settled: int = 0
    refused_by_hub: list[str] = field(default_factory=list)
    """``request id: reason`` of countersigned receipts the hub refused for good."""
    lost: list[str] = field(default_factory=list)
    """Countersigned, then neither settled nor refused (``request id (gateway): where``)."""
    double_billed: list[str] = field(default_factory=list)
    not_countersigned: int = 0
    """Receipts a gateway refused to countersign (its log says so): no pay is owed."""
    unpaid_work: int = 0
    """Streams a client saw complete with no settled receipt, less ``not_countersigned``."""
    billed_without_stream: int = 0
    """Settled receipts with no stream a client saw complete."""
    audit_exit: int | None = None
    audit_output: str = ""


@dataclass(slots=True)
class LedgerFigures:
    total: int = 0
    accounts: int = 0
    negative: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    holds: int = 0
    live_allowances: int = 0
    client_drift: dict[str, int] = field(default_factory=dict)
    """Per client: (balance + live allowance) - (grants + refunds - settled costs); must be 0."""


@dataclass(slots=True)
class ChaosResult:
    seed: int
    rounds: int
    hosts: int
    wall_s: float = 0.0
    streams: list[StreamResult] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    """Events carried out, by kind (``kill_host``, ``kill_hub``, ``busy``, ``grant``, ``revoke``)."""
    receipts: ReceiptFigures = field(default_factory=ReceiptFigures)
    ledger: LedgerFigures = field(default_factory=LedgerFigures)
    mid_stream_failovers: int = 0
    """Hosts that died mid-stream and were replaced by a continuation (the gateways' logs say so)."""
    hosts_seen: list[list[int]] = field(default_factory=list)
    """After each round: how many hosts each gateway's offer book holds (a restarted host must come back)."""
    served_after_revocation: int = 0
    """Streams of the revoked key started over a second after ``hub key revoke`` that got content."""
    processes_started: int = 0
    left_running: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    """What went wrong outside the invariants (a process that would not start or stop)."""
    reference_mismatch: list[int] = field(default_factory=list)
    """Requests whose two reference runs on the healthy swarm differed."""
    work_dir: str = ""

    def chaos_streams(self) -> list[StreamResult]:
        return [s for s in self.streams if s.phase == "chaos"]

    def violations(self) -> list[str]:
        """Every broken invariant, named (empty when the run holds)."""
        out = [f"stream r{s.round} {s.client} req{s.request} at {s.started_s:.1f}s: {s.status}: {s.detail}"
               for s in self.streams if s.violation]
        out += [f"reference request {i}: two runs on the healthy swarm gave different text" for i in self.reference_mismatch]
        r = self.receipts
        out += [f"receipt lost: {x}" for x in r.lost]
        out += [f"receipt settled twice: {x}" for x in r.double_billed]
        out += [f"receipt refused by the hub (host unpaid): {x}" for x in r.refused_by_hub]
        if r.unpaid_work:
            out.append(f"unpaid work: {r.unpaid_work} streams the client saw complete have no settled receipt")
        if r.billed_without_stream:
            out.append(f"{r.billed_without_stream} settled receipts match no stream a client saw complete")
        if r.audit_exit != 0:
            out.append(f"gpunexus audit exited {r.audit_exit}: {r.audit_output.strip()[-600:]}")
        g = self.ledger
        out += [f"ledger: balance below zero: {x}" for x in g.negative]
        out += [f"ledger: cached balance differs from its postings: {x}" for x in g.mismatched]
        if g.total:
            out.append(f"ledger: accounts sum to {g.total}, not 0")
        if g.holds != g.live_allowances:
            out.append(f"ledger: platform:holds is {g.holds} but live allowances hold {g.live_allowances}")
        out += [f"ledger: client {c} off by {d} micro-USD from grants minus settled receipts" for c, d in g.client_drift.items() if d]
        out += [f"process left running: {x}" for x in self.left_running]
        return out

    @property
    def ok(self) -> bool:
        return not self.violations()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["events"] = dict(self.events)
        for s in out["streams"]:
            s.pop("text")
        out["violations"] = self.violations()
        out["ok"] = self.ok
        return out

    def table(self) -> str:
        """The figures, then every violation and incident."""
        chaos = self.chaos_streams()
        done = sum(s.status == "completed" for s in chaos)
        clean = Counter(s.http_status for s in chaos if s.status == "clean_error")
        bad = Counter(s.status for s in chaos if s.violation)
        r, g = self.receipts, self.ledger
        rows = [
            ("rounds", f"{self.rounds} (seed {self.seed}, {self.wall_s:.0f} s)"),
            ("streams", f"{len(chaos)}: {done} completed, {sum(clean.values())} clean errors "
                        f"({', '.join(f'{k}: {v}' for k, v in sorted(clean.items(), key=str)) or '-'}), "
                        f"{sum(bad.values())} violations ({', '.join(f'{k}: {v}' for k, v in sorted(bad.items())) or '-'})"),
            ("reference streams", f"{sum(s.phase == 'reference' for s in self.streams)} (healthy swarm, before chaos)"),
            ("kills", f"hosts {self.events['kill_host']}, hub {self.events['kill_hub']}; busy bursts {self.events['busy']}, "
                      f"small grants {self.events['grant']}, revocations {self.events['revoke']}"),
            ("mid-stream failovers", str(self.mid_stream_failovers)),
            ("hosts in books", "; ".join(f"r{i}: {'/'.join(map(str, n))}" for i, n in enumerate(self.hosts_seen))
             + f" (of {self.hosts}, per gateway, after each round)"),
            ("receipts", f"countersigned {r.countersigned}, settled {r.settled}, refused by hub {len(r.refused_by_hub)}, "
                         f"lost {len(r.lost)}, double-billed {len(r.double_billed)}"),
            ("unpaid work", f"{r.unpaid_work} (not countersigned by the gateway: {r.not_countersigned}); "
                            f"billed without a completed stream: {r.billed_without_stream}"),
            ("audit", f"gpunexus audit exit {r.audit_exit}"),
            ("ledger", f"{g.accounts} accounts sum to {g.total}; below zero {len(g.negative)}; holds {g.holds} "
                       f"vs live allowances {g.live_allowances}; client drift {sum(map(abs, g.client_drift.values()))}"),
            ("after revocation", f"{self.served_after_revocation} streams served over 1 s after the key was revoked"),
            ("processes", f"{self.processes_started} started, {len(self.left_running)} left running"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        violations = self.violations()
        lines.append(f"VIOLATIONS ({len(violations)})" if violations else "all invariants hold")
        lines += [f"  - {v}" for v in violations]
        if self.incidents:
            lines.append(f"incidents ({len(self.incidents)})")
            lines += [f"  - {i}" for i in self.incidents]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    seed: int = 1
    rounds: int = 3
    round_s: float = ROUND_S
    hosts: int = 3
    stream_deadline_s: float = 45.0
    """Longer than the gateway's own stall timeout (30 s), so only a real hang trips it."""
    drain_s: float = 8.0
    """How long gateways get to deliver their queues before they are restarted to deliver."""
    run_deadline_s: float | None = None
    """The whole run (default: rounds x round_s + 240 s)."""
    work_dir: str | None = None
    """Kept when given (logs, databases); otherwise a temporary folder, removed."""


# --- processes -------------------------------------------------------------------------
class StartFailed(Exception):
    pass


class Proc:
    """One ``gpunexus`` command, restartable with the same arguments and home.

    Each incarnation writes its stdout to its own file (the first line is the
    address the tools print) and appends its stderr to the role's log, so
    nothing can block on a full pipe and logs survive a kill -9.
    """

    def __init__(self, name: str, args: list[str], home: Path, ready: str) -> None:
        self.name, self.args, self.home, self.ready = name, args, home, ready
        self.lock = trio.Lock()
        """Held across a kill and its restart, so two events on one target do not interleave."""
        self.process: trio.Process | None = None
        self.incarnations = 0
        self.pids: list[int] = []
        home.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.home / "stderr.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> str:
        """Start it and return the value of its first line (``peer: X`` -> ``X``)."""
        self.incarnations += 1
        out_path = self.home / f"stdout.{self.incarnations}"
        with open(out_path, "wb") as out, open(self.log, "ab") as err:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "gpunexus", *self.args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**os.environ, "GPUNEXUS_HOME": str(self.home)}, start_new_session=True)
        self.pids.append(self.process.pid)
        with trio.fail_after(START_S):
            while True:
                line = out_path.read_text().partition("\n")
                if line[1] and line[0].startswith(self.ready):
                    return line[0][len(self.ready):].strip()
                if self.process.poll() is not None:
                    raise StartFailed(f"{self.name} exited {self.process.returncode} before it was ready: {self.tail()}")
                await trio.sleep(0.05)

    def tail(self, lines: int = 2) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(text[-lines:])

    async def kill9(self) -> None:
        if self.running:
            self.process.kill()
            with trio.fail_after(STOP_S):
                await self.process.wait()

    async def stop(self, sig: int) -> bool:
        """Ask it to stop; kill -9 after ``STOP_S``. True when it stopped by itself."""
        if not self.running:
            return True
        self.process.send_signal(sig)
        with trio.move_on_after(STOP_S):
            await self.process.wait()
            return True
        await self.kill9()
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Client:
    name: str
    email: str
    key: str
    gateway: Proc
    peer_id: str = ""
    base_url: str = ""
    revoked_at: float | None = None


class Swarm:
    """The processes of one run and the admin CLI against the hub's database."""

    def __init__(self, root: Path, hosts: int) -> None:
        self.root = root
        self.hub_port = _free_port()
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"
        self.hub = Proc("hub", ["hub", "serve", "--port", str(self.hub_port)], root / "hub", "hub ")
        self.host_ports = [_free_port() for _ in range(hosts)]
        self.hosts: list[Proc] = []
        self.clients: dict[str, Client] = {}

    @property
    def procs(self) -> list[Proc]:
        return [self.hub, *self.hosts, *(c.gateway for c in self.clients.values())]

    async def cli(self, *args: str) -> str:
        """One ``gpunexus`` admin command on the hub's home; its stdout, or RuntimeError."""
        with trio.fail_after(CLI_S):
            done = await trio.run_process([sys.executable, "-m", "gpunexus", *args], capture_stdout=True, capture_stderr=True,
                                          check=False, env={**os.environ, "GPUNEXUS_HOME": str(self.hub.home)})
        if done.returncode != 0:
            raise RuntimeError(f"gpunexus {' '.join(args[:3])} exited {done.returncode}: {done.stderr.decode(errors='replace')[-400:]}")
        return done.stdout.decode()

    async def setup(self) -> None:
        """Accounts and credits first (the CLI works on the database), then the processes."""
        # The first command creates the schema, so it runs alone; all hosts share its account.
        host_key = (await self.cli("hub", "user", "add", "hosts@chaos.test", "--role", "host")).strip().splitlines()[-1]
        keys: dict[str, str] = {}

        async def add(name: str) -> None:
            keys[name] = (await self.cli("hub", "user", "add", f"{name}@chaos.test", "--role", "client")).strip().splitlines()[-1]
            await self.cli("hub", "credits", "grant", f"{name}@chaos.test", CLIENTS[name])

        async with trio.open_nursery() as nursery:
            for name in CLIENTS:
                nursery.start_soon(add, name)
            nursery.start_soon(self.hub.start)
        for i, port in enumerate(self.host_ports):
            self.hosts.append(Proc(f"host{i}", [
                # One slot and one queue place: a burst of a few streams makes every host busy.
                # A speed is announced rather than measured, which would cost CPU at every restart.
                "node", "serve", "--model", MODEL, "--backend", "reference", "--price", HOST_PRICE_USD, "--slots", "1",
                "--queue", "1", "--tokens-per-s", "400", "--listen", f"/ip4/127.0.0.1/tcp/{port}",
                "--hub", self.hub_url, "--api-key", host_key], self.root / f"host{i}", "peer: "))
        peers: list[str] = []
        async with trio.open_nursery() as nursery:
            for host in self.hosts:
                nursery.start_soon(_start_into, host, peers)
        for name in CLIENTS:
            port = _free_port()
            bootstrap = [a for p in sorted(peers) for a in ("--bootstrap", p)]
            gateway = Proc(f"gateway-{name}", ["node", "gateway", "--port", str(port), *bootstrap, "--hub", self.hub_url,
                                               "--api-key", keys[name], "--first-token-timeout", "5"],
                           self.root / f"gateway-{name}", "base_url: ")
            self.clients[name] = Client(name, f"{name}@chaos.test", keys[name], gateway)
        async with trio.open_nursery() as nursery:
            for client in self.clients.values():
                nursery.start_soon(self.start_gateway, client)

    async def start_gateway(self, client: Client) -> None:
        client.base_url = await client.gateway.start()
        async with httpx.AsyncClient(timeout=5) as http:
            client.peer_id = (await http.get(client.base_url.removesuffix("/v1") + "/healthz")).json()["peer_id"]
        with trio.fail_after(START_S):
            while await self.hosts_in_book(client) < len(self.hosts):  # every host's offer: the swarm is whole
                await trio.sleep(0.2)

    async def hosts_in_book(self, client: Client) -> int:
        """How many hosts the client's gateway lists for the model (``GET /v1/models``); 0 if it cannot say."""
        async with httpx.AsyncClient(timeout=5) as http:
            try:
                models = (await http.get(client.base_url + "/models")).json()["data"]
            except (httpx.HTTPError, ValueError, KeyError):
                return 0
        return next((m["hosts"] for m in models if m.get("id") == MODEL), 0)

    async def restart(self, proc: Proc, incidents: list[str]) -> None:
        """Start ``proc`` again; a host cannot start while the hub is away, so retry (and say so)."""
        with trio.fail_after(START_S * 2):
            while True:
                try:
                    await proc.start()
                    return
                except StartFailed as exc:
                    incidents.append(f"restart: {exc}")
                    await trio.sleep(1.0)


async def _start_into(proc: Proc, out: list[str]) -> None:
    out.append(await proc.start())


# --- the run ---------------------------------------------------------------------------
def run(config: ChaosConfig) -> ChaosResult:
    """Run the chaos suite once (blocking); every child process is gone when it returns."""
    return trio.run(_run, config)


async def _run(config: ChaosConfig) -> ChaosResult:
    schedule = make_schedule(config.seed, config.rounds, config.round_s, config.hosts)
    result = ChaosResult(config.seed, config.rounds, config.hosts)
    root = Path(config.work_dir) if config.work_dir else Path(tempfile.mkdtemp(prefix="gpunexus-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    result.work_dir = str(root)
    swarm = Swarm(root, config.hosts)
    started = trio.current_time()
    try:
        with trio.fail_after(config.run_deadline_s or config.rounds * config.round_s + 240):
            await swarm.setup()
            log.info("%.1f s: hub, %d hosts and %d gateways up", trio.current_time() - started, config.hosts, len(swarm.clients))
            references = await _reference_runs(swarm, schedule, config, result, started)
            log.info("%.1f s: reference texts taken", trio.current_time() - started)
            for rnd in schedule.rounds:
                await _play_round(swarm, schedule, rnd, config, result, started)
                result.hosts_seen.append([await swarm.hosts_in_book(c) for c in swarm.clients.values()])
                log.info("%.1f s: round %d done", trio.current_time() - started, rnd.index)
            await _drain(swarm, config, result)
            log.info("%.1f s: queues drained; stopping", trio.current_time() - started)
            await _stop(swarm, result)
            log.info("%.1f s: stopped; judging", trio.current_time() - started)
            result.left_running += _left_running(swarm.procs)
            _judge_streams(result, references)
            result.served_after_revocation = sum(
                1 for s in result.chaos_streams()
                if (t := swarm.clients[s.client].revoked_at) is not None and s.started_s > t + 1.0 and s.text)
            await _judge_receipts(swarm, schedule, result)
            _judge_ledger(swarm, result)
    finally:
        with trio.CancelScope(shield=True):
            stragglers = _left_running(swarm.procs)
            for proc in swarm.procs:
                with contextlib.suppress(trio.TooSlowError):
                    await proc.kill9()
                for pid in proc.pids:  # anything the child left behind in its session
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
        result.left_running += [x for x in stragglers if x not in result.left_running]
        result.processes_started = sum(len(p.pids) for p in swarm.procs)
        result.wall_s = trio.current_time() - started
        if not config.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    return result


async def _stop(swarm: Swarm, result: ChaosResult) -> None:
    """Gateways, then hosts, then the hub they talk to, each group at once.

    The node commands stop cleanly on SIGINT (trio unwinds every nursery); the
    hub handles SIGTERM. One that does not stop within ``STOP_S`` is killed
    and counts as left running.
    """
    async def stop(proc: Proc, sig: signal.Signals) -> None:
        if not await proc.stop(sig):
            result.left_running.append(f"{proc.name} (pid {proc.pids[-1]}): still running {STOP_S:.0f} s after {sig.name}; killed")

    for group, sig in (([c.gateway for c in swarm.clients.values()], signal.SIGINT), (swarm.hosts, signal.SIGINT),
                       ([swarm.hub], signal.SIGTERM)):
        async with trio.open_nursery() as nursery:
            for proc in group:
                nursery.start_soon(stop, proc, sig)


async def _reference_runs(swarm: Swarm, schedule: Schedule, config: ChaosConfig, result: ChaosResult,
                          started: float) -> dict[int, StreamResult]:
    """Each request twice, one at a time, on the healthy swarm: the text every later stream must match.

    One at a time, because "healthy" must mean it: concurrent requests could
    meet the very failures (busy hosts) the rounds are there to provoke.
    """
    runs = [await _stream(swarm.clients["rich"], request, "reference", -1, config, started)
            for request in schedule.requests * 2]
    result.streams += runs
    references: dict[int, StreamResult] = {}
    for request in schedule.requests:
        pair = [s for s in runs if s.request == request.index]
        if not all(s.status == "finished" for s in pair):
            raise RuntimeError(f"the healthy swarm could not serve request {request.index}: {[s.detail for s in pair]}")
        if pair[0].text != pair[1].text or pair[0].completion_tokens != pair[1].completion_tokens:
            result.reference_mismatch.append(request.index)
        references[request.index] = pair[0]
    return references


async def _play_round(swarm: Swarm, schedule: Schedule, rnd: Round, config: ChaosConfig, result: ChaosResult,
                      started: float) -> None:
    """The round's streams and events at their offsets; returns once every restart is done."""
    t0 = trio.current_time()

    async def at(offset: float) -> None:
        await trio.sleep_until(t0 + offset)

    async def stream(s: Stream) -> None:
        await at(s.at)
        out = await _stream(swarm.clients[s.client], schedule.requests[s.request], "chaos", rnd.index, config, started)
        result.streams.append(out)

    async def event(e: Event) -> None:
        await at(e.at)
        if e.kind in ("kill_host", "kill_hub"):
            proc = swarm.hub if e.kind == "kill_hub" else next(h for h in swarm.hosts if h.name == e.target)
            async with proc.lock:
                await proc.kill9()
                result.events[e.kind] += 1
                await trio.sleep(e.down_s)
                await swarm.restart(proc, result.incidents)
        elif e.kind == "grant":
            await swarm.cli("hub", "credits", "grant", swarm.clients[e.target].email, SMALL_GRANT_USD)
            result.events[e.kind] += 1
        elif e.kind == "revoke":
            client = swarm.clients[e.target]
            await swarm.cli("hub", "key", "revoke", client.key)
            client.revoked_at = trio.current_time() - started
            result.events[e.kind] += 1
        else:
            result.events[e.kind] += 1  # its streams are in rnd.streams

    async with trio.open_nursery() as nursery:
        for s in rnd.streams:
            nursery.start_soon(stream, s)
        for e in rnd.events:
            nursery.start_soon(event, e)


async def _stream(client: Client, request: Request, phase: str, rnd: int, config: ChaosConfig,
                  started: float) -> StreamResult:
    """One streamed chat completion through the client's gateway, under a deadline.

    Status here is ``finished`` (stream ended with a finish reason and usage),
    ``clean_error``, ``broken``, ``hung`` or ``truncated``; ``_judge_streams``
    then compares finished ones with the reference text.
    """
    t = trio.current_time()
    out = StreamResult(phase, rnd, client.name, request.index, round(t - started, 2))
    sdk = openai.AsyncOpenAI(base_url=client.base_url, api_key=client.key, max_retries=0, timeout=config.stream_deadline_s)
    parts: list[str] = []
    finish = None
    try:
        with trio.fail_after(config.stream_deadline_s):
            response = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": request.prompt}], max_tokens=request.max_tokens,
                seed=request.seed, temperature=TEMPERATURE, stream=True, stream_options={"include_usage": True})
            async for chunk in response:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    out.completion_tokens = chunk.usage.completion_tokens
        if finish is None:
            out.status, out.detail = "truncated", "the stream ended without a finish reason"
        elif out.completion_tokens is None:
            out.status, out.detail = "no_usage", "include_usage was asked for but no usage chunk came"
        else:
            out.status = "finished"
    except trio.TooSlowError:
        out.status, out.detail = "hung", f"no end within {config.stream_deadline_s:.0f} s ({len(''.join(parts))} chars in)"
    except openai.APIStatusError as exc:
        out.http_status = exc.status_code
        out.status = "broken" if "".join(parts) else "clean_error"
        out.detail = f"HTTP {exc.status_code}: {_message(exc)}"
    except Exception as exc:  # an SSE error event, a reset connection: anything that is not an HTTP status
        out.status = "broken"
        out.detail = f"{type(exc).__name__} after {len(''.join(parts))} chars: {_message(exc)}"
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await sdk.close()
    out.text = "".join(parts)
    out.elapsed_s = round(trio.current_time() - t, 2)
    return out


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"][:200]
    return str(exc)[:200]


async def _drain(swarm: Swarm, config: ChaosConfig, result: ChaosResult) -> None:
    """Let gateways deliver their queues; restart the ones that did not (delivery starts at once)."""
    async def drained(clients: list[Client], wait_s: float) -> list[Client]:
        with trio.move_on_after(wait_s):
            while any(_queue(c)["pending"] for c in clients):
                await trio.sleep(0.5)
        return [c for c in clients if _queue(c)["pending"]]

    late = await drained(list(swarm.clients.values()), config.drain_s)
    for client in late:
        if not await client.gateway.stop(signal.SIGINT):
            result.incidents.append(f"drain: {client.gateway.name} ignored SIGINT for {STOP_S:.0f} s; killed")
        await swarm.restart(client.gateway, result.incidents)
    if late:
        await drained(late, config.drain_s)


def _queue(client: Client) -> dict:
    """A gateway's receipt queue, read-only: pending, refused (with reasons), countersigned ids."""
    path = client.gateway.home / "node" / "gateway" / "receipts.db"
    if not path.exists():
        return {"pending": [], "refused": [], "countersigned": set()}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        pending = [r for (r,) in db.execute("SELECT request_id FROM pending")]
        refused = db.execute("SELECT request_id, reason FROM refused").fetchall()
        openings = {r for (r,) in db.execute("SELECT request_id FROM openings")}
    return {"pending": pending, "refused": refused, "countersigned": openings | set(pending) | {r for r, _ in refused}}


def _judge_streams(result: ChaosResult, references: dict[int, StreamResult]) -> None:
    for s in result.streams:
        if s.status != "finished":
            continue
        ref = references[s.request]
        if s.text != ref.text:
            at = next((i for i, (a, b) in enumerate(zip(s.text, ref.text)) if a != b), min(len(s.text), len(ref.text)))
            s.status = "wrong_text"
            s.detail = f"differs from the reference at char {at} ({len(s.text)} vs {len(ref.text)} chars): {s.text[at:at + 20]!r} vs {ref.text[at:at + 20]!r}"
        elif s.completion_tokens != ref.completion_tokens:
            s.status = "wrong_text"
            s.detail = f"usage says {s.completion_tokens} completion tokens, the reference {ref.completion_tokens}"
        else:
            s.status = "completed"


async def _judge_receipts(swarm: Swarm, schedule: Schedule, result: ChaosResult) -> None:
    """The hub's exported log against the gateways' queues and what the clients saw."""
    figures = result.receipts
    log_path = swarm.root / "receipts.jsonl"
    await swarm.cli("hub", "receipts", "export", str(log_path))
    with trio.fail_after(CLI_S):
        audit = await trio.run_process([sys.executable, "-m", "gpunexus", "audit", str(log_path)], capture_stdout=True,
                                       capture_stderr=True, check=False)
    figures.audit_exit = audit.returncode
    figures.audit_output = (audit.stdout + audit.stderr).decode(errors="replace")

    settled: Counter[str] = Counter()
    paid: Counter[tuple[str, int]] = Counter()
    lines = log_path.read_text().splitlines()[1:]
    for line in lines:
        entry = msgpack.unpackb(base64.b64decode(json.loads(line)["entry"]), raw=False)
        receipt = decode_as(Receipt, entry[3])
        settled[receipt.request_id] += 1
        paid[receipt.gateway_id, receipt.seed] += 1
    figures.settled = len(lines)
    figures.double_billed = [f"{rid} x{n}" for rid, n in settled.items() if n > 1]

    seen: Counter[tuple[str, int]] = Counter()
    for s in result.streams:
        if s.saw_complete:
            seen[swarm.clients[s.client].peer_id, schedule.requests[s.request].seed] += 1
    unpaid = {key: n - paid[key] for key, n in seen.items() if n > paid[key]}
    figures.billed_without_stream = sum(n - seen[key] for key, n in paid.items() if n > seen[key])
    for client in swarm.clients.values():
        queue = _queue(client)
        figures.countersigned += len(queue["countersigned"])
        figures.refused_by_hub += [f"{rid} ({client.name}): {reason}" for rid, reason in queue["refused"]]
        refused = {rid for rid, _ in queue["refused"]}
        figures.lost += [f"{rid} ({client.name}): {'still queued at the gateway' if rid in queue['pending'] else 'gone'}"
                         for rid in sorted(queue["countersigned"] - set(settled) - refused)]
        gateway_log = client.gateway.log.read_text(errors="replace")
        result.mid_stream_failovers += gateway_log.count("failed mid-stream after")
        not_signed = gateway_log.count("refusing to countersign receipt")
        figures.not_countersigned += not_signed
        owed = sum(n for (gw, _), n in unpaid.items() if gw == client.peer_id)
        figures.unpaid_work += max(0, owed - not_signed)


def _judge_ledger(swarm: Swarm, result: ChaosResult) -> None:
    """The hub's ledger, read-only from its SQLite file (the hub is stopped by now)."""
    path = swarm.hub.home / "hub" / "hub.db"
    engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    g = result.ledger
    try:
        with engine.connect() as conn:
            q = lambda sql, **params: conn.execute(sa.text(sql), params).all()  # noqa: E731
            sums = dict(q("SELECT account_id, sum(amount) FROM postings GROUP BY account_id"))
            accounts = q("SELECT id, name, allow_negative, balance FROM accounts")
            g.accounts = len(accounts)
            g.total = sum(a.balance for a in accounts)
            g.negative = [f"{a.name} = {a.balance}" for a in accounts if a.balance < 0 and not a.allow_negative]
            g.mismatched = [f"{a.name}: {a.balance} vs postings {sums.get(a.id, 0)}" for a in accounts if a.balance != sums.get(a.id, 0)]
            g.holds = next((a.balance for a in accounts if a.name == "platform:holds"), 0)
            g.live_allowances = q("SELECT coalesce(sum(remaining), 0) FROM allowances WHERE live")[0][0]
            for client in swarm.clients.values():
                uid, aid, balance = q("SELECT u.id, u.account_id, a.balance FROM users u JOIN accounts a ON a.id = u.account_id "
                                      "WHERE u.email = :email", email=client.email)[0]
                live = q("SELECT coalesce(sum(remaining), 0) FROM allowances WHERE live AND user_id = :uid", uid=uid)[0][0]
                # Reserve, release and settlement from the hold only move money between
                # the balance and the live allowance; grants and audit refunds add to it.
                added = q("SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN journal j ON j.key = p.journal_key "
                          "WHERE p.account_id = :aid AND j.kind NOT IN ('reserve', 'release', 'settle')", aid=aid)[0][0]
                spent = q("SELECT coalesce(sum(cost), 0) FROM receipt_log WHERE client_user_id = :uid", uid=uid)[0][0]
                g.client_drift[client.name] = balance + live - (added - spent)
    finally:
        engine.dispose()


def _left_running(procs: list[Proc]) -> list[str]:
    """Every child still alive, and anything still in one of their sessions (grandchildren)."""
    ours = {pid: p.name for p in procs for pid in p.pids}
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        pid = int(entry.name)
        if state != "Z" and (pid in ours or session in ours):
            alive.append(f"pid {pid} ({ours.get(pid) or 'in the session of ' + ours[session]})")
    return alive


# --- command line ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpunexus.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration-s", type=float, default=None, metavar="S",
                   help="chaos time in all, split evenly over the rounds (default 8 s per round)")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="keep logs and databases here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="chaos: %(message)s", stream=sys.stderr)
    for name in ("httpx", "httpx2"):  # the SDK's HTTP client logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    round_s = args.duration_s / args.rounds if args.duration_s else ROUND_S
    result = run(ChaosConfig(seed=args.seed, rounds=args.rounds, round_s=round_s, work_dir=args.work_dir))
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
