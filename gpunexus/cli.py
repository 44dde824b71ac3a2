"""The ``gpunexus`` command: one entry point, one subcommand per role.

Each role package owns its subcommands (``gpunexus.node.cli``,
``gpunexus.hub.cli``) and registers them here through ``register(sub)``; this
module only wires them together, so node/ and hub/ never import each other.

A command may file under another role's name: ``gpunexus hub challenger``
is an operator's tool (so under ``hub``) but a libp2p gateway peer (so in
node/). ``_GUESTS`` names such modules; each ``register(actions)`` adds its
subcommands to the host command's actions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

_ROLES = ("gpunexus.node.cli", "gpunexus.hub.cli", "gpunexus.demo")
_GUESTS = (("hub", "gpunexus.node.gateway.challenger_cli"),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpunexus",
        description="A peer-to-peer market for LLM inference: hosts serve models over libp2p, "
        "gateways speak the OpenAI API on localhost, a hub keeps the money.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _ROLES:
        module = _role(name)
        if module is not None:
            module.register(sub)
    for command, name in _GUESTS:
        module = _role(name)
        if module is not None and command in sub.choices:
            module.register(_actions_of(sub.choices[command]))
    return parser


def _role(name: str):
    """The module ``name``, or None where this install leaves that package out."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _actions_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The subcommand table of a command (argparse keeps it among the parser's actions)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity if verbosity else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py-libp2p logs routine peer churn at INFO/WARNING; keep it for -vv.
    if verbosity < 2:
        logging.getLogger("libp2p").setLevel(logging.ERROR)
        logging.getLogger("multiaddr").setLevel(logging.ERROR)
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gpunexus node status | head`: the reader left. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def home() -> str:
    """``$GPUNEXUS_HOME`` or ``~/.gpunexus``: identity keys, database, pending receipts."""
    return os.environ.get("GPUNEXUS_HOME") or os.path.expanduser("~/.gpunexus")


if __name__ == "__main__":
    sys.exit(main())
