"""Challenge requests: the hub's own traffic, indistinguishable from a client's.

Hosts could behave while audited if they could tell audits apart, so the hub
also sends requests of its own. They go through an ordinary gateway (a
``gpunexus node gateway`` with its own fresh peer identity, logged in with an
account listed in ``HubConfig.challenge_accounts``) over the OpenAI API, with
everyday prompts and sampling settings, so a host sees an order like any
other. Every receipt such an account pays is audited (``hub/honesty.py``).

The hub never imports the node: this module only speaks HTTP to the gateway.
The request bodies come from :mod:`gpunexus.verify.challenges`, which the
scheduled challenger (``gpunexus hub challenger``, node/gateway/challenger.py) draws
from too.
"""

from __future__ import annotations

import random

import httpx
import trio

from gpunexus.verify.challenges import challenge_body


async def send_challenges(base_url: str, api_key: str, model: str, count: int, *, interval_s: float = 0.0,
                          rng: random.Random | None = None, timeout_s: float = 120.0) -> list[int]:
    """Send ``count`` challenge requests through the gateway at ``base_url``; their HTTP statuses."""
    rng = rng or random.Random()
    statuses = []
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                 headers={"authorization": f"Bearer {api_key}"}) as http:
        for i in range(count):
            if i and interval_s:
                await trio.sleep(rng.uniform(0.5, 1.5) * interval_s)  # no fixed rhythm to spot
            try:
                r = await http.post("/chat/completions", json=challenge_body(model, rng))
                statuses.append(r.status_code)
            except httpx.HTTPError:
                statuses.append(0)
    return statuses
