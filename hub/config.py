"""The hub's tunable policy, in one typed place."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpunexus.protocol.money import MICRO_PER_USD


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Market and settlement policy; every amount is integer micro-USD.

    ``allowance_grace_s``: an allowance's held budget is released this long
    after it expires, not at once, so that receipts a gateway queued while the
    hub was unreachable still settle from the budget they were served under.
    A receipt *issued* after its allowance expired is refused regardless.

    Market (see :mod:`gpunexus.hub.market`): prices are stepped every
    ``epoch_s``; ``reference_price_micro_per_mtok`` is the ceiling (the
    closed-API price the market must undercut) of every model not named in
    ``reference_prices`` (model -> micro-USD per million tokens). A receipt's
    price must be at most a price its host offered for the model between
    ``offer_lookback_s`` before the receipt was issued and ``clock_skew_s``
    after; an offer may live at most ``max_offer_ttl_s``.
    """

    fee_bps: int = 1000
    allowance_budget_micro: int = 2 * MICRO_PER_USD
    allowance_max_micro: int = 50 * MICRO_PER_USD
    allowance_ttl_s: float = 300.0
    allowance_grace_s: float = 900.0
    clock_skew_s: float = 60.0
    max_price_micro_per_mtok: int = 1000 * MICRO_PER_USD
    max_batch: int = 1000
    max_long_poll_s: float = 30.0
    """Longest a long poll (``GET /v1/revocations``) may ask the hub to wait."""
    rate_per_s: float = 20.0
    rate_burst: int = 100
    epoch_s: float = 60.0
    reference_price_micro_per_mtok: int = 600_000
    reference_prices: dict[str, int] = field(default_factory=dict)
    offer_lookback_s: float = 60.0
    max_offer_ttl_s: float = 600.0
    audit_rate: float = 0.05
    """Fraction of settled receipts audited; raised per host by ``verify.reputation.audit_rate``."""
    audit_period_s: float = 3600.0
    """Lifetime of one audit-selection secret (its commitment is public, then the secret)."""
    audit_root_grace_s: float = 300.0
    """How long after its period ends a host may still publish its receipt root; the
    period's secret is revealed, and receipts of hosts without a root are all
    selected, once it is over."""
    public_url: str = ""
    """The URL people reach the hub at (``hub serve --public-url``). When it is ``https://``, the
    dashboard's cookies are ``Secure`` (see :mod:`gpunexus.hub.web.auth`); empty: plain loopback HTTP."""
    hub_replay: bool = True
    """Audit receipts of models the hub has a reference for on the hub itself; False sends every
    audit to peer verifiers (``hub/peer_audit.py``)."""
    verifier_fee_micro: int = 100
    """What a peer verifier earns per answered job, paid from the platform fee."""
    known_answer_rate: float = 0.05
    """Share of peer audits that also send a job whose answer the hub knows (an altered opening)."""
    verifier_job_ttl_s: float = 300.0
    """How long a verifier has to answer a job before it is drawn again among the others."""
    verifier_seen_s: float = 120.0
    """A verifier is drawn only if it polled for jobs this recently."""
    verifier_min_p_honest: float = 0.5
    """Reputation (``p_honest``) a host needs to be drawn as a verifier."""
    challenge_accounts: frozenset[str] = frozenset()
    """Emails of the hub's own client accounts that send challenge requests through
    ordinary gateways (``gpunexus hub challenge``): every receipt they pay is audited."""

    def __post_init__(self) -> None:
        if not 0 <= self.fee_bps <= 10_000:
            raise ValueError("fee_bps must be in [0, 10000]")
        if self.epoch_s <= 0:
            raise ValueError("epoch_s must be > 0")
        if min([self.reference_price_micro_per_mtok, *self.reference_prices.values()]) < 1:
            raise ValueError("reference prices must be >= 1 micro-USD per million tokens")
        if not 0 <= self.audit_rate <= 1 or self.audit_period_s <= 0:
            raise ValueError("audit_rate must be in [0, 1] and audit_period_s > 0")
        if self.audit_root_grace_s < 0:
            raise ValueError("audit_root_grace_s must be >= 0")
        if self.verifier_fee_micro < 0 or not 0 <= self.known_answer_rate <= 1:
            raise ValueError("verifier_fee_micro must be >= 0 and known_answer_rate in [0, 1]")
        if self.verifier_job_ttl_s <= 0 or self.verifier_seen_s <= 0 or not 0 <= self.verifier_min_p_honest <= 1:
            raise ValueError("verifier_job_ttl_s and verifier_seen_s must be > 0, verifier_min_p_honest in [0, 1]")
        if self.offer_lookback_s < 0 or self.max_offer_ttl_s <= 0:
            raise ValueError("offer_lookback_s must be >= 0 and max_offer_ttl_s > 0")

    def reference_price(self, model: str) -> int:
        """The ceiling for ``model``: its override, else the default reference price."""
        return self.reference_prices.get(model, self.reference_price_micro_per_mtok)

    def fee(self, cost: int) -> int:
        """The platform's cut, rounded down: any rounding goes to the host."""
        return cost * self.fee_bps // 10_000
