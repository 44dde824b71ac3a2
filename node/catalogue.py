"""The hub's model catalogue as a gateway shows it: each model's licence and availability on ``/v1/models``.

A host names its model's licence in its offer; the hub's operator keeps the
catalogue (``GET /v1/catalogue``), which is the market's word on it. A
gateway with a hub fetches the catalogue every ``interval`` seconds and
shows the catalogue's licence (and whether the model is switched off) where
it has an entry, the host's claim elsewhere. Advisory only: what a key may
use is decided by the hub-signed allowance (``refused_models``), not by this
copy.
"""

from __future__ import annotations

import logging

import httpx
import trio

log = logging.getLogger(__name__)

CATALOGUE_POLL_S = 60.0


class CatalogueView:
    """The latest catalogue entries by model id (empty until the first fetch, or without a hub)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def describe(self, model: str) -> dict:
        """The ``/v1/models`` fields the catalogue sets for ``model`` (none if it has no entry)."""
        entry = self.entries.get(model)
        if entry is None:
            return {}
        licence = entry.get("licence_name") or entry.get("licence_url") or ""
        return {"license": licence, "license_url": entry.get("licence_url") or None, "display_name": entry.get("display_name"),
                "licence_must_be_accepted": bool(entry.get("licence_ack")), "available": bool(entry.get("available", True))}

    async def follow(self, hub_url: str, *, interval: float = CATALOGUE_POLL_S,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with httpx.AsyncClient(base_url=hub_url.rstrip("/"), timeout=10.0) as http:
            while True:
                try:
                    answer = await http.get("/v1/catalogue")
                    models = answer.json().get("models") if answer.status_code == 200 else None
                    if isinstance(models, list):
                        self.entries = {m["model"]: m for m in models if isinstance(m, dict) and isinstance(m.get("model"), str)}
                except (httpx.HTTPError, ValueError, AttributeError) as exc:
                    log.debug("no catalogue from the hub this time: %s", exc)
                await trio.sleep(interval)
