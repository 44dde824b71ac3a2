"""The discovery simulator (bench/discovery_sim.py) run small: its invariants, not its timings.

The figures in the README come from ``python bench/discovery.py``; these
tests check that the simulation they rest on delivers every offer, counts
every copy at both ends, reads the router's real parameters and measures
real messages.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = str(Path(__file__).resolve().parent.parent / "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)  # appended: bench/ modules must not shadow anything tests import

import discovery  # noqa: E402
from discovery_sim import LinkModel, simulate_topic  # noqa: E402

from gpunexus.node.net.gossip import gossipsub_options  # noqa: E402
from gpunexus.protocol.codec import decode  # noqa: E402
from gpunexus.protocol.discovery import SMALL  # noqa: E402
from gpunexus.protocol.messages import Offer  # noqa: E402
from gpunexus.protocol.signing import Signer  # noqa: E402


@pytest.fixture(scope="module")
def params():
    return discovery.real_params()


@pytest.fixture(scope="module")
def sizes():
    return discovery.measure_sizes(discovery.FLAT_TOPIC)


def test_parameters_come_from_the_router(params):
    opts = gossipsub_options()
    assert (params.degree, params.degree_low, params.degree_high) == (
        opts["degree"], opts["degree_low"], opts["degree_high"])
    assert params.heartbeat_s == opts["heartbeat_interval"]
    assert (params.gossip_window, params.gossip_history) == (opts["gossip_window"], opts["gossip_history"])
    assert params.px_peers == opts["px_peers_count"]


def test_sizes_are_those_of_a_real_signed_offer(sizes):
    offer = discovery.realistic_offer(Signer.generate())
    decoded = decode(offer.encode())
    assert isinstance(decoded, Offer)
    decoded.verify()
    assert decoded.expires_at - decoded.issued_at == SMALL.ttl_s
    # the pubsub envelope (signature, key, peer record) and the framing come on top of the offer
    assert sizes.message > len(offer.encode()) + 64
    assert sizes.ihave_per_id >= 38 + 8  # from_id (identity multihash of the Ed25519 key) + seqno


def test_every_offer_reaches_every_peer_and_copies_add_up(params, sizes):
    result = simulate_topic(hosts=50, gateways=10, announce_interval_s=3.0, params=params, sizes=sizes, samples=6)
    assert result.delivered_all
    assert result.copies_out == result.copies_in
    # each of the 59 other peers gets each of the 6 messages at least once
    assert result.copies_in >= 6 * 59
    assert result.host_in_bps > 0 and result.gateway_in_bps > 0
    assert math.isfinite(result.t99_reach_s) and math.isfinite(result.gateway_p99_s)
    assert not result.saturated


def test_a_tiny_topic_is_a_full_mesh(params, sizes):
    result = simulate_topic(hosts=3, gateways=1, announce_interval_s=3.0, params=params, sizes=sizes, samples=4)
    assert result.delivered_all
    # origin floods to the 3 others, each forwards to the 2 that are neither origin nor sender
    assert result.copies_out == result.copies_in == 4 * (3 + 3 * 2)


def test_light_gateways_receive_fewer_copies(params, sizes):
    full = simulate_topic(hosts=60, gateways=30, announce_interval_s=3.0, params=params, sizes=sizes, seed=2)
    light = simulate_topic(hosts=60, gateways=30, announce_interval_s=3.0, params=params, sizes=sizes, seed=2,
                           gateway_degree=2, gateway_connections=3)
    assert light.delivered_all
    assert light.gateway_in_bps < full.gateway_in_bps


def test_an_overloaded_topic_is_reported_saturated(params, sizes):
    slow = LinkModel(cpu_per_message_s=1.0)
    result = simulate_topic(hosts=30, gateways=5, announce_interval_s=3.0, params=params, sizes=sizes, link=slow)
    assert result.saturated
    assert math.isinf(result.t99_reach_s)


def test_bad_input_is_refused(params, sizes):
    with pytest.raises(ValueError):
        simulate_topic(hosts=0, gateways=1, announce_interval_s=3.0, params=params, sizes=sizes)
    with pytest.raises(SystemExit):
        discovery.main(["--shard-hosts", "0"])


def test_memory_per_offer_is_measured_on_a_real_book():
    costs = discovery.measure_memory(count=20)
    assert costs.book_per_offer > 300  # a decoded, signed offer with its addresses and capabilities
    assert costs.mcache_per_message > 0 and costs.seen_per_id > 0
