"""The gateway's offer book: a host dropped for a dead connection stays out until it speaks again."""

from __future__ import annotations

import dataclasses

from gpunexus.node.net.offers import OfferBook
from gpunexus.protocol.messages import Offer
from gpunexus.protocol.signing import Signer

HOST = Signer(b"\x03" * 32)
NOW = 1_000_000.0


def offer(seq: int, **changes) -> Offer:
    base = Offer(peer_id=HOST.peer_id, model="tiny", model_hash="h", price_micro_per_mtok=200_000, tokens_per_s=50.0,
                 free_slots=2, max_slots=4, max_context=2048, region="", license="", follows_market=False,
                 addrs=("/ip4/127.0.0.1/tcp/4001",), seq=seq, issued_at=NOW, expires_at=NOW + 10)
    return dataclasses.replace(base, **changes).signed(HOST)


def test_dropped_host_refuses_stale_copies_and_returns_with_a_newer_offer() -> None:
    book = OfferBook(clock=lambda: NOW)
    last = offer(seq=5)
    assert book.apply(last)
    book.drop_host(HOST.peer_id)
    assert book.get(HOST.peer_id, "tiny") is None and book.for_model("tiny") == []
    # The dead host's last offer, relayed late by another peer, does not bring it back.
    assert not book.apply(offer(seq=5)) and not book.apply(offer(seq=4))
    assert book.for_model("tiny") == []
    # An offer issued after the drop does: the host is alive and announcing.
    assert book.apply(offer(seq=6))
    assert book.get(HOST.peer_id, "tiny").seq == 6


def test_get_is_the_live_offer_of_one_host_and_model() -> None:
    clock = [NOW]
    book = OfferBook(clock=lambda: clock[0])
    book.apply(offer(seq=1, free_slots=0))
    assert book.get(HOST.peer_id, "tiny").free_slots == 0
    assert book.get(HOST.peer_id, "other") is None
    clock[0] = NOW + 10  # expired
    assert book.get(HOST.peer_id, "tiny") is None
