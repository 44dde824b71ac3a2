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
CATALOGUE_TIMEOUT_S = 5.0


def entries_of(answer: httpx.Response) -> dict[str, dict] | None:
    """``GET /v1/catalogue``'s entries by model id; None when the answer is not a catalogue."""
    try:
        models = answer.json().get("models") if answer.status_code == 200 else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(models, list):
        return None
    return {m["model"]: m for m in models if isinstance(m, dict) and isinstance(m.get("model"), str)}


def fetch_catalogue(hub: str, *, timeout_s: float = CATALOGUE_TIMEOUT_S) -> dict[str, dict]:
    """The hub's catalogue once, for ``node check`` and ``node serve``; ``{}`` when it cannot be had (the check reports the hub itself)."""
    try:
        return entries_of(httpx.get(f"{hub.rstrip('/')}/v1/catalogue", timeout=timeout_s)) or {}
    except httpx.HTTPError:
        return {}


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
                    entries = entries_of(await http.get("/v1/catalogue"))
                except httpx.HTTPError as exc:
                    log.debug("no catalogue from the hub this time: %s", exc)
                else:
                    if entries is not None:
                        self.entries = entries
                await trio.sleep(interval)
