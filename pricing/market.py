"""Per-model market state: observations in, one price quote per model out.

The hub closes an epoch, gathers for every model the tokens asked and the
hosts that offered it, and calls `MarketBook.step` once. The book feeds each
model's estimators, runs the control law (`gpunexus.pricing.controller`) and
returns a `PriceQuote` per model, which the hub signs and publishes.

A quote's ``epoch`` is the epoch whose observations produced it; its price
holds from then until the next step. A model with no observation in an epoch
is stepped as if nothing was asked and no host offered it, so every model
moves every epoch and silence reads as an idle market.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .controller import ControllerConfig, apply_step, log_step, price_bounds, utilisation
from .estimators import DemandConfig, DemandEstimator, HostSupply, SupplyConfig, SupplyEstimator


@dataclass(frozen=True)
class EpochObservation:
    """What one model saw in one epoch."""

    tokens_asked: int
    hosts: tuple[HostSupply, ...] = ()

    def __post_init__(self) -> None:
        if self.tokens_asked < 0:
            raise ValueError("tokens_asked must be >= 0")


@dataclass(frozen=True)
class PriceQuote:
    model: str
    epoch: int
    price_micro_per_mtok: int
    demand_tps: float
    supply_tps: float
    utilisation: float
    hosts: int
    floor_micro_per_mtok: int
    ceiling_micro_per_mtok: int


@dataclass(frozen=True)
class MarketConfig:
    epoch_s: float = 60.0
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    demand: DemandConfig = field(default_factory=DemandConfig)
    supply: SupplyConfig = field(default_factory=SupplyConfig)

    def __post_init__(self) -> None:
        if self.epoch_s <= 0:
            raise ValueError("epoch_s must be > 0")


@dataclass
class _ModelState:
    reference: int
    price: int
    demand: DemandEstimator
    supply: SupplyEstimator
    direction: int = 0  # sign of the last price move (readable from published quotes)
    quote: PriceQuote | None = None


class MarketBook:
    """Market prices for many models, stepped once per epoch."""

    def __init__(self, config: MarketConfig = MarketConfig()) -> None:
        self._config = config
        self._models: dict[str, _ModelState] = {}
        self._epoch: int | None = None

    @property
    def config(self) -> MarketConfig:
        return self._config

    def add_model(self, model: str, reference_micro_per_mtok: int, initial_micro_per_mtok: int | None = None) -> None:
        """List a model; its price starts at ``initial`` (default: half the reference)."""
        if model in self._models:
            raise ValueError(f"model {model!r} already listed")
        if reference_micro_per_mtok < 1:
            raise ValueError("reference price must be >= 1")
        floor, ceiling = price_bounds(None, reference_micro_per_mtok, self._config.controller)
        start = reference_micro_per_mtok // 2 if initial_micro_per_mtok is None else initial_micro_per_mtok
        self._models[model] = _ModelState(
            reference=reference_micro_per_mtok,
            price=min(max(start, floor), ceiling),
            demand=DemandEstimator(self._config.demand),
            supply=SupplyEstimator(self._config.supply),
        )

    def models(self) -> list[str]:
        return sorted(self._models)

    def price(self, model: str) -> int:
        """The price in force for ``model`` now."""
        return self._models[model].price

    def quote(self, model: str) -> PriceQuote | None:
        """The last quote for ``model``; ``None`` before its first step."""
        return self._models[model].quote

    def step(self, epoch: int, observations: Mapping[str, EpochObservation]) -> list[PriceQuote]:
        """Close ``epoch``: feed every listed model, return their new quotes.

        Epochs must increase; an unknown model or a replayed epoch raises
        before any state changes.
        """
        unknown = set(observations) - set(self._models)
        if unknown:
            raise KeyError(f"unlisted models: {sorted(unknown)}")
        if self._epoch is not None and epoch <= self._epoch:
            raise ValueError(f"epoch {epoch} is not after {self._epoch}")
        for obs in observations.values():
            _check_unique(obs.hosts)
        self._epoch = epoch
        empty = EpochObservation(0)
        return [self._step_model(m, epoch, observations.get(m, empty)) for m in sorted(self._models)]

    def _step_model(self, model: str, epoch: int, obs: EpochObservation) -> PriceQuote:
        state = self._models[model]
        cfg = self._config.controller
        demand = state.demand.observe(obs.tokens_asked, self._config.epoch_s)
        supply = state.supply.observe(obs.hosts)
        u = utilisation(demand, supply)
        floor, ceiling = price_bounds(state.supply.cheapest_ask(), state.reference, cfg)
        price = apply_step(state.price, log_step(u, cfg, state.direction), floor, ceiling)
        state.direction = (price > state.price) - (price < state.price)
        state.price = price
        state.quote = PriceQuote(
            model=model,
            epoch=epoch,
            price_micro_per_mtok=state.price,
            demand_tps=demand,
            supply_tps=supply,
            utilisation=u,
            hosts=state.supply.live_hosts(),
            floor_micro_per_mtok=floor,
            ceiling_micro_per_mtok=ceiling,
        )
        return state.quote


def _check_unique(hosts: Iterable[HostSupply]) -> None:
    ids = [h.peer_id for h in hosts]
    if len(ids) != len(set(ids)):
        raise ValueError("a host appears twice in one model's epoch")
