"""What a host serves: the models named by ``--model`` flags or by a ``--config host.toml`` file.

Two grammars, one result (a list of :class:`ModelSpec`, one per model):

- ``--model A --model B``: the simple case. Every other per-model flag
  (``--backend``, ``--price``, ``--slots``, ``--license``, the minimums)
  applies to each model alike.
- ``--config host.toml``: one ``[[model]]`` table per model, each with its
  own keys (:data:`MODEL_KEYS`). A key a table leaves out takes the command
  line's flag, so ``--price 0.3 --config host.toml`` sets the default ask.

Host-wide settings (listen addresses, hub, bootstrap peers, schedule,
region) stay on the command line: they belong to the one peer, not to a
model, and a unit file that sets them should not have to repeat them.

Everything is checked before anything starts; a bad file or flag is one
:class:`ConfigError` that names the table and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gpunexus.protocol.messages import Capabilities
from gpunexus.protocol.money import usd_to_micro

from ..backends.openai_upstream import parse_supports
from .check import Minimums, minimums_from
from .gpu import parse_capability

BACKENDS = ("reference", "openai", "exllamav2")


class ConfigError(ValueError):
    """A model list that cannot be served as written; the message says where and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One model as the owner asked for it, before its backend is loaded."""

    id: str
    """The public name gateways ask for."""
    backend: str = "reference"
    reference: str | None = None
    """``reference`` backend: the reference model's name when ``id`` differs from it."""
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_key: str | None = None
    upstream_supports: Capabilities | None = None
    """``openai`` backend: what the upstream does beyond plain text (``--upstream-supports``); None is plain text."""
    model_dir: str | None = None
    price: str = "0.20"
    """USD per million tokens, or ``market``."""
    min_price: str | None = None
    slots: int | None = None
    queue: int | None = None
    license: str | None = None
    tokens_per_s: float | None = None
    force: bool = False
    minimums: Minimums = field(default_factory=Minimums)

    @property
    def follows_market(self) -> bool:
        return self.price == "market"

    def price_micro(self) -> int:
        """The ask (or, following the market, the floor) in micro-USD per million tokens."""
        text = (self.min_price or "0.20") if self.follows_market else self.price
        try:
            return usd_to_micro(text)
        except ValueError as exc:
            raise ConfigError(f"--price/--min-price (or price/min_price in --config): {exc} (model {self.id!r})") from None


# key -> (type, what it is); a table's keys are checked against this before use.
MODEL_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "id": (str, "public model name gateways ask for (required)"),
    "backend": (str, "reference, openai or exllamav2"),
    "reference": (str, "reference backend: the reference model, when id differs from it"),
    "upstream": (str, "openai backend: base URL of the OpenAI-compatible server"),
    "upstream_model": (str, "openai backend: model name on the upstream"),
    "upstream_key": (str, "openai backend: bearer key for the upstream"),
    "upstream_supports": ((str, list), "openai backend: what the upstream does beyond plain text, e.g. \"tools,json_schema\" or [\"tools\"]"),
    "model_dir": (str, "exllamav2 backend: the EXL2 model folder"),
    "price": ((str, int, float), "USD per million tokens, or \"market\""),
    "min_price": ((str, int, float), "with price = \"market\": the floor"),
    "slots": (int, "requests served at once"),
    "queue": (int, "orders that may wait for a slot"),
    "license": (str, "licence note announced with the model"),
    "tokens_per_s": ((int, float), "announce at most this speed"),
    "force": (bool, "serve even if the machine fails this model's check"),
    "min_tokens_per_s": ((int, float), "the model's minimum engine speed"),
    "min_vram_gb": ((int, float), "the model's minimum GPU memory in GB"),
    "min_compute_capability": (str, "lowest CUDA compute capability, e.g. \"8.0\""),
    "max_latency_ms": ((int, float), "most round trip to the hub and each bootstrap peer"),
    "min_bandwidth_mbps": ((int, float), "least throughput each way to each bootstrap peer, in Mbit/s"),
}


def specs_from_args(args: argparse.Namespace) -> list[ModelSpec]:
    """The models ``node serve`` / ``node check`` were asked for, checked; ConfigError if they cannot be."""
    defaults = _defaults(args)
    if getattr(args, "config", None) is not None:
        if args.model:
            raise ConfigError("--config and --model both name models: give the models in one place")
        specs = load_config(args.config, defaults)
    else:
        names = args.model or ["tiny"]
        if len(names) > 1:
            for flag, value in (("--upstream-model", args.upstream_model), ("--model-dir", args.model_dir)):
                if value:
                    raise ConfigError(f"{flag} names one model's files, but --model is given {len(names)} times: use --config host.toml with one [[model]] table each")
        specs = [dataclasses.replace(defaults, id=name) for name in names]
    _check_all(specs)
    return specs


def _defaults(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        id="",
        backend=args.backend,
        upstream=args.upstream,
        upstream_model=args.upstream_model,
        upstream_key=args.upstream_key,
        upstream_supports=getattr(args, "upstream_supports", None),
        model_dir=args.model_dir,
        price=getattr(args, "price", "0.20"),
        min_price=getattr(args, "min_price", None),
        slots=getattr(args, "slots", None),
        queue=getattr(args, "queue", None),
        license=getattr(args, "license", None),
        tokens_per_s=getattr(args, "tokens_per_s", None),
        force=getattr(args, "force", False),
        minimums=minimums_from(args),
    )


def load_config(path: Path, defaults: ModelSpec) -> list[ModelSpec]:
    """Read ``[[model]]`` tables from a TOML file; each key a table leaves out comes from ``defaults``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"model"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(extra)}: the file holds [[model]] tables only (host-wide settings are flags)")
    tables = data.get("model")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: no [[model]] table (one per model: id = \"tiny\", backend = \"reference\", ...)")
    return [_spec_from_table(table, defaults, f"{path}: [[model]] #{i}") for i, table in enumerate(tables, 1)]


def _spec_from_table(table: dict, defaults: ModelSpec, where: str) -> ModelSpec:
    unknown = sorted(set(table) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MODEL_KEYS)}")
    for key, value in table.items():
        kind = MODEL_KEYS[key][0]
        # TOML's booleans are Python bools, which are ints too: never a number here.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{where}: {key} = {value!r} is not {_kind_name(kind)} ({MODEL_KEYS[key][1]})")
    if "id" not in table or not table["id"].strip():
        raise ConfigError(f"{where}: no id (the public model name, e.g. id = \"tiny\")")
    where = f"{where} ({table['id']})"
    minimums = defaults.minimums
    number_minimums = {"min_tokens_per_s": "tokens_per_s", "min_vram_gb": "vram_gb", "max_latency_ms": "max_latency_ms", "min_bandwidth_mbps": "bandwidth_mbps"}
    for key, attr in number_minimums.items():
        if key in table:
            if not table[key] > 0:
                raise ConfigError(f"{where}: {key} must be a positive number, not {table[key]!r}")
            minimums = dataclasses.replace(minimums, **{attr: float(table[key])})
    if "min_compute_capability" in table:
        try:
            minimums = dataclasses.replace(minimums, compute_capability=parse_capability(table["min_compute_capability"]))
        except ValueError as exc:
            raise ConfigError(f"{where}: min_compute_capability: {exc}") from None
    if minimums != defaults.minimums:
        minimums = dataclasses.replace(minimums, source=f"{where}, flags for the rest")
    if "upstream_supports" in table:
        names = table["upstream_supports"]
        try:
            table = {**table, "upstream_supports": parse_supports(names if isinstance(names, str) else ",".join(map(str, names)))}
        except ValueError as exc:
            raise ConfigError(f"{where}: upstream_supports: {exc}") from None
    plain = {k: (str(v) if k in ("price", "min_price") else v) for k, v in table.items() if k not in number_minimums and k != "min_compute_capability"}
    if "tokens_per_s" in plain:
        plain["tokens_per_s"] = float(plain["tokens_per_s"])
    return dataclasses.replace(defaults, **plain, minimums=minimums)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def _check_all(specs: list[ModelSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.id in seen:
            raise ConfigError(f"model {spec.id!r} is named twice: one peer serves each model once")
        seen.add(spec.id)
        if spec.backend not in BACKENDS:
            raise ConfigError(f"model {spec.id!r}: backend {spec.backend!r} is not one of {', '.join(BACKENDS)}")
        if spec.slots is not None and spec.slots < 1:
            raise ConfigError(f"model {spec.id!r}: slots must be at least 1")
        if spec.queue is not None and spec.queue < 0:
            raise ConfigError(f"model {spec.id!r}: queue must be 0 or more")
        if spec.tokens_per_s is not None and not spec.tokens_per_s > 0:
            raise ConfigError(f"model {spec.id!r}: tokens_per_s must be a positive number")
        spec.price_micro()  # a bad price is refused now, not after the other models have loaded
