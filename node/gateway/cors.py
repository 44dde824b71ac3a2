"""CORS for browser apps (Open WebUI, a web playground): off unless origins are configured.

With ``--cors-origin`` (one or more, or ``*``), a request whose ``Origin``
is allowed gets ``access-control-allow-origin`` (and ``vary: origin``) on
its response, and a preflight (``OPTIONS`` with
``access-control-request-method``) from it is answered here with 204, the
methods, the requested headers and a max-age. Without it nothing is added,
and a browser keeps other sites' pages away from the gateway: a gateway on
localhost spends its user's credits, so cross-origin access is opt-in.
"""

from __future__ import annotations

ALLOW_METHODS = b"GET, POST, OPTIONS"
MAX_AGE_S = b"600"


class Cors:
    """ASGI middleware for ``origins`` (``"*"`` allows any)."""

    def __init__(self, app, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").encode() for o in origins)

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        origin = headers.get(b"origin")
        if origin is None or not (self.any or origin in self.origins):
            await self.app(scope, receive, send)
            return
        allow = [(b"access-control-allow-origin", b"*" if self.any else origin), (b"vary", b"origin")]
        if scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers:
            while (await receive()).get("more_body", False):
                pass  # a preflight has no body; read whatever came so the connection stays usable
            requested = headers.get(b"access-control-request-headers", b"authorization, content-type")
            await send({"type": "http.response.start", "status": 204, "headers": [
                *allow, (b"access-control-allow-methods", ALLOW_METHODS), (b"access-control-allow-headers", requested),
                (b"access-control-max-age", MAX_AGE_S), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        async def with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *allow]}
            await send(message)

        await self.app(scope, receive, with_cors)
