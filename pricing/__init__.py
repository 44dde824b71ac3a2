"""Market logic: prices from supply and demand, and which host serves a request.

Pure code, no I/O and no clock: every function takes what it needs (epoch
observations, ``now``) and returns values, so the hub, the gateway, the bench
and the tests all run the same thing.

- `capabilities`: a request's needs against an offer's capabilities.
- `matching`: rank a gateway's offers for one request (filters, cheapest
  first, round-robin among equals, back-off, reputation exclusion).
- `estimators`: demand (median-prefiltered EWMA) and supply (per-host
  presence EWMA) per model, one observation per epoch.
- `controller`: the control law, one bounded multiplicative step per epoch
  toward a target utilisation, between the hosts' floor and a reference
  ceiling. Its docstring states the law, its parameters and why.
- `market`: `MarketBook`, per-model state stepped once per epoch into
  `PriceQuote`s for the hub to sign and publish.
- `earnings`: what a GPU earns per hour on each model, for hosts choosing.
- `simulation`: a seeded closed-loop market shared by ``bench/market_sim.py``
  and the tests.

Money is integer micro-USD (prices in micro-USD per million tokens); rates
(tokens/s, utilisation) are floats and never become money without rounding
to an integer first.
"""

from .capabilities import Needs, lacking, unmet
from .controller import ControllerConfig, next_price, utilisation
from .earnings import ModelEarnings, earnings_micro_per_gpu_hour, expected_utilisation, rank_models
from .estimators import DemandConfig, DemandEstimator, HostSupply, SupplyConfig, SupplyEstimator
from .market import EpochObservation, MarketBook, MarketConfig, PriceQuote
from .matching import Matcher, MatchPolicy, OfferLike

__all__ = [
    "ControllerConfig",
    "DemandConfig",
    "DemandEstimator",
    "EpochObservation",
    "HostSupply",
    "MarketBook",
    "MarketConfig",
    "MatchPolicy",
    "Needs",
    "Matcher",
    "ModelEarnings",
    "OfferLike",
    "PriceQuote",
    "SupplyConfig",
    "SupplyEstimator",
    "earnings_micro_per_gpu_hour",
    "expected_utilisation",
    "lacking",
    "next_price",
    "rank_models",
    "unmet",
    "utilisation",
]
