"""Start-up mistakes said in one line, with exit status 2, as argparse says its own.

Hypercorn (the hub and the gateway) and py-libp2p bind inside their own task
groups, where a port already taken or out of range surfaces as a nested
exception group of a hundred lines. The checks here run first, in the
command's own thread, and say what is wrong in one line; every other
"this cannot start as asked" (a flag that needs another, a hub that is not
there) goes through :func:`usage_error` too, so scripts see one exit status
for a mistake in how a command was started. Shared by the hub and the node,
which never import each other.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys


def usage_error(message: str) -> SystemExit:
    """Print ``gpunexus: error: message`` on stderr; the SystemExit(2) to raise."""
    print(f"gpunexus: error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


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
    """Exit (status 2, one line) if ``host:port`` cannot be listened on now.

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
        raise usage_error(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = " (another process holds it; pick another port or stop that one)" if exc.errno == errno.EADDRINUSE else ""
            raise usage_error(f"cannot listen on {host}:{port} for {what}: {exc.strerror}{hint}") from None
