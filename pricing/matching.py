"""Host matching: which hosts a gateway tries for one request, in what order.

The gateway keeps an offer book; for every request it asks a `Matcher` to
rank the offers for the requested model. The order is the order of tries:
the gateway opens a stream to the first host and falls through the list on
failure, so the ranking decides both price and resilience.

Rules, in the order they apply:

1. **Hard filters.** Only offers for the requested model, priced at or under
   the client's ``max_price_micro_per_mtok``, at or over its
   ``min_tokens_per_s``, whose capabilities meet every need of the request
   (`capabilities.lacking`), and not excluded by reputation. Nothing filtered
   here is ever returned: a client's limits and a failed audit are promises,
   not preferences.
2. **Free, then full, then backed off.** Candidates are ranked in three
   tiers: healthy hosts with a free slot, healthy hosts whose last offer
   showed ``free_slots == 0``, then hosts in back-off (rule 3). A full host
   is never dropped: ``free_slots`` comes from a heartbeat a few seconds old,
   and a live host past its slots still queues an order (``--queue``), so a
   busy live host is the right next try once the free ones have failed. The
   free-slot count of a backed-off host does not lift it over a busy live
   one: a host that just failed, or whose connection died, advertises free
   slots from before its failure (a dead host's last offer says it is idle),
   and preferring that stale promise over a live queue is what turned
   failovers into 503s (issue 8).
3. **Back-off after failure.** `report_failure` puts a host into exponential
   back-off (``backoff_base_s`` doubling per consecutive failure up to
   ``backoff_max_s``; `report_success` resets it). Backed-off hosts go after
   every healthy candidate, free or full, instead of vanishing, so a request
   is not refused because every host hiccupped once; once its back-off has
   run out a host is healthy again, and one more failure doubles the next
   wait.
4. **Cheapest first, faster breaks ties.** Within a tier, by ascending price,
   then by descending throughput group.
5. **Round-robin among equals.** Offers with the same price and the same
   throughput group are equals. Throughput is grouped so measurement noise
   cannot break the tie: walking down the sorted tokens/s, an offer joins the
   current group when it is within ``tps_tolerance`` (default 5%) of the
   group's fastest offer, else it starts a new group. (Fixed buckets on a
   log scale would split 99.9 and 100.1 tokens/s at a bucket edge however
   wide the buckets; anchoring on the fastest member cannot.) Among equals
   the host placed first least recently goes first, and each `rank` call
   records the host it put first, so consecutive requests spread evenly.

`now` is always passed in (monotonic seconds), so the matcher does no I/O and
reads no clock: the same calls give the same answers, in tests and in the
gateway alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .capabilities import PLAIN, CapabilitiesLike, Needs, lacking


class OfferLike(Protocol):
    """What matching needs from an offer (``gpunexus.protocol``'s Offer fits)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def price_micro_per_mtok(self) -> int: ...

    @property
    def tokens_per_s(self) -> float: ...

    @property
    def free_slots(self) -> int: ...

    @property
    def capabilities(self) -> CapabilitiesLike: ...


O = TypeVar("O", bound=OfferLike)


@dataclass(frozen=True)
class MatchPolicy:
    """A client's limits for one request (``None`` means no limit) and what the request needs."""

    max_price_micro_per_mtok: int | None = None
    min_tokens_per_s: float | None = None
    needs: Needs = PLAIN

    def admits(self, offer: OfferLike) -> bool:
        if self.max_price_micro_per_mtok is not None and offer.price_micro_per_mtok > self.max_price_micro_per_mtok:
            return False
        if self.min_tokens_per_s is not None and offer.tokens_per_s < self.min_tokens_per_s:
            return False
        # Plain text needs nothing: every offer has it (and offers need not carry capabilities to be ranked).
        return self.needs.plain or not lacking(offer.capabilities, self.needs)


@dataclass(frozen=True)
class _Backoff:
    failures: int
    until: float


class Matcher:
    """Ranks offers for a request and remembers failures and rotation.

    One `Matcher` per gateway; it is not thread-safe and needs no lock under
    trio (no await inside any method).
    """

    def __init__(
        self,
        *,
        backoff_base_s: float = 2.0,
        backoff_max_s: float = 60.0,
        tps_tolerance: float = 0.05,
    ) -> None:
        if not 0 < backoff_base_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_max_s")
        if not 0 <= tps_tolerance < 1:
            raise ValueError("tps_tolerance must be in [0, 1)")
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._tolerance = tps_tolerance
        self._backoff: dict[str, _Backoff] = {}
        # (model, peer_id) -> sequence number of the last rank that put it first.
        self._last_first: dict[tuple[str, str], int] = {}
        self._sequence = 0

    # -- failures -----------------------------------------------------------

    def report_failure(self, peer_id: str, now: float) -> None:
        """Back a host off: base, 2×base, 4×base, ... capped at the maximum."""
        failures = self._backoff[peer_id].failures + 1 if peer_id in self._backoff else 1
        delay = min(self._base * 2 ** (failures - 1), self._max)
        self._backoff[peer_id] = _Backoff(failures, now + delay)

    def report_success(self, peer_id: str) -> None:
        """A host served a request: forget its failures."""
        self._backoff.pop(peer_id, None)

    def backed_off(self, peer_id: str, now: float) -> bool:
        state = self._backoff.get(peer_id)
        return state is not None and now < state.until

    def forget(self, peer_id: str) -> None:
        """Drop all state for a host that left the offer book (bounds memory)."""
        self._backoff.pop(peer_id, None)
        for key in [k for k in self._last_first if k[1] == peer_id]:
            del self._last_first[key]

    # -- ranking ------------------------------------------------------------

    def rank(
        self,
        offers: Iterable[O],
        model: str,
        policy: MatchPolicy,
        now: float,
        excluded: Callable[[str], bool] | None = None,
    ) -> list[O]:
        """Candidates for one request, in the order to try them.

        ``excluded`` is the reputation hook: a peer id for which it returns
        true is never returned (pass ``bad_peers.__contains__`` for a set).
        Calling `rank` counts as one request for round-robin.
        """
        candidates = [
            o
            for o in offers
            if o.model == model and policy.admits(o) and not (excluded is not None and excluded(o.peer_id))
        ]
        healthy = [o for o in candidates if not self.backed_off(o.peer_id, now)]
        free = [o for o in healthy if o.free_slots > 0]
        full = [o for o in healthy if o.free_slots <= 0]
        waiting = [o for o in candidates if self.backed_off(o.peer_id, now)]
        ranked = self._order(free, model) + self._order(full, model) + self._order(waiting, model)
        if ranked:
            self._sequence += 1
            self._last_first[(model, ranked[0].peer_id)] = self._sequence
        return ranked

    def _order(self, offers: list[O], model: str) -> list[O]:
        """Cheapest first, faster group first, least recently first among equals."""
        by_price: dict[int, list[O]] = {}
        for offer in offers:
            by_price.setdefault(offer.price_micro_per_mtok, []).append(offer)
        ordered: list[O] = []
        for price in sorted(by_price):
            for group in self._throughput_groups(by_price[price]):
                group.sort(key=lambda o: (self._last_first.get((model, o.peer_id), 0), o.peer_id))
                ordered.extend(group)
        return ordered

    def _throughput_groups(self, offers: list[O]) -> list[list[O]]:
        groups: list[list[O]] = []
        for offer in sorted(offers, key=lambda o: -o.tokens_per_s):
            if groups and offer.tokens_per_s >= groups[-1][0].tokens_per_s * (1 - self._tolerance):
                groups[-1].append(offer)
            else:
                groups.append([offer])
        return groups
