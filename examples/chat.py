"""Talk to a gpunexus gateway with the official openai SDK, streamed and not.

Run against a running ``gpunexus demo`` (or your own ``gpunexus node gateway``):

    python examples/chat.py --base-url http://127.0.0.1:8000/v1 --api-key gnx_... "Hello"

The only gpunexus-specific thing here is ``base_url``: everything else is the
plain OpenAI client, which is the point.
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Hello, market!")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="client key (any string for a gateway without a hub)")
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=60)
    models = client.models.list().data
    if not models:
        print("the gateway knows no host yet: is one running and bootstrapped?", file=sys.stderr)
        return 1
    model = args.model or models[0].id
    messages = [{"role": "user", "content": args.prompt}]

    print(f"model: {model}")
    print("streamed: ", end="", flush=True)
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        if chunk.usage is not None:
            usage = chunk.usage
    print()
    print(f"stream usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")

    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, seed=7)
    print(f"whole: {reply.choices[0].message.content!r} (finish_reason {reply.choices[0].finish_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
