"""``gpunexus demo``: a whole market in one process, on embedded defaults.

A hub (SQLite in a temporary folder, manual-credits mode), a host serving the
reference model and a gateway bootstrapped to it, all on loopback with
throwaway identities and nothing from outside. It prints the base URL and a
client API key with credits for the official ``openai`` SDK; requests are
paid, receipts settled and the host's earnings grow, as in production. It
also prints the hub's dashboard URL and a demo login (a fresh password per
run) for the client, the host and an operator account.
"""

from __future__ import annotations

import argparse
import functools
import logging
import secrets
import sys
import tempfile
import time
import uuid

import httpx
import trio

log = logging.getLogger("gpunexus.demo")

DEMO_CREDITS_MICRO = 5_000_000
DEMO_PRICE_MICRO = 200_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a hub, a host and a gateway in one process", description="Run a hub, a host (reference model) and a gateway in one process on loopback, and print the base URL and an API key (with 5 USD of demo credits) for the openai SDK.")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--model", default="tiny", help="reference model to serve (default tiny)")
    p.add_argument("--once", action="store_true", help="send one chat request through the gateway, print the answer and the bill, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gpunexus-demo-") as home:
        return trio.run(_main, args, home)


async def _main(args: argparse.Namespace, home: str) -> int:
    from gpunexus.hub import accounts, keys
    from gpunexus.hub.app import create_app, serve
    from gpunexus.hub.service import Hub
    from gpunexus.node.backends.reference import ReferenceBackend
    from gpunexus.node.net.p2p import P2PConfig
    from gpunexus.node.runtime import GatewayOptions, HostOptions, HubLogin, open_gateway, open_host

    backend = ReferenceBackend(args.model)
    print(f"measuring the {args.model} reference model on this CPU...", file=sys.stderr)
    tokens_per_s = await trio.to_thread.run_sync(backend.measure_tokens_per_s)
    hub = Hub.open(home)
    _, client_key = hub.db.write_sync(keys.add_user, "client@demo.local", "client")
    _, host_key = hub.db.write_sync(keys.add_user, "host@demo.local", "host")
    hub.grant_sync("client@demo.local", DEMO_CREDITS_MICRO, uuid.uuid4().hex)
    demo_password = "demo-" + secrets.token_hex(6)
    hub.db.write_sync(keys.create_user, "admin@demo.local", "admin")
    encoded = accounts.hash_password(demo_password)
    for email in ("client@demo.local", "host@demo.local", "admin@demo.local"):
        hub.db.write_sync(accounts.set_password, hub.db.read_sync(keys.get_user, email).id, encoded, time.time())
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, hub, create_app(hub), host="127.0.0.1", port=0, shutdown_trigger=stop.wait))
        hub_url = binds[0]
        host_options = HostOptions(backend=backend, price_micro_per_mtok=DEMO_PRICE_MICRO, tokens_per_s=tokens_per_s, home=home, hub=HubLogin(hub_url, host_key))
        async with open_host(host_options) as host:
            addr = host.node.listen_addrs()[0]
            gateway_options = GatewayOptions(port=args.port, p2p=P2PConfig(bootstrap=[addr]), home=home, hub=HubLogin(hub_url, client_key))
            async with open_gateway(gateway_options) as gateway:
                with trio.fail_after(30):
                    while not gateway.book.for_model(backend.info.name):
                        await gateway.book.changed.wait()
                print(f"hub:       {hub_url} (manual credits; client has 5.00 USD)")
                print(f"dashboard: {hub_url}/ (log in as client@demo.local, host@demo.local or admin@demo.local, "
                      f"password {demo_password})")
                print(f"host:      {addr} ({backend.info.name}, {tokens_per_s:.0f} tokens/s, 0.20 USD/Mtok)")
                print(f"base_url:  {gateway.base_url}")
                print(f"api_key:   {client_key}")
                print(f"model:     {backend.info.name}")
                if args.once:
                    code = await _one_request(gateway.base_url, client_key, backend.info.name)
                    await gateway.service.settlement.flush()
                    earnings = await host.hub.earnings()
                    print(f"host earned: {earnings['amount_micro']} micro-USD over {earnings['requests']} settled request(s)")
                    stop.set()
                    return code
                print("\nTry it:\n"
                      f"  from openai import OpenAI\n"
                      f"  client = OpenAI(base_url=\"{gateway.base_url}\", api_key=\"{client_key}\")\n"
                      f"  client.chat.completions.create(model=\"{backend.info.name}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}])\n"
                      "Ctrl-C to stop.", flush=True)
                await trio.sleep_forever()
    return 0


async def _one_request(base_url: str, api_key: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello, market!"}], "max_tokens": 32}
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {api_key}"})
    if r.status_code != 200:
        print(f"request failed: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    data = r.json()
    print(f"reply:     {data['choices'][0]['message']['content']!r}")
    print(f"usage:     {data['usage']}")
    return 0
