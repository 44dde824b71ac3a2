"""The hardware and network gate: can this machine serve this model?

``gpunexus node check`` prints it; ``gpunexus node serve`` runs the very same
gate before it announces anything and refuses a model the machine fails
(``--force`` serves anyway, logged and marked in the offer's region). One
function, :func:`run_gate`, measures; one pure function, :func:`evaluate`,
judges, so what the setup script was told at install time is what the
service enforces at every start.

What is measured, and why it is the number that matters:

- **VRAM** of all GPUs together (a GPU backend splits a model across every
  GPU it sees) and the **compute capability** of the weakest one (every GPU
  holding a layer must run the kernels), from ``nvidia-smi`` (:mod:`.gpu`).
- **tokens/s** of the chosen backend on a short real run: what a client's
  stream will see, and what the offer announces (never a claimed figure).
- **latency** to the hub and to each bootstrap peer, over real round trips,
  and **bandwidth** each way to each bootstrap peer, over a few megabytes
  moved on the same connection (:mod:`.netprobe`, :mod:`.speedtest`).

Minimums come from the hub's model catalogue (``GET /v1/catalogue``, the
operator's minimum GPU memory, compute capability and tokens/s per model)
where it has them, else from flags (or a ``--config`` table); each report
names its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import trio

from ..net.netprobe import Probe, probe_hub, probe_peers
from .gpu import GpuSurvey, format_capability, parse_capability, survey_gpus

if TYPE_CHECKING:
    from ..backends.base import Backend

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
MINIMUMS_SOURCE = "flags"
DEFAULT_MIN_TOKENS_PER_S = 10.0
GENERIC_MEASURE_TIMEOUT_S = 120.0
MAX_REGION = 64
"""``Offer.region``'s cap (protocol/messages.py)."""


@dataclass(frozen=True, slots=True)
class Minimums:
    """What a model needs; None is "no minimum"."""

    tokens_per_s: float | None = DEFAULT_MIN_TOKENS_PER_S
    vram_gb: float | None = None
    """Decimal GB: a "24 GB" card reports 24564 MiB = 25.8 GB, so it meets ``24``."""
    compute_capability: tuple[int, int] | None = None
    max_latency_ms: float | None = None
    """Applies to the hub and to every bootstrap peer."""
    bandwidth_mbps: float | None = None
    """Mbit/s each way to every bootstrap peer (the hub's is not measured: see :mod:`.netprobe`)."""
    source: str = MINIMUMS_SOURCE


@dataclass(frozen=True, slots=True)
class Throughput:
    tokens_per_s: float | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Measurements:
    gpus: GpuSurvey
    throughput: Throughput
    hub: Probe | None = None
    peers: tuple[Probe, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckLine:
    name: str
    status: str
    measured: str
    required: str
    target: str = ""


@dataclass(frozen=True)
class Report:
    model: str
    backend: str
    minimums: Minimums
    measurements: Measurements
    lines: tuple[CheckLine, ...]
    machine: str = field(default_factory=lambda: _machine())

    @property
    def ok(self) -> bool:
        return all(line.status != FAIL for line in self.lines)

    @property
    def failures(self) -> list[CheckLine]:
        return [line for line in self.lines if line.status == FAIL]

    @property
    def tokens_per_s(self) -> float | None:
        return self.measurements.throughput.tokens_per_s

    def failure_summary(self) -> str:
        """Every failed check on one line, e.g. ``tokens/s 312.4, needs >= 1000``."""
        return "; ".join(f"{f.name}{' ' + f.target if f.target else ''} {_short(f.measured)}, needs {f.required}" for f in self.failures)

    def to_json(self) -> dict:
        m = self.measurements
        return {
            "ok": self.ok,
            "model": self.model,
            "backend": self.backend,
            "machine": self.machine,
            "minimums": {**asdict(self.minimums), "compute_capability": _cap_or_none(self.minimums.compute_capability)},
            "checks": [asdict(line) for line in self.lines],
            "measured": {
                "gpus": [{"name": g.name, "memory_mib": g.memory_mib, "compute_capability": _cap_or_none(g.compute_capability)} for g in m.gpus.gpus],
                "gpu_note": m.gpus.note,
                "tokens_per_s": m.throughput.tokens_per_s,
                "tokens_per_s_error": m.throughput.error,
                "network": [asdict(p) for p in ([m.hub] if m.hub else []) + list(m.peers)],
            },
        }


def _short(text: str, width: int = 60) -> str:
    """One table cell: libp2p's and httpx's errors run to hundreds of characters (``--json`` keeps them whole)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _cap_or_none(cap: tuple[int, int] | None) -> str | None:
    return None if cap is None else format_capability(cap)


def _machine() -> str:
    try:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB memory"
    except (ValueError, OSError):
        memory = ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{memory}, Python {platform.python_version()}"


# --- judging ---------------------------------------------------------------------------------
def evaluate(measured: Measurements, minimums: Minimums, *, network_strict: bool = True) -> tuple[CheckLine, ...]:
    """PASS/FAIL per check. Pure: the same measurements always give the same verdict.

    ``network_strict=False`` (``node serve``) turns an unreachable hub or peer
    into a WARN: the host already waits for its hub and redials its peers, and
    a hub restarting, or a network that comes up after the service, must not
    keep a host down. A latency over the minimum is a FAIL either way.
    """
    lines = [*evaluate_hardware(measured.gpus, minimums), _throughput_line(measured.throughput, minimums)]
    for probe in ([measured.hub] if measured.hub else []) + list(measured.peers):
        lines.append(_network_line(probe, minimums, network_strict))
        if probe.kind == "peer" and probe.reachable:
            lines.append(_bandwidth_line(probe, minimums, network_strict))
    return tuple(lines)


def evaluate_hardware(gpus: GpuSurvey, minimums: Minimums) -> tuple[CheckLine, CheckLine]:
    """The VRAM and compute lines alone: what a model needs of the GPUs, judged without its engine."""
    return _vram_line(gpus, minimums), _compute_line(gpus, minimums)


def _vram_line(gpus: GpuSurvey, minimums: Minimums) -> CheckLine:
    if gpus.gpus:
        measured = f"{gpus.total_memory_gb:.1f} GB on {len(gpus.gpus)} GPU{'s' if len(gpus.gpus) > 1 else ''}"
    else:
        measured = gpus.describe()
    if minimums.vram_gb is None:
        return CheckLine("vram", PASS, measured, "-")
    ok = bool(gpus.gpus) and gpus.total_memory_gb >= minimums.vram_gb
    return CheckLine("vram", PASS if ok else FAIL, measured, f">= {minimums.vram_gb:g} GB")


def _compute_line(gpus: GpuSurvey, minimums: Minimums) -> CheckLine:
    cap = gpus.lowest_compute_capability
    measured = "no GPU" if not gpus.gpus else format_capability(cap) + ("" if cap is not None else " (driver does not say)")
    if minimums.compute_capability is None:
        return CheckLine("compute", PASS, measured, "-")
    ok = cap is not None and cap >= minimums.compute_capability
    return CheckLine("compute", PASS if ok else FAIL, measured, f">= {format_capability(minimums.compute_capability)}")


def _throughput_line(throughput: Throughput, minimums: Minimums) -> CheckLine:
    required = "-" if minimums.tokens_per_s is None else f">= {minimums.tokens_per_s:g}"
    if throughput.tokens_per_s is None:
        # An engine that cannot generate cannot serve, whatever the minimum.
        return CheckLine("tokens/s", FAIL, f"not measured: {throughput.error}", required if required != "-" else "a working engine")
    ok = minimums.tokens_per_s is None or throughput.tokens_per_s >= minimums.tokens_per_s
    return CheckLine("tokens/s", PASS if ok else FAIL, f"{throughput.tokens_per_s:.1f}", required)


def _network_line(probe: Probe, minimums: Minimums, strict: bool) -> CheckLine:
    limit = minimums.max_latency_ms
    required = "reachable" if limit is None else f"<= {limit:g} ms"
    name = "hub" if probe.kind == "hub" else "peer"
    if not probe.reachable:
        return CheckLine(name, FAIL if strict else WARN, f"unreachable: {probe.error}", required, probe.target)
    assert probe.latency_ms is not None
    measured = f"{probe.latency_ms:.1f} ms" + (f" (connect {probe.connect_ms:.0f} ms)" if probe.connect_ms is not None else "")
    ok = limit is None or probe.latency_ms <= limit
    return CheckLine(name, PASS if ok else FAIL, measured, required, probe.target)


def _bandwidth_line(probe: Probe, minimums: Minimums, strict: bool) -> CheckLine:
    """Both directions must meet the minimum. Not measured (an older peer) is a WARN, unless a minimum
    was asked for and the check is strict: then it is a FAIL, since nothing shows the link meets it."""
    limit = minimums.bandwidth_mbps
    required = "-" if limit is None else f">= {limit:g} Mbit/s"
    if probe.down_mbps is None or probe.up_mbps is None:
        return CheckLine("bandwidth", FAIL if strict and limit is not None else WARN, f"not measured: {probe.bandwidth_error}", required, probe.target)
    measured = f"down {probe.down_mbps:g} / up {probe.up_mbps:g} Mbit/s"
    ok = limit is None or min(probe.down_mbps, probe.up_mbps) >= limit
    return CheckLine("bandwidth", PASS if ok else FAIL, measured, required, probe.target)


# --- measuring ---------------------------------------------------------------------------------
async def measure_throughput(backend: Backend, runs: int = 2) -> Throughput:
    """Decode speed on a short real run; the best of ``runs`` for a local engine.

    The first run of a local engine pays one-off costs (numpy's first
    matmuls, CUDA kernels loading) that no client request pays again, so the
    best run is the speed the machine sustains. An upstream server (``openai``
    backend) is asked once: each run costs it real work.
    """
    try:
        measure = getattr(backend, "measure_tokens_per_s", None)
        if measure is not None:
            best = 0.0
            for _ in range(max(1, runs)):
                best = max(best, await trio.to_thread.run_sync(measure))
            return Throughput(best)
        with trio.fail_after(GENERIC_MEASURE_TIMEOUT_S):
            return Throughput(await _measure_generic(backend))
    except trio.TooSlowError:
        return Throughput(None, f"no answer within {GENERIC_MEASURE_TIMEOUT_S:g} s")
    except Exception as exc:  # a failed run is a FAIL line, never a crashed check
        return Throughput(None, str(exc) or type(exc).__name__)


async def _measure_generic(backend: Backend) -> float:
    """Tokens per second of one 64-token greedy answer (prompt included: an upstream shows no split)."""
    from gpunexus.protocol.messages import ChatMessage, Sampling

    from ..backends.base import GenerationRequest

    send, receive = trio.open_memory_channel(float("inf"))
    request = GenerationRequest("chat", (ChatMessage("user", "Count from one to fifty."),), "", "", Sampling(0.0, 1.0, 0, (), 0), 64)
    start = time.perf_counter()
    async with send, receive:
        result = await backend.generate(request, send)
    if result.completion_tokens == 0:
        raise RuntimeError("the engine answered with no tokens")
    return round(result.completion_tokens / max(1e-9, time.perf_counter() - start), 1)


async def run_gate(backend: Backend, backend_name: str, minimums: Minimums, *, hub: str | None = None,
                   bootstrap: list[str] | tuple[str, ...] = (), swarm_key: str | None = None,
                   network_strict: bool = True, survey=survey_gpus) -> Report:
    """Measure everything, then judge one model (:func:`run_gates` for several)."""
    [report] = await run_gates([(backend, backend_name, minimums)], hub=hub, bootstrap=bootstrap, swarm_key=swarm_key,
                               network_strict=network_strict, survey=survey)
    return report


async def run_gates(models: list[tuple[Backend, str, Minimums]], *, hub: str | None = None,
                    bootstrap: list[str] | tuple[str, ...] = (), swarm_key: str | None = None,
                    network_strict: bool = True, survey=survey_gpus) -> list[Report]:
    """One report per (backend, backend name, minimums): the machine and the network
    are measured once, each engine's speed on its own, each verdict against its own
    model's minimums. The network goes first: a libp2p dial is CPU work that would
    otherwise be counted against the engines' speed; the engines go one at a time
    for the same reason."""
    hub_probe: Probe | None = None
    peers: list[Probe] = []
    gpus = GpuSurvey(())

    async def probe_the_hub() -> None:
        nonlocal hub_probe
        hub_probe = await probe_hub(hub)  # type: ignore[arg-type]

    async def probe_the_peers() -> None:
        nonlocal peers
        peers = await probe_peers(list(bootstrap), swarm_key=swarm_key)

    async def survey_the_gpus() -> None:
        nonlocal gpus
        gpus = await trio.to_thread.run_sync(survey)

    async with trio.open_nursery() as nursery:
        if hub:
            nursery.start_soon(probe_the_hub)
        if bootstrap:
            nursery.start_soon(probe_the_peers)
        nursery.start_soon(survey_the_gpus)
    reports = []
    for backend, backend_name, minimums in models:
        throughput = await measure_throughput(backend)
        measured = Measurements(gpus, throughput, hub_probe, tuple(peers))
        reports.append(Report(backend.info.name, backend_name, minimums, measured, evaluate(measured, minimums, network_strict=network_strict)))
    return shared_vram(reports, gpus)


def shared_vram(reports: list[Report], gpus: GpuSurvey) -> list[Report]:
    """Models served together share the GPUs: each one that passes alone must also fit beside those before it.

    In order (the command line's, the file's), every model that passes its own
    checks and names a VRAM minimum adds it to a running total; a model whose
    total exceeds the GPUs' memory gets a failed ``vram-shared`` line, and is
    not counted, so the ones after it may still fit. One model, or models
    without VRAM minimums, are left as they are.
    """
    if sum(r.minimums.vram_gb is not None for r in reports) < 2:
        return reports
    taken, names, out = 0.0, [], []
    for report in reports:
        need = report.minimums.vram_gb
        if need is None or not report.ok:
            out.append(report)
            continue
        required = f">= {taken + need:g} GB" + (f" (with {', '.join(names)})" if names else "")
        fits = taken + need <= gpus.total_memory_gb
        line = CheckLine("vram-shared", PASS if fits else FAIL, f"{gpus.total_memory_gb:.1f} GB", required)
        if fits:
            taken += need
            names.append(report.model)
        out.append(dataclasses.replace(report, lines=report.lines + (line,)))
    return out


def unloadable_backend_report(model: str, backend_name: str, minimums: Minimums, error: str, *, survey=survey_gpus) -> Report:
    """The verdict when the engine does not even start (no CUDA, unknown model): the GPU lines still say why."""
    measured = Measurements(survey(), Throughput(None, error))
    lines = evaluate_hardware(measured.gpus, minimums) + (CheckLine("backend", FAIL, f"cannot load: {error}", "a working engine"),)
    return Report(model, backend_name, minimums, measured, lines)


# --- showing -----------------------------------------------------------------------------------
def render(report: Report, backend_detail: str = "") -> str:
    """The table ``node check`` prints: one row per check, the verdict last."""
    rows = [("CHECK", "RESULT", "MEASURED", "REQUIRED", "")] + [(ln.name, ln.status, _short(ln.measured), ln.required, ln.target) for ln in report.lines]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = [
        f"machine   {report.machine}",
        f"gpu       {report.measurements.gpus.describe()}",
        f"model     {report.model} on the {report.backend} backend{backend_detail}",
        f"minimums  from {report.minimums.source}",
        "",
    ]
    for row in rows:
        out.append(("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + (f"  {row[4]}" if row[4] else "")).rstrip())
    out.append("")
    if report.ok:
        warned = [ln.name for ln in report.lines if ln.status == WARN]
        # The wording predates the table: scripts/install-host.sh's tests look for it.
        out.append("PASS: this machine can serve the model" + (f" (warnings: {', '.join(warned)})" if warned else ""))
    else:
        out.append(f"FAIL: {report.failure_summary()}")
    return "\n".join(out)


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2)


# --- what serve does with a verdict --------------------------------------------------------
def forced_region(region: str, report: Report) -> str:
    """The offer's region with the checks ``--force`` overrode, e.g. ``eu (forced: tokens/s)``.

    ``Offer`` has no field for it, and region is the free-form label gateways
    show; changing the signed message would split the network between old and
    new peers. The tag is kept whole: the region text is shortened instead.
    """
    names = list(dict.fromkeys(f.name for f in report.failures))
    if not names:
        return region
    tag = f"(forced: {','.join(names)})"[:MAX_REGION]
    room = MAX_REGION - len(tag) - 1
    return f"{region[:room].rstrip()} {tag}" if region and room > 0 else tag


def announced_tokens_per_s(measured: float | None, claimed: float | None) -> tuple[float, str]:
    """The speed the offer carries, and a note for the log when it is not simply the measurement.

    ``--tokens-per-s`` can only lower it (a host keeping headroom for its own
    use): gateways rank and filter hosts by this figure, so it must be one
    this machine reached. A claim above the measurement is cut to it.
    """
    if measured is None:
        return (claimed or 0.0, "speed not measured (--force): announcing " + (f"the claimed {claimed:g}" if claimed else "0"))
    if claimed is None or claimed == measured:
        return measured, ""
    if claimed < measured:
        return claimed, f"announcing {claimed:g} tokens/s (--tokens-per-s), below the measured {measured:.1f}"
    return measured, f"announcing the measured {measured:.1f} tokens/s, not the claimed {claimed:g} (--tokens-per-s can only lower it)"


# --- the command line surface, shared by `node check` and `node serve` ---------------------
def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _capability(text: str) -> tuple[int, int]:
    try:
        return parse_capability(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_minimum_arguments(p: argparse.ArgumentParser) -> None:
    """The model's minimums as flags (bad values: argparse's usage error, exit 2)."""
    p.add_argument("--min-tokens-per-s", type=_positive, default=DEFAULT_MIN_TOKENS_PER_S, metavar="N",
                   help=f"the model's minimum engine speed (default {DEFAULT_MIN_TOKENS_PER_S:g})")
    p.add_argument("--min-vram-gb", type=_positive, default=None, metavar="GB", help="the model's minimum GPU memory, all GPUs together, in GB (no minimum by default)")
    p.add_argument("--min-compute-capability", type=_capability, default=None, metavar="X.Y", help="the lowest CUDA compute capability the model's kernels run on, e.g. 8.0 (no minimum by default)")
    p.add_argument("--max-latency-ms", type=_positive, default=None, metavar="MS", help="the most round-trip time to the hub and to each bootstrap peer (default: reachable is enough)")
    p.add_argument("--min-bandwidth-mbps", type=_positive, default=None, metavar="MBIT_S",
                   help="the least throughput each way to each bootstrap peer, in Mbit/s (measured by moving a few MB each way; no minimum by default)")


def with_catalogue(minimums: Minimums, entry: dict | None, hub: str) -> Minimums:
    """``minimums`` with the catalogue entry's where it names one: the market's operator sets what a model needs."""
    given = (entry or {}).get("minimums")
    if not isinstance(given, dict):
        return minimums
    changes: dict = {}
    for key, attr in (("vram_gb", "vram_gb"), ("tokens_per_s", "tokens_per_s")):
        if isinstance(given.get(key), (int, float)) and given[key] > 0:
            changes[attr] = float(given[key])
    if isinstance(given.get("compute_capability"), str) and given["compute_capability"]:
        try:
            changes["compute_capability"] = parse_capability(given["compute_capability"])
        except ValueError:
            pass
    if not changes:
        return minimums
    return dataclasses.replace(minimums, **changes, source=f"the hub's catalogue ({hub}), {minimums.source} for the rest")


def minimums_from(args: argparse.Namespace) -> Minimums:
    return Minimums(tokens_per_s=args.min_tokens_per_s, vram_gb=args.min_vram_gb,
                    compute_capability=args.min_compute_capability, max_latency_ms=args.max_latency_ms,
                    bandwidth_mbps=args.min_bandwidth_mbps)
