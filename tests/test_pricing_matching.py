"""Matching: filters, order, round-robin, back-off, reputation exclusion."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpunexus.pricing.matching import Matcher, MatchPolicy

ANY = MatchPolicy()


@dataclass(frozen=True)
class Offer:
    peer_id: str
    model: str = "m"
    price_micro_per_mtok: int = 100_000
    tokens_per_s: float = 50.0
    free_slots: int = 1


def ids(offers: list[Offer]) -> list[str]:
    return [o.peer_id for o in offers]


def test_filters_model_price_throughput_and_reputation() -> None:
    offers = [
        Offer("ok"),
        Offer("other-model", model="x"),
        Offer("too-dear", price_micro_per_mtok=200_001),
        Offer("too-slow", tokens_per_s=9.9),
        Offer("banned"),
    ]
    policy = MatchPolicy(max_price_micro_per_mtok=200_000, min_tokens_per_s=10.0)
    ranked = Matcher().rank(offers, "m", policy, now=0.0, excluded={"banned"}.__contains__)
    assert ids(ranked) == ["ok"]


def test_limits_are_inclusive_and_none_means_no_limit() -> None:
    offers = [Offer("a", price_micro_per_mtok=200_000, tokens_per_s=10.0), Offer("b", price_micro_per_mtok=10**9)]
    exact = MatchPolicy(max_price_micro_per_mtok=200_000, min_tokens_per_s=10.0)
    assert ids(Matcher().rank(offers, "m", exact, 0.0)) == ["a"]
    assert sorted(ids(Matcher().rank(offers, "m", ANY, 0.0))) == ["a", "b"]


def test_cheapest_first_then_faster() -> None:
    offers = [
        Offer("dear", price_micro_per_mtok=300),
        Offer("cheap-slow", price_micro_per_mtok=100, tokens_per_s=20),
        Offer("cheap-fast", price_micro_per_mtok=100, tokens_per_s=80),
        Offer("mid", price_micro_per_mtok=200, tokens_per_s=500),
    ]
    assert ids(Matcher().rank(offers, "m", ANY, 0.0)) == ["cheap-fast", "cheap-slow", "mid", "dear"]


def test_round_robin_spreads_requests_evenly_over_equal_hosts() -> None:
    # 100.0, 98.0 and 96.0 tokens/s are within 5% of the fastest: one group.
    offers = [Offer("a", tokens_per_s=100.0), Offer("b", tokens_per_s=98.0), Offer("c", tokens_per_s=96.0)]
    offers.append(Offer("dear", price_micro_per_mtok=999_999))
    matcher = Matcher()
    firsts = [matcher.rank(offers, "m", ANY, float(t))[0].peer_id for t in range(30)]
    assert Counter(firsts) == {"a": 10, "b": 10, "c": 10}
    assert all(x != y for x, y in zip(firsts, firsts[1:]))  # consecutive requests go to different hosts
    assert "dear" not in firsts


def test_throughput_beyond_tolerance_is_not_equal() -> None:
    offers = [Offer("fast", tokens_per_s=100.0), Offer("slow", tokens_per_s=90.0)]
    matcher = Matcher()
    assert {matcher.rank(offers, "m", ANY, 0.0)[0].peer_id for _ in range(5)} == {"fast"}


def test_round_robin_is_per_model() -> None:
    offers = [Offer("a"), Offer("b"), Offer("a", model="n"), Offer("b", model="n")]
    matcher = Matcher()
    assert matcher.rank(offers, "m", ANY, 0.0)[0].peer_id == "a"
    assert matcher.rank(offers, "n", ANY, 0.0)[0].peer_id == "a"  # model n's rotation is untouched
    assert matcher.rank(offers, "m", ANY, 0.0)[0].peer_id == "b"


def test_full_hosts_go_after_free_ones_and_are_never_dropped() -> None:
    free = Offer("free", price_micro_per_mtok=500)
    full = Offer("full", price_micro_per_mtok=100, free_slots=0)
    full2 = Offer("full2", price_micro_per_mtok=200, free_slots=0)
    assert ids(Matcher().rank([full, free, full2], "m", ANY, 0.0)) == ["free", "full", "full2"]
    assert ids(Matcher().rank([full2, full], "m", ANY, 0.0)) == ["full", "full2"]


def test_failed_host_with_free_slots_ranks_after_a_live_busy_host() -> None:
    # Issue 8: the cheap host died mid-stream; its last offer still says it is idle.
    dead = Offer("dead", price_micro_per_mtok=100, free_slots=4)
    busy = Offer("busy", price_micro_per_mtok=300, free_slots=0)
    m = Matcher()
    m.report_failure("dead", now=10.0)
    assert ids(m.rank([dead, busy], "m", ANY, now=10.5)) == ["busy", "dead"]


def test_backed_off_free_host_does_not_push_out_busy_live_hosts() -> None:
    stale = Offer("stale", price_micro_per_mtok=100, free_slots=2)
    busy = Offer("busy", price_micro_per_mtok=300, free_slots=0)
    idle = Offer("idle", price_micro_per_mtok=900, free_slots=1)
    m = Matcher()
    m.report_failure("stale", now=0.0)
    assert ids(m.rank([stale, busy, idle], "m", ANY, now=1.0)) == ["idle", "busy", "stale"]


def test_backoff_doubles_caps_and_resets_on_success() -> None:
    m = Matcher(backoff_base_s=2.0, backoff_max_s=60.0)
    waits = []
    now = 0.0
    for _ in range(7):
        m.report_failure("h", now)
        start = now
        while m.backed_off("h", now):
            now += 0.5
        waits.append(now - start)
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    m.report_success("h")
    assert not m.backed_off("h", now)
    m.report_failure("h", now)
    assert m.backed_off("h", now + 1.9) and not m.backed_off("h", now + 2.0)


def test_backed_off_host_goes_last_then_recovers() -> None:
    offers = [Offer("cheap", price_micro_per_mtok=100), Offer("dear", price_micro_per_mtok=900)]
    m = Matcher()
    m.report_failure("cheap", now=10.0)
    assert ids(m.rank(offers, "m", ANY, now=11.0)) == ["dear", "cheap"]  # still offered, after the healthy
    assert ids(m.rank(offers, "m", ANY, now=12.0)) == ["cheap", "dear"]  # back-off over


def test_everyone_backed_off_still_returns_candidates_cheapest_first() -> None:
    offers = [Offer("b", price_micro_per_mtok=200), Offer("a", price_micro_per_mtok=100)]
    m = Matcher()
    for o in offers:
        m.report_failure(o.peer_id, now=0.0)
    assert ids(m.rank(offers, "m", ANY, now=1.0)) == ["a", "b"]


def test_excluded_host_is_never_returned_even_as_the_only_one() -> None:
    assert Matcher().rank([Offer("bad")], "m", ANY, 0.0, excluded=lambda p: p == "bad") == []


def test_forget_clears_rotation_and_backoff() -> None:
    m = Matcher()
    offers = [Offer("a"), Offer("b")]
    m.rank(offers, "m", ANY, 0.0)  # a was first
    m.report_failure("a", 0.0)
    m.forget("a")
    assert not m.backed_off("a", 0.0)
    assert m.rank(offers, "m", ANY, 0.0)[0].peer_id == "a"  # never picked again, so ahead of b


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Matcher(backoff_base_s=10.0, backoff_max_s=5.0)
    with pytest.raises(ValueError):
        Matcher(tps_tolerance=1.0)


offer_lists = st.lists(
    st.builds(
        Offer,
        peer_id=st.sampled_from([f"p{i}" for i in range(8)]),
        model=st.sampled_from(["m", "n"]),
        price_micro_per_mtok=st.integers(1, 5),
        tokens_per_s=st.floats(1, 100),
        free_slots=st.integers(0, 2),
    ),
    max_size=12,
    unique_by=lambda o: (o.peer_id, o.model),
)


@given(
    offer_lists,
    st.one_of(st.none(), st.integers(1, 5)),
    st.one_of(st.none(), st.floats(1, 100)),
    st.sets(st.sampled_from([f"p{i}" for i in range(8)])),
    st.sets(st.sampled_from([f"p{i}" for i in range(8)])),
)
def test_rank_properties(offers, max_price, min_tps, banned, failed) -> None:
    m = Matcher()
    for peer in failed:
        m.report_failure(peer, now=0.0)
    policy = MatchPolicy(max_price, min_tps)
    ranked = m.rank(offers, "m", policy, now=1.0, excluded=banned.__contains__)
    eligible = [o for o in offers if o.model == "m" and policy.admits(o) and o.peer_id not in banned]
    assert len(ranked) == len({o.peer_id for o in ranked})
    assert set(ranked) <= set(eligible)
    assert set(eligible) == set(ranked)  # nothing admitted is dropped, full or backed off
    healthy = [o for o in ranked if o.peer_id not in failed]
    assert ranked[: len(healthy)] == healthy  # healthy ones first
    free = [o for o in healthy if o.free_slots > 0]
    assert healthy[: len(free)] == free  # among them, those with a free slot first
    for tier in (free, healthy[len(free) :], ranked[len(healthy) :]):
        prices = [o.price_micro_per_mtok for o in tier]
        assert prices == sorted(prices)
