"""``gpunexus demo``: a whole market in one process, on embedded defaults.

A host serving the reference model and a gateway bootstrapped to it, on
loopback, with throwaway identities, nothing from outside. It prints the
base URL and an API key for the official ``openai`` SDK.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

import httpx
import trio

log = logging.getLogger("gpunexus.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a host and a gateway in one process", description="Run a host (reference model) and a gateway in one process on loopback, and print the base URL and API key for the openai SDK.")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--model", default="tiny", help="reference model to serve (default tiny)")
    p.add_argument("--once", action="store_true", help="send one chat request through the gateway, print the answer and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return trio.run(_main, args)


async def _main(args: argparse.Namespace) -> int:
    from gpunexus.node.backends.reference import ReferenceBackend
    from gpunexus.node.p2p import P2PConfig
    from gpunexus.node.runtime import GatewayOptions, HostOptions, open_gateway, open_host
    from gpunexus.node.settlement import FreeSettlement

    api_key = "sk-demo-" + secrets.token_urlsafe(12)
    backend = ReferenceBackend(args.model)
    print(f"measuring the {args.model} reference model on this CPU...", file=sys.stderr)
    tokens_per_s = await trio.to_thread.run_sync(backend.measure_tokens_per_s)
    host_options = HostOptions(backend=backend, price_micro_per_mtok=200_000, tokens_per_s=tokens_per_s)
    async with open_host(host_options) as host:
        addr = host.node.listen_addrs()[0]
        gateway_options = GatewayOptions(port=args.port, p2p=P2PConfig(bootstrap=[addr]), settlement=FreeSettlement(api_key=api_key))
        async with open_gateway(gateway_options) as gateway:
            with trio.fail_after(30):
                while not gateway.book.for_model(backend.info.name):
                    await gateway.book.changed.wait()
            print(f"host:      {addr} ({backend.info.name}, {tokens_per_s:.0f} tokens/s, 0.20 USD/Mtok)")
            print(f"base_url:  {gateway.base_url}")
            print(f"api_key:   {api_key}")
            print(f"model:     {backend.info.name}")
            if args.once:
                return await _one_request(gateway.base_url, api_key, backend.info.name)
            print("\nTry it:\n"
                  f"  from openai import OpenAI\n"
                  f"  client = OpenAI(base_url=\"{gateway.base_url}\", api_key=\"{api_key}\")\n"
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
