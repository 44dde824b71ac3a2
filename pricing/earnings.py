"""What a GPU would earn per hour on each model, so a host can pick models.

A host measures its own throughput per model (``gpunexus node check``): the
same GPU makes many more tokens/s on a small model than on a large one, so
the best-paid model per token is not always the best-paid per hour.

    earnings per GPU-hour = price × tokens/s × 3600 × expected utilisation / 10⁶

(price in micro-USD per million tokens, result in micro-USD, rounded down).
The expected utilisation is the one the host would see after joining:
``demand / (supply + own tokens/s)``, capped at 1. Using the market's current
utilisation instead would promise a newcomer a share of demand that its own
capacity dilutes, and would be undefined in a market with no supply yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


class QuoteLike(Protocol):
    """What ranking needs from a market quote (`market.PriceQuote` fits)."""

    @property
    def model(self) -> str: ...

    @property
    def price_micro_per_mtok(self) -> int: ...

    @property
    def demand_tps(self) -> float: ...

    @property
    def supply_tps(self) -> float: ...


@dataclass(frozen=True)
class ModelEarnings:
    model: str
    price_micro_per_mtok: int
    tokens_per_s: float
    expected_utilisation: float
    micro_usd_per_gpu_hour: int


def expected_utilisation(demand_tps: float, supply_tps: float, own_tps: float) -> float:
    """The busy fraction a host adding ``own_tps`` of capacity can expect."""
    if demand_tps < 0 or supply_tps < 0 or own_tps < 0:
        raise ValueError("rates must be >= 0")
    capacity = supply_tps + own_tps
    return min(1.0, demand_tps / capacity) if capacity > 0 else 0.0


def earnings_micro_per_gpu_hour(price_micro_per_mtok: int, tokens_per_s: float, utilisation: float) -> int:
    """Micro-USD one GPU earns in an hour at this price, throughput and load."""
    if price_micro_per_mtok < 0 or tokens_per_s < 0 or not 0 <= utilisation <= 1:
        raise ValueError("need price >= 0, tokens_per_s >= 0, 0 <= utilisation <= 1")
    return int(price_micro_per_mtok * tokens_per_s * 3600 * utilisation // 1_000_000)


def rank_models(quotes: Iterable[QuoteLike], measured_tps: Mapping[str, float]) -> list[ModelEarnings]:
    """Models this host can run, best earnings per GPU-hour first.

    ``measured_tps`` maps model to the tokens/s this GPU makes on it in total
    (all slots); models it has not measured are left out. Ties go by name so
    the order is stable.
    """
    ranked = []
    for quote in quotes:
        tps = measured_tps.get(quote.model)
        if tps is None:
            continue
        u = expected_utilisation(quote.demand_tps, quote.supply_tps, tps)
        ranked.append(
            ModelEarnings(
                model=quote.model,
                price_micro_per_mtok=quote.price_micro_per_mtok,
                tokens_per_s=tps,
                expected_utilisation=u,
                micro_usd_per_gpu_hour=earnings_micro_per_gpu_hour(quote.price_micro_per_mtok, tps, u),
            )
        )
    ranked.sort(key=lambda e: (-e.micro_usd_per_gpu_hour, e.model))
    return ranked
