"""When the host is available: ``node serve --available 18:00-08:00``.

A GPU owner lends the GPU at night and wants it back in the morning without
touching a terminal. Windows are wall-clock times in the host's own time
zone; one may wrap midnight (``22:00-06:00``), several are comma-separated
(``12:00-13:00,18:00-24:00``). Outside every window the host withdraws its
offer through the same path as ``node disable`` (no new orders, the ones in
flight finish, then a signed Withdraw); inside, it announces again.

The rule is two pure functions over aware datetimes, :func:`is_available`
and :func:`next_change`, so they are tested without waiting; the
:class:`ScheduleFollower` task only sleeps until the next change on an
injectable :class:`Clock`.

Daylight saving: availability depends on the wall clock, so it changes where
the wall clock crosses a window's edge. An edge in a spring-forward gap
(02:30 on the night clocks jump 02:00 -> 03:00) is crossed at the jump
itself, and an edge in a fall-back hour is crossed twice; :func:`next_change`
therefore considers both readings (``fold``) of every edge and every UTC
offset change of the zone, and keeps the first instant where the answer
really differs.

Manual ``node enable``/``disable`` act at once; the schedule acts again at
its next change, so a host disabled by hand inside a window stays off until
the next window opens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio

log = logging.getLogger(__name__)

DAY_MINUTES = 24 * 60
MAX_SLEEP_S = 60.0
"""The system clock's sleeps are cut into pieces this long: a wall clock that
jumps (NTP, a suspended laptop) is noticed within a minute."""


@dataclass(frozen=True, slots=True)
class Window:
    """``start`` to ``end`` in minutes after local midnight; ``end <= start`` wraps midnight."""

    start: int
    end: int

    def covers(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _parse_time(text: str) -> int:
    hours, colon, minutes = text.strip().partition(":")
    if not colon or not hours.isdigit() or len(minutes) != 2 or not minutes.isdigit():
        raise ValueError(f"{text.strip()!r} is not a time like 18:00")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) >= 60 or value > DAY_MINUTES:
        raise ValueError(f"{text.strip()!r} is not a time of day (00:00 to 24:00)")
    return value


def parse_windows(text: str) -> tuple[Window, ...]:
    """``"18:00-08:00,12:00-13:00"`` -> windows; ValueError saying what is wrong."""
    windows = []
    for part in text.split(","):
        start, dash, end = part.strip().partition("-")
        if not dash:
            raise ValueError(f"{part.strip()!r} is not a range like 18:00-08:00")
        window = Window(_parse_time(start), _parse_time(end))
        if window.start == window.end or (window.start == DAY_MINUTES):
            raise ValueError(f"{part.strip()!r} is empty or ambiguous (all day is 00:00-24:00)")
        windows.append(window)
    if not windows:
        raise ValueError("no time window given")
    return tuple(windows)


def format_windows(windows: Sequence[Window]) -> str:
    return ",".join(str(w) for w in windows)


def _wall_minute(moment: datetime) -> float:
    return moment.hour * 60 + moment.minute + moment.second / 60 + moment.microsecond / 60e6


def is_available(now: datetime, windows: Sequence[Window]) -> bool:
    """Whether ``now`` (aware; its own zone is the host's) falls in a window."""
    if now.tzinfo is None:
        raise ValueError("is_available needs an aware datetime (the host's time zone)")
    minute = _wall_minute(now)
    return any(w.covers(minute) for w in windows)


def next_change(now: datetime, windows: Sequence[Window]) -> datetime | None:
    """The first instant after ``now`` where :func:`is_available` changes; None if it never does.

    Windows repeat daily, so the answer, if any, lies within two days (a
    little more across an offset change); candidates are every window edge on
    the days around ``now``, read with both folds, and the zone's offset
    changes in that span. The returned datetime is in ``now``'s zone.
    """
    zone = now.tzinfo
    if zone is None:
        raise ValueError("next_change needs an aware datetime (the host's time zone)")
    current = is_available(now, windows)
    utc_now = now.astimezone(timezone.utc)
    candidates: set[datetime] = set()
    for offset in range(-1, 3):
        day = now.date() + timedelta(days=offset)
        for window in windows:
            for edge in (window.start, window.end):
                candidates.update(_instants(day, edge, zone))
    candidates.update(_offset_changes(utc_now - timedelta(days=1), utc_now + timedelta(days=3), zone))
    for moment in sorted(c for c in candidates if c > utc_now):
        local = moment.astimezone(zone)
        if is_available(local, windows) != current:
            return local
    return None


def _instants(day: date, minute: int, zone: tzinfo) -> list[datetime]:
    """The UTC instants at which wall time reads ``minute`` on ``day`` (one, two, or none exact)."""
    if minute == DAY_MINUTES:
        day, minute = day + timedelta(days=1), 0
    wall = datetime.combine(day, time(minute // 60, minute % 60))
    return [wall.replace(tzinfo=zone, fold=fold).astimezone(timezone.utc) for fold in (0, 1)]


def _offset_changes(start: datetime, end: datetime, zone: tzinfo) -> list[datetime]:
    """UTC instants in [start, end) where ``zone``'s UTC offset changes (DST).

    zoneinfo keeps its transitions private, so they are found by stepping an
    hour at a time and bisecting each step where the offset differs, down to
    the second (zone transitions fall on whole seconds).
    """
    def offset(ts: int) -> timedelta | None:
        return datetime.fromtimestamp(ts, timezone.utc).astimezone(zone).utcoffset()

    found = []
    ts, stop = int(start.timestamp()), int(end.timestamp())
    while ts < stop:
        after = ts + 3600
        if offset(ts) != offset(after):
            low, high = ts, after
            while high - low > 1:
                mid = (low + high) // 2
                if offset(mid) == offset(low):
                    low = mid
                else:
                    high = mid
            found.append(datetime.fromtimestamp(high, timezone.utc))
        ts = after
    return found


def local_zone() -> tzinfo:
    """The host's time zone, as a rule set (so DST changes are known ahead), not a fixed offset.

    ``$TZ`` first (what systemd and docker set), then ``/etc/localtime``, then
    the offset Python sees now (no DST knowledge: the best left).
    """
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("TZ=%s is not a known time zone; using the system's", name)
    localtime = Path("/etc/localtime")
    try:
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key=_zone_key(localtime))
    except (OSError, ValueError):
        pass
    return datetime.now().astimezone().tzinfo or timezone.utc


def _zone_key(link: Path) -> str:
    """``Europe/Berlin`` from ``/etc/localtime -> /usr/share/zoneinfo/Europe/Berlin``, else ``localtime``."""
    try:
        target = str(link.resolve())
    except OSError:
        return "localtime"
    _, marker, key = target.partition("zoneinfo/")
    return key if marker and key else "localtime"


def zone_name(zone: tzinfo | None) -> str:
    key = getattr(zone, "key", None)
    return key or (zone.tzname(None) if zone is not None else None) or str(zone)


class Clock(Protocol):
    """Wall-clock time for the schedule; tests inject one they move by hand."""

    def now(self) -> datetime:
        """An aware datetime in the host's zone."""

    async def sleep_until(self, when: datetime) -> None:
        """Return once ``now() >= when``."""


class SystemClock:
    def __init__(self, zone: tzinfo | None = None) -> None:
        self.zone = zone or local_zone()

    def now(self) -> datetime:
        return datetime.now(self.zone)

    async def sleep_until(self, when: datetime) -> None:
        # In UTC: Python subtracts two datetimes of the same zone by wall clock, an hour off across DST.
        target = when.astimezone(timezone.utc)
        while (remaining := (target - datetime.now(timezone.utc)).total_seconds()) > 0:
            await trio.sleep(min(remaining, MAX_SLEEP_S))


class Switch(Protocol):
    """What the schedule steers: the host service's enable/disable path."""

    enabled: bool

    async def enable(self) -> None: ...

    async def disable(self) -> None: ...


class ScheduleFollower:
    """Enables and disables a host at its windows' edges, by itself."""

    def __init__(self, switch: Switch, windows: Sequence[Window], clock: Clock | None = None) -> None:
        self.switch = switch
        self.windows = tuple(windows)
        self.clock = clock or SystemClock()
        self._scope = trio.CancelScope()

    def available_now(self) -> bool:
        return is_available(self.clock.now(), self.windows)

    def status(self) -> dict:
        now = self.clock.now()
        change = next_change(now, self.windows)
        return {
            "windows": format_windows(self.windows),
            "zone": zone_name(now.tzinfo),
            "available": is_available(now, self.windows),
            "next_change": change.isoformat() if change else None,
            "next_state": None if change is None else ("enabled" if is_available(change, self.windows) else "withdrawn"),
        }

    def stop(self) -> None:
        """Stop steering (the host is leaving: a window opening must not re-enable a drain)."""
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            while True:
                await self._apply()
                change = next_change(self.clock.now(), self.windows)
                if change is None:
                    log.info("schedule %s never changes: nothing more to do", format_windows(self.windows))
                    await trio.sleep_forever()
                log.info("schedule: next change at %s", change.isoformat(timespec="minutes"))
                await self.clock.sleep_until(change)

    async def _apply(self) -> None:
        want = self.available_now()
        if want and not self.switch.enabled:
            log.info("schedule %s: inside a window, announcing again", format_windows(self.windows))
            await self.switch.enable()
        elif not want and self.switch.enabled:
            log.info("schedule %s: outside every window, draining, then withdrawing", format_windows(self.windows))
            await self.switch.disable()
