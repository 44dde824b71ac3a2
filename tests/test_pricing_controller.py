"""The control law: properties that must hold for every input."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gpunexus.pricing.controller import (
    ControllerConfig,
    apply_step,
    log_step,
    next_price,
    price_bounds,
    utilisation,
)

CFG = ControllerConfig()

prices = st.integers(1, 10**9)
utilisations = st.one_of(st.floats(0, 50), st.just(math.inf))
directions = st.sampled_from([-1, 0, 1])


@st.composite
def bounds(draw) -> tuple[int, int]:
    floor = draw(st.integers(1, 10**8))
    return floor, draw(st.integers(floor, 10**9))


@given(prices, utilisations, bounds(), directions)
def test_output_is_an_integer_within_floor_and_ceiling(price, u, fc, direction) -> None:
    floor, ceiling = fc
    p = next_price(price, u, floor, ceiling, CFG, direction)
    assert type(p) is int
    assert floor <= p <= ceiling


@given(prices, utilisations, utilisations, bounds(), directions)
def test_monotone_in_demand(price, u1, u2, fc, direction) -> None:
    lo, hi = sorted((u1, u2))
    assert next_price(price, lo, *fc, CFG, direction) <= next_price(price, hi, *fc, CFG, direction)


@given(prices, utilisations, directions)
def test_steps_are_bounded(price, u, direction) -> None:
    p = next_price(price, u, 1, 10**10, CFG, direction)
    up = max(price + 1, round(price * math.exp(CFG.max_step)))
    down = max(1, min(price - 1, round(price * math.exp(-CFG.max_step))))
    assert down <= p <= up
    if price >= 1000:  # where rounding is negligible the step is the configured factor at most
        assert abs(math.log(p / price)) <= CFG.max_step + 1e-3


@given(prices, st.floats(CFG.target_utilisation - CFG.dead_band + 1e-9, CFG.target_utilisation + CFG.dead_band - 1e-9))
def test_dead_band_at_rest_leaves_the_price_alone(price, u) -> None:
    assert next_price(price, u, 1, 10**10, CFG, direction=0) == price


@given(prices, st.floats(0.001, CFG.dead_band - 1e-9))
def test_a_moving_price_keeps_moving_until_u_crosses_the_target(price, above) -> None:
    assume(price > 1)
    u = CFG.target_utilisation + above
    assert next_price(price, u, 1, 10**10, CFG, direction=+1) > price  # still chasing: above target
    assert next_price(price, u, 1, 10**10, CFG, direction=-1) == price  # moving down, but u is above: stop
    assert next_price(price, CFG.target_utilisation - above, 1, 10**10, CFG, direction=-1) < price


@st.composite
def price_within_bounds(draw) -> tuple[int, int, int]:
    floor, ceiling = draw(bounds())
    return draw(st.integers(floor, ceiling)), floor, ceiling


@given(price_within_bounds(), directions)
def test_above_target_never_lowers_below_target_never_raises(pfc, direction) -> None:
    price, floor, ceiling = pfc
    assert next_price(price, 5.0, floor, ceiling, CFG, direction) >= price
    assert next_price(price, 0.0, floor, ceiling, CFG, direction) <= price


def test_step_law_values() -> None:
    assert log_step(0.75 + 0.2, CFG) == pytest.approx(CFG.gain * 0.2)
    assert log_step(0.0, CFG) == pytest.approx(-CFG.gain * 0.75)
    assert log_step(math.inf, CFG) == CFG.max_step
    assert log_step(100.0, CFG) == CFG.max_step
    assert apply_step(1_000_000, 0.01, 1, 10**9) == round(1_000_000 * math.exp(0.01))


def test_a_tiny_price_can_still_rise() -> None:
    """Rounding alone would pin a price of 1 forever; a non-zero step moves it by at least one."""
    assert apply_step(1, 1e-6, 1, 100) == 2
    assert apply_step(2, -1e-6, 1, 100) == 1


def test_zero_supply() -> None:
    assert utilisation(10.0, 0.0) == math.inf
    assert utilisation(0.0, 0.0) == 0.0
    assert utilisation(3.0, 4.0) == 0.75
    # Demand with no supply: the price climbs at the slew limit to attract hosts.
    assert next_price(100_000, math.inf, 1000, 10**6, CFG) == round(100_000 * math.exp(CFG.max_step))
    with pytest.raises(ValueError):
        utilisation(-1.0, 1.0)


def test_floor_and_ceiling_from_asks_and_reference() -> None:
    assert price_bounds(None, 500_000, CFG) == (CFG.min_price_micro_per_mtok, 500_000)
    assert price_bounds(20_000, 500_000, CFG) == (20_000, 500_000)
    assert price_bounds(10, 500_000, CFG) == (CFG.min_price_micro_per_mtok, 500_000)
    assert price_bounds(900_000, 500_000, CFG) == (500_000, 500_000)  # the ceiling wins
    # The floor lifts a price that the hosts will not sell at, at once.
    assert next_price(10_000, 0.75, 20_000, 500_000, CFG) == 20_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_utilisation": 1.0},
        {"target_utilisation": 0.0},
        {"dead_band": 0.8},
        {"gain": 0.0},
        {"max_step": -0.1},
        {"min_price_micro_per_mtok": 0},
    ],
)
def test_bad_config_is_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        ControllerConfig(**kwargs)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        next_price(0, 0.5, 1, 10, CFG)
    with pytest.raises(ValueError):
        next_price(5, 0.5, 11, 10, CFG)
    with pytest.raises(ValueError):
        next_price(5, math.nan, 1, 10, CFG)
