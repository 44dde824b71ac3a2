"""The hub's HTTP API (quart-trio): JSON in, JSON out, OpenAI-shaped errors.

``/metrics`` (Prometheus) needs an admin account's key. Every route but ``/openapi.json``, ``/v1/hub``, the market's ``/v1/prices``
and ``/v1/market``, the model ``/v1/catalogue`` and the Stripe webhook needs ``Authorization: Bearer <API
key>``; the key is checked against the database on every request
(revocation is immediate) and then charged one token from its rate-limit
bucket (429 with ``retry-after`` when empty). The public market routes are
charged to a bucket per client address instead. Binary protocol
messages (allowances, receipts) travel base64-encoded. The full contract is
in :mod:`gpunexus.hub.openapi`, served at ``/openapi.json``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import hypercorn
import hypercorn.trio
import trio
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from gpunexus.http_drain import DrainBody
from gpunexus.protocol.discovery import DiscoveryPlan
from gpunexus.protocol.errors import ProtocolError

from . import bodies, keys, metrics, web
from .body import Body
from .keys import User
from .openapi import spec
from .ratelimit import RateLimiter
from .service import VERSION, Hub, HubError

MAX_BODY_BYTES = 16 * 1024 * 1024
DRAIN_BYTES = 1024 * 1024
"""Unread request body the hub still waits for after an early answer, to keep the connection (see gpunexus/http_drain.py)."""
DRAIN_TIMEOUT_S = 5.0
_TYPES = {401: "invalid_request_error", 402: "insufficient_quota", 403: "permission_error", 429: "rate_limit_error"}


def error_response(status: int, code: str, message: str, param: str | None = None) -> Response:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    resp = jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}})
    resp.status_code = status
    if status in (400, 401, 402, 403, 409, 413):
        resp.headers["x-should-retry"] = "false"
    return resp


class Extension(Protocol):
    """Routes a billing layer adds (Stripe): its handlers and their OpenAPI paths.

    ``read(spec)`` is the request's JSON body checked against ``spec`` (400 otherwise).
    """

    def routes(self, app: QuartTrio, current_user: Callable[[], Awaitable[User]],
               read: Callable[[Body], Awaitable[dict[str, Any]]]) -> None: ...

    def openapi_paths(self) -> dict[str, Any]: ...


def create_app(hub: Hub, *, limiter: RateLimiter | None = None, billing: Extension | None = None) -> QuartTrio:
    """The ASGI app for ``hub``, with ``billing``'s routes when Stripe is configured."""
    app = QuartTrio("gpunexus.hub")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.asgi_app = DrainBody(app.asgi_app, max_bytes=DRAIN_BYTES, timeout_s=DRAIN_TIMEOUT_S)  # type: ignore[method-assign]
    receipts_body = bodies.receipts(hub.config.max_batch)
    limiter = limiter or RateLimiter(hub.config.rate_per_s, hub.config.rate_burst)
    measured = metrics.HubMetrics()

    @app.before_request
    async def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unrouted"
        measured.answered(rule, response.status_code, g.get("started", time.perf_counter()))
        return response

    def bearer() -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header[:7].lower() == "bearer " else None

    def bearer_key_id() -> str:
        """The public id of the (already authenticated) bearer key."""
        return keys.key_id_of(bearer() or "")

    async def current_user(*, allow_revoked: bool = False) -> User:
        token = bearer()
        user = await hub.authenticate(token, allow_revoked=allow_revoked)
        wait = limiter.take(token.split("_")[1])
        if wait:
            raise RateLimited(wait)
        return user

    def public() -> None:
        wait = limiter.take("addr:" + (request.remote_addr or ""))
        if wait:
            raise RateLimited(wait)

    async def read(body: Body) -> dict[str, Any]:
        return body.parse(await request.get_data())

    @app.errorhandler(HubError)
    async def on_hub_error(exc: HubError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.errorhandler(RateLimited)
    async def on_rate_limited(exc: RateLimited) -> Response:
        resp = error_response(429, "rate_limit_exceeded", "Rate limit reached for this API key.")
        resp.headers["retry-after"] = RateLimiter.retry_after(exc.wait_s)
        return resp

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        """Quart's own refusals (routing, body size, malformed requests) in the API's error shape."""
        status = exc.code or 500
        if status == 413:
            return error_response(413, "body_too_large", f"request body above {MAX_BODY_BYTES} bytes")
        if status == 404:
            return error_response(404, "not_found", f"no route {request.method} {request.path}")
        if isinstance(exc, MethodNotAllowed):
            resp = error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
            resp.headers["allow"] = ", ".join(sorted(exc.valid_methods or ()))
            return resp
        return error_response(status, (exc.name or "error").lower().replace(" ", "_"), exc.description or exc.name)

    @app.get("/metrics")
    async def prometheus() -> tuple[bytes, int, dict[str, str]]:
        user = await current_user()
        if user.role != "admin":
            raise HubError(403, "permission_denied", "/metrics needs an admin account's API key.")
        return measured.render(await hub.db.read(metrics.snapshot)), 200, {"content-type": metrics.CONTENT_TYPE}

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return jsonify(spec(hub.config.max_batch, billing.openapi_paths() if billing else None,
                            max_long_poll_s=hub.config.max_long_poll_s))

    @app.get("/v1/hub")
    async def info() -> Response:
        cfg = hub.config
        return jsonify({"hub_id": hub.hub_id, "version": VERSION, "fee_bps": cfg.fee_bps,
                        "allowance_ttl_s": cfg.allowance_ttl_s, "max_batch": cfg.max_batch,
                        "audit_period_s": cfg.audit_period_s, "audit_root_grace_s": cfg.audit_root_grace_s,
                        "billing": "stripe" if hub.billing else "manual"})

    @app.post("/v1/allowances")
    async def allowance() -> Response:
        user = await current_user()
        data = await read(bodies.ALLOWANCE)
        issued = await hub.issue_allowance(user, data["gateway_id"], data["budget_micro"], bearer_key_id())
        a = issued.allowance
        return jsonify({"allowance": base64.b64encode(a.encode()).decode(), "allowance_id": a.allowance_id,
                        "hub_id": a.hub_id, "account": a.account, "budget_micro": a.budget_micro,
                        "issued_at": a.issued_at, "expires_at": a.expires_at,
                        "limited_by_balance": issued.limited_by_balance,
                        "refused_models": [r.to_json() for r in issued.refusals],
                        "limit": issued.limit_note, "key_expires_at": issued.key_expires_at, "terms": issued.terms})

    @app.post("/v1/receipts")
    async def submit() -> Response:
        # A revoked key still delivers: these receipts are work served under its
        # allowance before the revocation, and they prove themselves (both
        # signatures, an allowance window); the allowance, not the key, pays.
        await current_user(allow_revoked=True)
        outcomes = await hub.submit((await read(receipts_body))["receipts"])
        measured.outcomes(outcomes)
        return jsonify({"results": [o.to_json() for o in outcomes]})

    @app.get("/v1/revocations")
    async def revocations() -> Response:
        user = await current_user(allow_revoked=True)
        after = _query_float("after", 0.0, 0.0, 1e12)
        wait_s = _query_float("wait_s", 0.0, 0.0, hub.config.max_long_poll_s)
        terms = request.args.get("terms")
        if terms is not None and len(terms) > 200:
            raise HubError(400, "invalid_request_error", "terms is at most 200 characters (the stamp an allowance came with)", "terms")
        found, stamp = await hub.revocations(user, after, wait_s, terms)
        cursor = max([after, *(r.revoked_at for r in found)])
        return jsonify({"hub_id": hub.hub_id, "cursor": cursor, "terms": stamp,
                        "revocations": [base64.b64encode(r.encode()).decode() for r in found]})

    @app.get("/v1/balance")
    async def balance() -> Response:
        return jsonify(await hub.balance(await current_user()))

    @app.get("/v1/usage")
    async def usage() -> Response:
        return jsonify(await hub.usage(await current_user()))

    @app.get("/v1/earnings")
    async def earnings() -> Response:
        return jsonify(await hub.earnings(await current_user()))

    @app.post("/v1/hosts/register")
    async def register_host() -> Response:
        user = await current_user()
        data = await read(bodies.HOST_REGISTER)
        await hub.register_host(user, data["peer_id"], data["proof"])
        return jsonify({"peer_id": data["peer_id"], "account": user.account})

    @app.post("/v1/offers")
    async def post_offer() -> Response:
        user = await current_user()
        await hub.post_offer(user, (await read(bodies.OFFER))["offer"])
        return jsonify({"accepted": True})

    @app.post("/v1/offers/withdraw")
    async def post_withdraw() -> Response:
        user = await current_user()
        ended = await hub.post_withdraw(user, (await read(bodies.WITHDRAW))["withdraw"])
        return jsonify({"accepted": True, "ended": ended})

    @app.get("/v1/offers")
    async def shard_offers() -> Response:
        public()
        model, shard, shards = _shard_query()
        blobs = await hub.market.shard_offers(model, shard, shards)
        return jsonify({"model": model, "shard": shard, "shards": shards,
                        "offers": [base64.b64encode(b).decode() for b in blobs]})

    @app.get("/v1/directory")
    async def directory() -> Response:
        public()
        return jsonify(await hub.market.directory())

    @app.get("/v1/prices")
    async def prices() -> Response:
        public()
        blobs = await hub.market.latest_updates()
        return jsonify({"hub_id": hub.hub_id, "prices": [base64.b64encode(b).decode() for b in blobs]})

    @app.get("/v1/catalogue")
    async def public_catalogue() -> Response:
        public()
        return jsonify({"hub_id": hub.hub_id, "models": [m.to_json() for m in await hub.models()]})

    @app.get("/v1/market")
    async def market() -> Response:
        public()
        return jsonify(await hub.market.overview())

    @app.get("/v1/audits/commitment")
    async def audit_commitment() -> Response:
        public()
        return jsonify(await hub.audit_commitments())

    @app.post("/v1/audits/roots")
    async def audit_root() -> Response:
        user = await current_user()
        return jsonify(await hub.post_root(user, (await read(bodies.ROOT))["root"]))

    @app.get("/v1/audits/pending")
    async def audits_pending() -> Response:
        user = await current_user()
        return jsonify({"request_ids": await hub.pending_audits(user)})

    @app.post("/v1/audits/openings")
    async def audit_opening() -> Response:
        user = await current_user()
        data = await read(bodies.OPENING)
        return jsonify(await hub.open_audit(user, data["request_id"], data["opening"], data["reason"] or ""))

    @app.get("/v1/audits/jobs")
    async def audit_jobs() -> Response:
        user = await current_user()
        peer_id = request.args.get("peer_id", "")
        jobs = await hub.audit_jobs(user, peer_id, request.args.getlist("model_hash"))
        return jsonify({"hub_id": hub.hub_id, "jobs": [base64.b64encode(j).decode() for j in jobs]})

    @app.post("/v1/audits/results")
    async def audit_result() -> Response:
        user = await current_user()
        return jsonify(await hub.post_verifier_result(user, (await read(bodies.RESULT))["result"]))

    @app.get("/v1/reputation")
    async def reputation() -> Response:
        public()
        reps = await hub.reputations()
        return jsonify({"hub_id": hub.hub_id, "reputations": [base64.b64encode(r.encode()).decode() for r in reps]})

    @app.put("/v1/payout-settings")
    async def payout_settings() -> Response:
        user = await current_user()
        data = await read(bodies.PAYOUT_SETTINGS)
        return jsonify(await hub.set_payout_settings(user, data["threshold_micro"], data["connect_account_id"]))

    if billing:
        billing.routes(app, current_user, read)
    web.mount(app, hub, billing if isinstance(billing, web.Checkout) else None)
    return app


class RateLimited(Exception):
    def __init__(self, wait_s: float) -> None:
        super().__init__(f"retry in {wait_s:.2f}s")
        self.wait_s = wait_s


def _shard_query() -> tuple[str, int, int]:
    """``model``, ``shard`` and ``shards`` of a catch-up query, checked as peers compute them."""
    model = request.args.get("model", "")
    if not model or len(model) > 256:
        raise HubError(400, "invalid_request_error", "model is required (at most 256 characters)", "model")
    try:
        shards = int(request.args.get("shards", "1"))
        shard = int(request.args.get("shard", "0"))
    except ValueError:
        raise HubError(400, "invalid_request_error", "shard and shards must be integers", "shard") from None
    try:
        DiscoveryPlan(shards).check()
    except ProtocolError as exc:
        raise HubError(400, "invalid_request_error", str(exc), "shards") from None
    if not 0 <= shard < shards:
        raise HubError(400, "invalid_request_error", f"shard must be in [0, {shards})", "shard")
    return model, shard, shards


def _query_float(name: str, default: float, lo: float, hi: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # NaN fails too
        raise HubError(400, "invalid_request_error", f"{name} must be a number in [{lo:g}, {hi:g}]", name)
    return value


async def serve(hub: Hub, app: QuartTrio, *, host: str = "127.0.0.1", port: int = 8080,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` with hypercorn's trio worker next to the hub's background duties.

    ``task_status.started`` receives the bound addresses (``port=0`` picks a
    free port). When ``shutdown_trigger`` returns, the server drains and the
    background work is cancelled with it.
    """
    config = hypercorn.Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 5.0

    async with trio.open_nursery() as nursery:

        async def http(task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # the server drained: stop the background duties too

        await nursery.start(hub.run)
        task_status.started(await nursery.start(http))


