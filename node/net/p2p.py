"""One libp2p peer: identity, transport, pubsub, bootstrap dialling.

Both roles (host and gateway) run exactly this, inside their own nursery, so
the network stack is configured in one place: Noise only (no plaintext or
secio fallback a peer could pick to skip authentication), yamux, TCP, an
optional pre-shared swarm key (libp2p pnet) for private swarms, and our
gossipsub router (:mod:`gpunexus.node.net.gossip`).
"""

from __future__ import annotations

import logging
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import AsyncIterator

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from gpunexus.protocol.signing import Signer

from .gossip import LIGHT_DEGREE, make_gossipsub, running_pubsub
from .libp2p_compat import allow_redial
from .speedtest import PROTOCOL as SPEEDTEST_PROTOCOL
from .speedtest import speedtest_handler

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
REDIAL_INTERVAL = 5.0
SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/"


@dataclass
class P2PConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    swarm_key: str | None = None
    """64 hex characters (32 bytes): only peers holding the same key can connect."""
    light: bool = False
    """A light gossip member (mesh degree 3/2/4, :data:`~.gossip.LIGHT_DEGREE`): a gateway, which reads offers but
    need not carry them; hosts keep the full degree."""


def load_swarm_key(path: Path) -> str:
    """Read a go-libp2p style swarm.key (``/key/swarm/psk/1.0.0/``, ``/base16/``, hex)."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) != 3 or lines[0] != SWARM_KEY_HEADER or lines[1] != "/base16/":
        raise ValueError(f"{path}: not a swarm key file (expected {SWARM_KEY_HEADER}, /base16/, 64 hex digits)")
    key = lines[2].lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path}: the key must be 64 hex digits")
    return key


def format_swarm_key(hex_key: str) -> str:
    return f"{SWARM_KEY_HEADER}\n/base16/\n{hex_key}\n"


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses by name lookup, non-loopback first, loopback last."""
    try:
        found = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        found = []
    public = [ip for ip in found if not ip.startswith("127.")]
    return public + ["127.0.0.1"]


class P2PNode:
    """A running libp2p host with pubsub; use :func:`open_p2p` to start one."""

    def __init__(self, host, pubsub: Pubsub, signer: Signer) -> None:
        self.host = host
        self.pubsub = pubsub
        self.signer = signer

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    def listen_addrs(self) -> list[str]:
        """Addresses others can dial, each ending in ``/p2p/<peer id>``.

        A wildcard listen address (0.0.0.0) is not dialable, so it is
        expanded into this machine's own addresses, non-loopback first.
        """
        out = []
        for addr in self.host.get_addrs():
            text = str(addr).split("/p2p/")[0]
            if text.startswith("/ip4/0.0.0.0/"):
                rest = text[len("/ip4/0.0.0.0"):]
                out.extend(f"/ip4/{ip}{rest}" for ip in local_ipv4_addresses())
            else:
                out.append(text)
        return [f"{a}/p2p/{self.peer_id}" for a in dict.fromkeys(out)]

    async def connect(self, addr: str, timeout: float = CONNECT_TIMEOUT) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        self.allow_redial(str(info.peer_id))
        with trio.fail_after(timeout):
            await self.host.connect(info)

    def allow_redial(self, peer_id: str) -> None:
        """Let the next dial to ``peer_id`` through py-libp2p's negative cache.

        py-libp2p 0.8 refuses every dial to a peer for 60 s after one dial to
        it failed (``Swarm._negative_peer_cache``), so a host restarted a few
        seconds after a crash stayed out of reach for a minute although its
        bootstrap address answered again. Our own dials are already paced
        (``REDIAL_INTERVAL``, the matcher's back-off), so an explicit dial
        clears the entry first. The cache is private to py-libp2p: absent, this
        does nothing (:func:`gpunexus.node.net.libp2p_compat.allow_redial`).
        """
        allow_redial(self.host.get_network(), peer_id)

    def on_disconnect(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(peer_id)`` whenever the last connection to a peer closes."""
        self.host.get_network().register_notifee(_DisconnectNotifee(self, callback))

    def is_connected(self, peer_id: str) -> bool:
        return any(str(p) == peer_id for p in self.host.get_network().connections)

    async def keep_connected(self, addrs: list[str]) -> None:
        """Dial bootstrap peers and redial them whenever the connection drops."""
        while True:
            for addr in addrs:
                target = addr.rsplit("/p2p/", 1)[-1]
                if self.is_connected(target):
                    continue
                try:
                    await self.connect(addr)
                    log.info("connected to bootstrap peer %s", addr)
                except Exception as exc:  # a down bootstrap peer is routine: retry later
                    log.warning("cannot reach bootstrap peer %s: %s", addr, exc)
            await trio.sleep(REDIAL_INTERVAL)


class _DisconnectNotifee:
    """The slice of libp2p's INotifee the node needs: peers going away."""

    def __init__(self, node: P2PNode, callback: Callable[[str], None]) -> None:
        self._node = node
        self._callback = callback

    async def disconnected(self, network, conn) -> None:
        peer_id = str(conn.muxed_conn.peer_id)
        if not self._node.is_connected(peer_id):
            self._callback(peer_id)

    async def connected(self, network, conn) -> None: ...
    async def opened_stream(self, network, stream) -> None: ...
    async def closed_stream(self, network, stream) -> None: ...
    async def listen(self, network, multiaddr) -> None: ...
    async def listen_close(self, network, multiaddr) -> None: ...


@asynccontextmanager
async def open_p2p(signer: Signer, config: P2PConfig) -> AsyncIterator[P2PNode]:
    """Start a libp2p host, pubsub and bootstrap dialling; stop them on exit."""
    key_pair = create_new_key_pair(signer.seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    listen = [multiaddr.Multiaddr(a) for a in config.listen]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        listen_addrs=listen,
        psk=config.swarm_key,
    )
    # Every peer answers bandwidth probes (node check): hosts and gateways are each other's bootstrap peers.
    host.set_stream_handler(SPEEDTEST_PROTOCOL, speedtest_handler())
    router = make_gossipsub(**LIGHT_DEGREE) if config.light else None
    async with host.run(listen), running_pubsub(host, router) as pubsub:
        node = P2PNode(host, pubsub, signer)
        async with trio.open_nursery() as nursery:
            if config.bootstrap:
                for addr in config.bootstrap:
                    try:
                        await node.connect(addr)
                    except Exception as exc:
                        log.warning("cannot reach bootstrap peer %s yet: %s", addr, exc)
                nursery.start_soon(node.keep_connected, list(config.bootstrap))
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
