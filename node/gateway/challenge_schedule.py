"""When the challenger challenges whom: one timetable entry per host, with jitter.

The goal is that every host meets a challenge ``per_period`` times per
period on average, and that no host can guess when. The schedule is by host,
not by request, so a swarm that grows gets more challenges, and a host
without traffic is challenged as often as a busy one.

* A host first seen is challenged at a uniformly random moment within one
  mean gap (``period_s / per_period``): every host of a swarm is reached
  within that gap of joining, wherever in the period it joined.
* After each challenge the next is drawn uniformly from 0.5 to 1.5 mean gaps
  later: the mean rate is exact, and no host goes more than 1.5 gaps
  unchallenged. We chose this over exponential (Poisson) gaps, which are
  memoryless but unbounded: one host in twenty would wait three gaps.
  Either way a host sees the challenger's orders mixed into ordinary
  traffic, from a gateway identity like any other, so the gaps are not
  something it can measure.
* A host that leaves the offer book leaves the timetable; when it comes back
  it is a first sighting again (a quick challenge: a host that just
  restarted, perhaps with other weights, is worth checking).

:class:`ChallengeSchedule` is pure (times are plain floats from a
:class:`Clock`, draws come from a seeded ``random.Random``), so it is tested
by stepping a clock by hand, never by waiting.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Protocol

import trio


class Clock(Protocol):
    """Seconds on some monotonic scale; tests inject one they move by hand."""

    def now(self) -> float: ...

    async def sleep_until(self, when: float) -> None:
        """Return once ``now() >= when``."""


class TrioClock:
    """trio's own clock (monotonic; a wall clock that jumps changes nothing)."""

    def now(self) -> float:
        return trio.current_time()

    async def sleep_until(self, when: float) -> None:
        await trio.sleep_until(when)


class ChallengeSchedule:
    """Each tracked host's next challenge time."""

    def __init__(self, period_s: float, per_period: float, rng: random.Random) -> None:
        if period_s <= 0 or per_period <= 0:
            raise ValueError("the period and the challenges per host per period must be > 0")
        self.mean_gap_s = period_s / per_period
        self.rng = rng
        self._next: dict[str, float] = {}

    def track(self, hosts: Iterable[str], now: float) -> None:
        """Make the timetable hold exactly ``hosts``: new ones get a first time, gone ones are dropped."""
        present = set(hosts)
        for host in list(self._next):
            if host not in present:
                del self._next[host]
        for host in sorted(present - self._next.keys()):  # sorted: a seed gives the same timetable
            self._next[host] = now + self.rng.uniform(0.0, self.mean_gap_s)

    def due(self, now: float) -> list[str]:
        """The hosts whose time has come, earliest first; each gets its next time drawn."""
        ready = sorted((when, host) for host, when in self._next.items() if when <= now)
        for _, host in ready:
            self._next[host] = now + self.rng.uniform(0.5, 1.5) * self.mean_gap_s
        return [host for _, host in ready]

    def next_due(self) -> float | None:
        """The earliest next challenge time, None with no host tracked."""
        return min(self._next.values(), default=None)

    def hosts(self) -> list[str]:
        return sorted(self._next)
