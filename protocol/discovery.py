"""Where offers travel: one gossip topic per model and shard, and the plan that sizes them.

One topic for every offer (``gpunexus/offers/1``) costs every peer about
3.6 KB/s per host in the network and saturates a typical peer's CPU at
about 1,400 hosts (``bench/discovery.py``). So offers travel on
``gpunexus/offers/2/<model>/<shard>`` instead:

* a host announces each model it serves on that model's topic in the shard
  of its own peer id, and a gateway follows, for each model it uses, the
  shard of *its* peer id: every gateway sees up to :data:`SHARD_HOSTS`
  hosts of a model (enough to route and fail over) and every host is seen
  by the gateways whose id falls in its shard, which spreads the gateways'
  traffic over all hosts;
* the shard count and the heartbeat follow the model's host count
  (:meth:`DiscoveryPlan.for_hosts`): one shard while a model has up to
  :data:`SHARD_HOSTS` hosts, then the next power of two, so a split moves
  each host either nowhere or to shard ``s + old count``; a heartbeat of
  3 s while a shard holds at most :data:`FAST_SHARD_HOSTS` hosts (a host
  that vanishes leaves every book within 10 s, as on the flat topic) and
  120 s above (offers live 360 s; a change of terms is announced at once,
  and a vanished host is found by the gateway's failed dial).

The plan comes from the hub's directory (``GET /v1/directory``: it counts
each model's live offers); a peer with no hub, or a model the directory
does not list yet, uses :data:`SMALL`, the one-shard, 3 s plan. Every peer
computes topics and shards with the functions here, so peers agree on them
whatever language they are written in: the shard is the first 8 bytes of
SHA-256 of the peer id's text, big-endian, modulo the shard count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .errors import ProtocolError

OFFER_TOPIC_PREFIX = "gpunexus/offers/2/"
SHARD_HOSTS = 32
"""Hosts per shard before a model's topic splits: what one gateway sees of a model."""
FAST_SHARD_HOSTS = 8
"""Largest shard that still refreshes every :data:`FAST_REFRESH_S`."""
FAST_REFRESH_S = 3.0
SLOW_REFRESH_S = 120.0
MAX_SHARDS = 1024


@dataclass(frozen=True, slots=True)
class DiscoveryPlan:
    """How a model's offers are spread: shard count, heartbeat and lifetime of an offer."""

    shards: int = 1
    refresh_s: float = FAST_REFRESH_S

    @property
    def ttl_s(self) -> float:
        """An offer outlives two missed heartbeats: 10 s at 3 s, 360 s at 120 s."""
        return 10.0 if self.refresh_s <= FAST_REFRESH_S else 3 * self.refresh_s

    @classmethod
    def for_hosts(cls, hosts: int) -> DiscoveryPlan:
        """The plan for a model with ``hosts`` live hosts."""
        shards = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(hosts / SHARD_HOSTS)))))
        shards = min(shards, MAX_SHARDS)
        per_shard = math.ceil(hosts / shards)
        return cls(shards, FAST_REFRESH_S if per_shard <= FAST_SHARD_HOSTS else SLOW_REFRESH_S)

    def check(self) -> None:
        if not (1 <= self.shards <= MAX_SHARDS and self.shards & (self.shards - 1) == 0):
            raise ProtocolError(f"a shard count must be a power of two up to {MAX_SHARDS}, not {self.shards}")
        if not FAST_REFRESH_S <= self.refresh_s <= 3600:
            raise ProtocolError(f"an offer heartbeat of {self.refresh_s} s is out of range")


SMALL = DiscoveryPlan()
"""A model nobody has counted: one shard, 3 s heartbeat."""


def shard_of(peer_id: str, shards: int) -> int:
    """The shard a peer belongs to among ``shards`` (a power of two)."""
    digest = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def offer_topic(model: str, shard: int = 0) -> str:
    """The topic carrying ``model``'s offers (and its hosts' withdrawals) in ``shard``."""
    return f"{OFFER_TOPIC_PREFIX}{model}/{shard}"


def parse_offer_topic(topic: str) -> tuple[str, int] | None:
    """``(model, shard)`` of an offer topic, or None for any other topic.

    Model names may hold slashes (``org/name``), so the shard is what
    follows the last one.
    """
    if not topic.startswith(OFFER_TOPIC_PREFIX):
        return None
    model, _, shard = topic[len(OFFER_TOPIC_PREFIX):].rpartition("/")
    if not model or not shard.isdigit():
        return None
    return model, int(shard)
