"""Gossipsub router for the offer and price topics.

Hosts announce offers on one topic per model and shard
(``gpunexus/offers/2/<model>/<shard>``, :mod:`gpunexus.protocol.discovery`)
and every gateway in a topic must see every offer on it. py-libp2p 0.8.1's :class:`~libp2p.pubsub.gossipsub.GossipSub`
stops delivering once the network grows: in a 30-peer star (every peer dials
one bootstrap peer; loopback; degree 6/4/12; heartbeat 1 s) a leaf that the
bootstrap pruned reaches 0 of 29 peers. :class:`OfferGossipSub` corrects the
router the way go-libp2p-pubsub behaves, :func:`make_gossipsub` builds it
with the project's parameters and :func:`running_pubsub` starts it. Every
peer must run it: PX only helps if the peer that prunes sends it.

Every root cause, and each override that corrects it, is in
:mod:`gpunexus.node.net.libp2p_compat` (items 1-8 of its notes), with the rest of
what reaches into py-libp2p's private parts; this module builds and starts
the router.

The issue's 6-peer case (degree 3/2/4)
--------------------------------------
Not the initial delay as such. With the stock ``heartbeat_interval=120``
the first heartbeat runs 0.1 s after start, before any peer connects, and
the next two minutes later; meanwhile the bootstrap's mesh holds all 5
leaves (over ``degree_high=4``, nothing prunes it) and every offer reaches
5/5. The heartbeat at about 120 s prunes it to 3 (cause 1 in the notes): the two pruned
leaves then reach 0 of 5, the others 3 of 5 (the next gossip is 90 s away,
cause 5). With ``heartbeat_interval=1`` the same happens after one
second. The interval decides *when* the star breaks, not *whether*;
``degree_high=12`` "works" up to 13 peers only because nothing is pruned.

Use::

    router = make_gossipsub()            # degree 6/4/12, heartbeat 1 s, PX on
    pubsub = Pubsub(host, router)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        sub = await pubsub.subscribe(offer_topic("tiny"))

or ``async with running_pubsub(host) as pubsub:``, which does exactly that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import (
    PROTOCOL_ID,
    PROTOCOL_ID_V11,
    PROTOCOL_ID_V12,
    GossipSub,
)
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from .libp2p_compat import OfferGossipSub

__all__ = ["GOSSIP_PROTOCOLS", "LIGHT_DEGREE", "OfferGossipSub", "gossipsub_options", "make_gossipsub", "running_pubsub"]

GOSSIP_PROTOCOLS = [PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID]
"""Gossipsub v1.2 (IDONTWANT) first, v1.1 and v1.0 for older peers."""

LIGHT_DEGREE = {"degree": 3, "degree_low": 2, "degree_high": 4}
"""A gateway's mesh: it receives each offer from about 3 mesh peers instead of 6 (bench/discovery.py, "built").
Degree 2 with D_low 1 was cheaper still, but in the simulation some gateways then formed mesh islands that no
offer reached; with D_low 2 none did in any seed tried."""


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
