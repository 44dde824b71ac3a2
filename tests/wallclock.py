"""A wall clock the test moves by hand, for the availability schedule (node/host/schedule.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import trio


class FakeClock:
    """``now()`` is whatever the test last set; ``sleep_until`` returns once it has been set past the deadline."""

    def __init__(self, now: datetime) -> None:
        assert now.tzinfo is not None, "the schedule reads aware datetimes"
        self._now = now
        self._moved = trio.Event()
        self.sleepers = 0

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        self.sleepers += 1
        try:
            # As instants: Python compares two datetimes of one zone by wall clock, wrong across DST.
            while self._now.astimezone(timezone.utc) < when.astimezone(timezone.utc):
                await self._moved.wait()
        finally:
            self.sleepers -= 1

    def set(self, now: datetime) -> None:
        assert now.tzinfo is not None
        self._now = now
        self._moved.set()
        self._moved = trio.Event()
