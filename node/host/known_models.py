"""The models ``gpunexus node models`` knows, and what each needs of a machine.

Two kinds, judged by what can honestly be measured without the weights:

- **reference** models (``verify.registry``): they run here on the CPU, so
  their minimum is the gate's engine speed, measured on a real short run.
- **GPU** models, well-known open-weight checkpoints as EXL2 quantisations
  for the ``exllamav2`` backend: their minimum is the GPU memory the weights
  and one slot's KV cache take, computed from the architecture (parameters,
  layers, KV heads, head size: public facts of each model card) rather than
  copied from anyone's claim. Their speed cannot be measured without the
  weights; ``node check`` does it once the model is downloaded.

``vram_gb`` is ``params x bits/8`` for the weights, plus an FP16 KV cache of
``2 x layers x kv_heads x head_dim x 2 bytes`` per token of context, plus
:data:`RUNTIME_OVERHEAD_GB` for the CUDA context and activations. It is a
floor for one slot; each further slot adds one more KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import trio

from .check import DEFAULT_MIN_TOKENS_PER_S, FAIL, CheckLine, Measurements, Minimums, evaluate, evaluate_hardware, measure_throughput
from .gpu import GpuSurvey, format_capability, survey_gpus

RUNTIME_OVERHEAD_GB = 1.0
"""CUDA context, activations and scratch buffers of one exllamav2 process (a measured order, not a bound)."""
DEFAULT_CONTEXT = 8192
DEFAULT_BITS = 4.0
MEASURED_WIDTH = 48
"""A table cell; ``--json`` keeps a long driver note whole."""
MINIMUMS_SOURCE = "gpunexus's known models (GPU memory computed from each architecture)"


@dataclass(frozen=True, slots=True)
class Architecture:
    params_b: float
    """Parameters, in billions."""
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int


@dataclass(frozen=True, slots=True)
class KnownModel:
    model: str
    backend: str
    context: int
    minimums: Minimums
    note: str = ""


GPU_MODELS: dict[str, Architecture] = {
    "llama-3.1-8b-instruct": Architecture(8.03, 32, 8, 128, 131072),
    "mistral-7b-instruct-v0.3": Architecture(7.25, 32, 8, 128, 32768),
    "qwen2.5-7b-instruct": Architecture(7.62, 28, 4, 128, 32768),
    "qwen2.5-32b-instruct": Architecture(32.8, 64, 8, 128, 32768),
    "llama-3.1-70b-instruct": Architecture(70.6, 80, 8, 128, 131072),
}


def vram_gb(arch: Architecture, context: int, bits: float = DEFAULT_BITS) -> float:
    """GPU memory (decimal GB) for the weights at ``bits`` per weight and one slot's FP16 KV cache."""
    weights = arch.params_b * 1e9 * bits / 8
    kv_cache = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2 * context
    return round((weights + kv_cache) / 1e9 + RUNTIME_OVERHEAD_GB, 1)


def known_models(context: int = DEFAULT_CONTEXT, bits: float = DEFAULT_BITS) -> list[KnownModel]:
    """Every known model, the reference ones first; GPU ones at ``context`` tokens (capped by the model's own) and ``bits``."""
    from gpunexus.verify.registry import REFERENCE_CONFIGS

    out = [KnownModel(name, "reference", config.max_seq_len, Minimums(tokens_per_s=DEFAULT_MIN_TOKENS_PER_S, source=MINIMUMS_SOURCE),
                      "CPU (numpy)") for name, config in REFERENCE_CONFIGS.items()]
    for name, arch in GPU_MODELS.items():
        ctx = min(context, arch.max_context)
        out.append(KnownModel(name, "exllamav2", ctx, Minimums(tokens_per_s=None, vram_gb=vram_gb(arch, ctx, bits), source=MINIMUMS_SOURCE),
                              f"EXL2 {bits:g} bits per weight, {arch.params_b:g}B parameters"))
    return out


# --- what this machine can serve --------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    known: KnownModel
    lines: tuple[CheckLine, ...]

    @property
    def ok(self) -> bool:
        return all(line.status != FAIL for line in self.lines)

    def to_json(self) -> dict:
        m = self.known.minimums
        return {
            "model": self.known.model,
            "backend": self.known.backend,
            "context": self.known.context,
            "note": self.known.note,
            "ok": self.ok,
            "minimums": {"vram_gb": m.vram_gb, "tokens_per_s": m.tokens_per_s, "compute_capability": m.compute_capability and format_capability(m.compute_capability)},
            "checks": [asdict(line) for line in self.lines],
        }


async def judge(models: list[KnownModel], *, survey=survey_gpus) -> tuple[GpuSurvey, list[Verdict]]:
    """Each model against this machine: the GPUs surveyed once, each reference model's speed on a real short run."""
    from ..backends.reference import ReferenceBackend

    gpus = await trio.to_thread.run_sync(survey)
    verdicts = []
    for known in models:
        if known.backend == "reference":
            throughput = await measure_throughput(ReferenceBackend(known.model))
            lines = evaluate(Measurements(gpus, throughput), known.minimums)
        else:
            lines = evaluate_hardware(gpus, known.minimums)
        verdicts.append(Verdict(known, tuple(lines)))
    return gpus, verdicts


def render(gpus: GpuSurvey, verdicts: list[Verdict]) -> str:
    """One row per model: what it needs, what this machine has, PASS or FAIL."""
    rows = [("MODEL", "BACKEND", "CONTEXT", "NEEDS", "MEASURED", "RESULT")]
    for v in verdicts:
        judged = [ln for ln in v.lines if ln.required != "-"] or list(v.lines[:1])
        needs = ", ".join(f"{ln.name} {ln.required}" for ln in judged)
        measured = ", ".join(" ".join(ln.measured.split()) for ln in judged)
        measured = measured if len(measured) <= MEASURED_WIDTH else measured[: MEASURED_WIDTH - 3] + "..."
        rows.append((v.known.model, v.known.backend, str(v.known.context), needs, measured, "PASS" if v.ok else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"gpu       {gpus.describe()}", f"minimums  from {MINIMUMS_SOURCE}", ""]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    can = [v.known.model for v in verdicts if v.ok]
    out += ["", f"this machine can serve: {', '.join(can) if can else 'none of these'}",
            "(GPU memory is for one slot at the context shown; 'gpunexus node check --model M' measures a downloaded model's speed)"]
    return "\n".join(out)
