"""The gateway's OpenAI-compatible HTTP API (quart-trio).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /healthz``. Streaming responses are fed by a
relay task in the gateway's own nursery through a small channel: the HTTP
status is decided by the first event (so "no host" is a real 503, not an SSE
error), and a client that disconnects cancels the relay, which resets the
host's stream so its GPU stops too.
"""

from __future__ import annotations

import json
import logging

import trio
from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from gpunexus.protocol.ids import new_request_id

from .gateway import Delta, Finish, GatewayService
from .openai_api import APIError, ResponseShaper, parse_request, sse_error

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 * 1024 * 1024
STREAM_BUFFER = 64
"""Deltas buffered between relay and HTTP writer: backpressure past this."""


def _error_response(error: APIError):
    return json.dumps(error.body()), error.status, {"content-type": "application/json", **error.headers}


def create_app(gateway: GatewayService, nursery: trio.Nursery) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = 30

    @app.errorhandler(APIError)
    async def api_error(error: APIError):
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException):
        status = error.code or 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        message = "Request body too large." if status == 413 else (error.description or error.name)
        return _error_response(APIError(status, message, type=kind, code="request_too_large" if status == 413 else None))

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "peer_id": gateway.node.peer_id, "models": sorted(gateway.book.models())}

    @app.get("/v1/models")
    async def models():
        data = []
        for name, offers in sorted(gateway.book.models().items()):
            prices = [o.price_micro_per_mtok for o in offers]
            data.append({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "gpunexus",
                "hosts": len(offers),
                "min_price_usd_per_mtok": min(prices) / 1_000_000,
                "license": offers[0].license,
                "max_context": max(o.max_context for o in offers),
            })
            market = gateway.prices.get(name)
            if market is not None:
                data[-1]["market_price_usd_per_mtok"] = market.price_micro_per_mtok / 1_000_000
        return {"object": "list", "data": data}

    @app.get("/v1/models/<path:model>")
    async def model(model: str):
        offers = gateway.book.for_model(model)
        if not offers:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return {"id": model, "object": "model", "created": 0, "owned_by": "gpunexus"}

    async def _complete(kind: str):
        raw = await request.get_data()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        req = parse_request(body, kind)
        bearer = _bearer(request.headers.get("authorization"))
        shaper = ResponseShaper(req, new_request_id())
        if not req.stream:
            parts: list[str] = []

            async def collect(delta: Delta) -> None:
                parts.append(delta.text)

            finish = await gateway.complete(req, bearer, collect)
            shaper.fingerprint = finish.fingerprint
            return shaper.full("".join(parts), finish.finish_reason, finish.usage)
        return await _stream(req, bearer, shaper)

    async def _stream(req, bearer, shaper: ResponseShaper):
        send, receive = trio.open_memory_channel(STREAM_BUFFER)
        scope = trio.CancelScope()

        async def relay() -> None:
            with scope:
                async with send:
                    try:
                        finish = await gateway.complete(req, bearer, send.send)
                        await send.send(finish)
                    except APIError as error:
                        await send.send(error)
                    except Exception as exc:  # surfaced to the client as an SSE error, logged here
                        log.exception("relay failed")
                        await send.send(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

        nursery.start_soon(relay)
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            scope.cancel()
            raise APIError(500, "the relay ended without an answer", type="server_error") from None
        if isinstance(first, APIError):
            scope.cancel()
            raise first

        async def body():
            try:
                event = first
                while True:
                    if isinstance(event, Delta):
                        yield shaper.sse_delta(event.text)
                    elif isinstance(event, Finish):
                        yield shaper.sse_finish(event.finish_reason, event.usage)
                        return
                    else:
                        yield sse_error(event)
                        return
                    event = await receive.receive()
            except trio.EndOfChannel:
                return
            finally:
                scope.cancel()
                receive.close()

        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", "x-accel-buffering": "no"}
        return body(), 200, headers

    @app.post("/v1/chat/completions")
    async def chat_completions():
        return await _complete("chat")

    @app.post("/v1/completions")
    async def completions():
        return await _complete("completion")

    return app


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


def hypercorn_config(host: str, port: int):
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 2
    config.h11_max_incomplete_size = 64 * 1024
    return config



