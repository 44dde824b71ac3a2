"""Offers on the wire: the host's announcer and the gateway's offer book.

A host re-announces each model on its discovery plan's heartbeat
(:mod:`gpunexus.protocol.discovery`: every 3 s on a small model, 120 s on a
big one) and at once when its terms change; each offer expires after the
plan's TTL, so a host that vanishes without a word drops out of every book
within one TTL; a host that leaves politely publishes a signed
:class:`Withdraw` and drops out at once. Sequence numbers are milliseconds of
wall time, so a restarted host's offers still supersede its old ones.
Which topics a peer reads is :mod:`.discovery`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from gpunexus.protocol.discovery import SMALL, DiscoveryPlan, offer_topic, shard_of
from gpunexus.protocol.messages import PLAIN_TEXT, Capabilities, Offer, Withdraw
from gpunexus.protocol.signing import Signer

log = logging.getLogger(__name__)

CLOCK_SKEW = 30.0


def next_seq() -> int:
    return time.time_ns() // 1_000_000


class OfferBook:
    """The live offers a gateway knows, keyed by (host peer id, model).

    Only verified, unexpired offers get in; a withdrawal removes the host's
    offers and blocks any older one that arrives late (gossip reorders). A
    host dropped for a dead connection is blocked the same way up to the
    newest offer it had: only an offer issued after that one (the host is
    alive and announcing) brings it back.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._offers: dict[tuple[str, str], Offer] = {}
        self._withdrawn: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self.changed = trio.Event()

    def apply(self, msg: Offer | Withdraw) -> bool:
        """Verify and apply one message; True when the book changed."""
        msg.verify()
        now = self._clock()
        if isinstance(msg, Withdraw):
            if msg.seq <= self._withdrawn.get(msg.peer_id, -1):
                return False
            self._withdrawn[msg.peer_id] = msg.seq
            gone = [k for k, o in self._offers.items() if k[0] == msg.peer_id and o.seq <= msg.seq]
            for key in gone:
                del self._offers[key]
            return self._touch(bool(gone))
        if msg.expires_at <= now or msg.issued_at > now + CLOCK_SKEW:
            return False
        if msg.seq <= max(self._withdrawn.get(msg.peer_id, -1), self._dropped.get(msg.peer_id, -1)):
            return False
        key = (msg.peer_id, msg.model)
        current = self._offers.get(key)
        if current is not None and current.seq >= msg.seq:
            return False
        self._offers[key] = msg
        return self._touch(True)

    def _touch(self, changed: bool) -> bool:
        if changed:
            self.changed.set()
            self.changed = trio.Event()
        return changed

    def live(self) -> list[Offer]:
        now = self._clock()
        expired = [k for k, o in self._offers.items() if o.expires_at <= now]
        for key in expired:
            del self._offers[key]
        return list(self._offers.values())

    def for_model(self, model: str) -> list[Offer]:
        return [o for o in self.live() if o.model == model]

    def get(self, peer_id: str, model: str) -> Offer | None:
        """This host's current offer for ``model``, if it is live."""
        offer = self._offers.get((peer_id, model))
        return offer if offer is not None and offer.expires_at > self._clock() else None

    def models(self) -> dict[str, list[Offer]]:
        out: dict[str, list[Offer]] = {}
        for offer in self.live():
            out.setdefault(offer.model, []).append(offer)
        return out

    def drop_host(self, peer_id: str) -> None:
        """Forget a host now (its connection died); its next offer brings it back.

        Copies of the offers dropped here may still be in flight on other
        gossip paths; they are refused, so a dead host's last word cannot put
        it back into the candidate set until its offers expire.
        """
        gone = [k for k in self._offers if k[0] == peer_id]
        if gone:
            self._dropped[peer_id] = max(self._dropped.get(peer_id, -1), *(self._offers[k].seq for k in gone))
        for key in gone:
            del self._offers[key]
        self._touch(bool(gone))


@dataclass
class OfferTerms:
    """What a host asks and can do; the announcer signs a fresh Offer from it."""

    model: str
    model_hash: str
    price_micro_per_mtok: int
    tokens_per_s: float
    max_slots: int
    max_context: int
    license: str
    region: str = ""
    follows_market: bool = False
    capabilities: Capabilities = PLAIN_TEXT


class Announcer:
    """Publishes a host's offers on each model's heartbeat, and its withdrawal on disable.

    ``free_slots`` answers per offer (a host of several models keeps slots per
    model). ``plan`` gives each model's discovery plan (its topic's shard
    count, heartbeat and offer lifetime). Sequence numbers only grow, even
    within one millisecond, so the offers announced right after a withdrawal
    supersede it (:meth:`reannounce`).
    """

    def __init__(self, pubsub, signer: Signer, addrs: Callable[[], list[str]], free_slots: Callable[[OfferTerms], int],
                 plan: Callable[[str], DiscoveryPlan] = lambda model: SMALL) -> None:
        self._pubsub = pubsub
        self._signer = signer
        self._addrs = addrs
        self._free_slots = free_slots
        self._plan = plan
        self.terms: list[OfferTerms] = []
        self.active = False
        self.on_announce: list[Callable[[Offer], Awaitable[None]]] = []
        """Also told of every offer announced (a host's hub: market supply and price checks)."""
        self.on_withdraw: list[Callable[[Withdraw], Awaitable[None]]] = []
        """Also told of every withdrawal (a host's hub: it stops listing the offers to gateways that catch up)."""
        self._wake = trio.Event()
        self._last_seq = 0
        self._announced: dict[str, float] = {}
        """Topic -> when an offer on it last expires: where a withdrawal must go."""
        self._due: dict[str, float] = {}
        """Model -> when (trio time) its next heartbeat is due."""

    def _next_seq(self) -> int:
        self._last_seq = max(next_seq(), self._last_seq + 1)
        return self._last_seq

    def topic(self, model: str) -> str:
        """Where this host announces ``model`` now: its shard of the model's topic."""
        return offer_topic(model, shard_of(self._signer.peer_id, self._plan(model).shards))

    def offer(self, terms: OfferTerms) -> Offer:
        now = time.time()
        return Offer(
            peer_id=self._signer.peer_id,
            model=terms.model,
            model_hash=terms.model_hash,
            price_micro_per_mtok=terms.price_micro_per_mtok,
            tokens_per_s=terms.tokens_per_s,
            free_slots=min(self._free_slots(terms), terms.max_slots),
            max_slots=terms.max_slots,
            max_context=terms.max_context,
            region=terms.region,
            license=terms.license,
            follows_market=terms.follows_market,
            addrs=tuple(self._addrs()),
            seq=self._next_seq(),
            issued_at=now,
            expires_at=now + self._plan(terms.model).ttl_s,
            capabilities=terms.capabilities,
        ).signed(self._signer)

    async def announce_now(self, models: set[str] | None = None) -> None:
        """Announce every model's offer now (or only ``models``'), each on its topic."""
        for terms in list(self.terms):
            if models is not None and terms.model not in models:
                continue
            offer = self.offer(terms)
            topic = self.topic(terms.model)
            self._announced[topic] = max(self._announced.get(topic, 0.0), offer.expires_at)
            self._due[terms.model] = trio.current_time() + self._plan(terms.model).refresh_s
            await self._pubsub.publish(topic, offer.encode())
            await self._tell(self.on_announce, offer)

    async def _tell(self, hooks: list[Callable], msg: Offer | Withdraw) -> None:
        for hook in hooks:
            try:
                await hook(msg)
            except Exception as exc:  # the hub being away must not silence the network
                log.warning("could not report the %s: %s", msg.TYPE, exc)

    async def withdraw(self) -> None:
        """Take back every offer: on each topic an offer of this host may still be live on."""
        self.active = False
        await self._send_withdrawal(self._withdrawal())

    def _withdrawal(self) -> Withdraw:
        return Withdraw(peer_id=self._signer.peer_id, seq=self._next_seq(), issued_at=time.time()).signed(self._signer)

    async def _send_withdrawal(self, msg: Withdraw) -> None:
        now = time.time()
        topics = {t for t, until in self._announced.items() if until > now} | {self.topic(t.model) for t in self.terms}
        self._announced = {t: until for t, until in self._announced.items() if until > now}
        for topic in sorted(topics):
            await self._pubsub.publish(topic, msg.encode())
        await self._tell(self.on_withdraw, msg)

    async def reannounce(self) -> None:
        """Take back the offers no longer in ``terms`` and keep the rest: one model of several.

        ``Withdraw`` names no model (it takes back all of a peer's offers), and
        changing that signed message would split the network between old and
        new peers. So the host signs a withdrawal, then offers for what it
        still serves with newer sequence numbers, and sends the offers
        *first*: a withdrawal only removes older offers, so every book drops
        the model taken back and keeps the others whatever order gossip
        delivers them in, and a book that gets them in order never passes
        through a moment with none of this host's offers (each model now has
        its own topic, so the two do not travel together).
        """
        withdrawal = self._withdrawal()
        self.active = True
        await self.announce_now()
        await self._send_withdrawal(withdrawal)

    def wake(self) -> None:
        """Re-announce at once (enabled again, price changed, moved to another shard)."""
        self._wake.set()

    async def run(self) -> None:
        """Announce each model when its heartbeat is due, and every model when woken."""
        woken = True
        while True:
            if self.active:
                now = trio.current_time()
                due = None if woken else {t.model for t in self.terms if self._due.get(t.model, now) <= now}
                try:
                    await self.announce_now(due)
                except Exception as exc:  # pubsub hiccups must not stop the heartbeat
                    log.warning("could not publish offer: %s", exc)
            wait = min((self._due.get(t.model, 0.0) for t in self.terms), default=float("inf")) - trio.current_time()
            woken = False
            with trio.move_on_after(max(0.05, min(wait, 3.0) if self.active else 3.0)):
                await self._wake.wait()
                woken = True
            self._wake = trio.Event()
