"""The gateway's OpenAI-compatible HTTP API.

Routes: ``GET /v1/models``, ``GET /healthz`` (and ``/health``, the name
many load balancers and Open WebUI probe), ``POST /v1/embeddings``
(quart-trio), and
``POST /v1/chat/completions``, ``POST /v1/completions`` (the hot path). The
HTTP status of a completion is decided before its first byte (so "no host"
is a real 503, not an SSE error), and a client that disconnects cancels the
relay, which resets the host's stream so its GPU stops too.

The two completion routes are served by :class:`_HotRoutes`, a small ASGI
front in front of Quart that answers them itself. Measured on the relay
benchmark (bench/relay.py), Quart's per-request and per-body-chunk machinery
(request context, response wrapper, a timeout task per body chunk) and the
channel hop between the relay task and the HTTP writer cost more CPU per
token than the whole libp2p leg; the front answers in the request's own task,
writes each arriving chunk straight to the socket, and sends the response
head together with the first token.

Kept-alive connections used to hang after an answer sent before the
request body had arrived (an unknown route, an unexpected method, a body a
few milliseconds late): see :mod:`gpunexus.http_drain` for the root cause.
Quart's routes sit inside its :class:`~gpunexus.http_drain.DrainBody`; the
hot routes keep its two rules themselves, without a wrapper on every chunk
they send: they answer only once the body is read (else with
``connection: close``, the one case being a declared body over the limit),
and send their last chunk shielded from cancellation.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import trio
from gpunexus.http_drain import DrainBody
from gpunexus.protocol.ids import new_request_id
from gpunexus.protocol.messages import Capabilities, Offer
from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .cors import Cors
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics, RequestCounter
from .openai_api import APIError, CompletionRequest, check_unicode, parse_embedding_request, parse_request
from .openai_shapes import Choice, ResponseShaper, Usage, embeddings_response, sse_error
from .service import Delta, Finish, GatewayService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 * 1024 * 1024
DRAIN_BYTES = 1024 * 1024
"""Unread request body still awaited after an early answer, to keep the connection (see gpunexus/http_drain.py)."""
DRAIN_TIMEOUT_S = 5.0


def _json_error(error: APIError):
    return json.dumps(error.body()), error.status, {"content-type": "application/json", **error.headers}


def create_app(gateway: GatewayService, *, cors_origins: tuple[str, ...] = ()) -> QuartTrio:
    """The gateway's ASGI app; ``cors_origins`` (empty: CORS off) as ``node gateway --cors-origin``."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = 30
    balances = getattr(gateway.settlement, "allowance_balances", dict)
    metrics = GatewayMetrics(lambda: {model: len(offers) for model, offers in gateway.book.models().items()}, balances)
    app.extensions["gpunexus_metrics"] = metrics

    def _error_response(error: APIError):
        metrics.error(error.code, error.status)
        return _json_error(error)

    @app.errorhandler(APIError)
    async def api_error(error: APIError):
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException):
        status = error.code or 500
        if status == 413:
            return _error_response(APIError(413, "Request body too large.", code="request_too_large"))
        if status == 404:
            return _error_response(APIError(404, f"Unknown route {request.method} {request.path}.", code="not_found"))
        if isinstance(error, MethodNotAllowed):
            allow = ", ".join(sorted(error.valid_methods or ()))
            return _error_response(APIError(405, f"{request.method} is not allowed on {request.path}.", code="method_not_allowed", headers={"allow": allow}))
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _error_response(APIError(status, error.description or error.name, type=kind))

    @app.get("/metrics")
    async def prometheus():
        return metrics.render(), 200, {"content-type": METRICS_CONTENT_TYPE}

    @app.get("/healthz")
    @app.get("/health")
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
                "capabilities": capabilities_of(offers),
                **gateway.catalogue.describe(name),
            })
            market = gateway.prices.get(name)
            if market is not None:
                data[-1]["market_price_usd_per_mtok"] = market.price_micro_per_mtok / 1_000_000
        # In a big market the gateway follows only the models it is asked for; the hub's directory names the rest.
        directory = gateway.topics.directory if gateway.topics is not None else None
        listed = {entry["id"] for entry in data}
        for name in directory.models() if directory is not None else ():
            if name not in listed:
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "gpunexus",
                             "hosts": directory.hosts(name), **gateway.catalogue.describe(name)})
        data.sort(key=lambda entry: entry["id"])
        return {"object": "list", "data": data}

    @app.get("/v1/models/<path:model>")
    async def model(model: str):
        await gateway.discover(model)
        offers = gateway.book.for_model(model)
        if not offers:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return {"id": model, "object": "model", "created": 0, "owned_by": "gpunexus", "capabilities": capabilities_of(offers)}

    @app.post("/v1/embeddings")
    async def embeddings():
        raw = await request.get_data()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        check_unicode(raw, body)
        req = parse_embedding_request(body)
        finishes = await gateway.embed(req, _bearer(request.headers.get("authorization")))
        prompt_tokens = sum(f.usage.prompt_tokens for f in finishes)
        metrics.usage(req.model, prompt_tokens, 0)
        return embeddings_response(req, [f.vector for f in finishes], prompt_tokens)

    routes = frozenset(rule.rule for rule in app.url_map.iter_rules())
    quart = DrainBody(RequestCounter(app.asgi_app, metrics, routes), max_bytes=DRAIN_BYTES, timeout_s=DRAIN_TIMEOUT_S)
    front = _HotRoutes(quart, gateway, metrics)
    app.asgi_app = Cors(front, cors_origins) if cors_origins else front  # type: ignore[method-assign]
    return app


def capabilities_of(offers: list[Offer]) -> dict:
    """What some host of a model offers: each flag if any host has it, the largest limits, the longest context."""
    caps = [o.capabilities for o in offers]
    out: dict = {}
    for f in dataclasses.fields(Capabilities):
        values = [getattr(c, f.name) for c in caps]
        out[f.name] = max(values) if f.type in (int, "int") else any(values)
    out["max_context"] = max(o.max_context for o in offers)
    return out


HOT_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
BODY_TIMEOUT = 30.0


class _HotRoutes:
    """ASGI front: ``POST /v1/chat/completions`` and ``/v1/completions`` without Quart.

    The OpenAI contract: OpenAI-shaped JSON errors
    with their status (400 bad JSON or parameters, 413 body too large, 404,
    401/402, 503) before the stream starts, an SSE error event after; a
    client disconnect cancels the relay (which resets the host's stream).
    """

    def __init__(self, inner, gateway: GatewayService, metrics: GatewayMetrics) -> None:
        self.inner = inner
        self.gateway = gateway
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        kind = HOT_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None:
            await self.inner(scope, receive, send)
            return
        state = _Response(send, self.metrics, scope["path"])
        async with trio.open_nursery() as nursery:
            try:
                await self._complete(kind, scope, receive, state, nursery)
            except _ClientGone:
                pass
            except APIError as error:
                await state.error(error)
            except Exception as exc:
                log.exception("request failed")
                await state.error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))
            finally:
                nursery.cancel_scope.cancel()

    async def _complete(self, kind: str, scope, receive, state: _Response, nursery: trio.Nursery) -> None:
        raw = await _read_body(scope, receive)
        state.body_read = True
        if scope.get("method") != "POST":
            # Read first, answered after: an unread body would cost the kept-alive connection.
            raise APIError(405, f"{scope.get('method')} is not allowed on {scope['path']}.", code="method_not_allowed", headers={"allow": "POST"})
        # From here on a client that goes away cancels the request (and with it the host's stream).
        nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request.") from None
        check_unicode(raw, body)
        parsed = parse_request(body, kind)
        await self.gateway.discover(parsed.model)
        req = self.gateway.detokenize(parsed)
        bearer = _bearer(_header(scope, b"authorization"))
        shaper = ResponseShaper(req, new_request_id())
        clock = self.metrics.stream_clock(req.model)
        if not req.stream:
            choices = [Choice(req) for _ in range(req.choices)]
            if req.echo:
                for index, choice in enumerate(choices):
                    choice.parts.append(_prompt_of(req, index))

            async def collect(index: int, delta: Delta) -> None:
                clock.delta(delta.tokens)
                choices[index].add(delta.text, delta.logprobs, delta.details, delta.tool_calls)

            finishes = await self.gateway.complete_choices(req, bearer, collect)
            clock.finish()
            shaper.fingerprint = finishes[0].fingerprint
            usage = _total(finishes)
            self.metrics.usage(req.model, usage.prompt_tokens, usage.completion_tokens)
            await state.json(200, shaper.full(choices, [f.finish_reason for f in finishes], usage))
            return

        # n choices relay side by side: one event at a time reaches the socket.
        sending = trio.Lock() if req.choices > 1 else None
        unechoed = set(range(req.choices)) if req.echo else set()
        """Choices whose prompt is still to be sent ahead of their first text (``echo``)."""

        async def emit(index: int, delta: Delta) -> None:
            clock.delta(delta.tokens)
            text = delta.text
            if unechoed and index in unechoed:
                unechoed.discard(index)
                text = _prompt_of(req, index) + text
            event = shaper.sse_delta(index, text, delta.logprobs, delta.details, delta.tool_calls)
            if sending is None:
                await state.chunk(event)
                return
            async with sending:
                await state.chunk(event)

        try:
            finishes = await self.gateway.complete_choices(req, bearer, emit)
        except APIError as error:
            if not state.started:
                raise
            await state.error(error)
            return
        except Exception as exc:
            if not state.started:
                raise
            log.exception("relay failed")
            await state.error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))
            return
        finally:
            clock.finish()  # a stream that failed mid-way still had its first token
        for index in sorted(unechoed):  # a choice that produced no text still echoes its prompt
            await state.chunk(shaper.sse_delta(index, _prompt_of(req, index)))
        usage = _total(finishes)
        self.metrics.usage(req.model, usage.prompt_tokens, usage.completion_tokens)
        await state.chunk(shaper.sse_finish([f.finish_reason for f in finishes], usage), last=True)


class _Response:
    """One response's ASGI sends: the head goes out with the first body chunk."""

    __slots__ = ("body_read", "done", "metrics", "route", "send", "started")

    def __init__(self, send, metrics: GatewayMetrics, route: str) -> None:
        self.send = send
        self.metrics = metrics
        self.route = route
        self.started = False
        self.done = False
        self.body_read = False

    async def chunk(self, data: bytes, last: bool = False) -> None:
        if not self.started:
            self.started = True
            self.metrics.requests.labels(self.route, "200").inc()
            await self.send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self.done = last
        if last:
            # hypercorn recycles the connection inside this send: it must not be cancelled half-way.
            with trio.CancelScope(shield=True):
                await self.send({"type": "http.response.body", "body": data, "more_body": False})
            return
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if not self.body_read:
            head.append((b"connection", b"close"))  # the unread body makes the connection unusable
        self.started = self.done = True
        self.metrics.requests.labels(self.route, str(status)).inc()
        with trio.CancelScope(shield=True):
            await self.send({"type": "http.response.start", "status": status, "headers": head})
            await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, error: APIError) -> None:
        self.metrics.error(error.code, error.status)
        if not self.started:
            with trio.CancelScope(shield=True):
                await self.json(error.status, error.body(), error.headers)
        elif not self.done:
            with trio.CancelScope(shield=True):
                await self.chunk(sse_error(error), last=True)


def _prompt_of(req: CompletionRequest, index: int) -> str:
    """The prompt of choice ``index``: with a batch, prompt ``index // n``."""
    return (req.batch or (req.prompt,))[index // req.n]


def _total(finishes: list[Finish]) -> Usage:
    """Usage of all choices together: each is its own order, billed its own prompt."""
    total = Usage(0, 0)
    for finish in finishes:
        total += finish.usage
    return total


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(scope, receive) -> bytes:
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, "Request body too large.", code="request_too_large")
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_TIMEOUT) as waited:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, "Request body too large.", code="request_too_large")
            parts.append(chunk)
            if not message.get("more_body", False):
                break
    if waited.cancelled_caught:
        raise APIError(408, "Request Timeout")
    return b"".join(parts)


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def _watch_disconnect(receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


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



