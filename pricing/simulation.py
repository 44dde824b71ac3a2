"""A simulated market that closes the loop around `MarketBook`.

Shared by ``bench/market_sim.py`` (table and plot) and the tests (convergence
on fixed seeds), so what the bench shows is what the tests assert. Pure and
seeded: the same `Scenario` gives the same `Run`.

The plant, per model and per epoch (``epoch_s`` seconds):

- **Demand** responds to price with constant elasticity:
  ``D = base × diurnal × shocks × (price / reference)^-elasticity`` tokens/s,
  then Poisson noise on requests of ``tokens_per_request`` tokens (normal
  approximation). Clients also see queueing: unserved tokens wait one epoch,
  half of them give up.
- **Supply** responds to price: a host joins when the market price pays its
  reservation earnings per GPU-hour at the target utilisation (its *ask*) and
  leaves when it no longer does, each decision taken with probability
  ``host_inertia`` per epoch (owners do not watch the market every minute),
  with ±5% hysteresis. A host's schedule says when its owner lends the GPU at
  all: always, nights (22:00-08:00), or nights and weekends, each host with
  its own jitter of up to an hour.
- **Cheater**: an always-on host that offers at a tenth of the market and
  states that tiny ask, to show that one underpricer cannot drag the market
  price with it (the floor only bounds from below) while clients still get
  its cheap tokens first.
- **Flapper**: a host following the market price that is offline every
  other epoch.

Matching is cheapest first (as `gpunexus.pricing.matching` ranks), so the
effective price clients pay is the token-weighted mean of the prices of the
hosts that served them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .controller import ControllerConfig
from .earnings import earnings_micro_per_gpu_hour
from .estimators import HostSupply
from .market import EpochObservation, MarketBook, MarketConfig, PriceQuote

EPOCHS_PER_DAY_AT_60S = 1440
_HYSTERESIS = 0.05


@dataclass(frozen=True)
class Shock:
    """Multiply demand by ``factor`` from ``start`` (epoch) until ``end`` (None: for good)."""

    start: int
    factor: float
    end: int | None = None

    def applies(self, epoch: int) -> bool:
        return epoch >= self.start and (self.end is None or epoch < self.end)


@dataclass(frozen=True)
class ModelScenario:
    model: str
    reference_micro_per_mtok: int
    demand_at_reference_tps: float
    hosts: int
    host_tps: tuple[float, float]
    reservation_usd_per_hour: tuple[float, float]
    elasticity: float = 1.0
    schedule_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)  # always, nights, nights+weekends
    diurnal: bool = False
    shocks: tuple[Shock, ...] = ()
    cheater: bool = False
    flapper: bool = False


@dataclass(frozen=True)
class Scenario:
    models: tuple[ModelScenario, ...]
    epochs: int
    seed: int = 1
    tokens_per_request: int = 1000
    host_inertia: float = 0.3
    market: MarketConfig = field(default_factory=MarketConfig)

    @property
    def epoch_s(self) -> float:
        return self.market.epoch_s

    @property
    def target(self) -> float:
        return self.market.controller.target_utilisation


@dataclass(frozen=True)
class Series:
    """One model's trajectory, one entry per epoch."""

    model: str
    reference_micro_per_mtok: int
    price: tuple[int, ...]  # market price in force during the epoch
    utilisation: tuple[float, ...]  # the market's estimate (what the controller acts on)
    served_utilisation: tuple[float, ...]  # tokens served / real capacity
    effective_price: tuple[int, ...]  # token-weighted price clients paid, rounded up
    queue_s: tuple[float, ...]  # backlog at the end of the epoch, in seconds of capacity
    hosts: tuple[int, ...]  # hosts online


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    series: tuple[Series, ...]


@dataclass
class _Host:
    peer_id: str
    tps: float
    reservation_micro_per_hour: int
    schedule: int  # 0 always, 1 nights, 2 nights and weekends
    jitter_h: float
    ask: int | None  # least price that pays the reservation at the target utilisation; None follows the market
    online: bool = False
    cheater: bool = False
    flapper: bool = False

    def pays(self, price: int, target: float, margin: float) -> bool:
        """Does ``price`` earn this host its reservation (times ``1 + margin``) per GPU-hour?"""
        earned = earnings_micro_per_gpu_hour(price, self.tps, target)
        return earned >= self.reservation_micro_per_hour * (1 + margin)

    def available(self, epoch: int, epoch_s: float) -> bool:
        if self.flapper:
            return epoch % 2 == 0
        if self.schedule == 0:
            return True
        hours = epoch * epoch_s / 3600 + self.jitter_h
        hour, day = hours % 24, int(hours // 24) % 7
        night = hour >= 22 or hour < 8
        return night or (self.schedule == 2 and day >= 5)


def diurnal_factor(epoch: int, epoch_s: float) -> float:
    """Working-hours demand: peak 1.5× at 14:00, 0.5× at 02:00, weekends × 0.7 (day 0 is a Monday)."""
    hours = epoch * epoch_s / 3600
    hour, day = hours % 24, int(hours // 24) % 7
    factor = 1 + 0.5 * math.cos(2 * math.pi * (hour - 14) / 24)
    return factor * (0.7 if day >= 5 else 1.0)


def _make_hosts(spec: ModelScenario, target: float, rng: random.Random) -> list[_Host]:
    hosts = []
    for i in range(spec.hosts):
        schedule = rng.choices((0, 1, 2), weights=spec.schedule_mix)[0]
        tps = rng.uniform(*spec.host_tps)
        reservation = round(rng.uniform(*spec.reservation_usd_per_hour) * 1_000_000)
        ask = math.ceil(reservation * 1_000_000 / (tps * 3600 * target))
        hosts.append(_Host(f"{spec.model}/h{i}", tps, reservation, schedule, rng.uniform(-1, 1), ask))
    mid_tps = sum(spec.host_tps) / 2
    if spec.cheater:
        hosts.append(_Host(f"{spec.model}/cheater", mid_tps, 0, 0, 0.0, 1, cheater=True))
    if spec.flapper:
        hosts.append(_Host(f"{spec.model}/flapper", mid_tps, 0, 0, 0.0, None, flapper=True))
    return hosts


class _ModelSim:
    def __init__(self, spec: ModelScenario, scenario: Scenario, rng: random.Random, price: int) -> None:
        self.spec = spec
        self.scenario = scenario
        self.rng = rng
        self.hosts = _make_hosts(spec, scenario.target, rng)
        for h in self.hosts:  # start from the hosts the opening price attracts, not from an empty market
            h.online = h.available(0, scenario.epoch_s) and (h.ask is None or h.pays(price, scenario.target, 0.0))
        self.backlog_tokens = 0
        self.rows: dict[str, list] = {k: [] for k in ("price", "u", "served_u", "eff", "queue", "hosts")}

    def demand_tps(self, epoch: int, price: int) -> float:
        spec = self.spec
        d = spec.demand_at_reference_tps * (price / spec.reference_micro_per_mtok) ** -spec.elasticity
        if spec.diurnal:
            d *= diurnal_factor(epoch, self.scenario.epoch_s)
        for shock in spec.shocks:
            if shock.applies(epoch):
                d *= shock.factor
        return d

    def update_hosts(self, epoch: int, price: int) -> None:
        target = self.scenario.target
        for h in self.hosts:
            if not h.available(epoch, self.scenario.epoch_s):
                h.online = False
            elif h.cheater or h.flapper:
                h.online = True
            elif not h.online and h.pays(price, target, _HYSTERESIS):
                h.online = self.rng.random() < self.scenario.host_inertia
            elif h.online and not h.pays(price, target, -_HYSTERESIS):
                h.online = self.rng.random() >= self.scenario.host_inertia

    def epoch(self, epoch: int, price: int) -> EpochObservation:
        """Play one epoch at ``price``; record it and return what the hub saw."""
        sc = self.scenario
        self.update_hosts(epoch, price)
        mean_requests = self.demand_tps(epoch, price) * sc.epoch_s / sc.tokens_per_request
        requests = max(0, round(self.rng.gauss(mean_requests, math.sqrt(mean_requests))))
        asked = requests * sc.tokens_per_request
        online = [h for h in self.hosts if h.online]
        offered = sorted(online, key=lambda h: self.offer_price(h, price))
        want = asked + self.backlog_tokens
        served = paid = 0  # tokens, and micro-USD × 10⁶ (exact: tokens × micro-USD per Mtok)
        for h in offered:  # cheapest first
            take = min(want - served, int(h.tps * sc.epoch_s))
            served += take
            paid += take * self.offer_price(h, price)
        capacity_tps = sum(h.tps for h in online)
        self.backlog_tokens = (want - served) // 2  # half of the unserved give up
        self.rows["price"].append(price)
        self.rows["served_u"].append(served / (capacity_tps * sc.epoch_s) if capacity_tps else 0.0)
        self.rows["eff"].append(-(-paid // served) if served else price)  # rounded up
        self.rows["queue"].append(self.backlog_tokens / capacity_tps if capacity_tps else 0.0)
        self.rows["hosts"].append(len(online))
        hosts = tuple(HostSupply(h.peer_id, h.tps, 1, h.ask) for h in online)
        return EpochObservation(asked, hosts)

    def record_quote(self, quote: PriceQuote) -> None:
        self.rows["u"].append(quote.utilisation)

    @staticmethod
    def offer_price(host: _Host, market: int) -> int:
        return max(1, market // 10) if host.cheater else market

    def series(self) -> Series:
        r = self.rows
        return Series(
            model=self.spec.model,
            reference_micro_per_mtok=self.spec.reference_micro_per_mtok,
            price=tuple(r["price"]),
            utilisation=tuple(r["u"]),
            served_utilisation=tuple(r["served_u"]),
            effective_price=tuple(r["eff"]),
            queue_s=tuple(r["queue"]),
            hosts=tuple(r["hosts"]),
        )


def simulate(scenario: Scenario) -> Run:
    """Run every model of ``scenario`` through a `MarketBook` for ``epochs`` epochs."""
    book = MarketBook(scenario.market)
    sims = {}
    for i, spec in enumerate(scenario.models):
        book.add_model(spec.model, spec.reference_micro_per_mtok)
        rng = random.Random(scenario.seed * 1_000_003 + i)
        sims[spec.model] = _ModelSim(spec, scenario, rng, book.price(spec.model))
    for epoch in range(scenario.epochs):
        observations = {m: sim.epoch(epoch, book.price(m)) for m, sim in sims.items()}
        for quote in book.step(epoch, observations):
            sims[quote.model].record_quote(quote)
    return Run(scenario, tuple(sim.series() for sim in sims.values()))


STEP_EPOCH = 300


def step_scenario(factor: float, seed: int = 1, host_inertia: float = 0.3) -> Scenario:
    """One model at rest, then demand times ``factor`` for good at `STEP_EPOCH`.

    200 always-on hosts with asks spread between about $0.05 and $0.28 per
    million tokens under a $0.20 reference, unit-elastic demand, requests of
    100 tokens (about 2% noise per epoch): a market where both sides answer
    the price within a few epochs, the setting the gain was chosen for.
    """
    spec = ModelScenario(
        model="step",
        reference_micro_per_mtok=200_000,
        demand_at_reference_tps=8_000,
        hosts=200,
        host_tps=(180, 300),
        reservation_usd_per_hour=(0.03, 0.18),
        shocks=(Shock(STEP_EPOCH, factor),),
    )
    return Scenario((spec,), epochs=STEP_EPOCH + 400, seed=seed, tokens_per_request=100, host_inertia=host_inertia)


def week_scenario(seed: int = 1) -> Scenario:
    """Five models over a week of 60 s epochs, from Monday 00:00.

    Working-hours demand against hosts that lend their GPUs at night and at
    weekends; a scarce large model pinned to its ceiling by day; an
    underpricing host; a flapping host with a launch-day surge (×2 for six
    hours on Tuesday) and a big client's outage (×0.5 for four hours on
    Thursday); an oversupplied small model that sits on its floor.
    """
    day = EPOCHS_PER_DAY_AT_60S
    mix = (0.4, 0.4, 0.2)
    models = (
        ModelScenario("llama-3.1-8b", 200_000, 6_000, 150, (500, 1100), (0.08, 0.50), schedule_mix=mix, diurnal=True),
        ModelScenario("llama-3.1-70b", 900_000, 2_500, 80, (200, 400), (0.40, 2.00), schedule_mix=mix, diurnal=True),
        ModelScenario(
            "qwen2.5-7b", 200_000, 4_000, 100, (500, 1100), (0.08, 0.50), schedule_mix=mix, diurnal=True, cheater=True
        ),
        ModelScenario(
            "mistral-small-24b",
            300_000,
            5_000,
            120,
            (300, 700),
            (0.10, 0.70),
            schedule_mix=mix,
            diurnal=True,
            flapper=True,
            shocks=(Shock(day + 600, 2.0, day + 960), Shock(3 * day + 780, 0.5, 3 * day + 1020)),
        ),
        ModelScenario("phi-3-mini", 100_000, 6_000, 100, (1500, 2500), (0.05, 0.30), schedule_mix=mix, diurnal=True),
    )
    return Scenario(models, epochs=7 * day, seed=seed)


@dataclass(frozen=True)
class StepResponse:
    """How the price answered a step in demand."""

    before: float  # mean price over the window before the step
    after: float  # mean price over the last window (the settled value)
    peak_overshoot: float  # how far the price went past `after`, as a fraction of the move
    settle_epochs: int  # epochs from the step until the price stays within `tolerance` of `after`
    reversals: int  # times the price changed direction after the step


def step_response(price: Sequence[int], step: int, window: int = 50, tolerance: float = 0.02) -> StepResponse:
    """Measure a price trajectory's response to a demand step at epoch ``step``.

    ``reversals`` counts sign changes of the price's moves after the step
    (epochs without a move are skipped): zero means no oscillation at all.
    """
    before = sum(price[step - window : step]) / window
    after = sum(price[-window:]) / len(price[-window:])
    moved = after - before
    tail = price[step:]
    beyond = max((p - after) * math.copysign(1, moved) for p in tail)
    overshoot = max(0.0, beyond) / abs(moved) if moved else 0.0
    settle = len(tail)
    for i in range(len(tail) - 1, -1, -1):
        if abs(tail[i] - after) > tolerance * after:
            break
        settle = i
    moves = [b - a for a, b in zip(tail, tail[1:]) if b != a]
    reversals = sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))
    return StepResponse(before, after, overshoot, settle, reversals)


@dataclass(frozen=True)
class Summary:
    """One model's week in numbers (the bench's table row)."""

    model: str
    reference_usd: float
    mean_price_usd: float
    min_price_usd: float
    max_price_usd: float
    mean_paid_usd: float  # what clients paid per million tokens, epochs weighted alike
    at_ceiling: float  # share of epochs priced at the reference (a shortage)
    in_band: float  # share of epochs with the market's u within target ± dead band
    near_band: float  # share within target ± 3 dead bands
    mean_served_u: float
    p95_queue_s: float
    max_effective_over_ceiling: float  # the dearest epoch's effective price / reference
    mean_hosts: float


def summarise(series: Series, config: ControllerConfig) -> Summary:
    n = len(series.price)
    off = [abs(u - config.target_utilisation) for u in series.utilisation]
    queue = sorted(series.queue_s)
    ref = series.reference_micro_per_mtok
    return Summary(
        model=series.model,
        reference_usd=ref / 1e6,
        mean_price_usd=sum(series.price) / n / 1e6,
        min_price_usd=min(series.price) / 1e6,
        max_price_usd=max(series.price) / 1e6,
        mean_paid_usd=sum(series.effective_price) / n / 1e6,
        at_ceiling=sum(1 for p in series.price if p == ref) / n,
        in_band=sum(1 for e in off if e <= config.dead_band) / n,
        near_band=sum(1 for e in off if e <= 3 * config.dead_band) / n,
        mean_served_u=sum(series.served_utilisation) / n,
        p95_queue_s=queue[int(0.95 * (n - 1))],
        max_effective_over_ceiling=max(series.effective_price) / ref,
        mean_hosts=sum(series.hosts) / n,
    )
