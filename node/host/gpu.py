"""What GPUs this machine has, as the NVIDIA driver reports them.

The gate (:mod:`gpunexus.node.host.check`) needs two numbers per GPU: its memory
and its CUDA compute capability (a model's kernels need a minimum one, e.g.
flash attention wants 8.0). ``nvidia-smi`` ships with the driver, so asking
it needs nothing installed beyond what any CUDA backend needs anyway, and it
answers without initialising CUDA (no GPU memory taken, works while another
program holds the GPU).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

QUERY = "name,memory.total,compute_cap"
"""``compute_cap`` needs driver 510 or newer; older drivers refuse the field
and are asked again without it (capability then unknown)."""
TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    memory_mib: int
    compute_capability: tuple[int, int] | None
    """(major, minor); None where the driver does not report it."""

    @property
    def memory_gb(self) -> float:
        """Decimal gigabytes (10^9 bytes), the unit the gate's ``--min-vram-gb`` uses."""
        return self.memory_mib * 2**20 / 1e9


@dataclass(frozen=True, slots=True)
class GpuSurvey:
    gpus: tuple[Gpu, ...]
    note: str = ""
    """Why no GPU was found (no nvidia-smi, driver error), or ''."""

    @property
    def total_memory_gb(self) -> float:
        """All GPUs together: a GPU backend splits a model across every GPU it sees (exllamav2's autosplit)."""
        return sum(g.memory_gb for g in self.gpus)

    @property
    def lowest_compute_capability(self) -> tuple[int, int] | None:
        """The weakest GPU's capability: every GPU holding a layer must run the kernels. None if any is unknown."""
        caps = [g.compute_capability for g in self.gpus]
        if not caps or any(c is None for c in caps):
            return None
        return min(caps)  # type: ignore[type-var]

    def describe(self) -> str:
        if not self.gpus:
            return f"no GPU ({self.note})" if self.note else "no GPU"
        return "; ".join(f"{g.name}, {g.memory_mib} MiB, compute {format_capability(g.compute_capability)}" for g in self.gpus)


def parse_capability(text: str) -> tuple[int, int]:
    """``"8.6"`` -> ``(8, 6)``; ValueError for anything else."""
    major, dot, minor = text.strip().partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        raise ValueError(f"compute capability must look like 8.6, not {text!r}")
    return int(major), int(minor)


def format_capability(cap: tuple[int, int] | None) -> str:
    return "unknown" if cap is None else f"{cap[0]}.{cap[1]}"


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total[,compute_cap] --format=csv,noheader``.

    One line per GPU, e.g. ``NVIDIA H200, 143771 MiB, 9.0``. A GPU name could
    hold a comma, so fields are split from the right. A field the driver cannot
    fill (``[N/A]``, e.g. memory of a MIG parent) makes that value unknown, not
    the whole answer unreadable.
    """
    gpus = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and _looks_like_memory(parts[1]):
            name, memory, cap = parts
        else:
            name, _, memory = line.rpartition(",")
            name, memory, cap = name.strip(), memory.strip(), ""
        try:
            capability: tuple[int, int] | None = parse_capability(cap) if cap else None
        except ValueError:
            capability = None
        gpus.append(Gpu(name or "unknown GPU", _mib(memory), capability))
    return gpus


def _looks_like_memory(field: str) -> bool:
    return field.endswith("MiB") or field.startswith("[")


def _mib(field: str) -> int:
    number = field.removesuffix("MiB").strip()
    return int(number) if number.isdigit() else 0


Runner = Callable[..., subprocess.CompletedProcess]


def survey_gpus(*, run: Runner = subprocess.run, which: Callable[[str], str | None] = shutil.which) -> GpuSurvey:
    """Ask ``nvidia-smi`` for every GPU; an empty survey with the reason when there is none."""
    exe = which("nvidia-smi")
    if exe is None:
        return GpuSurvey((), "nvidia-smi absent")
    for query in (QUERY, QUERY.removesuffix(",compute_cap")):
        try:
            out = run([exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return GpuSurvey((), f"nvidia-smi failed: {exc}")
        if out.returncode == 0:
            gpus = parse_nvidia_smi(out.stdout)
            return GpuSurvey(tuple(gpus), "" if gpus else "nvidia-smi lists no GPU")
        if "compute_cap" not in (out.stdout + out.stderr):
            break  # not the old-driver refusal: asking again without the field will not help
    reason = (out.stderr or out.stdout).strip().splitlines()
    return GpuSurvey((), f"nvidia-smi failed: {reason[0] if reason else f'exit {out.returncode}'}")
