"""gpunexus: a peer-to-peer market for LLM inference.

The architecture lives in the repository's top-level folders, installed as
subpackages of this one: ``gpunexus.protocol`` (wire vocabulary),
``gpunexus.pricing`` (market logic), ``gpunexus.verify`` (honesty),
``gpunexus.node`` (libp2p peers) and ``gpunexus.hub`` (money and pages).
``gpunexus.http_drain`` (keep-alive draining) and ``gpunexus.usage``
(port and bind checks at start-up) are plumbing the hub and the node share
(neither owns it, since they never import each other).
"""

__version__ = "0.1.0"
