"""Demand and supply estimates per model, one observation per epoch.

The controller acts on utilisation = demand / supply, so both estimates must
follow real changes within a few epochs yet ignore what is not a change: a
single epoch's burst of requests, or one host blinking on and off.

**Demand** (`DemandEstimator`) is fed the tokens *asked* in an epoch (served,
queued and refused alike: counting only settled tokens would cap demand at
supply, and utilisation could never say "more than we have"). Each epoch's
rate first goes through a running median of the last ``window`` rates
(default 3), then an EWMA with weight ``alpha`` (default 0.5). The median
throws away any burst or dip lasting fewer than half the window, whatever its
size, where clipping to k× the estimate would still let a burst push the price
one step; the cost is that a lasting change shows up one epoch late (window 3).
The EWMA then smooths Poisson noise. Before any observation the estimate is 0.

**Supply** (`SupplyEstimator`) is fed the hosts offering the model in an
epoch, each with its capacity (tokens/s per stream × slots: total capacity,
not free capacity, since free slots fall as demand rises and would count
demand twice). Each host carries an EWMA *presence* (1 in an epoch it was
seen, 0 otherwise, weight ``presence_alpha``, default 0.3) and an EWMA of its
capacity while present. Supply is the sum of presence × capacity. A host that
flaps on and off every epoch settles at a presence swinging between about
0.41 and 0.59, so it moves supply by ±9% of its capacity instead of ±50%.
A host absent ``forget_after`` epochs in a row (default 2) is gone: letting
it fade out over several epochs kept departed capacity in the estimate, and
in the step simulation the price then overshot after demand fell. A host
first seen starts at presence 1: it is offering now, and new capacity should
lower the price at once. Hosts not yet forgotten are *live*: they make the
host count and the floor (their cheapest ask).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DemandConfig:
    window: int = 3
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError("window must be a positive odd number (a median needs a middle)")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")


class DemandEstimator:
    """Tokens asked per second, median-prefiltered then exponentially weighted."""

    def __init__(self, config: DemandConfig = DemandConfig()) -> None:
        self._config = config
        self._recent: deque[float] = deque(maxlen=config.window)
        self._estimate: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self._estimate or 0.0

    def observe(self, tokens_asked: int, epoch_s: float) -> float:
        """Feed one epoch; returns the new estimate in tokens/s."""
        if tokens_asked < 0 or epoch_s <= 0:
            raise ValueError("need tokens_asked >= 0 and epoch_s > 0")
        self._recent.append(tokens_asked / epoch_s)
        filtered = statistics.median(self._recent)
        if self._estimate is None:
            self._estimate = filtered
        else:
            self._estimate += self._config.alpha * (filtered - self._estimate)
        return self._estimate


@dataclass(frozen=True)
class HostSupply:
    """One host's offer for one model in one epoch.

    ``ask_micro_per_mtok`` is the least the host will sell at; ``None`` means
    it follows the market price and so sets no floor.
    """

    peer_id: str
    tokens_per_s: float
    slots: int
    ask_micro_per_mtok: int | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_s < 0 or self.slots < 0:
            raise ValueError("tokens_per_s and slots must be >= 0")
        if self.ask_micro_per_mtok is not None and self.ask_micro_per_mtok < 0:
            raise ValueError("ask must be >= 0")

    @property
    def capacity_tps(self) -> float:
        return self.tokens_per_s * self.slots


@dataclass(frozen=True)
class SupplyConfig:
    presence_alpha: float = 0.3
    capacity_alpha: float = 0.5
    forget_after: int = 2

    def __post_init__(self) -> None:
        if not (0 < self.presence_alpha <= 1 and 0 < self.capacity_alpha <= 1):
            raise ValueError("alphas must be in (0, 1]")
        if self.forget_after < 1:
            raise ValueError("forget_after must be >= 1")


@dataclass
class _Host:
    presence: float
    capacity_tps: float
    ask_micro_per_mtok: int | None
    absent: int = 0


class SupplyEstimator:
    """Offered capacity in tokens/s, robust to hosts flapping on and off."""

    def __init__(self, config: SupplyConfig = SupplyConfig()) -> None:
        self._config = config
        self._hosts: dict[str, _Host] = {}

    def observe(self, offers: Iterable[HostSupply]) -> float:
        """Feed the hosts seen offering in one epoch; returns supply in tokens/s."""
        seen: dict[str, HostSupply] = {}
        for offer in offers:
            if offer.peer_id in seen:
                raise ValueError(f"host {offer.peer_id!r} appears twice in one epoch")
            seen[offer.peer_id] = offer
        a, c = self._config.presence_alpha, self._config.capacity_alpha
        for peer_id, host in list(self._hosts.items()):
            if peer_id not in seen:
                host.absent += 1
                host.presence *= 1 - a
                if host.absent >= self._config.forget_after:
                    del self._hosts[peer_id]
        for peer_id, offer in seen.items():
            host = self._hosts.get(peer_id)
            if host is None:
                self._hosts[peer_id] = _Host(1.0, offer.capacity_tps, offer.ask_micro_per_mtok)
            else:
                host.absent = 0
                host.presence += a * (1 - host.presence)
                host.capacity_tps += c * (offer.capacity_tps - host.capacity_tps)
                host.ask_micro_per_mtok = offer.ask_micro_per_mtok
        return self.tokens_per_s

    @property
    def tokens_per_s(self) -> float:
        return sum(h.presence * h.capacity_tps for h in self._hosts.values())

    def live_hosts(self) -> int:
        """Hosts seen within the last ``forget_after`` epochs."""
        return len(self._hosts)

    def cheapest_ask(self) -> int | None:
        """Lowest ask among live hosts; ``None`` when no live host sets a floor.

        A host following the market is willing at any price, so while one is
        live nothing lifts the floor above the controller's minimum price.
        """
        asks = [h.ask_micro_per_mtok for h in self._hosts.values()]
        if not asks or None in asks:
            return None
        return min(a for a in asks if a is not None)
