"""Challenge requests: the hub's own traffic, indistinguishable from a client's.

Hosts could behave while audited if they could tell audits apart, so the hub
also sends requests of its own. They go through an ordinary gateway (a
``gpunexus node gateway`` with its own fresh peer identity, logged in with an
account listed in ``HubConfig.challenge_accounts``) over the OpenAI API, with
everyday prompts and sampling settings, so a host sees an order like any
other. Every receipt such an account pays is audited (``hub/honesty.py``).

The hub never imports the node: this module only speaks HTTP to the gateway.
"""

from __future__ import annotations

import random

import httpx
import trio

PROMPTS = (
    "Write a short note to a colleague about moving our meeting to Thursday.",
    "Summarise the plot of a heist film in three sentences.",
    "What are three tips for keeping houseplants alive?",
    "Explain what a hash table is to a new programmer.",
    "Suggest a name for a bakery that sells sourdough.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List five things to pack for a weekend hike.",
    "Give me a haiku about autumn rain.",
    "How do I reverse a list in Python?",
    "Draft a polite reminder about an unpaid invoice.",
)


def challenge_body(model: str, rng: random.Random) -> dict:
    """One ordinary-looking chat request (prompt, temperature, length vary as users' do)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.choice((16, 24, 32, 48, 64)),
        "temperature": rng.choice((0.0, 0.7, 0.7, 1.0)),
        "top_p": rng.choice((1.0, 1.0, 0.95)),
    }


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
