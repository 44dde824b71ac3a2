"""A request's needs against offers' capabilities: filtering and what a refusal names."""

from __future__ import annotations

from dataclasses import dataclass

from gpunexus.pricing.capabilities import Needs, lacking, unmet
from gpunexus.pricing.matching import Matcher, MatchPolicy
from gpunexus.protocol.messages import PLAIN_TEXT, Capabilities

JSON_LOGPROBS = Capabilities(json_mode=True, logprobs=True, top_logprobs=5, max_n=8)


@dataclass(frozen=True)
class Offer:
    peer_id: str
    capabilities: Capabilities = PLAIN_TEXT
    model: str = "m"
    price_micro_per_mtok: int = 100
    tokens_per_s: float = 50.0
    free_slots: int = 1


def test_lacking_names_each_need_as_a_client_asks_for_it():
    needs = Needs(tools=True, json_mode=True, logprobs=True, top_logprobs=6, n=9, penalties=True)
    assert lacking(JSON_LOGPROBS, needs) == ("tools", "top_logprobs=6", "n=9", "penalties")
    assert lacking(JSON_LOGPROBS, Needs(json_mode=True, top_logprobs=5, logprobs=True, n=8)) == ()
    assert lacking(PLAIN_TEXT, Needs()) == ()


def test_unmet_names_what_no_host_has_or_the_combination():
    caps = [PLAIN_TEXT, Capabilities(json_mode=True), Capabilities(logprobs=True)]
    assert unmet(caps, Needs(json_mode=True)) == ()
    assert unmet(caps, Needs(tools=True, json_mode=True)) == ("tools",)
    assert unmet(caps, Needs(json_mode=True, logprobs=True)) == ("json_mode", "logprobs")
    assert unmet([], Needs(tools=True)) == ("tools",)


def test_matching_never_returns_an_offer_lacking_a_need():
    offers = [Offer("plain", price_micro_per_mtok=1), Offer("capable", JSON_LOGPROBS, price_micro_per_mtok=5)]
    matcher = Matcher()
    assert [o.peer_id for o in matcher.rank(offers, "m", MatchPolicy(), 0.0)] == ["plain", "capable"]
    wanted = MatchPolicy(needs=Needs(json_mode=True))
    for _ in range(3):
        assert [o.peer_id for o in matcher.rank(offers, "m", wanted, 0.0)] == ["capable"]
    assert matcher.rank(offers, "m", MatchPolicy(needs=Needs(n=9)), 0.0) == []
