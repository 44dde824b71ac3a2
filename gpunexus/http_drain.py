"""ASGI middleware: no response ends before its request body has arrived, or the connection closes cleanly.

Why. Under hypercorn's trio worker with HTTP/1.1 keep-alive, a response that
is complete while the client is still sending the request body (an early
401, 404, 405 or 413, or any body that arrives a few milliseconds after its
headers) left the connection stuck: the next request on it was never
answered. Two things combine:

* hypercorn can only recycle a connection whose request was read to its end;
  otherwise it closes it, and it does so from inside the ASGI ``send`` of the
  response's last body chunk;
* that same ``send`` delivers ``http.disconnect`` to the app, on which
  quart-trio cancels the task the ``send`` runs in. The close is cancelled
  half-way, h11 is left waiting for a ``start_next_cycle`` that never comes,
  and the reader pauses forever.

So this middleware, wrapped around the Quart app:

* before a response starts, waits (at most ``timeout_s``) for the rest of a
  request body that declared a ``content-length`` of at most ``max_bytes``
  still to come (quart-trio's receiver task keeps reading it meanwhile), so
  the connection is recycled and kept alive;
* when the rest is larger, of unknown size (chunked) or late past the
  deadline, adds ``connection: close`` to the response instead, so the client
  knows not to reuse the connection;
* sends the last body chunk in a shielded cancel scope, so hypercorn's
  recycle or close of the connection always runs to its end.

Where it lives. Both HTTP servers (the hub's API and a gateway's OpenAI
API) run quart-trio on hypercorn and need it; node/ and hub/ never import
each other, and protocol/ holds wire formats only, so it sits at the top of
the ``gpunexus`` package, beside the CLI that already composes the roles:
HTTP plumbing both roles share, owned by neither. A copy in each role was
the alternative; one fix in one place beats two that drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class DrainBody:
    """Wrap ``app`` (an ASGI app whose HTTP handling reads the whole body in a task of its own, as quart-trio's does)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _framing(scope["headers"])
        received = 0
        complete = trio.Event()
        if not chunked and not declared:
            complete.set()

        async def tracked_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    complete.set()
            elif message["type"] == "http.disconnect":
                complete.set()
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete.is_set():
                if not chunked and declared - received <= self.max_bytes:
                    with trio.move_on_after(self.timeout_s):
                        await complete.wait()
                if not complete.is_set():
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """(declared content-length or 0, whether the body is chunked) of a request's headers."""
    declared, chunked = 0, False
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length" and value.strip().isdigit():
            declared = int(value)
    return declared, chunked
