"""Estimators, the per-model market book, and earnings per GPU-hour."""

from __future__ import annotations

import math

import pytest

from gpunexus.pricing.controller import ControllerConfig, next_price
from gpunexus.pricing.earnings import earnings_micro_per_gpu_hour, expected_utilisation, rank_models
from gpunexus.pricing.estimators import DemandConfig, DemandEstimator, HostSupply, SupplyEstimator
from gpunexus.pricing.market import EpochObservation, MarketBook, MarketConfig, PriceQuote

# -- demand ---------------------------------------------------------------------


def feed(est: DemandEstimator, rates: list[int]) -> list[float]:
    return [est.observe(r * 60, 60.0) for r in rates]


def test_demand_ignores_a_one_epoch_burst_and_dip_entirely() -> None:
    est = DemandEstimator()
    out = feed(est, [100] * 5 + [100_000] + [100] * 3 + [0] + [100] * 3)
    assert out == [100.0] * len(out)


def test_demand_follows_a_lasting_step_one_epoch_late_then_halves_the_gap() -> None:
    est = DemandEstimator(DemandConfig(window=3, alpha=0.5))
    out = feed(est, [100] * 5 + [200] * 6)
    assert out[5] == 100.0  # the first epoch of the new level could be a burst
    assert out[6:] == pytest.approx([150.0, 175.0, 187.5, 193.75, 196.875])


def test_demand_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        DemandEstimator().observe(-1, 60.0)
    with pytest.raises(ValueError):
        DemandConfig(window=2)


# -- supply ---------------------------------------------------------------------


def test_new_host_counts_at_once_and_a_leaver_is_forgotten_after_two_epochs() -> None:
    est = SupplyEstimator()
    a, b = HostSupply("a", 50.0, 2), HostSupply("b", 100.0, 1)
    assert est.observe([a, b]) == 200.0
    assert est.observe([a]) == pytest.approx(100.0 + 0.7 * 100.0)
    assert est.live_hosts() == 2
    assert est.observe([a]) == 100.0
    assert est.live_hosts() == 1


def test_a_flapping_host_moves_supply_by_a_tenth_of_its_capacity_not_all_of_it() -> None:
    est = SupplyEstimator()
    steady = [HostSupply(f"s{i}", 100.0, 1) for i in range(9)]
    flapper = HostSupply("flap", 100.0, 1)
    readings = [est.observe(steady + ([flapper] if t % 2 == 0 else [])) for t in range(40)]
    late = readings[20:]
    assert 900 < min(late) and max(late) < 1000
    assert max(late) - min(late) < 0.2 * 100.0  # ±10% of the flapper's capacity at most
    assert est.live_hosts() in (9, 10)


def test_cheapest_ask_is_the_floor_unless_a_host_follows_the_market() -> None:
    est = SupplyEstimator()
    est.observe([HostSupply("a", 10, 1, 30_000), HostSupply("b", 10, 1, 20_000)])
    assert est.cheapest_ask() == 20_000
    est.observe([HostSupply("a", 10, 1, 30_000), HostSupply("b", 10, 1, 20_000), HostSupply("f", 10, 1, None)])
    assert est.cheapest_ask() is None
    assert SupplyEstimator().cheapest_ask() is None


def test_supply_refuses_a_host_twice_in_one_epoch() -> None:
    est = SupplyEstimator()
    with pytest.raises(ValueError):
        est.observe([HostSupply("a", 1, 1), HostSupply("a", 2, 1)])
    assert est.tokens_per_s == 0.0
    with pytest.raises(ValueError):
        HostSupply("a", -1.0, 1)


# -- market book ----------------------------------------------------------------


def book(**controller) -> MarketBook:
    b = MarketBook(MarketConfig(epoch_s=60.0, controller=ControllerConfig(**controller)))
    b.add_model("m", 200_000, initial_micro_per_mtok=100_000)
    b.add_model("idle", 300_000)
    return b


def hosts(n: int, tps: float = 100.0, ask: int | None = None) -> tuple[HostSupply, ...]:
    return tuple(HostSupply(f"h{i}", tps, 1, ask) for i in range(n))


def test_step_quotes_every_listed_model_with_its_numbers() -> None:
    b = book()
    quotes = b.step(7, {"m": EpochObservation(60 * 90, hosts(1))})
    by_model = {q.model: q for q in quotes}
    assert set(by_model) == {"m", "idle"}
    q = by_model["m"]
    assert q == PriceQuote(
        model="m",
        epoch=7,
        price_micro_per_mtok=q.price_micro_per_mtok,
        demand_tps=90.0,
        supply_tps=100.0,
        utilisation=0.9,
        hosts=1,
        floor_micro_per_mtok=1000,
        ceiling_micro_per_mtok=200_000,
    )
    assert q.price_micro_per_mtok == round(100_000 * math.exp(0.05 * (0.9 - 0.75)))
    assert b.quote("m") == q and b.price("m") == q.price_micro_per_mtok
    assert by_model["idle"].price_micro_per_mtok < 150_000  # nothing asked, nobody offering: cheaper
    assert b.models() == ["idle", "m"]


def test_excess_demand_climbs_to_the_ceiling_and_stays_there() -> None:
    b = book()
    for epoch in range(200):
        b.step(epoch, {"m": EpochObservation(60 * 500, hosts(1))})
    assert b.price("m") == 200_000


def test_idle_capacity_falls_to_the_cheapest_ask_and_stops() -> None:
    b = book()
    for epoch in range(400):
        q = {x.model: x for x in b.step(epoch, {"m": EpochObservation(60, hosts(3, ask=40_000))})}["m"]
    assert q.price_micro_per_mtok == 40_000 == q.floor_micro_per_mtok


def test_zero_supply_with_demand_rises_at_the_slew_limit() -> None:
    b = book()
    q = {x.model: x for x in b.step(0, {"m": EpochObservation(6000)})}["m"]
    assert q.utilisation == math.inf and q.supply_tps == 0.0 and q.hosts == 0
    assert q.price_micro_per_mtok == round(100_000 * math.exp(0.10))


def test_published_quotes_replay_to_the_same_prices() -> None:
    """An auditor holding the quotes can recompute every price: no hidden state."""
    b = book()
    quotes = []
    for epoch, demand in enumerate([50, 90, 120, 120, 95, 80, 76, 74, 60, 40, 40, 41, 75, 77, 79]):
        quotes += [q for q in b.step(epoch, {"m": EpochObservation(60 * demand, hosts(1))}) if q.model == "m"]
    cfg = ControllerConfig()
    price, before = 100_000, 100_000
    for q in quotes:
        direction = (price > before) - (price < before)
        floor, ceiling = q.floor_micro_per_mtok, q.ceiling_micro_per_mtok
        before, price = price, next_price(price, q.utilisation, floor, ceiling, cfg, direction)
        assert price == q.price_micro_per_mtok
    assert len({q.price_micro_per_mtok for q in quotes}) > 5


def test_bad_steps_change_nothing() -> None:
    b = book()
    b.step(1, {})
    before = (b.price("m"), b.quote("m"))
    with pytest.raises(KeyError):
        b.step(2, {"m": EpochObservation(1), "unlisted": EpochObservation(1)})
    with pytest.raises(ValueError):
        b.step(1, {"m": EpochObservation(1)})  # replayed epoch
    with pytest.raises(ValueError):
        b.step(2, {"m": EpochObservation(1, (HostSupply("a", 1, 1), HostSupply("a", 1, 1)))})
    assert (b.price("m"), b.quote("m")) == before
    b.step(2, {})  # the book still accepts the next epoch


def test_listing_rules() -> None:
    b = MarketBook()
    b.add_model("m", 200_000)
    assert b.price("m") == 100_000  # half the reference by default
    assert b.quote("m") is None
    with pytest.raises(ValueError):
        b.add_model("m", 200_000)
    with pytest.raises(ValueError):
        b.add_model("n", 0)
    b.add_model("n", 200_000, initial_micro_per_mtok=10**9)
    assert b.price("n") == 200_000  # clamped under the ceiling
    with pytest.raises(ValueError):
        EpochObservation(-1)


# -- earnings -------------------------------------------------------------------


def test_earnings_formula_is_exact_and_rounds_down() -> None:
    # $0.20 per Mtok, 1000 tokens/s, busy 75%: 2.7 Mtok an hour, $0.54.
    assert earnings_micro_per_gpu_hour(200_000, 1000.0, 0.75) == 540_000
    assert earnings_micro_per_gpu_hour(1, 1.0, 1.0) == 0  # 0.0036 micro-USD
    with pytest.raises(ValueError):
        earnings_micro_per_gpu_hour(1, 1.0, 1.5)


def test_expected_utilisation_counts_the_newcomer() -> None:
    assert expected_utilisation(750.0, 900.0, 100.0) == 0.75
    assert expected_utilisation(5000.0, 0.0, 1000.0) == 1.0  # empty market, more demand than the host
    assert expected_utilisation(0.0, 0.0, 0.0) == 0.0


def test_rank_models_by_earnings_per_gpu_hour() -> None:
    def quote(model: str, price: int, demand: float, supply: float) -> PriceQuote:
        return PriceQuote(model, 1, price, demand, supply, demand / supply, 3, 1000, 10**6)

    quotes = [
        quote("big", 900_000, 300.0, 400.0),  # dear per token, but this GPU is slow on it
        quote("small", 150_000, 7_000.0, 8_000.0),
        quote("unmeasured", 10**6, 1e6, 1.0),
    ]
    ranked = rank_models(quotes, {"big": 100.0, "small": 1_000.0})
    assert [r.model for r in ranked] == ["small", "big"]
    assert ranked[0].expected_utilisation == pytest.approx(7000 / 9000)
    assert ranked[0].micro_usd_per_gpu_hour == earnings_micro_per_gpu_hour(150_000, 1_000.0, 7000 / 9000)
    assert ranked[0].micro_usd_per_gpu_hour > ranked[1].micro_usd_per_gpu_hour
