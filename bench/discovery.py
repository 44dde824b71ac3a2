"""Discovery at scale: offer gossip at 100, 1,000 and 10,000 hosts, simulated.

Issue 13's goal: at 10,000 hosts a gateway spends <= 5 KB/s on discovery
and sees a new host's offer within 2 s (p99). This runs the discrete-event
simulation in ``bench/discovery_sim.py`` with

* the **real gossip parameters**, read from the code: mesh degree, D_low,
  D_high, heartbeat, gossip window/history and PX count from
  ``node.gossip.gossipsub_options()``, the seen-cache TTL from py-libp2p's
  ``Pubsub`` default (node/ does not override it), the re-announce interval
  and offer expiry from ``node.offers``;
* the **real message sizes**: a signed :class:`Offer` with realistic fields
  (an 8B model, two addresses with ``/p2p/`` ids, full capabilities), wrapped
  as py-libp2p sends it (an RPC with the pubsub-signed message, its key, and
  the signed peer record py-libp2p attaches to every RPC) plus varint, yamux
  header and Noise length and tag; IHAVE sizes the same way;
* the **real memory** of an offer in :class:`OfferBook`, an entry of
  py-libp2p's ``MessageCache`` and of the seen cache (tracemalloc).

Scenarios (one row each):

``flat``: before shards: one topic, every host and gateway in it, every
host re-announcing every 3 s. ``per-model``: one topic per model, a gateway
in the topics of the models it uses, same 3 s re-announce. ``shards``:
per-model topics split into shards of at most ``--shard-hosts`` hosts (a
host joins the shard of its peer id, a gateway one shard per model it uses),
an offer announced at once when it is new or changes (price, terms,
withdrawal: the 2 s path) and otherwise refreshed every ``--refresh``
seconds with an expiry of three refreshes. ``built``: what the peers run
(``protocol/discovery.py``): a power-of-two shard count from each model's
host count, a 3 s heartbeat for shards of at most 8 hosts and 120 s above,
and gateways as light gossip members (``node.net.gossip.LIGHT_DEGREE``).

Models are Zipf-distributed over ``--models`` (host share and gateway demand
alike), each host serves one, each gateway uses ``--models-per-gateway``;
per-model rows report the busiest case (a host of the top model, a gateway
using the top two), simulating those topics only.

    python bench/discovery.py [--gateways-per-host 0.5] [--seed 1]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # imported from a test: find discovery_sim next to us, shadowing nothing
    sys.path.append(_HERE)

from discovery_sim import GossipParams, TopicResult, WireSizes, simulate_topic  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerstore import create_signed_peer_record  # noqa: E402
from libp2p.pubsub.mcache import MessageCache  # noqa: E402
from libp2p.pubsub.pb import rpc_pb2  # noqa: E402
from libp2p.pubsub.pubsub import Pubsub  # noqa: E402
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX  # noqa: E402
from multiaddr import Multiaddr  # noqa: E402

from gpunexus.node.net.gossip import LIGHT_DEGREE, gossipsub_options  # noqa: E402
from gpunexus.node.net.offers import OfferBook  # noqa: E402
from gpunexus.protocol.discovery import SMALL, DiscoveryPlan, offer_topic  # noqa: E402
from gpunexus.protocol.messages import Capabilities, Offer  # noqa: E402
from gpunexus.protocol.signing import Signer  # noqa: E402

FLAT_TOPIC = "gpunexus/offers/1"
"""The one topic every offer travelled on before shards (the flat rows)."""
OFFER_INTERVAL = SMALL.refresh_s
GOAL_BPS = 5_000
GOAL_P99_S = 2.0
YAMUX_HEADER = 12
NOISE_OVERHEAD = 2 + 16  # length prefix, ChaCha20-Poly1305 tag
SIZES = (100, 1_000, 10_000)


def real_params() -> GossipParams:
    opts = gossipsub_options()
    return GossipParams(
        degree=opts["degree"],
        degree_low=opts["degree_low"],
        degree_high=opts["degree_high"],
        heartbeat_s=opts["heartbeat_interval"],
        gossip_window=opts["gossip_window"],
        gossip_history=opts["gossip_history"],
        seen_ttl_s=inspect.signature(Pubsub.__init__).parameters["seen_ttl"].default,
        px_peers=opts["px_peers_count"],
    )


def realistic_offer(signer: Signer, model: str = "meta-llama/Llama-3.1-8B-Instruct", now: float | None = None) -> Offer:
    now = time.time() if now is None else now
    return Offer(
        peer_id=signer.peer_id,
        model=model,
        model_hash=hashlib.sha256(model.encode()).hexdigest(),
        price_micro_per_mtok=180_000,
        tokens_per_s=1450.5,
        free_slots=12,
        max_slots=16,
        max_context=131_072,
        region="eu-west",
        license="llama3.1",
        follows_market=True,
        addrs=(f"/ip4/203.0.113.17/tcp/4001/p2p/{signer.peer_id}", f"/ip6/2001:db8::17/tcp/4001/p2p/{signer.peer_id}"),
        seq=time.time_ns() // 1_000_000,
        issued_at=now,
        expires_at=now + SMALL.ttl_s,
        capabilities=Capabilities(tools=True, json_mode=True, json_schema=True, logprobs=True, top_logprobs=5,
                                  max_n=4, penalties=True, logit_bias=True),
    ).signed(signer)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _framed(rpc: rpc_pb2.RPC) -> int:
    size = rpc.ByteSize()
    return _varint_len(size) + size + YAMUX_HEADER + NOISE_OVERHEAD


def _pubsub_message(signer: Signer, topic: str, data: bytes, seqno: int) -> tuple[rpc_pb2.Message, bytes]:
    keys = create_new_key_pair(signer.seed)
    msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=ID.from_pubkey(keys.public_key).to_bytes(),
                          seqno=seqno.to_bytes(8, "big"))
    msg.signature = keys.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = keys.public_key.serialize()
    record = create_signed_peer_record(
        ID.from_pubkey(keys.public_key), [Multiaddr("/ip4/203.0.113.17/tcp/4001"), Multiaddr("/ip6/2001:db8::17/tcp/4001")],
        keys.private_key,
    ).marshal_envelope()
    return msg, record


def measure_sizes(topic: str) -> WireSizes:
    signer = Signer.generate()
    msg, record = _pubsub_message(signer, topic, realistic_offer(signer).encode(), 1)
    message = _framed(rpc_pb2.RPC(publish=[msg], senderRecord=record))
    mid = msg.from_id + msg.seqno

    def ihave(ids: int) -> int:
        control = rpc_pb2.ControlMessage(ihave=[rpc_pb2.ControlIHave(topicID=topic, messageIDs=[mid] * ids)])
        return _framed(rpc_pb2.RPC(control=control, senderRecord=record))

    per_id = (ihave(101) - ihave(1)) / 100
    return WireSizes(message=message, ihave_base=round(ihave(1) - per_id), ihave_per_id=round(per_id))


@dataclass(frozen=True)
class MemoryCosts:
    book_per_offer: float
    mcache_per_message: float
    seen_per_id: float


def measure_memory(count: int = 300) -> MemoryCosts:
    """Bytes per offer in a real OfferBook, per message in MessageCache, per id in a seen cache."""
    signers = [Signer.generate() for _ in range(count)]
    offers = [realistic_offer(s) for s in signers]
    encoded = [o.encode() for o in offers]
    wires = [_pubsub_message(s, FLAT_TOPIC, e, i + 1)[0] for i, (s, e) in enumerate(zip(signers, encoded))]

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    book = OfferBook()
    from gpunexus.protocol.codec import decode

    for data in encoded:
        book.apply(decode(data))
    book_bytes = tracemalloc.get_traced_memory()[0] - base
    base = tracemalloc.get_traced_memory()[0]
    cache = MessageCache(3, 5)
    received = []
    for w in wires:
        copy = rpc_pb2.Message()
        copy.ParseFromString(w.SerializeToString())
        received.append(copy)
        cache.put(copy)
    mcache_bytes = tracemalloc.get_traced_memory()[0] - base
    base = tracemalloc.get_traced_memory()[0]
    seen = {w.from_id + w.seqno: 1_700_000_000 + i for i, w in enumerate(wires)}
    seen_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(book.live()) == count and len(seen) == count
    return MemoryCosts(book_bytes / count, mcache_bytes / count, seen_bytes / count)


def zipf_shares(models: int) -> list[float]:
    weights = [1 / k for k in range(1, models + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def use_probability(shares: list[float], picks: int) -> list[float]:
    """P(a gateway's ``picks`` distinct models, drawn by demand without replacement, include model k)."""
    if picks >= len(shares):
        return [1.0] * len(shares)
    # Exact for picks <= 2, which is what the table runs; a first-order bound beyond.
    if picks == 1:
        return list(shares)
    if picks == 2:
        return [s + sum(o * s / (1 - o) for j, o in enumerate(shares) if j != k) for k, s in enumerate(shares)]
    return [min(1.0, picks * s) for s in shares]


@dataclass
class Row:
    name: str
    hosts: int
    gateways: int
    gw_bps: float
    host_bps: float
    gw_memory: float
    host_memory: float
    t99_s: float
    gw_p99_s: float
    rho: float
    delivered: bool


def _memory(visible_offers: float, topic_rates: list[float], params: GossipParams, costs: MemoryCosts) -> float:
    rate = sum(topic_rates)
    return (visible_offers * costs.book_per_offer
            + rate * params.gossip_history * params.heartbeat_s * costs.mcache_per_message
            + rate * params.seen_ttl_s * costs.seen_per_id)


def _samples(n: int) -> int:
    return 4 if n > 5_000 else 8 if n > 500 else 24


def _topic(hosts: int, gateways: int, interval: float, params: GossipParams, sizes: WireSizes, seed: int,
           light: tuple[int, int] | None = None) -> TopicResult:
    n = hosts + gateways
    degree, connections = light if light is not None else (None, None)
    return simulate_topic(hosts=max(1, hosts), gateways=gateways, announce_interval_s=interval,
                          params=params, sizes=sizes, samples=_samples(n), seed=seed,
                          gateway_degree=degree, gateway_connections=connections)


def flat_row(hosts: int, gw_per_host: float, params: GossipParams, costs: MemoryCosts, seed: int) -> Row:
    gateways = max(10, round(hosts * gw_per_host))
    r = _topic(hosts, gateways, OFFER_INTERVAL, params, measure_sizes(FLAT_TOPIC), seed)
    mem = _memory(hosts, [r.rate_msgs_s], params, costs)
    return Row("flat topic, 3 s", hosts, gateways, r.gateway_in_bps + r.gateway_out_bps, r.host_in_bps + r.host_out_bps,
               mem, mem, r.t99_reach_s, r.gateway_p99_s, max(r.host_rho, r.gateway_rho), r.delivered_all)


def per_model_row(name: str, hosts: int, gw_per_host: float, models: int, picks: int, shard_hosts: int | None,
                  interval: float, params: GossipParams, costs: MemoryCosts, seed: int,
                  light: tuple[int, int] | None = None, change_every: float | None = None) -> Row:
    """The busiest host and gateway: the top model's topic (or shard), and the gateway's second model.

    With ``change_every`` the shard count and heartbeat of each model are the
    built ones (:meth:`DiscoveryPlan.for_hosts`, with a change of terms every
    ``change_every`` s on top of the heartbeat) and ``shard_hosts`` and
    ``interval`` are unused.
    """
    gateways = max(10, round(hosts * gw_per_host))
    shares = zipf_shares(models)
    use = use_probability(shares, picks)
    results: list[TopicResult] = []
    visible = []
    for k in range(min(picks, models)):
        model_hosts = max(1, round(hosts * shares[k]))
        topic_interval = interval
        if change_every is not None:
            plan = DiscoveryPlan.for_hosts(model_hosts)
            shards, topic_interval = plan.shards, 1 / (1 / plan.refresh_s + 1 / change_every)
        else:
            shards = 1 if shard_hosts is None else math.ceil(model_hosts / shard_hosts)
        topic_hosts = math.ceil(model_hosts / shards)
        topic_gateways = max(1, round(gateways * use[k] / shards))
        sizes = measure_sizes(offer_topic(f"model-{k}", shards - 1))
        results.append(_topic(topic_hosts, topic_gateways, topic_interval, params, sizes, seed + k, light))
        visible.append(topic_hosts)
    top = results[0]
    gw_bps = sum(r.gateway_in_bps + r.gateway_out_bps for r in results)
    host_bps = top.host_in_bps + top.host_out_bps
    gw_mem = _memory(sum(visible), [r.rate_msgs_s for r in results], params, costs)
    host_mem = _memory(visible[0], [top.rate_msgs_s], params, costs)
    return Row(name, hosts, gateways, gw_bps, host_bps, gw_mem, host_mem,
               top.t99_reach_s, max(r.gateway_p99_s for r in results),
               max(max(r.host_rho, r.gateway_rho) for r in results), all(r.delivered_all for r in results))


def _kb(bps: float) -> str:
    return f"{bps / 1000:,.1f}"


def _s(seconds: float) -> str:
    return "never (saturated)" if math.isinf(seconds) else f"{seconds:.2f}"


def print_table(rows: list[Row]) -> None:
    print("| scenario | hosts | gateways | gateway KB/s (in+out) | host KB/s | gateway memory | host memory "
          "| 99 % of topic reached, s | gateway p99, s | CPU/uplink load, median peer | goal met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = r.gw_bps <= GOAL_BPS and r.gw_p99_s <= GOAL_P99_S and r.delivered
        print(f"| {r.name} | {r.hosts:,} | {r.gateways:,} | {_kb(r.gw_bps)} | {_kb(r.host_bps)} "
              f"| {r.gw_memory / 1e6:.2f} MB | {r.host_memory / 1e6:.2f} MB | {_s(r.t99_s)} | {_s(r.gw_p99_s)} "
              f"| {r.rho:.0%} | {'yes' if ok else 'no'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways-per-host", type=float, default=0.5,
                        help="gateways in the network per host (default 0.5; at least 10 gateways)")
    parser.add_argument("--models", type=int, default=100, help="models on the market, Zipf-distributed (default 100)")
    parser.add_argument("--models-per-gateway", type=int, default=2, help="models one gateway uses (default 2)")
    parser.add_argument("--shard-hosts", type=int, default=32, help="most hosts in one shard topic (default 32)")
    parser.add_argument("--refresh", type=float, default=120.0,
                        help="seconds between refreshes of an unchanged offer in the sharded design (default 120)")
    parser.add_argument("--change-every", type=float, default=600.0,
                        help="mean seconds between changes of one host's offer (new, price, terms; default 600)")
    parser.add_argument("--gateway-degree", type=int, default=LIGHT_DEGREE["degree"],
                        help=f"mesh degree of a gateway in a shard topic (default {LIGHT_DEGREE['degree']}, a light gateway's)")
    parser.add_argument("--gateway-connections", type=int, default=LIGHT_DEGREE["degree_high"],
                        help=f"topic peers a gateway stays connected to in a shard (default {LIGHT_DEGREE['degree_high']})")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.gateways_per_host < 0 or args.models < 1 or args.models_per_gateway < 1 or args.shard_hosts < 1 \
            or args.refresh <= 0 or args.change_every <= 0 or args.gateway_degree < 1 \
            or args.gateway_connections < args.gateway_degree:
        parser.error("counts must be >= 1, the ratio >= 0, the intervals > 0, "
                     "gateway connections >= gateway degree")

    started = time.perf_counter()
    params = real_params()
    sizes = measure_sizes(FLAT_TOPIC)
    costs = measure_memory()
    print(f"gossip: D={params.degree} D_low={params.degree_low} D_high={params.degree_high} "
          f"heartbeat={params.heartbeat_s:g}s window={params.gossip_window} history={params.gossip_history} "
          f"seen_ttl={params.seen_ttl_s:g}s px={params.px_peers}; offers every {OFFER_INTERVAL:g}s, expire after {SMALL.ttl_s:g}s")
    print(f"wire: offer message {sizes.message} B, IHAVE {sizes.ihave_base} B + {sizes.ihave_per_id} B per id; "
          f"memory: {costs.book_per_offer:,.0f} B per book offer, {costs.mcache_per_message:,.0f} B per mcache message, "
          f"{costs.seen_per_id:,.0f} B per seen id")
    print()

    rows = [flat_row(n, args.gateways_per_host, params, costs, args.seed) for n in SIZES]
    per_host = rows[0].gw_bps / rows[0].hosts
    per_host_rho = rows[0].rho / rows[0].hosts
    rows.append(per_model_row("per-model topics, 3 s", SIZES[-1], args.gateways_per_host, args.models,
                              args.models_per_gateway, None, OFFER_INTERVAL, params, costs, args.seed))
    interval = 1 / (1 / args.refresh + 1 / args.change_every)
    shards = f"shards of {args.shard_hosts}, refresh {args.refresh:g} s"
    rows.append(per_model_row(shards, SIZES[-1], args.gateways_per_host, args.models, args.models_per_gateway,
                              args.shard_hosts, interval, params, costs, args.seed))
    light = (args.gateway_degree, args.gateway_connections)
    for n in SIZES:
        rows.append(per_model_row(f"built: shards by host count, 3 s / 120 s, light gateways (D={light[0]}, {light[1]} peers)",
                                  n, args.gateways_per_host, args.models, args.models_per_gateway, None,
                                  interval, params, costs, args.seed, light, change_every=args.change_every))
    print_table(rows)
    print()
    print(f"flat topic: a gateway spends ~{per_host:,.0f} B/s per host on the network (over {GOAL_BPS / 1000:g} KB/s "
          f"from {max(1, math.ceil(GOAL_BPS / per_host))} hosts on); a typical (median) peer's CPU or uplink saturates at "
          f"~{1 / per_host_rho:,.0f} hosts, after which offers never arrive on time.")
    print(f"shards: offers new or changed go out at once (the 2 s path); unchanged ones every {args.refresh:g} s "
          f"(effective {interval:.0f} s per host with a change every {args.change_every:g} s), expiring after "
          f"{3 * args.refresh:g} s.")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
