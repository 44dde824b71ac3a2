"""Gossipsub router for the offer and price topics.

Hosts announce offers on ``gpunexus/offers/1`` and every gateway must see
every offer. py-libp2p 0.8.1's :class:`~libp2p.pubsub.gossipsub.GossipSub`
stops delivering once the network grows: in a 30-peer star (every peer dials
one bootstrap peer; loopback; degree 6/4/12; heartbeat 1 s) a leaf that the
bootstrap pruned reaches 0 of 29 peers. :class:`OfferGossipSub` corrects the
router the way go-libp2p-pubsub behaves, :func:`make_gossipsub` builds it
with the project's parameters and :func:`running_pubsub` starts it. Every
peer must run it: PX only helps if the peer that prunes sends it.

Root causes (real hosts on 127.0.0.1; tests/test_gossip.py, bench/gossip.py)
---------------------------------------------------------------------------
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

The issue's 6-peer case (degree 3/2/4)
--------------------------------------
Not the initial delay as such. With the stock ``heartbeat_interval=120``
the first heartbeat runs 0.1 s after start, before any peer connects, and
the next two minutes later; meanwhile the bootstrap's mesh holds all 5
leaves (over ``degree_high=4``, nothing prunes it) and every offer reaches
5/5. The heartbeat at about 120 s prunes it to 3 (cause 1): the two pruned
leaves then reach 0 of 5, the others 3 of 5 (the next gossip is 90 s away,
cause 5). With ``heartbeat_interval=1`` the same happens after one
second. The interval decides *when* the star breaks, not *whether*;
``degree_high=12`` "works" up to 13 peers only because nothing is pruned.

Use::

    router = make_gossipsub()            # degree 6/4/12, heartbeat 1 s, PX on
    pubsub = Pubsub(host, router)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        sub = await pubsub.subscribe(OFFERS_TOPIC)

or ``async with running_pubsub(host) as pubsub:``, which does exactly that.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.network.connection.swarm_connection import Direction
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub import floodsub
from libp2p.pubsub.gossipsub import (
    PROTOCOL_ID,
    PROTOCOL_ID_V11,
    PROTOCOL_ID_V12,
    GossipSub,
)
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

__all__ = ["GOSSIP_PROTOCOLS", "OfferGossipSub", "gossipsub_options", "make_gossipsub", "running_pubsub"]

GOSSIP_PROTOCOLS = [PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID]
"""Gossipsub v1.2 (IDONTWANT) first, v1.1 and v1.0 for older peers."""

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


def gossipsub_options(
    *,
    degree: int = 6,
    degree_low: int = 4,
    degree_high: int = 12,
    heartbeat_interval: float = 1.0,
    do_px: bool = True,
    px_peers_count: int = 16,
    prune_back_off: int = 60,
    direct_peers: Sequence[PeerInfo] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``GossipSub``/:class:`OfferGossipSub` with the project's parameters.

    go-libp2p's defaults: D=6, Dlo=4, Dhi=12, Dlazy=6 with gossip factor
    0.25, 1 s heartbeat, 60 s prune back-off, 16 PX peers, mcache window 3
    of 5. Peer exchange is on for every peer (a bootstrap peer is only a
    peer that others dial first). Adaptive gossip (rewrites the heartbeat to
    30-60 s) and IP-diversity eclipse protection (grafts through back-off)
    are off, and the spam limit is 100 messages/s per origin and topic (10
    drops a burst of price updates); see the module docstring. ``kwargs``
    override or extend the result.
    """
    options: dict[str, Any] = {
        "protocols": list(GOSSIP_PROTOCOLS),
        "degree": degree,
        "degree_low": degree_low,
        "degree_high": degree_high,
        "direct_peers": direct_peers,
        "time_to_live": 60,
        "gossip_window": 3,
        "gossip_history": 5,
        "heartbeat_initial_delay": 0.1,
        "heartbeat_interval": heartbeat_interval,
        "do_px": do_px,
        "px_peers_count": px_peers_count,
        "prune_back_off": prune_back_off,
        "unsubscribe_back_off": 10,
        "adaptive_gossip_enabled": False,
        "eclipse_protection_enabled": False,
        "spam_protection_enabled": True,
        "max_messages_per_topic_per_second": 100.0,
    }
    options.update(kwargs)
    return options


def make_gossipsub(**kwargs: Any) -> OfferGossipSub:
    """The router every gpunexus peer runs (host, gateway, hub): ``OfferGossipSub(**gossipsub_options(**kwargs))``."""
    return OfferGossipSub(**gossipsub_options(**kwargs))


@asynccontextmanager
async def running_pubsub(
    host: Any, router: GossipSub | None = None, *, close_host: bool = True, **pubsub_kwargs: Any
) -> AsyncIterator[Pubsub]:
    """Attach pubsub with our router to a running ``host`` and run both services.

    ``async with host.run(listen), running_pubsub(host) as pubsub:`` then
    ``await pubsub.subscribe(topic)`` / ``await pubsub.publish(topic, data)``.

    On exit the host's network is closed *before* the services stop
    (``close_host=False`` to skip): the host runs pubsub's stream readers,
    and a message arriving after pubsub stopped makes one spawn into the
    closed pubsub nursery, "Nursery is closed to new arrivals", which
    crashes the host's task group.
    """
    router = router if router is not None else make_gossipsub()
    pubsub = Pubsub(host, router, **pubsub_kwargs)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        try:
            yield pubsub
        finally:
            if close_host:
                with trio.CancelScope(shield=True):
                    await host.close()
