"""Every reach into py-libp2p's private parts, in one room.

Written for **py-libp2p >= 0.8.1, < 0.9** (the range the project pins). The rest
of node/ uses only this module and py-libp2p's public API (sessions, for one,
need only ``new_stream`` with two protocol ids and ``get_protocol``). What is in here
leans on names py-libp2p does not promise to keep: an upgrade that removes
or changes one of them must fail a test, not a user's request, so
:func:`contract_problems` lists every such name with what it is expected to
be and ``tests/test_libp2p_compat.py`` runs it against a real connection
(it names what changed). :func:`check_version` says when the installed
py-libp2p is outside the range.

What it relies on
-----------------
* **yamux internals** (``libp2p.stream_muxer.yamux.yamux``): the frame
  header layout (``YAMUX_HEADER_FORMAT``, ``HEADER_SIZE``, ``TYPE_DATA``,
  ``MAX_MESSAGE_SIZE``); ``Yamux._write_frame``, ``_write_lock``,
  ``secured_conn``, ``streams``, ``stream_buffers``, ``stream_events``,
  ``event_shutting_down``; ``YamuxStream.send_window``, ``recv_window``,
  ``target_recv_window``, ``_pending_recv_release``, ``_grow_threshold``,
  ``_auto_tune_and_send_window_update``, ``rw_lock._writer_lock``, the
  ``send_closed``/``recv_closed``/``closed``/``reset_received`` flags; the
  module's ``PY_YAMUX_*`` getter functions and ``RawConnError``.
* **NetStream's state**: ``NetStream._state`` and ``StreamState``
  (``OPEN``, ``CLOSE_WRITE``, ``ERROR``), read by the fast paths and set to
  ``ERROR`` when a direct write breaks the connection.
* **TrioTCPStream.read** (replaced by a read-ahead version).
* **Swarm._negative_peer_cache** (``evict``), to let an explicit dial through.
* **GossipSub's private methods**, overridden or called by
  :class:`OfferGossipSub`: ``_get_peers_to_send``, ``_check_spam_protection``,
  ``_emit_idontwant_for_message``, ``_emit_control_msgs``,
  ``_perform_opportunistic_grafting``, ``_do_px``, ``_is_gossipsub_peer``,
  ``_get_in_topic_gossipsub_peers_from_minus``, ``_check_back_off``,
  ``_add_back_off``, ``_manager``, and its public-but-undocumented state
  (``mesh``, ``peer_protocol``, ``mcache``, ``scorer``, ...).

Upstream bugs worked around (each worth reporting upstream)
-----------------------------------------------------------
Gossipsub (measured on real hosts on 127.0.0.1; tests/test_gossip.py,
bench/gossip.py). In a 30-peer star upstream ``GossipSub`` delivers a
pruned leaf's offers to 0 of 29 peers; with these fixes, to all 29.

1. **No flood publish.** Upstream sends a peer's *own* message only to its
   mesh. Every leaf grafts the bootstrap, whose mesh then holds all N-1
   leaves; its first heartbeat with more than ``degree_high`` of them prunes
   it to ``degree``. A pruned leaf backs off the bootstrap for
   ``prune_back_off`` (60 s) and knows no other peer, so its mesh is empty
   and its offers go nowhere, not even to its only neighbour. go-libp2p
   sends its own messages to every topic peer (``floodPublish``, default).
2. **Heartbeat PRUNEs carry neither back-off nor peer exchange.**
   ``GossipSub._emit_control_msgs`` builds ``ControlPrune(topicID=...)`` and
   nothing else even with ``do_px=True`` (only ``emit_prune`` adds PX), and
   the pruner records no back-off. Pruned leaves never learn another peer,
   the star never becomes a mesh, and the bootstrap forwards to its
   ``degree`` mesh peers only; the rest depend on IHAVE to a random few per
   heartbeat. Flood publish alone: 21, 16, 10, 7 of 29 for four pruned
   leaves. Flood publish plus PX on heartbeat PRUNEs: 29 of 29 each.
3. **The same function mixes up peers.** Its GRAFT, PRUNE and IHAVE lists
   are created once, outside the per-peer loop, so each grafted peer also
   gets the control messages meant for the peers before it. With two topics
   a peer grafted on ``offers`` receives, in the same RPC, a ``PRUNE(offers)``
   meant for another peer: it drops us and backs off 60 s while we keep it.
4. **Opportunistic grafting every heartbeat, equal scores included.** With
   ``/meshsub/1.1.0`` or later and no score weights all scores are 0, the
   upstream threshold ``max(median * 0.5, min * 1.1, gossip_threshold)`` is
   0, so 2 more peers are grafted every heartbeat, the mesh overflows, is
   pruned, and the just-pruned peers answer the next GRAFT with PRUNE ("GRAFT
   flood detected"): the bootstrap of a 30-peer star ends up backing off 23
   of its 29 peers. go does it every 60 heartbeats, only when the median mesh
   score is under a threshold, with peers scoring above the median.
5. **Adaptive gossip rewrites the heartbeat.** ``_adapt_heartbeat_parameters``
   sets it to ``max(30, ...)`` or ``max(60, ...)`` s whenever its health
   score is under 0.7, and that score cannot exceed 0.75 without score
   weights (its score term is then always 0). Measured: a 4-peer star with a
   1 s heartbeat runs a 30 s heartbeat after 36 s; the stock 120 s became 90.
   Turned off (``adaptive_gossip_enabled=False``); gossip then goes to go's
   ``max(Dlazy=6, 0.25 * non-mesh peers)``.
6. **Pubsub loses connected peers.** ``Pubsub._handle_new_peer_with_retry``
   retries only ``SwarmException``/``StreamClosed``; any other failure to
   open the pubsub stream (a protocol negotiation timing out on a busy host)
   leaves the peer connected but unknown to pubsub and the router for good.
   Under load it left a 30-peer network without a mesh after 60 s.
7. **Blocking PX dials.** ``_do_px`` dials the exchanged peers one by one
   inside ``handle_prune``, i.e. inside the read loop of the stream of the
   peer that pruned us; go hands them to a pool of 8 dialers.
8. **IDONTWANT for every message.** Upstream sends IDONTWANT to every mesh
   peer for every message; go only above 1 KiB. For a 300-byte offer it
   doubles the RPCs (each with a signed peer record the receiver verifies):
   median propagation to 29 peers 0.55 s with the threshold, 0.95 s without.

Also checked: *eclipse protection* is inert on loopback (all peers share
127.0.0.1: ``_improve_mesh_diversity`` finds no candidate with a new IP,
``_prune_for_ip_diversity`` only chooses which peers to prune, not how many)
but elsewhere grafts up to 2 peers per heartbeat without checking back-off,
to be pruned again every heartbeat; go relies on the IP-colocation score
instead, so it is off. *Spam protection* counts messages per *forwarder* (10
per second and topic by default) and runs before forwarding, own messages
included: a burst of 15 own messages sends 10 (measured), and a relay that
is a leaf's only neighbour is throttled for the whole topic. We count per
origin, never our own, at 100/s. Score gates are open (thresholds -inf), so
scoring drops nothing. The subscription queue holds 32 messages; a reader
that falls behind loses messages (logged "fail to deliver message").

yamux, Noise and TCP (measured with bench/relay.py; they keep yamux's
behaviour on the wire and its locking, and only drop work paid on every frame):

9. **No window update per read.** py-libp2p's ``_auto_tune_and_send_window_update``
   sends a WINDOW_UPDATE frame back on every read that leaves any credit
   owed (its "partial slack" branch, and ``PY_YAMUX_RELEASE_ON_READ``, on by
   default), so each token frame the gateway reads cost a second frame
   (encrypt, a socket send, a wakeup of the host and a parse there). Here the
   update is deferred until the credit owed reaches the hysteresis threshold
   (half the target window: 128 KiB of the 256 KiB default), which is what
   go-yamux does; then the upstream method runs unchanged and returns all of
   it at once. A sender is never starved: the update goes out long before its
   window is empty. ``PY_YAMUX_RELEASE_ON_READ`` is defaulted to off to match
   (an operator who sets it keeps their value).
10. **A lean, write-combining ``Yamux._write_frame``.** The upstream version
   decodes every outgoing header and formats a debug f-string (evaluated even
   with debug logging off), then writes the frame: one Noise message, one
   socket send, one wakeup of the peer per frame. This version (used when
   debug logging is off) lets the frames that are ready in the same scheduler
   pass (token chunks of several streams on one connection, a chunk and its
   receipt) join the first one and go out as one Noise message and one send:
   the first writer yields once without cancellation (upstream yielded once
   after the write instead), the frames that joined meanwhile ride along, and
   their writers return when it is written (or raise what the write raised).
   Frames keep their order; the connection's write lock is taken without a
   scheduler round trip when nobody holds it (a trio lock hands itself to a
   waiter on release, so an unlocked lock has none). Upstream candidates:
   guard the header decode with ``logger.isEnabledFor(logging.DEBUG)``, and
   coalesce frames per connection as go-yamux's send loop does.
11. **Read-ahead on the TCP connection.** Noise reads a 2-byte length, then
   the message, each through ``TrioTCPStream.read`` (a lock, a ``recv``
   syscall, a scheduler pass), and the next length read usually finds the
   socket empty (one more ``recv``, an epoll registration). Reading up to
   64 KiB at once and serving the exact-size reads from that buffer makes it
   one ``recv`` per wakeup. Bytes come out in the same order; a read never
   returns more than was asked for.
12. **Tuning knobs read once.** py-libp2p reads its ``PY_YAMUX_*`` environment
   variables on every frame (``os.getenv`` in the receive loop and in every
   window check: 2-3 % of the gateway's CPU at 32 streams). They are read once
   here, when this module loads; set them before starting the node.
13. **Three to five trio locks per stream read or write.** py-libp2p's
   ``NetStream``/``YamuxStream`` layers take them even uncontended, each a
   scheduler round trip: a large share of the relay's CPU per token. The
   fast paths (:func:`direct_data_frame`, :func:`read_buffered`) skip them
   in the common state (open, window available, nobody else holding the
   locks) and leave every other case to upstream. They need no locks: trio
   runs one task at a time, the fast paths do not await between checking
   and updating yamux's state, and every upstream update of that state is
   itself made without an await in the middle.
14. **A failed dial blocks the peer for 60 s.** ``Swarm._negative_peer_cache``
   refuses every dial to a peer for a minute after one failed, so a host
   restarted seconds after a crash stayed out of reach although its address
   answered again. Our own dials are paced (redial interval, the matcher's
   back-off), so an explicit dial clears the entry first
   (:func:`allow_redial`).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import struct
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio
from libp2p.network.connection.swarm_connection import Direction
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.peer.id import ID
from libp2p.pubsub import floodsub
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    YamuxStream,
)

try:
    from libp2p.io.trio import TrioTCPStream as _TrioTCPStream
    from libp2p.stream_muxer.yamux import yamux as _yamux
except ImportError:  # pragma: no cover - libp2p is a hard dependency
    _yamux = _TrioTCPStream = None

__all__ = [
    "SUPPORTED_VERSIONS",
    "OfferGossipSub",
    "allow_redial",
    "check_version",
    "connection_shutting_down",
    "contract_problems",
    "direct_data_frame",
    "fast_yamux",
    "install_yamux_tweaks",
    "mark_broken",
    "read_buffered",
    "write_direct",
]

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ((0, 8, 1), (0, 9, 0))
"""py-libp2p versions this module was written for: at least the first, below the second."""


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def check_version() -> str | None:
    """None when the installed py-libp2p is in :data:`SUPPORTED_VERSIONS`, else what is wrong."""
    try:
        installed = version("libp2p")
    except PackageNotFoundError:
        return "py-libp2p is not installed as a distribution"
    low, high = SUPPORTED_VERSIONS
    if not low <= _parse_version(installed) < high:
        return (f"py-libp2p {installed} is outside the range node/net/libp2p_compat.py was written for "
                f"(>= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}): run tests/test_libp2p_compat.py")
    return None


# -- yamux, Noise and TCP (items 9-12) -------------------------------------

READ_AHEAD = 65536

_PATCHED = "_gpunexus_lean_write_frame"
_UPSTREAM: dict[tuple[Any, str], Any] = {}
"""(class, name) -> py-libp2p's own function, for what :func:`install_yamux_tweaks` replaced."""


class _Batch:
    __slots__ = ("done", "error", "frames")

    def __init__(self, first: bytes) -> None:
        self.frames = [first]
        self.done = trio.Event()
        self.error: BaseException | None = None


def install_yamux_tweaks() -> None:
    """Apply the yamux and TCP tweaks (items 9-12 above) once; ``node.wire`` calls it when it loads."""
    if _yamux is None or getattr(_yamux.Yamux, _PATCHED, False):
        return
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")  # item 9 (an operator's own value is kept)
    original = _yamux.Yamux._write_frame
    _UPSTREAM[(_yamux.Yamux, "_write_frame")] = original
    logger = _yamux.logger

    async def _write_frame(self, data: bytes) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            await original(self, data)
            return
        batch = self.__dict__.get("_gx_batch")
        if batch is not None:
            batch.frames.append(data)
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return
        batch = self._gx_batch = _Batch(data)
        try:
            # Let the writers that are ready in this scheduler pass join (not a cancellation point:
            # frames that joined must go out whatever happens to this task).
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._gx_batch = None
            frames = batch.frames
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            lock = self._write_lock
            if lock.locked():
                async with lock:
                    await self.secured_conn.write(payload)
            else:
                lock.acquire_nowait()
                try:
                    await self.secured_conn.write(payload)
                finally:
                    lock.release()
        except BaseException as exc:
            batch.error = exc if isinstance(exc, Exception) else _yamux.RawConnError(f"write abandoned: {type(exc).__name__}")
            raise
        finally:
            if self.__dict__.get("_gx_batch") is batch:
                self._gx_batch = None
            batch.done.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    for name in ("_perf_yamux_debug_enabled", "_yamux_disable_hysteresis", "_yamux_release_on_read",
                 "_yamux_batch_threshold_divisor", "_yamux_data_read_timeout"):
        getter = getattr(_yamux, name, None)
        if getter is not None:
            value = getter()
            setattr(_yamux, name, lambda value=value: value)

    if _TrioTCPStream is not None and not getattr(_TrioTCPStream, _PATCHED, False):
        original_read = _TrioTCPStream.read
        _UPSTREAM[(_TrioTCPStream, "read")] = original_read

        async def read(self, n: int | None = None) -> bytes:
            ahead = self.__dict__.get("_gx_ahead")
            if ahead:
                if n is None or n >= len(ahead):
                    data = bytes(ahead)
                    ahead.clear()
                else:
                    data = bytes(ahead[:n])
                    del ahead[:n]
                return data
            if not n:
                return await original_read(self, n)
            data = await original_read(self, max(n, READ_AHEAD))
            if len(data) > n:
                if ahead is None:
                    ahead = self._gx_ahead = bytearray()
                ahead += memoryview(data)[n:]
                return data[:n]
            return data

        read.__doc__ = original_read.__doc__
        _TrioTCPStream.read = read
        setattr(_TrioTCPStream, _PATCHED, True)

    _write_frame.__doc__ = original.__doc__
    _yamux.Yamux._write_frame = _write_frame

    original_tune = _yamux.YamuxStream._auto_tune_and_send_window_update
    _UPSTREAM[(_yamux.YamuxStream, "_auto_tune_and_send_window_update")] = original_tune

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        buffered = self.conn.stream_buffers.get(self.stream_id)
        owed = self.target_recv_window - (self.recv_window + (len(buffered) if buffered else 0))
        if owed < self._grow_threshold():
            # Not worth a frame yet: remember the release, as upstream's batching does.
            self._pending_recv_release += bytes_read
            return
        await original_tune(self, bytes_read=bytes_read)

    _auto_tune_and_send_window_update.__doc__ = original_tune.__doc__
    _yamux.YamuxStream._auto_tune_and_send_window_update = _auto_tune_and_send_window_update
    setattr(_yamux.Yamux, _PATCHED, True)


# -- stream fast paths (item 13) --------------------------------------------

_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
_MAX_DATA = MAX_MESSAGE_SIZE - HEADER_SIZE
_READABLE = (StreamState.OPEN, StreamState.CLOSE_WRITE)


def fast_yamux(stream: Any) -> YamuxStream | None:
    """The yamux stream under ``stream`` when the fast paths know its layers exactly, else None."""
    muxed = getattr(stream, "muxed_stream", None)
    return muxed if type(stream) is NetStream and type(muxed) is YamuxStream else None


def direct_data_frame(stream: Any, y: YamuxStream | None, data: bytes) -> bytes | None:
    """The yamux DATA frame for ``data`` with its window taken, if the fast path applies."""
    n = len(data)
    if (
        y is None
        or stream._state is not StreamState.OPEN
        or y.send_closed
        or y.closed
        or not 0 < n <= _MAX_DATA
        or n > y.send_window
        or y.rw_lock._writer_lock.value == 0
    ):
        return None
    y.send_window -= n
    return _HEADER.pack(0, TYPE_DATA, 0, y.stream_id, n) + data


async def write_direct(y: YamuxStream, frame: bytes) -> None:
    """Write a frame made by :func:`direct_data_frame` straight to the connection."""
    await y.conn._write_frame(frame)


def mark_broken(stream: Any) -> None:
    """A direct write broke the connection: the stream is in error, as upstream's own write would leave it."""
    stream._state = StreamState.ERROR


async def read_buffered(stream: Any, y: YamuxStream | None) -> bytes | None:
    """Bytes from yamux's buffer for this stream (waiting for them if need be), or None for the full path."""
    if y is None:
        return None
    conn = y.conn
    sid = y.stream_id
    waited = False
    while True:
        if (
            stream._state not in _READABLE
            or conn.event_shutting_down.is_set()
            or y.reset_received
            or y.closed
            or sid not in conn.streams
        ):
            return None
        buffer = conn.stream_buffers.get(sid)
        if buffer is None:
            return None
        if buffer:
            data = bytes(buffer)
            buffer.clear()
            await y._auto_tune_and_send_window_update(bytes_read=len(data))
            if not waited:
                await trio.lowlevel.checkpoint()
            return data
        if y.recv_closed:
            return None
        event = conn.stream_events.get(sid)
        if event is None:
            return None
        if event.is_set():
            # A wake-up for bytes already taken (or for state checked above): arm a fresh one.
            event = conn.stream_events[sid] = trio.Event()
        await event.wait()
        waited = True


def connection_shutting_down(stream: Any) -> bool:
    """Whether the muxed connection under ``stream`` is being torn down (yamux sets this before resetting streams)."""
    shutting = getattr(getattr(stream, "muxed_conn", None), "event_shutting_down", None)
    return shutting is not None and shutting.is_set()


# -- dialling (item 14) -----------------------------------------------------


def allow_redial(network: Any, peer_id: str) -> None:
    """Let the next dial to ``peer_id`` through py-libp2p's negative dial cache (absent: nothing to do)."""
    cache = getattr(network, "_negative_peer_cache", None)
    if cache is not None:
        cache.evict(peer_id)


# -- gossipsub (items 1-8) --------------------------------------------------

PX_DIALERS = 8
"""Concurrent peer-exchange dials (go-libp2p: ``Connectors = 8``)."""
PX_DIAL_TIMEOUT = 10.0
STRAY_GRACE = 3.0
"""Seconds a connected peer may stay unknown to pubsub before we register it ourselves."""
IDONTWANT_MIN_BYTES = 1024
"""go-libp2p ``IDontWantMessageThreshold``: no IDONTWANT for smaller messages."""
OPPORTUNISTIC_GRAFT_TICKS = 60
"""go-libp2p ``OpportunisticGraftTicks``: heartbeats between opportunistic grafts."""




class OfferGossipSub(GossipSub):
    """py-libp2p 0.8.1 GossipSub with go-libp2p's publish, prune and PX behaviour.

    ``opportunistic_graft_threshold_score`` is go's
    ``OpportunisticGraftThreshold``: opportunistic grafting only happens when
    the median score of the mesh is below it (never, with the default 0 and
    no score weights).
    """

    def __init__(self, *args: Any, opportunistic_graft_threshold_score: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opportunistic_graft_threshold_score = opportunistic_graft_threshold_score
        self._opportunistic_ticks: dict[str, int] = {}
        self._px_limiter = trio.CapacityLimiter(PX_DIALERS)
        self._px_dialing: set[ID] = set()
        self._registering: set[ID] = set()
        self._register_after: dict[ID, tuple[float, float]] = {}  # peer -> (next try, back-off)

    async def run(self) -> None:
        self.manager.run_daemon_task(self._register_stray_peers)
        await super().run()

    # -- peers pubsub lost track of ---------------------------------------

    async def _register_stray_peers(self) -> None:
        """Give connected peers that pubsub never registered another chance.

        Upstream ``Pubsub._handle_new_peer_with_retry`` retries opening the
        pubsub stream only on ``SwarmException``/``StreamClosed``; any other
        failure (typically the multistream negotiation timing out on a busy
        host) ends it, and the peer stays connected but unknown to pubsub and
        to this router for good: no subscriptions, no mesh, no messages. In 30
        hosts on one loaded process that left some runs without a mesh after
        60 s. Every heartbeat, peers connected but missing from
        ``pubsub.peers`` go through the public ``Pubsub.ensure_peer_stream``
        again, first after ``STRAY_GRACE`` seconds (upstream may still be at
        it), then with a back-off doubling to 5 min so a peer that does not
        speak gossipsub is not retried forever.
        """
        while True:
            await trio.sleep(max(self.heartbeat_interval, 1.0))
            pubsub = self.pubsub
            if pubsub is None:
                continue
            now = trio.current_time()
            connected = set(pubsub.host.get_network().connections)
            for peer_id in list(self._register_after):
                if peer_id not in connected or peer_id in pubsub.peers:
                    del self._register_after[peer_id]
            for peer_id in connected:
                if peer_id in pubsub.peers or peer_id in self._registering or pubsub.is_peer_blacklisted(peer_id):
                    continue
                # first sighting: leave upstream's own registration STRAY_GRACE seconds
                next_try, back_off = self._register_after.setdefault(peer_id, (now + STRAY_GRACE, STRAY_GRACE))
                if now < next_try:
                    continue
                back_off = min(back_off * 2, 300.0)
                self._register_after[peer_id] = (now + back_off, back_off)
                self._registering.add(peer_id)
                self.manager.run_task(self._register_stray_peer, peer_id)

    async def _register_stray_peer(self, peer_id: ID) -> None:
        try:  # ensure_peer_stream catches and logs its own failures; the next round retries
            if self.pubsub is not None:
                await self.pubsub.ensure_peer_stream(peer_id, timeout=PX_DIAL_TIMEOUT)
        finally:
            self._registering.discard(peer_id)

    # -- publishing -------------------------------------------------------

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        """Flood-publish our own messages to every peer in the topic.

        Upstream sends an own message to the mesh (or fanout) only, so a peer
        whose mesh was pruned away publishes to nobody. go-libp2p's default
        ``floodPublish`` sends it to every known topic peer (the score gate in
        ``publish`` still applies); forwarded messages keep the mesh rules.
        """
        topic_ids = list(topic_ids)
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id:
            for topic in topic_ids:
                peers.update(
                    p for p in self.pubsub.peer_topics.get(topic, ()) if self._is_router_peer(p)
                )
            peers.difference_update((msg_forwarder, origin))
        return peers

    def _is_router_peer(self, peer_id: ID) -> bool:
        return self._is_gossipsub_peer(peer_id) or self.peer_protocol.get(peer_id) == floodsub.PROTOCOL_ID

    def _check_spam_protection(self, peer_id: ID, msg: rpc_pb2.Message) -> bool:
        """Rate-limit per message origin, never our own messages.

        Upstream counts messages per *forwarder* and drops (and penalises) the
        excess before forwarding. The forwarder of a leaf's every message is
        its relay, so a relay carrying more than ``max_messages_per_topic_per_second``
        messages of the whole topic gets throttled as a spammer, and a node
        publishing a burst of 15 own messages sends only the first 10.
        """
        origin = ID(msg.from_id)
        if self.pubsub is not None and origin == self.pubsub.my_id:
            return True
        return super()._check_spam_protection(origin, msg)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        """Send IDONTWANT only for messages of at least 1 KiB, as go-libp2p does.

        Upstream sends an IDONTWANT RPC to every mesh peer for every message
        it publishes or forwards. For a 300-byte offer that RPC (which also
        carries our signed peer record, verified by the receiver) costs more
        than the duplicate it saves, and it doubles the RPCs per message.
        """
        msg = self.mcache.get(msg_id)
        if msg is not None and msg.ByteSize() < IDONTWANT_MIN_BYTES:
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)

    # -- heartbeat --------------------------------------------------------

    async def _emit_control_msgs(
        self,
        peers_to_graft: dict[ID, list[str]],
        peers_to_prune: dict[ID, list[str]],
        peers_to_gossip: dict[ID, dict[str, list[bytes]]],
    ) -> None:
        """Send each peer its own GRAFT/PRUNE/IHAVE; PRUNEs carry back-off and PX.

        Upstream reuses one GRAFT, PRUNE and IHAVE list across the peers it
        grafts, so later peers receive the control messages meant for earlier
        ones (a peer can get ``PRUNE`` for the very topic we just grafted it
        on), and it builds heartbeat PRUNEs without back-off or peer exchange
        and records no back-off for the pruned peer. go-libp2p's heartbeat
        ``prunePeer`` adds the back-off and ``makePrune`` attaches both.
        """
        for peer in list(dict.fromkeys([*peers_to_graft, *peers_to_prune, *peers_to_gossip])):
            grafts = [rpc_pb2.ControlGraft(topicID=t) for t in peers_to_graft.get(peer, ())]
            prunes = []
            for topic in peers_to_prune.get(peer, ()):
                self._add_back_off(peer, topic, False)
                prunes.append(self._make_prune(topic, peer, self.do_px, False))
            ihaves = [
                rpc_pb2.ControlIHave(topicID=t, messageIDs=ids)
                for t, ids in peers_to_gossip.get(peer, {}).items()
            ]
            await self.emit_control_message(self.pack_control_msgs(ihaves, grafts, prunes), peer)

    def _make_prune(self, topic: str, to_peer: ID, do_px: bool, is_unsubscribe: bool) -> rpc_pb2.ControlPrune:
        """go-libp2p ``makePrune``: back-off, and PX peers with their signed peer records."""
        prune = rpc_pb2.ControlPrune(
            topicID=topic,
            backoff=self.unsubscribe_back_off if is_unsubscribe else self.prune_back_off,
        )
        if do_px and self.pubsub is not None:
            peerstore = self.pubsub.host.get_peerstore()
            for peer in self._get_in_topic_gossipsub_peers_from_minus(topic, self.px_peers_count, [to_peer]):
                info = rpc_pb2.PeerInfo(peerID=peer.to_bytes())
                envelope = peerstore.get_peer_record(peer)
                if envelope is not None:
                    info.signedPeerRecord = envelope.marshal_envelope()
                prune.peers.append(info)
        return prune

    def _perform_opportunistic_grafting(self, topic: str, peers_to_graft: Any) -> int:
        """Graft opportunistically only as go-libp2p does.

        Upstream runs it on every heartbeat and its threshold admits peers
        whose score merely equals the mesh median, so with score weights at 0
        it grafts 2 more peers every heartbeat, overfills the mesh, prunes it,
        and the just-pruned peers answer the next GRAFT with PRUNE. go runs
        it every ``OpportunisticGraftTicks`` (60) heartbeats and only when the
        median mesh score is below ``OpportunisticGraftThreshold``.
        """
        ticks = self._opportunistic_ticks.get(topic, 0) + 1
        self._opportunistic_ticks[topic] = ticks
        if ticks % OPPORTUNISTIC_GRAFT_TICKS or self.scorer is None:
            return 0
        scores = sorted(self.scorer.score(p, [topic]) for p in self.mesh.get(topic, ()))
        if len(scores) < 2 or scores[len(scores) // 2] >= self.opportunistic_graft_threshold_score:
            return 0
        return super()._perform_opportunistic_grafting(topic, peers_to_graft)

    # -- GRAFT / PRUNE handling ------------------------------------------

    async def handle_graft(self, graft_msg: rpc_pb2.ControlGraft, sender_peer_id: ID) -> None:
        """Refuse inbound GRAFTs into a full mesh with PRUNE + PX.

        Upstream accepts every GRAFT, so a bootstrap peer's mesh swells to
        all its peers until the next heartbeat prunes it. go-libp2p, once the
        mesh has ``Dhi`` peers, only accepts GRAFTs from peers we dialled
        (mesh take-over defence) and answers the others with PRUNE, back-off
        and PX at once, so a joining leaf learns other peers straight away
        instead of one heartbeat later.
        """
        topic = graft_msg.topicID
        mesh = self.mesh.get(topic)
        if (
            mesh is not None
            and sender_peer_id not in mesh
            and len(mesh) >= self.degree_high
            and sender_peer_id not in self.direct_peers
            and not self._check_back_off(sender_peer_id, topic)
            and not self._is_outbound(sender_peer_id)
        ):
            self._add_back_off(sender_peer_id, topic, False)
            await self.emit_control_message(
                self.pack_control_msgs(None, None, [self._make_prune(topic, sender_peer_id, self.do_px, False)]),
                sender_peer_id,
            )
            return
        await super().handle_graft(graft_msg, sender_peer_id)

    def _is_outbound(self, peer_id: ID) -> bool:
        if self.pubsub is None:
            return False
        conns = self.pubsub.host.get_network().get_connections(peer_id)
        return any(getattr(c, "direction", None) == Direction.OUTBOUND for c in conns)

    async def _do_px(self, px_peers: list[rpc_pb2.PeerInfo]) -> None:
        """Dial exchanged peers in the background, at most ``PX_DIALERS`` at a time.

        Upstream dials them one by one inside ``handle_prune``, which blocks
        the read loop of the pruning peer's stream for the whole series of
        dials. go-libp2p's ``pxConnect`` shuffles, caps the list at
        ``PrunePeers`` and queues the dials to a pool of connectors.
        """
        manager = getattr(self, "_manager", None)
        if self.pubsub is None or manager is None or not manager.is_running:
            return  # not started, or shutting down: dialling now would only race the teardown
        px_peers = list(px_peers)
        random.shuffle(px_peers)
        for info in px_peers[: self.px_peers_count]:
            peer_id = ID(info.peerID)
            if peer_id == self.pubsub.my_id or peer_id in self.pubsub.peers or peer_id in self._px_dialing:
                continue
            self._px_dialing.add(peer_id)
            manager.run_task(self._px_dial, info, peer_id)

    async def _px_dial(self, info: rpc_pb2.PeerInfo, peer_id: ID) -> None:
        try:
            async with self._px_limiter:
                if self.pubsub is not None and peer_id not in self.pubsub.peers:
                    with trio.move_on_after(PX_DIAL_TIMEOUT):
                        # upstream validates the signed record and dials
                        await GossipSub._do_px(self, [info])
        finally:
            self._px_dialing.discard(peer_id)


# -- the contract: what an upgrade must keep ---------------------------------

_METHODS: tuple[tuple[Any, str, tuple[str, ...], bool], ...] = (
    # (owner, name, parameter names, coroutine function) as py-libp2p 0.8.1 has them
    (GossipSub, "run", ("self",), True),
    (GossipSub, "_get_peers_to_send", ("self", "topic_ids", "msg_forwarder", "origin", "msg_id"), False),
    (GossipSub, "_check_spam_protection", ("self", "peer_id", "msg"), False),
    (GossipSub, "_emit_idontwant_for_message", ("self", "msg_id", "topic_ids"), True),
    (GossipSub, "_emit_control_msgs", ("self", "peers_to_graft", "peers_to_prune", "peers_to_gossip"), True),
    (GossipSub, "_perform_opportunistic_grafting", ("self", "topic", "peers_to_graft"), False),
    (GossipSub, "handle_graft", ("self", "graft_msg", "sender_peer_id"), True),
    (GossipSub, "_do_px", ("self", "px_peers"), True),
    (GossipSub, "_is_gossipsub_peer", ("self", "peer_id"), False),
    (GossipSub, "_get_in_topic_gossipsub_peers_from_minus", ("self", "topic", "num_to_select", "minus", "backoff_check"),
     False),
    (GossipSub, "_check_back_off", ("self", "peer", "topic"), False),
    (GossipSub, "_add_back_off", ("self", "peer", "topic", "is_unsubscribe", "backoff_duration"), False),
    (GossipSub, "pack_control_msgs", ("self", "ihave_msgs", "graft_msgs", "prune_msgs", "idontwant_msgs"), False),
    (GossipSub, "emit_control_message", ("self", "control_msg", "to_peer"), True),
)
_YAMUX_CONSTANTS = {"YAMUX_HEADER_FORMAT": "!BBHII", "HEADER_SIZE": 12, "TYPE_DATA": 0}
_YAMUX_GETTERS = ("_perf_yamux_debug_enabled", "_yamux_disable_hysteresis", "_yamux_release_on_read",
                  "_yamux_batch_threshold_divisor", "_yamux_data_read_timeout")
_STREAM_STATES = ("OPEN", "CLOSE_WRITE", "ERROR")
_NET_STREAM_ATTRS = ("_state", "muxed_stream", "muxed_conn")
_YAMUX_STREAM_ATTRS = ("stream_id", "conn", "send_window", "recv_window", "target_recv_window", "_pending_recv_release",
                       "send_closed", "recv_closed", "closed", "reset_received", "rw_lock")
_YAMUX_CONN_ATTRS = ("streams", "stream_buffers", "stream_events", "event_shutting_down", "_write_lock", "secured_conn")
_ROUTER_ATTRS = ("pubsub", "mesh", "peer_protocol", "mcache", "scorer", "direct_peers", "degree_high", "do_px",
                 "px_peers_count", "prune_back_off", "unsubscribe_back_off", "heartbeat_interval", "_manager")
_PUBSUB_ATTRS = ("host", "my_id", "peers", "peer_topics")


def _upstream(owner: Any, name: str) -> Any:
    """The attribute as py-libp2p defines it, before :func:`install_yamux_tweaks` replaced it."""
    value = inspect.getattr_static(owner, name, None)
    return getattr(value, "__wrapped__", value)


def _missing(obj: Any, names: Iterable[str], what: str) -> list[str]:
    return [f"{what} has no attribute {name!r}" for name in names if not hasattr(obj, name)]


def contract_problems(*, stream: Any = None, network: Any = None, pubsub: Any = None) -> list[str]:
    """Every way the installed py-libp2p differs from what this module relies on; empty when none.

    Without arguments it checks modules and classes; given a live
    ``NetStream`` over yamux, a running host's ``network`` and a running
    ``pubsub`` with our router it checks their instance state too (names
    that only exist on live objects). Each entry names the library part
    that changed.
    """
    problems: list[str] = []
    wrong = check_version()
    if wrong:
        problems.append(wrong)
    for owner, name, params, is_coroutine in _METHODS:
        func = _upstream(owner, name)
        where = f"{owner.__module__}.{owner.__qualname__}.{name}"
        if func is None:
            problems.append(f"{where} is gone")
            continue
        found = tuple(inspect.signature(func).parameters)
        if found != params:
            problems.append(f"{where} takes {found}, expected {params}")
        if inspect.iscoroutinefunction(func) != is_coroutine:
            problems.append(f"{where} is {'now' if not is_coroutine else 'no longer'} a coroutine function")
    if not isinstance(inspect.getattr_static(GossipSub, "manager", None), property):
        problems.append("libp2p.pubsub.gossipsub.GossipSub.manager is no longer a property")
    for name in ("ensure_peer_stream", "is_peer_blacklisted"):
        if not hasattr(Pubsub, name):
            problems.append(f"libp2p.pubsub.pubsub.Pubsub.{name} is gone")
    if _yamux is None or _TrioTCPStream is None:
        problems.append("libp2p.stream_muxer.yamux.yamux or libp2p.io.trio.TrioTCPStream cannot be imported")
        return problems
    for name, expected in _YAMUX_CONSTANTS.items():
        if getattr(_yamux, name, None) != expected:
            problems.append(f"yamux.{name} is {getattr(_yamux, name, None)!r}, expected {expected!r}")
    problems += _missing(_yamux, (*_YAMUX_GETTERS, "logger", "RawConnError"), "libp2p.stream_muxer.yamux.yamux")
    for owner, name, params in (
        (_yamux.Yamux, "_write_frame", ("self", "data")),
        (_yamux.YamuxStream, "_auto_tune_and_send_window_update", ("self", "bytes_read")),
        (_yamux.YamuxStream, "_grow_threshold", ("self",)),
        (_TrioTCPStream, "read", ("self", "n")),
    ):
        func = _UPSTREAM.get((owner, name)) or _upstream(owner, name)
        if func is None:
            problems.append(f"{owner.__qualname__}.{name} is gone")
        elif tuple(inspect.signature(func).parameters) != params:
            problems.append(f"{owner.__qualname__}.{name} takes {tuple(inspect.signature(func).parameters)}, "
                            f"expected {params}")
    problems += [f"StreamState has no member {m}" for m in _STREAM_STATES if not hasattr(StreamState, m)]
    if stream is not None:
        problems += _live_stream_problems(stream)
    if network is not None:
        cache = getattr(network, "_negative_peer_cache", None)
        if cache is None or not callable(getattr(cache, "evict", None)):
            problems.append("Swarm._negative_peer_cache (with evict) is gone: allow_redial does nothing")
    if pubsub is not None:
        problems += _missing(pubsub, _PUBSUB_ATTRS, "Pubsub")
        problems += _missing(pubsub.router, _ROUTER_ATTRS, "GossipSub (running)")
    return problems


def _live_stream_problems(stream: Any) -> list[str]:
    problems = _missing(stream, _NET_STREAM_ATTRS, "NetStream")
    if type(stream) is not NetStream:
        problems.append(f"a stream is a {type(stream).__qualname__}, not a NetStream: the fast paths are off")
    y = getattr(stream, "muxed_stream", None)
    if type(y) is not YamuxStream:
        problems.append(f"a stream's muxed_stream is a {type(y).__qualname__}, not a YamuxStream: the fast paths are off")
        return problems
    problems += _missing(y, _YAMUX_STREAM_ATTRS, "YamuxStream")
    writer = getattr(getattr(y, "rw_lock", None), "_writer_lock", None)
    if not hasattr(writer, "value"):
        problems.append("YamuxStream.rw_lock._writer_lock.value is gone")
    problems += _missing(getattr(y, "conn", None), _YAMUX_CONN_ATTRS, "Yamux")
    if not isinstance(getattr(stream, "_state", None), StreamState):
        problems.append("NetStream._state is not a StreamState")
    return problems
