"""Start-up mistakes told in one line.

An operator who types ``--listen garbage``, ``--port 99999`` or a port that is
already taken should read what is wrong, not a hundred lines of nested
traceback groups from inside hypercorn or py-libp2p. The argument types below
make argparse refuse bad values before anything starts (its usual
``error: argument --listen: ...`` line), and the bind checks turn an address
that cannot be taken into one line on stderr and exit status 1, before
trio starts (``SystemExit`` raised there needs no unwrapping). The port and
bind checks themselves live in :mod:`gpunexus.listening`, shared with the hub.
"""

from __future__ import annotations

import argparse

import multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from gpunexus.listening import check_bindable


def multiaddr_arg(text: str) -> str:
    """An argparse type: any parseable libp2p multiaddr (``/ip4/0.0.0.0/tcp/4001``)."""
    try:
        multiaddr.Multiaddr(text)
    except (MultiaddrError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a multiaddr: {text!r} ({_reason(exc)}); e.g. /ip4/0.0.0.0/tcp/4001") from None
    return text


def peer_multiaddr_arg(text: str) -> str:
    """An argparse type: a dialable peer address, which must end in ``/p2p/<peer id>``."""
    multiaddr_arg(text)
    if "/p2p/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} names no peer: copy a host's whole 'peer:' line, ending in /p2p/<peer id>")
    return text


def check_libp2p_listen(addrs: list[str]) -> None:
    """``check_bindable`` for each TCP listen multiaddr of a peer."""
    for text in addrs:
        addr = multiaddr.Multiaddr(text)
        protocols = {p.name for p in addr.protocols()}
        if "tcp" not in protocols:
            continue
        host = next((addr.value_for_protocol(p) for p in ("ip4", "ip6", "dns", "dns4", "dns6") if p in protocols), None)
        if host is not None:
            check_bindable(host, int(addr.value_for_protocol("tcp")), f"libp2p ({text})")


def _reason(exc: Exception) -> str:
    text = str(exc)
    # multiaddr repeats the whole address around its reason: keep the reason.
    if ": " in text:
        text = text.split(": ", 1)[1]
    return text.split(" (string:")[0]
