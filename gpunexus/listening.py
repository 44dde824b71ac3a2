"""Ports and listen addresses checked before a server starts.

Hypercorn (the hub and the gateway) and py-libp2p bind inside their own task
groups, where a port already taken or out of range surfaces as a nested
exception group of a hundred lines. These checks run first, in the command's
own thread, and say what is wrong in one line. Shared by the hub and the node,
which never import each other.
"""

from __future__ import annotations

import argparse
import errno
import socket


def port_arg(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535; 0 picks a free port)")
    return port


def check_bindable(host: str, port: int, what: str) -> None:
    """Exit with one line if ``host:port`` cannot be listened on now.

    Hypercorn and py-libp2p bind inside their own task groups, where a failed
    bind surfaces as a nested exception group (or, in py-libp2p, as a peer
    with no address). Trying the bind first, with the same ``SO_REUSEADDR``
    they use, gives the reason while there is still one line to say it in.
    The port is free again before they take it; a race with another process
    in between only brings back the long form.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = " (another process holds it; pick another port or stop that one)" if exc.errno == errno.EADDRINUSE else ""
            raise SystemExit(f"cannot listen on {host}:{port} for {what}: {exc.strerror}{hint}") from None
