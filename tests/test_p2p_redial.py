"""A peer that comes back after a crash can be dialled again at once."""

from __future__ import annotations

import socket

import pytest
import trio

from gpunexus.node.net.p2p import P2PConfig, open_p2p
from gpunexus.protocol.signing import Signer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_restarted_peer_is_reachable_right_after_a_failed_dial():
    """py-libp2p blocks a peer for 60 s after one failed dial; an explicit redial must not wait for that."""
    host_key, port = Signer.generate(), _free_port()
    listen = P2PConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"])
    async with open_p2p(Signer.generate(), P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"])) as gateway:
        async with open_p2p(host_key, listen) as host:
            addr = host.listen_addrs()[0]
            await gateway.connect(addr)
        # The host is gone: one dial fails, and py-libp2p puts the peer in its negative cache.
        with trio.fail_after(30):
            while gateway.is_connected(host_key.peer_id):
                await trio.sleep(0.01)
        with pytest.raises(Exception):
            await gateway.connect(addr, timeout=5)
        async with open_p2p(host_key, listen):  # back, same identity and address
            await gateway.connect(addr, timeout=10)
            assert gateway.is_connected(host_key.peer_id)
