"""Which offer topics a peer is in: the hub's directory, shard topics, catch-up on joining.

Offers travel on one topic per model and shard (:mod:`gpunexus.protocol.discovery`).
A :class:`Directory` holds each model's plan (shard count, heartbeat) as the
hub's ``GET /v1/directory`` last said; :class:`OfferTopics` keeps a peer in
the right shard topic of each model it follows and feeds their offers and
withdrawals into one :class:`~.offers.OfferBook`:

* a host follows the models it serves, in its own shard (it relays the
  topic and sees its competitors there);
* a gateway follows, in its shard, the models it is asked for, those it is
  told to use, and, while the market is small, every model it knows of
  (the directory's and those its neighbours' subscriptions name), so a
  small network behaves as one topic did;
* on joining a topic a peer with a hub fetches that shard's live offers
  from the hub (``GET /v1/offers``) instead of waiting one heartbeat, which
  is 120 s on a big model;
* and it dials a few of the shard's members it is not connected to (from
  those offers, and from offers of that shard already in its book): on the
  one flat topic any connection led to every peer, but a shard's members
  are a few among thousands, and gossip only flows between connected
  members of the same topic;
* when the directory changes a model's shard count, the peer moves to its
  new shard and catches up again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

from gpunexus.protocol.codec import decode
from gpunexus.protocol.discovery import SMALL, DiscoveryPlan, offer_topic, parse_offer_topic, shard_of
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import Offer, Withdraw

from ..hub_client import HubRefused, HubUnavailable, fetch_directory, fetch_shard_offers
from .offers import OfferBook
from .p2p import P2PNode

log = logging.getLogger(__name__)

DIRECTORY_POLL_S = 60.0
DIRECTORY_RETRY_S = 5.0
"""Shortest time between two directory fetches asked for by unknown models."""
CATCH_UP_TIMEOUT_S = 5.0
FOLLOW_ALL_HOSTS = 256
"""Largest market (hosts in the directory) in which a gateway follows every model it knows of."""
NEIGHBOUR_SCAN_S = 1.0
MEET_PEERS = 4
"""Shard members a peer dials on joining a topic when it is connected to fewer: a light gateway's D_high."""

CatchUp = Callable[[str, int, int], Awaitable[list[Offer]]]
"""``(model, shard, shards)`` -> that shard's live offers (unverified: the book verifies)."""


class Directory:
    """Every model's discovery plan; :data:`SMALL` for a model the hub has not counted."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, DiscoveryPlan]] = {}
        self.changed = trio.Event()
        self._http: httpx.AsyncClient | None = None
        self._last_fetch = float("-inf")

    def plan(self, model: str) -> DiscoveryPlan:
        entry = self._entries.get(model)
        return entry[1] if entry is not None else SMALL

    def models(self) -> list[str]:
        return sorted(self._entries)

    def hosts(self, model: str) -> int:
        """Live hosts of ``model`` the hub counted (0 for a model it does not list)."""
        entry = self._entries.get(model)
        return entry[0] if entry is not None else 0

    @property
    def total_hosts(self) -> int:
        return sum(hosts for hosts, _ in self._entries.values())

    def update(self, entries: dict[str, tuple[int, DiscoveryPlan]]) -> bool:
        """Take a fresh directory; True (and ``changed`` set) when a model's plan or presence changed."""
        before = {m: p for m, (_, p) in self._entries.items()}
        self._entries = dict(entries)
        moved = before != {m: p for m, (_, p) in self._entries.items()}
        if moved:
            self.changed.set()
            self.changed = trio.Event()
        return moved

    async def refresh(self) -> bool:
        """Fetch the directory now (a gateway asked for a model it does not know); False without a hub or when too soon."""
        if self._http is None or trio.current_time() - self._last_fetch < DIRECTORY_RETRY_S:
            return False
        return await self._fetch()

    async def _fetch(self) -> bool:
        assert self._http is not None
        self._last_fetch = trio.current_time()
        try:
            self.update(await fetch_directory(self._http))
        except (HubUnavailable, HubRefused) as exc:
            log.info("no directory from the hub this time: %s", exc)
            return False
        return True

    async def follow_hub(self, hub_url: str, *, interval: float = DIRECTORY_POLL_S,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Poll the hub's directory; the first answer (or failure) comes before ``started``."""
        async with httpx.AsyncClient(base_url=hub_url.rstrip("/")) as http:
            self._http = http
            try:
                await self._fetch()
                task_status.started()
                while True:
                    await trio.sleep(interval)
                    await self._fetch()
            finally:
                self._http = None

    async def catch_up(self, model: str, shard: int, shards: int) -> list[Offer]:
        """The hub's live offers of one shard; [] without a hub or when it does not answer."""
        if self._http is None:
            return []
        try:
            return await fetch_shard_offers(self._http, model, shard, shards, timeout_s=CATCH_UP_TIMEOUT_S)
        except (HubUnavailable, HubRefused) as exc:
            log.info("no catch-up for %s from the hub: %s", model, exc)
            return []


class OfferTopics:
    """Keeps this peer in one shard topic per followed model (or every shard), feeding ``book``.

    ``follow_known``: follow every model the directory or a neighbour names
    (True), only those asked for (False), or every known one while the
    directory lists at most :data:`FOLLOW_ALL_HOSTS` hosts (None: a
    gateway's default). ``all_shards``: be in every shard of each model
    followed, not only this peer's (a challenger, which must see every host).
    """

    def __init__(self, node: P2PNode, book: OfferBook, directory: Directory, *,
                 follow_known: bool | None = False, all_shards: bool = False) -> None:
        self._node = node
        self._pubsub = node.pubsub
        self.book = book
        self._peer_id = node.peer_id
        self.directory = directory
        self._follow_known = follow_known
        self._all_shards = all_shards
        self._wanted: set[str] = set()
        self._topics: dict[str, dict[str, trio.CancelScope]] = {}
        """model -> {topic joined: the scope of its reader}."""
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    @property
    def following(self) -> set[str]:
        return set(self._topics)

    def topics_of(self, model: str) -> set[str]:
        """The topics this peer belongs in for ``model`` under the current plan."""
        shards = self.directory.plan(model).shards
        if self._all_shards:
            return {offer_topic(model, shard) for shard in range(shards)}
        return {offer_topic(model, shard_of(self._peer_id, shards))}

    def known_models(self) -> set[str]:
        """Models the directory lists or a connected peer follows a topic of."""
        known = set(self.directory.models())
        for topic, peers in list(self._pubsub.peer_topics.items()):
            parsed = parse_offer_topic(topic)
            if parsed is not None and peers:
                known.add(parsed[0])
        return known

    def follows_everything(self) -> bool:
        if self._follow_known is None:
            return self.directory.total_hosts <= FOLLOW_ALL_HOSTS
        return self._follow_known

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._settle()
                task_status.started()
                while True:
                    with trio.move_on_after(NEIGHBOUR_SCAN_S):
                        await self.directory.changed.wait()
                    await self._settle()
            finally:
                self._nursery = None

    async def follow(self, model: str) -> bool:
        """Follow ``model`` from now on; True when this joined a topic of it (and caught up) now."""
        self._wanted.add(model)
        return await self._join(model)

    async def follow_if_known(self, model: str) -> bool:
        """Follow ``model`` if the network is known to have it (asking the hub once if need be).

        A gateway calls this for a model a client names and its book lacks:
        joining a topic for any name a client sends would let clients make the
        gateway subscribe to topics without end.
        """
        if model in self._topics:
            return False
        if model not in self.known_models() and not (await self.directory.refresh() and model in self.known_models()):
            return False
        return await self.follow(model)

    async def _settle(self) -> None:
        """Join what should be followed, in the shards the plan says; leave what should not."""
        wanted = set(self._wanted)
        if self.follows_everything():
            wanted |= self.known_models()
        for model in sorted(wanted):
            await self._join(model)
        for model in set(self._topics) - wanted:
            async with self._lock:
                await self._leave(model, set())

    async def _join(self, model: str) -> bool:
        if self._nursery is None:
            raise RuntimeError("OfferTopics.run is not running")
        async with self._lock:
            topics = self.topics_of(model)
            await self._leave(model, topics)
            joined = self._topics.setdefault(model, {})
            new = sorted(topics - set(joined))
            for topic in new:
                subscription = await self._pubsub.subscribe(topic)
                joined[topic] = trio.CancelScope()
                self._nursery.start_soon(self._read, topic, subscription, joined[topic])
                log.info("following %s", topic)
        for topic in new:
            await self._catch_up(model, topic)
        return bool(new)

    async def _leave(self, model: str, keep: set[str]) -> None:
        """Leave ``model``'s topics but ``keep`` (all of them, and the model, for an empty set)."""
        joined = self._topics.get(model, {})
        for topic in [t for t in joined if t not in keep]:
            joined.pop(topic).cancel()
            try:
                await self._pubsub.unsubscribe(topic)
            except Exception as exc:  # a peer going away mid-unsubscribe must not stop discovery
                log.debug("unsubscribing from %s: %s", topic, exc)
        if not keep:
            self._topics.pop(model, None)

    async def _catch_up(self, model: str, topic: str) -> None:
        parsed = parse_offer_topic(topic)
        assert parsed is not None
        shard, shards = parsed[1], self.directory.plan(model).shards
        caught = await self.directory.catch_up(model, shard, shards)
        for offer in caught:
            try:
                if offer.model == model and shard_of(offer.peer_id, shards) == shard:
                    self.book.apply(offer)
            except ProtocolError as exc:
                log.debug("dropped a caught-up offer: %s", exc)
        members = {o.peer_id: o for o in self.book.for_model(model) if shard_of(o.peer_id, shards) == shard}
        self._nursery.start_soon(self._meet, topic, [o for p, o in members.items() if p != self._peer_id])

    async def _meet(self, topic: str, members: list[Offer]) -> None:
        """Dial shard members until this peer is connected to :data:`MEET_PEERS` of the topic (or runs out)."""
        topic_peers = {str(p) for p in self._pubsub.peer_topics.get(topic, ())}
        for offer in members:
            if len(topic_peers) >= MEET_PEERS:
                return
            if offer.peer_id in topic_peers or self._node.is_connected(offer.peer_id):
                continue
            for addr in offer.addrs:
                try:
                    await self._node.connect(addr, timeout=CATCH_UP_TIMEOUT_S)
                except Exception as exc:  # an unreachable member is routine: try its next address, then the next one
                    log.debug("could not reach shard member %s at %s: %s", offer.peer_id, addr, exc)
                    continue
                topic_peers.add(offer.peer_id)
                break

    async def _read(self, topic: str, subscription, scope: trio.CancelScope) -> None:
        parsed = parse_offer_topic(topic)
        assert parsed is not None
        with scope:
            while True:
                envelope = await subscription.get()
                try:
                    msg = decode(envelope.data)
                    if not isinstance(msg, (Offer, Withdraw)):
                        raise ProtocolError(f"{msg.TYPE} does not belong on {topic}")
                    if isinstance(msg, Offer) and msg.model != parsed[0]:
                        raise ProtocolError(f"an offer for {msg.model} does not belong on {topic}")
                    self.book.apply(msg)
                except ProtocolError as exc:
                    log.debug("dropped an offer-topic message: %s", exc)
