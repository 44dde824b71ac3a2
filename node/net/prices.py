"""Market prices on the wire: the hub's signed PriceUpdates, as peers see them.

The hub stays a plain HTTP service (several hub processes can share one
database behind a load balancer, none of them a libp2p peer): it signs a
``PriceUpdate`` per model each epoch and serves them at ``GET /v1/prices``.
Any peer configured with that hub fetches them and republishes them on
``gpunexus/prices/1``; because they carry the hub's signature, relaying needs
no trust in the relay. A peer accepts only updates signed by the hub it is
configured with, and only a newer epoch than the one it holds, so a replayed
old price cannot move the market.
"""

from __future__ import annotations

import logging

import httpx
import trio

from gpunexus.protocol.codec import decode
from gpunexus.protocol.errors import ProtocolError
from gpunexus.protocol.messages import PRICES_TOPIC, PriceUpdate

from ..hub_client import HubRefused, HubUnavailable, fetch_prices

log = logging.getLogger(__name__)


class PriceBook:
    """The latest trusted market price per model."""

    def __init__(self, trusted_hubs: set[str] | None = None) -> None:
        self.trusted_hubs = set(trusted_hubs or ())
        self._prices: dict[str, PriceUpdate] = {}
        self.changed = trio.Event()

    def apply(self, update: PriceUpdate) -> bool:
        """Verify and keep ``update`` if it is from a trusted hub and newer; True if kept."""
        if update.hub_id not in self.trusted_hubs:
            return False
        update.verify()
        current = self._prices.get(update.model)
        if current is not None and current.epoch >= update.epoch:
            return False
        self._prices[update.model] = update
        self.changed.set()
        self.changed = trio.Event()
        return True

    def get(self, model: str) -> PriceUpdate | None:
        return self._prices.get(model)

    def all(self) -> list[PriceUpdate]:
        return sorted(self._prices.values(), key=lambda u: u.model)


async def follow_prices(pubsub, book: PriceBook, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Feed price updates seen on the prices topic into ``book``."""
    subscription = await pubsub.subscribe(PRICES_TOPIC)
    task_status.started()
    while True:
        envelope = await subscription.get()
        try:
            msg = decode(envelope.data)
            if not isinstance(msg, PriceUpdate):
                raise ProtocolError(f"{msg.TYPE} does not belong on {PRICES_TOPIC}")
            book.apply(msg)
        except ProtocolError as exc:
            log.debug("dropped a price-topic message: %s", exc)


PRICE_POLL_INTERVAL = 15.0


async def relay_hub_prices(hub_url: str, pubsub, book: PriceBook, *, interval: float = PRICE_POLL_INTERVAL) -> None:
    """Fetch the hub's signed prices and republish the new ones on the prices topic.

    The hub we fetch from becomes trusted by ``book``; anything that fails
    (hub away, bad answer) waits for the next poll: prices are advisory and
    the market keeps trading at the last ones.
    """
    async with httpx.AsyncClient(base_url=hub_url.rstrip("/")) as http:
        while True:
            try:
                hub_id, updates = await fetch_prices(http)
                book.trusted_hubs.add(hub_id)
                for update in updates:
                    if book.apply(update):
                        await pubsub.publish(PRICES_TOPIC, update.encode())
            except (HubUnavailable, HubRefused, ProtocolError) as exc:
                log.info("no prices from the hub this time: %s", exc)
            await trio.sleep(interval)
