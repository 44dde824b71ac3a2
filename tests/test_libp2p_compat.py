"""py-libp2p's private parts that node/net/libp2p_compat.py relies on are still there, as it expects.

When a py-libp2p upgrade removes or changes one of them, these tests fail
and the message names what changed (the yamux attribute, the router method
and its parameters, the dial cache), before any user's request does.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import trio
from gpunexus.node.net import libp2p_compat
from gpunexus.node.net.p2p import P2PConfig, open_p2p
from gpunexus.node.net.wire import FramedStream
from gpunexus.protocol.messages import Withdraw
from gpunexus.protocol.signing import Signer
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.yamux import yamux

PROTOCOL = "/gpunexus/compat-test/1"
NODE = Path(__file__).resolve().parent.parent / "node"


def _report(problems: list[str]) -> str:
    return "py-libp2p changed under node/net/libp2p_compat.py:\n  " + "\n  ".join(problems)


def test_the_installed_py_libp2p_is_the_one_it_was_written_for():
    assert libp2p_compat.check_version() is None, libp2p_compat.check_version()


def test_modules_and_classes_still_have_what_it_relies_on():
    problems = libp2p_compat.contract_problems()
    assert not problems, _report(problems)


def test_the_yamux_tweaks_are_installed_once_node_wire_loads():
    marker = libp2p_compat._PATCHED
    assert getattr(yamux.Yamux, marker, False) and getattr(TrioTCPStream, marker, False)
    libp2p_compat.install_yamux_tweaks()  # a second call changes nothing
    assert yamux.Yamux._write_frame is yamux.Yamux._write_frame


async def test_live_objects_still_have_what_it_relies_on():
    """Two real peers (Noise, yamux, our gossipsub): a stream's, a connection's and the router's state."""
    received = trio.Event()

    async def handler(stream) -> None:
        framed = FramedStream(stream)
        assert isinstance(await framed.receive(), Withdraw)
        received.set()
        await framed.close()

    with trio.fail_after(30):
        async with open_p2p(Signer.generate(), P2PConfig()) as server, open_p2p(Signer.generate(), P2PConfig()) as client:
            server.host.set_stream_handler(PROTOCOL, handler)
            await client.connect(server.listen_addrs()[0])
            stream = await client.host.new_stream(server.host.get_id(), [PROTOCOL])
            problems = libp2p_compat.contract_problems(
                stream=stream, network=client.host.get_network(), pubsub=client.pubsub
            )
            assert not problems, _report(problems)
            framed = FramedStream(stream)
            assert framed._yamux is not None  # the fast paths apply to a real yamux stream
            signer = client.signer
            await framed.send(Withdraw(peer_id=signer.peer_id, seq=1, issued_at=1.0).signed(signer))
            await received.wait()
            await framed.close()


def test_a_change_is_reported_by_name():
    """What an upgrade that dropped yamux's state would print."""
    stream = SimpleNamespace(muxed_stream=SimpleNamespace(), muxed_conn=None)
    problems = libp2p_compat.contract_problems(stream=stream, network=SimpleNamespace())
    text = "\n".join(problems)
    assert "NetStream has no attribute '_state'" in text
    assert "not a YamuxStream" in text
    assert "_negative_peer_cache" in text


def test_no_other_node_module_reaches_into_libp2p_privates():
    """Outside the adapter, node/ imports no private libp2p name and touches no private attribute of one.

    Attribute access on ``self`` and on our own objects is ours; the names
    checked are those the adapter keeps for itself.
    """
    private_names = {"_state", "_write_frame", "_negative_peer_cache", "_writer_lock", "_write_lock",
                     "_auto_tune_and_send_window_update", "_pending_recv_release", "_manager",
                     "_get_peers_to_send", "_emit_control_msgs", "_do_px", "stream_buffers", "stream_events"}
    offenders = []
    for path in sorted(NODE.rglob("*.py")):
        if path.name == "libp2p_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libp2p"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_")]
            on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            if isinstance(node, ast.Attribute) and node.attr in private_names and not on_self:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in private_names:
                offenders.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not offenders, "use node/net/libp2p_compat.py instead:\n  " + "\n  ".join(offenders)


def test_an_upgrade_that_drops_a_router_method_or_changes_a_signature_is_named(monkeypatch):
    from libp2p.pubsub.gossipsub import GossipSub

    monkeypatch.delattr(GossipSub, "_do_px")
    monkeypatch.setattr(GossipSub, "_check_back_off", lambda self, peer, topic, now: False)
    text = "\n".join(libp2p_compat.contract_problems())
    assert "GossipSub._do_px is gone" in text
    assert "GossipSub._check_back_off takes ('self', 'peer', 'topic', 'now')" in text
