"""Discrete-event simulation of one gossipsub topic carrying offers.

The simulator behind ``bench/discovery.py``, kept apart so a test can run it
small and check its invariants. It knows nothing of libp2p or of our
messages: the caller passes the gossip parameters read from node/ and the
wire sizes measured on real encoded messages. It lives under bench/ rather
than pricing/ because it models the network, not the market, and its caller
needs node/ (pricing/ must not import node/).

Model (one topic; the caller combines topics):

* **Topology.** The mesh is a random graph of degree ``D`` (configuration
  model: self-loops and double edges dropped, so a few peers sit at D-1 or
  D-2, inside ``D_low..D_high`` as the heartbeat keeps them); each peer is
  also connected to topic peers outside its mesh up to ``px_peers`` in all
  (peer exchange hands out that many). Gateways may be given a smaller
  degree and fewer connections (light members). A topic smaller than
  ``D + 1`` is a full mesh.
* **Propagation of one message.** The origin floods it to every connected
  topic peer (our router's flood publish); every other peer forwards it on
  first receipt to its mesh minus the peer it came from and the origin
  (upstream ``_get_peers_to_send``; no IDONTWANT below 1 KiB). Lazy gossip:
  on each heartbeat a peer sends IHAVE with the ids of its last
  ``gossip_window`` heartbeats to ``max(6, 0.25 * non-mesh peers)`` non-mesh
  peers; a peer that lacks the message answers IWANT and gets it: a path that
  costs the wait for the heartbeat plus three one-way latencies. First
  arrival times are shortest paths over both kinds of edges (Dijkstra).
* **Delay per hop.** One-way latency between two peers placed at random on a
  ring (5 ms next door, 75 ms across the world), the sender's serialisation
  time on its uplink, the receiver's CPU per message, and, from the load the
  accounting finds, an M/D/1 queueing wait at the sender
  (``rho / (2 mu (1 - rho))``). A peer whose CPU or uplink is busier than
  100 % never catches up: the topic is *saturated* and delivery times are
  infinite.
* **Accounting.** Every copy sent is counted at its sender and its receiver
  (in == out over the network, a test checks it), and IHAVE/IWANT bytes on
  top. Averages over sampled origins are scaled by the topic's publish rate.

Sampling: a run propagates ``samples`` messages from random hosts through the
whole topic (every peer, every edge); per-peer figures are averaged over
them. At 15,000 peers one message is ~0.2 s of Python (heapq Dijkstra over
~240,000 edges), so a few samples per topic keep the 10,000-host table well
inside two minutes on one core.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GossipParams", "LinkModel", "TopicResult", "WireSizes", "simulate_topic"]


@dataclass(frozen=True)
class GossipParams:
    """The router's and the announcer's parameters (read from node/ by the caller)."""

    degree: int
    degree_low: int
    degree_high: int
    heartbeat_s: float
    gossip_window: int
    gossip_history: int
    seen_ttl_s: float
    px_peers: int
    lazy_min: int = 6
    """Upstream ``_get_adaptive_gossip_peers_count`` with adaptive gossip off: max(6, 0.25 * n)."""
    lazy_factor: float = 0.25


@dataclass(frozen=True)
class WireSizes:
    """Bytes on the wire, measured by the caller on real encoded messages."""

    message: int
    """One published offer: RPC protobuf + varint + yamux header + Noise length and tag."""
    ihave_base: int
    """An IHAVE RPC with no ids (framing, control, topic)."""
    ihave_per_id: int
    """Each message id in an IHAVE or IWANT (from_id + seqno, with its protobuf tag)."""


@dataclass(frozen=True)
class LinkModel:
    host_uplink_bps: float = 100e6 / 8
    gateway_uplink_bps: float = 20e6 / 8
    cpu_per_message_s: float = 270e-6
    """Handling one received copy; DESIGN.md measures ~3,700 small messages/s on one stream."""
    latency_min_s: float = 0.005
    latency_span_s: float = 0.070


@dataclass
class TopicResult:
    hosts: int
    gateways: int
    rate_msgs_s: float
    host_in_bps: float
    host_out_bps: float
    gateway_in_bps: float
    gateway_out_bps: float
    host_rho: float
    gateway_rho: float
    t99_reach_s: float
    """Median over sampled messages of the time until 99 % of the topic's peers have it."""
    gateway_p99_s: float
    """99th percentile, over sampled messages and gateways, of a gateway's first receipt."""
    delivered_all: bool
    copies_out: float
    copies_in: float
    """Copies sent and received over the whole topic, summed over the samples (equal)."""

    @property
    def saturated(self) -> bool:
        return max(self.host_rho, self.gateway_rho) >= 1.0


@dataclass
class _Graph:
    n: int
    mesh: list[np.ndarray]
    other: list[np.ndarray]
    """Connected topic peers outside the mesh."""
    angle: np.ndarray


def _random_edges(rng: np.random.Generator, degrees: np.ndarray) -> set[tuple[int, int]]:
    stubs = np.repeat(np.arange(len(degrees)), degrees)
    rng.shuffle(stubs)
    pairs = stubs[: len(stubs) // 2 * 2].reshape(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    return set(map(tuple, np.unique(pairs, axis=0).tolist()))


def _build_graph(rng: np.random.Generator, n: int, mesh_degree: np.ndarray, connections: np.ndarray) -> _Graph:
    if n <= int(mesh_degree.max()) + 1:
        mesh_edges = {(a, b) for a in range(n) for b in range(a + 1, n)}
        other_edges: set[tuple[int, int]] = set()
    else:
        mesh_edges = _random_edges(rng, mesh_degree)
        extra = np.maximum(np.minimum(connections, n - 1) - mesh_degree, 0)
        other_edges = _random_edges(rng, extra) - mesh_edges if extra.any() else set()
    mesh: list[list[int]] = [[] for _ in range(n)]
    other: list[list[int]] = [[] for _ in range(n)]
    for a, b in mesh_edges:
        mesh[a].append(b)
        mesh[b].append(a)
    for a, b in other_edges:
        other[a].append(b)
        other[b].append(a)
    return _Graph(
        n=n,
        mesh=[np.array(m, dtype=np.int64) for m in mesh],
        other=[np.array(o, dtype=np.int64) for o in other],
        angle=rng.uniform(0, 2 * math.pi, n),
    )


def _latency(g: _Graph, link: LinkModel, u: int, vs: np.ndarray) -> np.ndarray:
    d = np.abs(g.angle[vs] - g.angle[u])
    d = np.minimum(d, 2 * math.pi - d) / math.pi
    return link.latency_min_s + link.latency_span_s * d


def _lazy_count(params: GossipParams, non_mesh: int) -> int:
    return min(non_mesh, max(params.lazy_min, int(params.lazy_factor * non_mesh)))


def _mdl_wait(rho: np.ndarray, service_s: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        wait = np.where(rho < 1.0, rho * service_s / (2 * (1 - rho)), np.inf)
    return wait


def _propagate(
    g: _Graph, params: GossipParams, rng: np.random.Generator, origin: int, hop_cost: np.ndarray,
    link: LinkModel,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First arrival time, predecessor and 'came by IWANT' for one message from ``origin``."""
    n = g.n
    arrival = np.full(n, np.inf)
    pred = np.full(n, -1, dtype=np.int64)
    lazy = np.zeros(n, dtype=bool)
    arrival[origin] = 0.0
    heap = [(0.0, origin)]
    done = np.zeros(n, dtype=bool)
    while heap:
        t, u = heapq.heappop(heap)
        if done[u]:
            continue
        done[u] = True
        cost = hop_cost[u]
        if u == origin:
            eager = np.concatenate([g.mesh[u], g.other[u]])
            lazy_to = np.empty(0, dtype=np.int64)
        else:
            eager = g.mesh[u]
            others = g.other[u]
            k = _lazy_count(params, len(others))
            lazy_to = rng.choice(others, size=k, replace=False) if k else others[:0]
        if len(eager):
            times = t + cost + _latency(g, link, u, eager)
            better = times < arrival[eager]
            for v, tv in zip(eager[better].tolist(), times[better].tolist()):
                arrival[v] = tv
                pred[v] = u
                lazy[v] = False
                heapq.heappush(heap, (tv, v))
        if len(lazy_to):
            lat = _latency(g, link, u, lazy_to)
            times = t + rng.uniform(0, params.heartbeat_s, len(lazy_to)) + 3 * lat + cost
            better = times < arrival[lazy_to]
            for v, tv in zip(lazy_to[better].tolist(), times[better].tolist()):
                arrival[v] = tv
                pred[v] = u
                lazy[v] = True
                heapq.heappush(heap, (tv, v))
    return arrival, pred, lazy


def _count_copies(g: _Graph, origin: int, pred: np.ndarray, lazy: np.ndarray, reached: np.ndarray):
    """Copies each peer sends and receives for one message (eager and IWANT-fetched)."""
    out = np.zeros(g.n)
    inn = np.zeros(g.n)
    for u in range(g.n):
        if not reached[u]:
            continue
        if u == origin:
            targets = np.concatenate([g.mesh[u], g.other[u]])
        else:
            m = g.mesh[u]
            targets = m[(m != pred[u]) & (m != origin)]
        out[u] += len(targets)
        np.add.at(inn, targets, 1)
    fetched = np.flatnonzero(lazy & reached)
    np.add.at(out, pred[fetched], 1)
    inn[fetched] += 1
    return out, inn


def simulate_topic(
    *,
    hosts: int,
    gateways: int,
    announce_interval_s: float,
    params: GossipParams,
    sizes: WireSizes,
    link: LinkModel = LinkModel(),
    samples: int = 8,
    seed: int = 1,
    gateway_degree: int | None = None,
    gateway_connections: int | None = None,
) -> TopicResult:
    """Simulate one topic with ``hosts`` publishers and ``gateways`` listeners.

    ``gateway_degree`` and ``gateway_connections`` (default: the hosts'
    ``degree`` and ``px_peers``) make gateways lighter members: a gateway
    router built with a smaller D keeps fewer mesh links, and one that asks
    for fewer PX peers keeps fewer connections in the topic.
    """
    if hosts < 1 or gateways < 0 or announce_interval_s <= 0 or samples < 1:
        raise ValueError("need at least one host, gateways >= 0, a positive interval and one sample")
    rng = np.random.default_rng(seed)
    n = hosts + gateways
    is_gw = np.arange(n) >= hosts
    mesh_degree = np.where(is_gw, params.degree if gateway_degree is None else gateway_degree, params.degree)
    connections = np.where(is_gw, params.px_peers if gateway_connections is None else gateway_connections,
                           params.px_peers)
    g = _build_graph(rng, n, mesh_degree, np.maximum(connections, mesh_degree))
    rate = hosts / announce_interval_s
    uplink = np.where(is_gw, link.gateway_uplink_bps, link.host_uplink_bps)
    tx = sizes.message / uplink
    origins = rng.integers(0, hosts, samples)

    # Pass 1: unloaded delays, to count the copies each peer handles.
    unloaded = tx + link.cpu_per_message_s
    out_sum = np.zeros(n)
    in_sum = np.zeros(n)
    delivered = True
    for origin in origins:
        arrival, pred, lazy = _propagate(g, params, rng, int(origin), unloaded, link)
        reached = np.isfinite(arrival)
        delivered &= bool(reached.all())
        out, inn = _count_copies(g, int(origin), pred, lazy, reached)
        out_sum += out
        in_sum += inn
    copies_out = float(out_sum.sum())
    copies_in = float(in_sum.sum())
    out_per_msg = out_sum / samples
    in_per_msg = in_sum / samples

    # Lazy gossip: an IHAVE per heartbeat to each chosen non-mesh peer, when the window is not empty.
    non_mesh = np.array([len(o) for o in g.other])
    lazy_peers = np.array([_lazy_count(params, k) for k in non_mesh], dtype=float)
    window_ids = rate * params.gossip_window * params.heartbeat_s
    ihave_bytes = (1 - math.exp(-window_ids)) * sizes.ihave_base + window_ids * sizes.ihave_per_id
    ihave_out = lazy_peers * ihave_bytes / params.heartbeat_s
    ihave_in = np.zeros(n)
    for u in range(n):
        if non_mesh[u]:
            ihave_in[g.other[u]] += ihave_out[u] / non_mesh[u]

    out_bps = out_per_msg * rate * sizes.message + ihave_out
    in_bps = in_per_msg * rate * sizes.message + ihave_in
    service = np.full(n, link.cpu_per_message_s)
    rho = np.maximum(in_per_msg * rate * link.cpu_per_message_s, out_bps / uplink)

    # Pass 2: delays under that load.
    t99s: list[float] = []
    gw_arrivals: list[np.ndarray] = []
    if np.median(rho) < 1.0:  # the odd overloaded peer only costs paths through it (infinite wait)
        loaded = tx + link.cpu_per_message_s + _mdl_wait(rho, np.maximum(service, tx))
        for origin in origins:
            arrival, _, _ = _propagate(g, params, rng, int(origin), loaded, link)
            others = np.delete(arrival, int(origin))
            t99s.append(float(np.quantile(others, 0.99)))
            gw_arrivals.append(arrival[is_gw])
    t99 = float(np.median(t99s)) if t99s else math.inf
    gw_all = np.concatenate(gw_arrivals) if gw_arrivals else np.empty(0)
    gw_p99 = float(np.quantile(gw_all, 0.99)) if len(gw_all) and t99s else (math.inf if gateways else 0.0)

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else 0.0

    return TopicResult(
        hosts=hosts,
        gateways=gateways,
        rate_msgs_s=rate,
        host_in_bps=mean(in_bps, ~is_gw),
        host_out_bps=mean(out_bps, ~is_gw),
        gateway_in_bps=mean(in_bps, is_gw),
        gateway_out_bps=mean(out_bps, is_gw),
        host_rho=float(np.median(rho[~is_gw])),
        gateway_rho=float(np.median(rho[is_gw])) if gateways else 0.0,
        t99_reach_s=t99,
        gateway_p99_s=gw_p99,
        delivered_all=delivered,
        copies_out=copies_out,
        copies_in=copies_in,
    )
