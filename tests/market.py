"""A whole paid market in one test: a real hub (SQLite file, HTTP), hosts and gateways."""

from __future__ import annotations

import functools
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from gpunexus.hub import keys
from gpunexus.hub.app import create_app, serve
from gpunexus.hub.service import Hub


@dataclass
class RunningHub:
    hub: Hub
    url: str

    def add_user(self, email: str, role: str, usd_micro: int = 0) -> str:
        _, key = self.hub.db.write_sync(keys.add_user, email, role)
        if usd_micro:
            self.hub.grant_sync(email, usd_micro, uuid.uuid4().hex)
        return key

    def balance(self, email: str) -> int:
        from gpunexus.hub import ledger

        user = self.hub.db.read_sync(keys.get_user, email)
        return self.hub.db.read_sync(ledger.balance, user.account_id)


@asynccontextmanager
async def running_hub(home, config=None):
    hub = Hub.open(str(home), config=config)
    app = create_app(hub)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, hub, app, host="127.0.0.1", port=0, shutdown_trigger=stop.wait))
        try:
            yield RunningHub(hub, binds[0])
        finally:
            stop.set()
