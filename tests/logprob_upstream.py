"""A real OpenAI-compatible ``/v1/completions`` server on loopback, computing with a reference model.

It generates (streamed, the way vLLM streams) with the project's seeded
sampler, and it scores: ``echo: true`` with ``logprobs: K`` returns every
prompt token with its logprob, its ``K`` likeliest alternatives and its text
offset, as the OpenAI legacy API and vLLM do (the first token, BOS here, has
no logprob). ``weight_seed`` other than the reference's makes it "a
different model" under the same name. ASCII text only (one byte, one token,
one character): enough for the tests, and offsets stay simple.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import hypercorn.config
import hypercorn.trio
import numpy as np
import trio
from quart import Response, request
from quart_trio import QuartTrio

from gpunexus.verify.attacks import other_model
from gpunexus.verify.generate import generate
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams


def create_upstream(weight_seed: int | None = None) -> QuartTrio:
    model, tokenizer = load_reference("tiny")
    if weight_seed is not None:
        model = other_model(model, tokenizer, weight_seed=weight_seed)
    app = QuartTrio(__name__)
    app.scored = []  # each echo request's prompt, for the tests

    def text_of(token: int) -> str:
        return chr(token) if token < 128 else ""

    @app.post("/v1/completions")
    async def completions() -> Response:
        body = await request.get_json()
        ids = tokenizer.completion_prompt(body["prompt"])
        if body.get("echo"):
            app.scored.append(body["prompt"])
            k = int(body.get("logprobs") or 0)
            logits, _ = await trio.to_thread.run_sync(model.new_session().prefill_all, ids[:-1])
            rows = logits.astype(np.float64)
            lse = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
            logprobs, tops, offsets, at = [None], [None], [0], 0
            for i, token in enumerate(ids[1:]):
                at += len(text_of(ids[i])) if i else 0
                offsets.append(at)
                lp = rows[i] - lse[i]
                logprobs.append(float(lp[token]))
                top = np.argsort(-lp, kind="stable")[:k]
                tops.append({text_of(int(t)) or f"<{int(t)}>": float(lp[t]) for t in top})
            tokens = [text_of(t) for t in ids]
            choice = {"index": 0, "text": body["prompt"], "finish_reason": "length",
                      "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                                   "text_offset": offsets}}
            return Response(json.dumps({"object": "text_completion", "choices": [choice],
                                        "usage": {"prompt_tokens": len(ids), "completion_tokens": 0}}),
                            content_type="application/json")
        params = SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                top_k=int(body.get("top_k", 0)), max_tokens=int(body["max_tokens"]),
                                stop=tuple(body.get("stop") or ()), seed=int(body.get("seed") or 0))
        out = await trio.to_thread.run_sync(lambda: list(generate(model, tokenizer, ids, params)))

        async def events():
            for tok in out:
                finish = None if tok.finish_reason is None else ("length" if tok.finish_reason == "length" else "stop")
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': tok.text, 'finish_reason': finish}]})}\n\n".encode()
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(out)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return Response(events(), content_type="text/event-stream")

    return app


@asynccontextmanager
async def running_upstream(weight_seed: int | None = None):
    """(base URL ending in /v1, the app) of a live upstream."""
    app = create_upstream(weight_seed)
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: hypercorn.trio.serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            yield f"{binds[0]}/v1", app
        finally:
            stop.set()
