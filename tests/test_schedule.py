"""The availability schedule as pure functions, and its follower on a hand-moved clock (no real waiting)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gpunexus.node.host.schedule import ScheduleFollower, Window, format_windows, is_available, next_change, parse_windows
from wallclock import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC = timezone.utc


def at(zone, *fields) -> datetime:
    return datetime(*fields, tzinfo=zone)


def real(moment: datetime) -> datetime:
    """In UTC: Python compares and subtracts two datetimes of the same zone by their wall clocks, not as instants."""
    return moment.astimezone(UTC)


def test_parse_windows_reads_ranges_and_says_what_is_wrong():
    assert parse_windows("18:00-08:00") == (Window(18 * 60, 8 * 60),)
    assert parse_windows(" 12:00-13:30 , 18:00-24:00") == (Window(720, 810), Window(1080, 1440))
    assert format_windows(parse_windows("9:05-17:00,22:00-06:00")) == "09:05-17:00,22:00-06:00"
    for bad, words in [("18:00", "range"), ("8-9", "time like"), ("25:00-01:00", "time of day"), ("10:61-11:00", "time of day"),
                       ("10:00-10:00", "all day is 00:00-24:00"), ("24:00-08:00", "ambiguous"), ("", "range"), ("a:bc-d", "time like")]:
        with pytest.raises(ValueError, match=words):
            parse_windows(bad)


def test_a_window_wraps_midnight():
    night = parse_windows("18:00-08:00")
    assert is_available(at(UTC, 2024, 5, 1, 23, 0), night)
    assert is_available(at(UTC, 2024, 5, 1, 0, 0), night)
    assert is_available(at(UTC, 2024, 5, 1, 7, 59, 59), night)
    assert not is_available(at(UTC, 2024, 5, 1, 8, 0), night)  # the end is exclusive
    assert not is_available(at(UTC, 2024, 5, 1, 17, 59), night)
    assert is_available(at(UTC, 2024, 5, 1, 18, 0), night)  # the start is inclusive
    assert next_change(at(UTC, 2024, 5, 1, 12, 0), night) == at(UTC, 2024, 5, 1, 18, 0)
    assert next_change(at(UTC, 2024, 5, 1, 23, 0), night) == at(UTC, 2024, 5, 2, 8, 0)
    assert next_change(at(UTC, 2024, 5, 1, 18, 0), night) == at(UTC, 2024, 5, 2, 8, 0)  # strictly after now


def test_several_windows_and_edges_where_nothing_changes():
    windows = parse_windows("08:00-12:00,12:00-13:00,22:00-02:00")
    assert next_change(at(UTC, 2024, 5, 1, 9, 0), windows) == at(UTC, 2024, 5, 1, 13, 0)  # 12:00 joins two windows
    assert next_change(at(UTC, 2024, 5, 1, 13, 0), windows) == at(UTC, 2024, 5, 1, 22, 0)
    assert next_change(at(UTC, 2024, 5, 1, 23, 0), windows) == at(UTC, 2024, 5, 2, 2, 0)
    assert not is_available(at(UTC, 2024, 5, 1, 3, 0), windows) and is_available(at(UTC, 2024, 5, 1, 1, 0), windows)
    overlapping = parse_windows("10:00-14:00,12:00-16:00")
    assert next_change(at(UTC, 2024, 5, 1, 11, 0), overlapping) == at(UTC, 2024, 5, 1, 16, 0)


def test_always_and_never_have_no_next_change():
    assert next_change(at(UTC, 2024, 5, 1, 9, 0), parse_windows("00:00-24:00")) is None
    assert is_available(at(UTC, 2024, 5, 1, 23, 59, 59), parse_windows("00:00-24:00"))
    assert next_change(at(UTC, 2024, 5, 1, 9, 0), parse_windows("06:00-12:00,12:00-06:00")) is None


def test_the_answer_is_in_the_host_zone_and_naive_times_are_refused():
    change = next_change(at(BERLIN, 2024, 5, 1, 12, 0), parse_windows("18:00-08:00"))
    assert change == at(BERLIN, 2024, 5, 1, 18, 0) and change.utcoffset() == timedelta(hours=2)
    with pytest.raises(ValueError, match="aware"):
        is_available(datetime(2024, 5, 1, 12, 0), parse_windows("18:00-08:00"))
    with pytest.raises(ValueError, match="aware"):
        next_change(datetime(2024, 5, 1, 12, 0), parse_windows("18:00-08:00"))


def test_a_night_window_across_spring_forward_is_an_hour_shorter():
    night = parse_windows("18:00-08:00")
    start = next_change(at(BERLIN, 2024, 3, 30, 12, 0), night)
    end = next_change(start, night)
    assert (start, end) == (at(BERLIN, 2024, 3, 30, 18, 0), at(BERLIN, 2024, 3, 31, 8, 0))
    assert real(end) - real(start) == timedelta(hours=13)  # 02:00-03:00 never happened


def test_an_edge_inside_the_spring_forward_gap_changes_at_the_jump():
    # 2024-03-31 in Berlin, wall clocks go 01:59:59 -> 03:00:00: 02:30 never happens.
    windows = parse_windows("01:00-02:30")
    opens = next_change(at(BERLIN, 2024, 3, 31, 0, 30), windows)
    closes = next_change(opens, windows)
    assert opens == at(BERLIN, 2024, 3, 31, 1, 0)
    assert closes.astimezone(UTC) == at(UTC, 2024, 3, 31, 1, 0)  # 03:00 CEST, the jump itself
    assert real(closes) - real(opens) == timedelta(hours=1)
    inside_gap = parse_windows("02:10-02:40")  # wholly inside the gap: not that night, the next
    assert next_change(at(BERLIN, 2024, 3, 31, 0, 0), inside_gap) == at(BERLIN, 2024, 4, 1, 2, 10)


def test_an_edge_inside_the_fall_back_hour_is_crossed_twice():
    # 2024-10-27 in Berlin, wall clocks go 02:59:59 CEST -> 02:00:00 CET: 02:15 happens twice.
    windows = parse_windows("02:15-02:45")
    moment = at(BERLIN, 2024, 10, 27, 0, 30)
    seen = []
    for _ in range(4):
        moment = next_change(moment, windows)
        seen.append((moment.astimezone(UTC).strftime("%H:%M"), is_available(moment, windows)))
    assert seen == [("00:15", True), ("00:45", False), ("01:15", True), ("01:45", False)]


def test_a_window_closing_inside_the_fall_back_hour_reopens_at_the_fold():
    # Available until 02:30: at 02:59:59 CEST it is off, and the clock falling back to 02:00 CET turns it on again.
    windows = parse_windows("22:00-02:30")
    moment = at(BERLIN, 2024, 10, 27, 1, 0)
    changes = []
    for _ in range(3):
        moment = next_change(moment, windows)
        changes.append(moment.astimezone(UTC).strftime("%H:%M"))
    assert changes == ["00:30", "01:00", "01:30"]


@given(
    windows=st.lists(st.tuples(st.integers(0, 1439), st.integers(1, 1440)).filter(lambda w: w[0] != w[1]), min_size=1, max_size=3),
    offset_s=st.integers(0, 3 * 365 * 86400),
    zone=st.sampled_from([BERLIN, NEW_YORK, ZoneInfo("Australia/Lord_Howe"), ZoneInfo("Asia/Kolkata"), UTC]),
)
def test_availability_holds_until_the_next_change_and_flips_there(windows, offset_s, zone):
    ws = tuple(Window(s, e) for s, e in windows)
    now = (datetime(2023, 1, 1, tzinfo=UTC) + timedelta(seconds=offset_s)).astimezone(zone)
    change = next_change(now, ws)
    state = is_available(now, ws)
    if change is None:
        probes = [real(now) + timedelta(minutes=m) for m in range(0, 3 * 1440, 7)]
        assert all(is_available(p.astimezone(zone), ws) == state for p in probes)
        return
    assert real(now) < real(change) <= real(now) + timedelta(days=2)
    assert is_available(change, ws) != state
    span = real(change) - real(now)
    for i in range(1, 16):  # real instants between now and the change, read in the host's zone
        probe = real(now) + span * i / 16
        if probe < real(change):
            assert is_available(probe.astimezone(zone), ws) == state, (probe, change)


class Switch:
    """Stands in for the host service: records the schedule's calls."""

    def __init__(self) -> None:
        self.enabled = True
        self.calls: list[str] = []

    async def enable(self) -> None:
        self.enabled = True
        self.calls.append("enable")

    async def disable(self) -> None:
        self.enabled = False
        self.calls.append("disable")


async def test_the_follower_switches_at_each_edge_and_only_there():
    clock = FakeClock(at(BERLIN, 2024, 5, 1, 12, 0))
    switch = Switch()
    follower = ScheduleFollower(switch, parse_windows("18:00-08:00"), clock)
    assert follower.status() == {"windows": "18:00-08:00", "zone": "Europe/Berlin", "available": False,
                                 "next_change": "2024-05-01T18:00:00+02:00", "next_state": "enabled"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.run)
        await trio.testing.wait_all_tasks_blocked()
        assert switch.calls == ["disable"]  # started outside the window
        clock.set(at(BERLIN, 2024, 5, 1, 17, 59))
        await trio.testing.wait_all_tasks_blocked()
        assert switch.calls == ["disable"]
        clock.set(at(BERLIN, 2024, 5, 1, 18, 0))
        await trio.testing.wait_all_tasks_blocked()
        assert switch.calls == ["disable", "enable"]
        await switch.disable()  # the owner takes the GPU back by hand inside the window...
        clock.set(at(BERLIN, 2024, 5, 2, 3, 0))
        await trio.testing.wait_all_tasks_blocked()
        assert not switch.enabled  # ...and the schedule does not undo it before its next edge
        clock.set(at(BERLIN, 2024, 5, 2, 19, 0))  # a jump past two edges (a suspended laptop): the state now is what counts
        await trio.testing.wait_all_tasks_blocked()
        assert switch.enabled and switch.calls[-1] == "enable"
        follower.stop()
    assert clock.sleepers == 0


async def test_a_stopped_follower_never_switches_again():
    clock = FakeClock(at(UTC, 2024, 5, 1, 12, 0))
    switch = Switch()
    follower = ScheduleFollower(switch, parse_windows("11:00-13:00"), clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.run)
        await trio.testing.wait_all_tasks_blocked()
        follower.stop()
        await trio.testing.wait_all_tasks_blocked()
        clock.set(at(UTC, 2024, 5, 1, 14, 0))
        await trio.testing.wait_all_tasks_blocked()
    assert switch.calls == [] and switch.enabled
