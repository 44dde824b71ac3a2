"""The hub's tunable policy, in one typed place."""

from __future__ import annotations

from dataclasses import dataclass

from gpunexus.protocol.money import MICRO_PER_USD


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Market and settlement policy; every amount is integer micro-USD.

    ``allowance_grace_s``: an allowance's held budget is released this long
    after it expires, not at once, so that receipts a gateway queued while the
    hub was unreachable still settle from the budget they were served under.
    A receipt *issued* after its allowance expired is refused regardless.
    """

    fee_bps: int = 1000
    allowance_budget_micro: int = 2 * MICRO_PER_USD
    allowance_max_micro: int = 50 * MICRO_PER_USD
    allowance_ttl_s: float = 300.0
    allowance_grace_s: float = 900.0
    clock_skew_s: float = 60.0
    max_price_micro_per_mtok: int = 1000 * MICRO_PER_USD
    max_batch: int = 1000
    rate_per_s: float = 20.0
    rate_burst: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.fee_bps <= 10_000:
            raise ValueError("fee_bps must be in [0, 10000]")

    def fee(self, cost: int) -> int:
        """The platform's cut, rounded down: any rounding goes to the host."""
        return cost * self.fee_bps // 10_000
