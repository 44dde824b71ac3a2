"""``gpunexus hub challenger``: the command line of :mod:`gpunexus.node.gateway.challenger`.

Filed under ``hub`` by ``gpunexus/cli.py`` (an operator's tool), living in
node/ (a libp2p gateway peer). Kept apart from the peer itself so that
building the ``gpunexus`` parser imports no libp2p.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..startup import check_libp2p_listen, multiaddr_arg, peer_multiaddr_arg


def register(actions: argparse._SubParsersAction) -> None:
    """Add ``challenger`` to the ``hub`` command's actions."""
    p = actions.add_parser(
        "challenger", help="challenge every host on a schedule, from a gateway peer of its own",
        description="Join the swarm as a gateway peer (a fresh identity each run) and send every host ordinary-looking "
                    "orders on a jittered timetable, paid by a challenge account: serve the hub with "
                    "'--challenge-account EMAIL' so that every receipt that account pays is audited. One log line per "
                    "challenge (host, model, outcome). SIGINT/SIGTERM: no new challenges, the running ones finish, "
                    "receipts and audit openings are delivered, then it exits (a second signal exits at once).")
    p.add_argument("--hub", metavar="URL",
                   help="the hub's base URL, e.g. http://127.0.0.1:8080 (required: challenges exist to be audited)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GPUNEXUS_API_KEY"),
                   help="the challenge account's API key (or $GPUNEXUS_API_KEY)")
    p.add_argument("--period", type=float, default=3600.0, metavar="S", help="the period in seconds (default 3600)")
    p.add_argument("--per-host-per-period", type=float, default=1.0, metavar="N",
                   help="challenges each host meets per period on average (default 1; fractions allowed)")
    p.add_argument("--max-in-flight", type=int, default=4, metavar="N", help="challenges running at once, at most (default 4)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed the timetable and the requests drawn (to reproduce a run; default: unpredictable)")
    p.add_argument("--first-token-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for a host's first token before its challenge fails (default 10)")
    p.add_argument("--listen", action="append", type=multiaddr_arg, metavar="MULTIADDR",
                   help="libp2p listen address (default /ip4/0.0.0.0/tcp/0); repeatable")
    p.add_argument("--bootstrap", action="append", default=[], type=peer_multiaddr_arg, metavar="MULTIADDR",
                   help="peer to dial at start (a host's 'peer:' line); repeatable")
    p.add_argument("--swarm-key", type=Path, metavar="FILE", help="private swarm: the pre-shared key its peers use")
    p.set_defaults(func=_main)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"hub challenger: {message}")


def options_from(args: argparse.Namespace):
    """:class:`ChallengerOptions` from the command line, or SystemExit with one line naming what is wrong."""
    from .challenger import ChallengerError, ChallengerOptions, check_hub_url
    from .service import GatewayConfig
    from ..net.p2p import P2PConfig, load_swarm_key
    from ..runtime import HubLogin

    if not args.hub:
        raise _fail("--hub URL is required (challenges are audited by a hub; a swarm without one has nothing to check them)")
    if not args.api_key:
        raise _fail("--api-key KEY (or $GPUNEXUS_API_KEY) is required: the challenge account's key")
    if not args.period > 0 or not args.per_host_per_period > 0:
        raise _fail("--period and --per-host-per-period must be > 0")
    if args.max_in_flight < 1 or not args.first_token_timeout > 0:
        raise _fail("--max-in-flight must be at least 1 and --first-token-timeout > 0")
    try:
        url = check_hub_url(args.hub)
    except ChallengerError as exc:
        raise _fail(str(exc)) from None
    try:
        swarm_key = load_swarm_key(args.swarm_key) if args.swarm_key else None
    except (OSError, ValueError) as exc:
        raise _fail(f"--swarm-key: {exc}") from None
    listen = args.listen or ["/ip4/0.0.0.0/tcp/0"]
    check_libp2p_listen(listen)
    return ChallengerOptions(
        hub=HubLogin(url, args.api_key), period_s=args.period, per_host_per_period=args.per_host_per_period,
        p2p=P2PConfig(listen=listen, bootstrap=list(args.bootstrap), swarm_key=swarm_key),
        config=GatewayConfig(first_token_timeout=args.first_token_timeout),
        home=os.environ.get("GPUNEXUS_HOME") or os.path.expanduser("~/.gpunexus"),
        seed=args.seed, max_in_flight=args.max_in_flight,
    )


def _main(args: argparse.Namespace) -> int:
    import trio

    from gpunexus.protocol.money import micro_to_usd

    from .challenger import ChallengerError, open_challenger, stop_on_signal

    options = options_from(args)

    async def main() -> int:
        try:
            async with open_challenger(options) as runtime:
                print(f"challenger peer {runtime.peer_id}: {options.per_host_per_period:g} challenge(s) per host every "
                      f"{options.period_s:g} s, paid by {runtime.account} ({micro_to_usd(runtime.balance_micro)} USD)",
                      flush=True)
                await stop_on_signal(runtime)
        except ChallengerError as exc:
            print(f"hub challenger: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0

    return trio.run(main)
