"""``gpunexus node ...``: run a host or a gateway, and steer a running host."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio

from gpunexus.usage import check_bindable, port_arg, usage_error
from gpunexus.protocol.money import micro_to_usd, usd_to_micro

from .host import check as check_args
from .startup import check_hub, check_libp2p_listen, hub_url_arg, multiaddr_arg, peer_multiaddr_arg

if TYPE_CHECKING:
    from .backends.base import Backend
    from .host.config import ModelSpec
    from .net.p2p import P2PConfig
    from .runtime import HostOptions, HubLogin

log = logging.getLogger("gpunexus.node")


def _home() -> str:
    return os.environ.get("GPUNEXUS_HOME") or os.path.expanduser("~/.gpunexus")


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="run a host or a gateway peer", description="Run a host (serve a model) or a gateway (OpenAI API on localhost), and steer a running host.")
    actions = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)

    from .host.config import MODEL_KEYS

    serve = actions.add_parser("serve", help="serve a model to the network as a host",
                               epilog=f"--config keys per [[model]] table: {', '.join(MODEL_KEYS)}. Host-wide settings (--listen, --bootstrap, --hub, "
                               "--region, --available, --swarm-key) stay flags.", description="Serve one or more models to the network from one peer. The first line on stdout is 'peer: <multiaddr>' for a gateway's --bootstrap. "
                                "Each model has its own offer, slots and check; one that fails the check is refused, the others are served.")
    serve.add_argument("--model", action="append", metavar="NAME", help="public model name gateways ask for (for --backend reference: the reference model, e.g. tiny or nano); "
                       "repeat it to serve several models from this one peer, the other flags applying to each")
    serve.add_argument("--config", type=Path, metavar="HOST.TOML", help="serve the models of this file instead: one [[model]] table per model with its own "
                       "id, backend, price, slots, license, minimums... (see README 'Run a host'); a key a table leaves out takes its flag")
    serve.add_argument("--backend", choices=("reference", "openai", "exllamav2"), default="reference", help="inference backend (default: reference, the CPU numpy model)")
    serve.add_argument("--upstream", metavar="URL", help="--backend openai: base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1")
    serve.add_argument("--upstream-model", metavar="NAME", help="--backend openai: model name on the upstream (default: --model)")
    serve.add_argument("--upstream-key", metavar="KEY", help="--backend openai: bearer key for the upstream, if it needs one")
    serve.add_argument("--upstream-supports", type=_supports, metavar="LIST", help="--backend openai: what the upstream engine does beyond plain text, "
                       "announced in the offer and passed through: a comma-separated list of tools, json_mode, json_schema, vision, penalties, logit_bias, logprobs "
                       "(e.g. tools,json_schema for vLLM with tool calling on; default: plain text only)")
    serve.add_argument("--model-dir", metavar="DIR", help="--backend exllamav2: the EXL2 model folder")
    serve.add_argument("--price", default="0.20", metavar="USD_PER_MTOK|market", help="asking price in USD per million tokens (default 0.20), or 'market' to follow the hub's market price")
    serve.add_argument("--min-price", default=None, metavar="USD_PER_MTOK", help="with --price market: never ask less than this (default 0.20 until the first market price)")
    serve.add_argument("--slots", type=int, default=None, help="requests served at once (default: 2 for reference, 64 for openai, 1 for exllamav2)")
    serve.add_argument("--queue", type=int, default=None, help="orders that may wait for a slot before the host answers 'busy' (default 4 x slots)")
    serve.add_argument("--region", default="", help="free-form region label shown to gateways")
    serve.add_argument("--license", default=None, help="licence note announced with the model (e.g. 'Apache-2.0', 'Llama 3.1 Community License')")
    serve.add_argument("--tokens-per-s", type=float, default=None, help="announce at most this speed (default: the speed measured at start; a claim above it is cut to it)")
    serve.add_argument("--listen", action="append", type=multiaddr_arg, metavar="MULTIADDR", help="libp2p listen address (default /ip4/0.0.0.0/tcp/4001); repeatable")
    _network_args(serve)
    check_args.add_minimum_arguments(serve)
    serve.add_argument("--force", action="store_true", help="serve even if this machine fails the start-up check (logged, and marked in the offer's region)")
    serve.add_argument("--metrics-port", type=port_arg, metavar="PORT", help="serve Prometheus /metrics and /health (200 while taking orders, 503 while "
                       "drained or withdrawn) on this port; read-only, no token (default: off)")
    serve.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR", help="with --metrics-port: the address to bind (default 127.0.0.1)")
    serve.add_argument("--available", type=_windows, default=(), metavar="HH:MM-HH:MM[,...]", help="serve only inside these local-time windows, e.g. 18:00-08:00 (may wrap midnight; comma-separated); withdrawn outside them")
    serve.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                       help="with --hub: also act as a peer verifier for this model, replaying the prefill of other "
                            "hosts' audited outputs for a per-job fee (default on where the backend can: reference, "
                            "exllamav2, openai for completions; --no-verify turns it off)")
    serve.set_defaults(func=_serve)

    gw = actions.add_parser("gateway", help="run the OpenAI-compatible gateway on localhost", description="Serve the OpenAI API on localhost and stream every request from a host, peer to peer.")
    gw.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    gw.add_argument("--port", type=port_arg, default=8000, help="HTTP port (default 8000)")
    gw.add_argument("--listen", action="append", type=multiaddr_arg, metavar="MULTIADDR", help="libp2p listen address (default /ip4/127.0.0.1/tcp/0)")
    gw.add_argument("--max-price", metavar="USD_PER_MTOK", help="never pay more than this per million tokens")
    gw.add_argument("--min-tokens-per-s", type=float, help="skip hosts announcing less than this speed")
    gw.add_argument("--first-token-timeout", type=float, default=10.0, help="seconds to wait for a host's first token before trying the next (default 10)")
    gw.add_argument("--audit-retention", type=float, default=3600.0, metavar="SECONDS", help="with --hub: keep each paid request and its output this long so the hub can audit the host (default 3600)")
    gw.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="let browser pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; repeatable (default: CORS off)")
    gw.add_argument("--no-sessions", action="store_true", help="open one libp2p stream per request instead of one session per host for all requests "
                    "(as gateways before /gpunexus/session/1; for comparing, or a host whose sessions misbehave)")
    gw.add_argument("--follow", choices=("auto", "all", "used"), default="auto",
                    help="which models' offers to follow: 'used' only those clients ask for (joined on the first request, caught up "
                    "from the hub), 'all' every model the network is known to have, 'auto' all while the hub's directory counts at "
                    "most 256 hosts, else used (default auto)")
    gw.add_argument("--no-audit-retention", action="store_true", help="with --hub: keep no request text for audits; the hub then cannot audit your requests, so this gateway only uses hosts in good standing (no unrecovered failed audit)")
    _network_args(gw)
    gw.set_defaults(func=_gateway)

    for name, text in (("enable", "take requests again"), ("disable", "finish in-flight requests, then withdraw from the network"), ("status", "show in-flight, served, earnings and uptime")):
        p = actions.add_parser(name, help=f"running host: {text}", description=f"Tell the host running under $GPUNEXUS_HOME to {text}.")
        if name != "status":
            p.add_argument("--model", action="append", metavar="NAME", help=f"{name} only this model of the host (repeatable); the host's other models keep their state")
        p.set_defaults(func=_control, action=name)

    check = actions.add_parser("check", help="hardware and network check for a model (the gate 'node serve' applies)",
                               description="Measure this machine against a model's minimums: GPU memory and compute capability (nvidia-smi), "
                               "the backend's tokens/s on a short real run, and round trips to the hub and the bootstrap peers. "
                               "Exit 0 when every check passes, 1 when one fails, 2 for bad usage.")
    check.add_argument("--model", action="append", metavar="NAME", help="model name, as for 'node serve' (default tiny); repeatable: one verdict per model")
    check.add_argument("--config", type=Path, metavar="HOST.TOML", help="check every model of this file, as 'node serve --config' would serve them")
    check.add_argument("--backend", choices=("reference", "openai", "exllamav2"), default="reference")
    check.add_argument("--upstream", metavar="URL", help="--backend openai: base URL of the OpenAI-compatible server")
    check.add_argument("--upstream-model", metavar="NAME")
    check.add_argument("--upstream-key", metavar="KEY")
    check.add_argument("--model-dir", metavar="DIR", help="--backend exllamav2: the EXL2 model folder")
    check_args.add_minimum_arguments(check)
    check.add_argument("--hub", metavar="URL", help="measure the round trip to this hub (GET /v1/hub)")
    check.add_argument("--bootstrap", action="append", default=[], type=peer_multiaddr_arg, metavar="MULTIADDR", help="measure the round trip to this peer (libp2p dial and ping); repeatable")
    check.add_argument("--swarm-key", type=Path, metavar="FILE", help="private swarm key, to reach its peers")
    check.add_argument("--json", action="store_true", help="print the measurements and verdicts as JSON")
    check.set_defaults(func=_check)

    models = actions.add_parser("models", help="the known models this machine's hardware can serve, PASS/FAIL each",
                                description="List the models gpunexus knows with what each needs (GPU memory for the weights and one slot's KV cache "
                                "at --context, computed from the architecture; engine speed for the CPU reference models, measured here) against "
                                "this machine (nvidia-smi, a short real run), PASS or FAIL each. 'node check --model M' then checks one fully.")
    models.add_argument("--context", type=_positive_int, default=None, metavar="TOKENS", help="context to size the KV cache for (default 8192, capped by each model's own)")
    models.add_argument("--bits", type=check_args._positive, default=None, metavar="BPW", help="EXL2 bits per weight of the GPU models (default 4.0)")
    models.add_argument("--json", action="store_true", help="print every model's minimums and checks as JSON")
    models.set_defaults(func=_models)

    market = sub.add_parser("market", help="market prices, demand, supply and utilisation per model", description="Show the hub's market: price, demand and supply (tokens/s), utilisation, hosts, what a GPU-hour earns, and the last day's prices, per model.")
    market.add_argument("--hub", default=os.environ.get("GPUNEXUS_HUB"), metavar="URL", help="hub base URL (or $GPUNEXUS_HUB)")
    market.add_argument("--json", action="store_true", help="print the hub's answer as JSON")
    market.set_defaults(func=_market)

    key = actions.add_parser("swarm-key", help="write a new pre-shared key for a private swarm", description="Write a new swarm key file (libp2p pnet format). Share it with your team's hosts and gateways; peers without it cannot connect.")
    key.add_argument("path", type=Path)
    key.set_defaults(func=_swarm_key)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _models(args: argparse.Namespace) -> int:
    from .host.known_models import DEFAULT_BITS, DEFAULT_CONTEXT, judge, known_models, render

    listed = known_models(args.context or DEFAULT_CONTEXT, args.bits or DEFAULT_BITS)
    gpus, verdicts = trio.run(judge, listed)
    if args.json:
        print(json.dumps({"gpu": gpus.describe(), "models": [v.to_json() for v in verdicts]}, indent=2))
    else:
        print(render(gpus, verdicts))
    return 0


def _supports(text: str):
    from .backends.openai_upstream import parse_supports

    try:
        return parse_supports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _windows(text: str):
    from .host.schedule import parse_windows

    try:
        return parse_windows(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", default=[], type=peer_multiaddr_arg, metavar="MULTIADDR", help="peer to dial at start (a host's 'peer:' line); repeatable")
    p.add_argument("--swarm-key", type=Path, metavar="FILE", help="private swarm: only peers with this key can connect (see 'gpunexus node swarm-key')")
    p.add_argument("--hub", type=hub_url_arg, metavar="URL", help="settlement hub base URL (omit for a private swarm without billing)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GPUNEXUS_API_KEY"), help="hub API key (or $GPUNEXUS_API_KEY); "
                   "on a gateway with --hub and no key: a team's gateway, each client sending its own hub key; "
                   "without --hub on a gateway: the bearer key clients must send")


def _p2p(args: argparse.Namespace, default_listen: str) -> P2PConfig:
    from .net.p2p import P2PConfig, load_swarm_key

    listen = args.listen or [default_listen]
    check_libp2p_listen(listen)
    return P2PConfig(
        listen=listen,
        bootstrap=list(args.bootstrap),
        swarm_key=load_swarm_key(args.swarm_key) if args.swarm_key else None,
    )


def _hub_login(args: argparse.Namespace) -> HubLogin | None:
    from .runtime import HubLogin

    if not args.hub:
        return None
    if not args.api_key:
        raise usage_error("--hub needs --api-key (or $GPUNEXUS_API_KEY)")
    return HubLogin(args.hub, args.api_key)


def make_backend(spec: ModelSpec) -> Backend:
    if spec.backend == "reference":
        from .backends.reference import ReferenceBackend

        return ReferenceBackend(spec.reference or spec.id, public_name=spec.id)
    if spec.backend == "openai":
        if not spec.upstream:
            raise usage_error(f"--backend openai needs --upstream URL (e.g. http://127.0.0.1:11434/v1 for Ollama){_which(spec)}")
        from .backends.openai_upstream import OpenAIUpstreamBackend

        return OpenAIUpstreamBackend(spec.upstream, spec.id, upstream_model=spec.upstream_model, api_key=spec.upstream_key, license=spec.license or "",
                                     **({"supports": spec.upstream_supports} if spec.upstream_supports is not None else {}))
    from .backends.exllamav2 import ExLlamaV2Backend

    if not spec.model_dir:
        raise usage_error(f"--backend exllamav2 needs --model-dir DIR (an EXL2 model folder){_which(spec)}")
    return ExLlamaV2Backend(spec.model_dir, spec.id, max_slots=spec.slots or 1)


def _which(spec: ModelSpec) -> str:
    return f" (model {spec.id!r})"


def _specs(args: argparse.Namespace) -> list[ModelSpec]:
    from .host.config import ConfigError, specs_from_args

    try:
        return _with_hub_catalogue(specs_from_args(args), args.hub)
    except ConfigError as exc:
        raise usage_error(str(exc)) from None


def _with_hub_catalogue(specs: list[ModelSpec], hub: str | None) -> list[ModelSpec]:
    """Each model's minimums from the hub's catalogue where it names them (``node check`` and ``node serve``)."""
    if not hub:
        return specs
    from .gateway.catalogue import fetch_catalogue

    catalogue = fetch_catalogue(hub)
    return [dataclasses.replace(s, minimums=check_args.with_catalogue(s.minimums, catalogue.get(s.id), hub)) for s in specs]


def _serve(args: argparse.Namespace) -> int:
    from .backends.base import BackendError
    from .runtime import HostOptions, ModelOptions, open_host

    if not args.model and args.config is None:
        raise usage_error("node serve needs --model NAME (repeatable) or --config HOST.TOML")
    specs = _specs(args)
    hub = _hub_login(args)
    if hub is not None:
        check_hub(hub.url, hub.api_key)
    if any(spec.follows_market for spec in specs) and not args.hub:
        raise usage_error("--price market needs --hub URL: market prices come from the hub")
    models: list[ModelOptions] = []
    for spec in specs:
        try:
            backend = make_backend(spec)
        except BackendError as exc:
            raise usage_error(f"cannot start the backend: {exc}" + (_which(spec) if len(specs) > 1 else "")) from None
        if spec.license is not None:
            backend.info = dataclasses.replace(backend.info, license=spec.license)
        models.append(ModelOptions(backend, spec.price_micro(), max_slots=spec.slots or getattr(backend, "default_slots", 1),
                                   max_queue=spec.queue, region=args.region, follow_market=spec.follows_market))
    options = HostOptions(
        p2p=_p2p(args, "/ip4/0.0.0.0/tcp/4001"),
        region=args.region,
        home=_home(),
        control=True,
        hub=hub,
        schedule=args.available,
        verify=args.verify,
        metrics=(args.metrics_host, args.metrics_port) if args.metrics_port is not None else None,
        models=models,
    )
    if options.metrics is not None:
        check_bindable(*options.metrics, "/metrics")

    async def main() -> int:
        if not await _gate(args, specs, options):
            return 1
        # The signals are ours before the peer line goes out: a supervisor that stops the host as soon as it
        # reads it (docker stop, a test) gets a drain, not Python's default exit on SIGTERM.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_host(options) as runtime:
                addrs = runtime.node.listen_addrs()
                print(f"peer: {addrs[0]}", flush=True)
                for model in options.models:
                    log.info("serving %s (%s) at %s USD/Mtok, %.1f tokens/s, %d slots", model.backend.info.name, model.backend.info.model_hash,
                             micro_to_usd(model.price_micro_per_mtok), model.tokens_per_s, model.max_slots)
                for addr in addrs[1:]:
                    log.info("also reachable at %s", addr)
                if runtime.schedule is not None:
                    when = runtime.schedule.status()
                    log.info("available %s (%s): %s now, next change %s", when["windows"], when["zone"], "announcing" if when["available"] else "withdrawn", when["next_change"])
                await _drain_on_signal(runtime.service, runtime.schedule, signals)
        return 0

    return trio.run(main)


async def _gate(args: argparse.Namespace, specs: list[ModelSpec], options: HostOptions) -> bool:
    """``node check``'s gate before anything is announced; sets each offer's speed (and region if forced).

    A model the machine fails is refused (one line on stderr naming every
    failed check) unless ``--force`` (or its table's ``force``) is given; the
    others are served. False when no model is left to serve.
    """
    from .host.check import WARN, announced_tokens_per_s, forced_region, run_gates

    reports = await run_gates([(m.backend, spec.backend, spec.minimums) for spec, m in zip(specs, options.models)], hub=args.hub,
                              bootstrap=args.bootstrap, swarm_key=options.p2p.swarm_key, network_strict=False)
    served = []
    for spec, model, report in zip(specs, options.models, reports):
        for line in report.lines:
            log.log(logging.WARNING if line.status == WARN else logging.INFO, "check %s %s %s: %s (needs %s)%s", report.model,
                    line.name, line.status, line.measured, line.required, f" {line.target}" if line.target else "")
        if not report.ok:
            if not spec.force:
                print(f"refusing to serve {report.model}: this machine fails the check: {report.failure_summary()} (--force serves anyway)", file=sys.stderr, flush=True)
                await model.backend.aclose()  # a GPU engine gives its memory back to the models that are served
                continue
            model.region = forced_region(model.region, report)
            log.warning("--force: serving %s although it fails the check (%s); the offer's region says %r", report.model, report.failure_summary(), model.region)
        elif spec.force:
            log.info("--force: nothing to force for %s, every check passed", report.model)
        model.tokens_per_s, note = announced_tokens_per_s(report.tokens_per_s, spec.tokens_per_s)
        if note:
            log.warning("%s: %s", report.model, note)
        served.append(model)
    options.models = served
    return bool(served)


async def _drain_on_signal(service, schedule, signals) -> None:
    """Wait for SIGTERM or SIGINT, then leave like ``node disable``: no new orders,
    the ones in flight finish, the offer is withdrawn. This is what ``docker stop``
    and ``systemctl stop`` send; a second signal stops at once. The schedule (if
    any) stops first, so a window opening during the drain cannot re-enable it.
    ``signals``: the receiver of both, opened before the host said it is up."""
    first = await signals.__anext__()
    if schedule is not None:
        schedule.stop()
    log.info("%s: draining %d request(s) in flight, then leaving", signal.Signals(first).name, service.stats.in_flight)
    async with trio.open_nursery() as nursery:

        async def stop_on_second_signal() -> None:
            await signals.__anext__()
            log.warning("second signal: stopping without waiting for requests in flight")
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_second_signal)
        await service.disable()
        nursery.cancel_scope.cancel()
    log.info("stopped: %d requests served, %d cut off", service.stats.served, service.stats.in_flight)


def _gateway(args: argparse.Namespace) -> int:
    from .gateway.service import GatewayConfig
    from .runtime import GatewayOptions, open_gateway

    config = GatewayConfig(first_token_timeout=args.first_token_timeout, min_tokens_per_s=args.min_tokens_per_s, sessions=not args.no_sessions,
                           follow_known={"auto": None, "all": True, "used": False}[args.follow])
    if args.max_price:
        try:
            config.max_price_micro_per_mtok = usd_to_micro(args.max_price)
        except ValueError as exc:
            raise usage_error(f"--max-price: {exc}") from None
    from .gateway.settlement import FreeSettlement

    team = bool(args.hub) and not args.api_key
    if team:  # a team's gateway: each client pays with its own hub key
        from .runtime import HubLogin

        check_hub(args.hub)
        hub = HubLogin(args.hub, "")
    else:
        hub = _hub_login(args)
        if hub is not None:
            check_hub(hub.url, hub.api_key)
    check_bindable(args.host, args.port, "the OpenAI API")
    options = GatewayOptions(host=args.host, port=args.port, p2p=_p2p(args, "/ip4/127.0.0.1/tcp/0"), config=config, settlement=FreeSettlement(api_key=args.api_key), home=_home(), hub=hub,
                             audit_retention_s=None if args.no_audit_retention else args.audit_retention, cors_origins=tuple(args.cors_origin),
                             team=team)

    async def main() -> None:
        async with open_gateway(options) as runtime:
            print(f"base_url: {runtime.base_url}", flush=True)
            log.info("gateway peer %s; OpenAI API at %s", runtime.node.peer_id, runtime.base_url)
            if team:
                log.info("team gateway: each client pays with its own hub key (Authorization: Bearer gnx_...)")
            await trio.sleep_forever()

    trio.run(main)
    return 0


def _control(args: argparse.Namespace) -> int:
    from .runtime import CONTROL_FILE, node_home

    path = node_home(_home(), "host") / CONTROL_FILE
    if not path.exists():
        print(f"no host is running under {_home()} (no {path})", file=sys.stderr)
        return 1
    info = json.loads(path.read_text())
    headers = {"authorization": f"Bearer {info['token']}"}
    models = getattr(args, "model", None) or [None]
    try:
        with httpx.Client(timeout=600 if args.action == "disable" else 10) as client:
            for model in models:
                if args.action == "disable":
                    print(f"draining{' ' + model if model else ''}: waiting for in-flight requests to finish...", file=sys.stderr)
                r = client.request("GET" if args.action == "status" else "POST", f"{info['url']}/{args.action}", headers=headers,
                                   params={"model": model} if model else None)
                if r.status_code == 404 and model:
                    print(f"cannot {args.action} {model}: {r.json()['error']}", file=sys.stderr)
                    return 1
                r.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"cannot reach the host (pid {info.get('pid')}): {exc}", file=sys.stderr)
        return 1
    status = r.json()
    state = "enabled" if status["enabled"] else "disabled (withdrawn)"
    print(f"host {status['peer_id']}: {state}")
    served = status.get("models", [])
    if len(served) > 1:
        print(f"  models       {len(served)}, {sum(m['enabled'] for m in served)} taking orders")
        for m in served:
            m_state = "enabled" if m["enabled"] else ("disabled (withdrawn)" if not m["model_enabled"] else "host disabled")
            print(f"    {m['model']:<16} {m_state:<20} {micro_to_usd(m['price_micro_per_mtok'])} USD/Mtok, {m['in_flight']} of {m['max_slots']} slots, "
                  f"{m['served']} served ({m['model_hash']})")
    else:
        taken_back = bool(served) and not served[0]["model_enabled"]
        print(f"  model        {status['model']} ({status['model_hash']}){' disabled (withdrawn)' if taken_back else ''}")
        print(f"  price        {micro_to_usd(status['price_micro_per_mtok'])} USD per million tokens")
    print(f"  in flight    {status['in_flight']} of {status['max_slots']} slots")
    print(f"  served       {status['served']} requests, {status['tokens_out']} tokens out, {status['failed']} failed, {status['refused']} refused")
    print(f"  billed       {micro_to_usd(status['billed_micro'])} USD (receipts signed)")
    if "earnings_micro" in status:
        print(f"  earnings     {micro_to_usd(status['earnings_micro'])} USD settled by the hub, {micro_to_usd(status['unpaid_micro'])} USD not yet paid out")
    elif "earnings_error" in status:
        print(f"  earnings     unknown: {status['earnings_error']}")
    print(f"  uptime       {status['uptime_s']:.0f} s")
    if "verifier" in status:
        v = status["verifier"]
        print(f"  verifier     {v['jobs']} jobs answered ({v['passed']} judged passed, {v['failed']} failed, "
              f"{v['refused']} refused), {micro_to_usd(v['fees_micro'])} USD in fees")
    if "schedule" in status:
        when = status["schedule"]
        change = "never changes"
        if when["next_change"]:
            at = datetime.fromisoformat(when["next_change"]).strftime("%Y-%m-%d %H:%M %z")
            change = f"{'announces again' if when['next_state'] == 'enabled' else 'withdraws'} at {at}"
        print(f"  schedule     {when['windows']} ({when['zone']}): {'inside' if when['available'] else 'outside'} the windows now; {change}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """One verdict per model, the machine and the network measured once; exit 0 only if every model passes."""
    from .backends.base import BackendError
    from .host.check import Report, render, render_json, run_gates, unloadable_backend_report
    from .host.config import ConfigError, specs_from_args
    from .net.p2p import load_swarm_key

    try:
        specs = _with_hub_catalogue(specs_from_args(args), args.hub)
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        backends: dict[int, Backend] = {}
        reports: dict[int, Report] = {}
        for i, spec in enumerate(specs):
            try:
                backends[i] = make_backend(spec)
            except BackendError as exc:  # the engine does not start here (no CUDA, unknown model): a failed check
                reports[i] = unloadable_backend_report(spec.id, spec.backend, spec.minimums, str(exc))
    except SystemExit:  # a flag that cannot work (said on stderr already): usage, not a verdict
        return 2
    except (ConfigError, OSError) as exc:  # a config file that cannot work: usage too
        print(f"gpunexus node check: {exc}", file=sys.stderr)
        return 2

    async def measure() -> list[tuple[Report, str]]:
        try:
            measured = await run_gates([(b, specs[i].backend, specs[i].minimums) for i, b in backends.items()], hub=args.hub,
                                       bootstrap=args.bootstrap, swarm_key=swarm_key)
        finally:
            for backend in backends.values():
                await backend.aclose()
        reports.update(zip(backends, measured))
        return [(reports[i], f" ({backends[i].info.model_hash}, context {backends[i].info.max_context})" if i in backends else "") for i in range(len(specs))]

    results = trio.run(measure)
    if args.json:
        reports = [report for report, _ in results]
        print(render_json(reports[0]) if len(reports) == 1 else json.dumps({"ok": all(r.ok for r in reports), "models": [r.to_json() for r in reports]}, indent=2))
    else:
        print("\n\n".join(render(report, detail) for report, detail in results))
    return 0 if all(report.ok for report, _ in results) else 1


def _swarm_key(args: argparse.Namespace) -> int:
    from .net.p2p import format_swarm_key

    if args.path.exists():
        raise usage_error(f"{args.path} exists; refusing to overwrite a swarm key")
    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(format_swarm_key(secrets.token_hex(32)))
    print(f"wrote {args.path}: pass it as --swarm-key to every host and gateway of your swarm")
    return 0


def _market(args: argparse.Namespace) -> int:
    if not args.hub:
        print("gpunexus market needs --hub URL (or $GPUNEXUS_HUB)", file=sys.stderr)
        return 2
    from .hub_client import HubRefused, HubUnavailable, fetch_market

    try:
        market = trio.run(fetch_market, args.hub)
    except (HubUnavailable, HubRefused) as exc:
        print(f"cannot read the market from {args.hub}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(market, indent=2))
        return 0
    models = market.get("models", [])
    if not models:
        print("no market yet: no host has offered a model to this hub")
        return 0
    print(f"{'MODEL':<24} {'USD/Mtok':>9} {'DEMAND t/s':>11} {'SUPPLY t/s':>11} {'UTIL':>6} {'HOSTS':>5} {'USD/GPU-h':>10}  LAST 24 H (min..max)")
    for m in sorted(models, key=lambda m: -m.get("earnings_micro_per_gpu_hour", 0)):
        history = [p for _, p in m.get("history", [])]
        span = f"{micro_to_usd(min(history))}..{micro_to_usd(max(history))} over {len(history)} epochs" if history else "-"
        print(f"{m['model']:<24} {m['price_micro_per_mtok'] / 1e6:>9.4f} {m['demand_tps']:>11.1f} {m['supply_tps']:>11.1f} "
              f"{m['utilisation']:>6.0%} {m['hosts']:>5} {m.get('earnings_micro_per_gpu_hour', 0) / 1e6:>10.4f}  {span}")
    print(f"(epochs of {market.get('epoch_s', 0):g} s; models sorted by what a GPU-hour earns)")
    return 0
