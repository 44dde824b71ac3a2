"""Bayesian reputation of a host from its audit results.

Two hypotheses about a host:

* honest: each audit fails with the verifier's measured false-positive rate
  ``fpr`` (take the 95% upper bound from ``bench/verify.py``, not the point
  estimate, so an honest host is never judged by too optimistic a rate);
* cheating: each audit fails with an unknown rate ``theta`` with a
  ``Beta(cheat_a, cheat_b)`` prior (default uniform: a host may cheat on any
  fraction of its requests).

After ``f`` failed and ``p`` passed audits the likelihoods are
``fpr**f * (1 - fpr)**p`` and the Beta-binomial ``B(a + f, b + p) / B(a, b)``;
``p_honest`` is the posterior probability of the first, from prior
``prior_honest``. One false flag drops a fresh honest host to a suspect (it is
then audited far more, ``audit_rate``), and every pass after it raises the
posterior again (after one failure, pass number p + 1 multiplies the odds by (p + 3) / (p + 1), against
(1 - fpr)), so an honest host recovers after a few dozen passes; a second
failure soon after is what a cheat looks like and excludes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["DEFAULT_MODEL", "Reputation", "ReputationModel", "audit_rate", "excluded"]


@dataclass(frozen=True)
class ReputationModel:
    fpr: float = 0.003  # per-audit false-positive rate of an honest host (95% upper bound)
    prior_honest: float = 0.9
    cheat_a: float = 1.0
    cheat_b: float = 1.0
    base_rate: float = 0.02  # audit rate of a host beyond suspicion
    max_rate: float = 1.0  # audit rate of a host certainly cheating (until excluded)
    exclude_below: float = 0.01  # p_honest under which a host is excluded from matching

    def __post_init__(self) -> None:
        if not 0 < self.fpr < 1 or not 0 < self.prior_honest < 1:
            raise ValueError("fpr and prior_honest must be in (0, 1)")
        if not 0 <= self.base_rate <= self.max_rate <= 1:
            raise ValueError("need 0 <= base_rate <= max_rate <= 1")


DEFAULT_MODEL = ReputationModel()


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


@dataclass(frozen=True)
class Reputation:
    """A host's audit record; immutable, ``record`` returns the updated one."""

    passes: int = 0
    fails: int = 0
    model: ReputationModel = DEFAULT_MODEL

    def record(self, passed: bool) -> Reputation:
        return replace(self, passes=self.passes + passed, fails=self.fails + (not passed))

    @property
    def p_honest(self) -> float:
        m, f, p = self.model, self.fails, self.passes
        log_h = math.log(m.prior_honest) + f * math.log(m.fpr) + p * math.log1p(-m.fpr)
        log_c = (
            math.log1p(-m.prior_honest)
            + _log_beta(m.cheat_a + f, m.cheat_b + p)
            - _log_beta(m.cheat_a, m.cheat_b)
        )
        # 1 / (1 + exp(log_c - log_h)) without overflow.
        d = log_c - log_h
        return 1 / (1 + math.exp(d)) if d < 700 else 0.0


def audit_rate(reputation: Reputation) -> float:
    """Fraction of this host's receipts to audit: ``base_rate`` for a trusted
    host, rising linearly with the posterior probability of cheating."""
    m = reputation.model
    return m.base_rate + (m.max_rate - m.base_rate) * (1 - reputation.p_honest)


def excluded(reputation: Reputation) -> bool:
    """Whether matching should skip this host (and its audited receipts go unpaid)."""
    return reputation.p_honest < reputation.model.exclude_below
