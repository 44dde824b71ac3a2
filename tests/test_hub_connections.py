"""Kept-alive connections after an early answer: the next request is answered, or the hub closes cleanly.

A raw socket against the real hypercorn server (trio worker) on loopback, so
nothing in an HTTP client library hides what the server does with the bytes
of a request body it did not read. Every exchange runs under a deadline: a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json

import trio
from gpunexus.hub.app import DRAIN_BYTES, MAX_BODY_BYTES, create_app
from rawhttp import Conn, request_head
from rawhttp import open_conn as _open
from test_hub_support import backend, db, served  # noqa: F401

BODY = json.dumps({"gateway_id": "x", "receipts": [], "amount_micro": 1}).encode()
DEADLINE_S = 15
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
NEXT = b"GET /v1/hub HTTP/1.1\r\nhost: hub\r\n\r\n"


async def _then_answered(conn: Conn) -> None:
    await conn.send(NEXT)
    status, _, body = await conn.response()
    assert status == 200 and b"hub_id" in body


def _unexpected(app) -> list[tuple[str, str]]:
    """(method, path) for every route of the app with a method it does not serve, plus an unknown path."""
    served: dict[str, set[str]] = {}  # one path may have a rule per method (GET and POST /v1/offers)
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/static"):
            served.setdefault(rule.rule, set()).update(rule.methods)
    cases = [(next(m for m in METHODS if m not in methods), path) for path, methods in served.items()]
    return cases + [("POST", "/v1/no-such-route")]


async def test_after_an_unexpected_method_with_a_body_the_connection_serves_on(served):
    market, url, _ = served
    cases = _unexpected(create_app(market.hub))
    assert len(cases) > 15
    with trio.fail_after(DEADLINE_S):
        for method, path in cases:
            for late in (False, True):
                conn = await _open(url)
                head = request_head(method, path, length=len(BODY), key=market.client_key, host="hub")
                if late:  # the body 10 ms after the headers: the answer is ready before it arrives
                    await conn.send(head)
                    await trio.sleep(0.01)
                    await conn.send(BODY)
                else:
                    await conn.send(head + BODY)
                status, headers, body = await conn.response()
                assert status in (404, 405), (method, path, status, body)
                assert json.loads(body)["error"]["code"] in ("not_found", "method_not_allowed")
                assert status == 404 or "allow" in headers
                await _then_answered(conn)
                await conn.stream.aclose()


async def test_after_an_early_refusal_of_a_late_body_the_connection_serves_on(served):
    market, url, _ = served
    with trio.fail_after(DEADLINE_S):
        for key, expected in ((None, 401), (market.client_key, 400)):
            conn = await _open(url)
            await conn.send(request_head("POST", "/v1/allowances", length=len(BODY), key=key, host="hub"))
            await trio.sleep(0.01)
            await conn.send(BODY)
            assert (await conn.response())[0] == expected
            await _then_answered(conn)
            await _then_answered(conn)


async def test_a_body_too_large_is_413_then_a_clean_close(served):
    market, url, _ = served
    with trio.fail_after(DEADLINE_S):
        conn = await _open(url)
        await conn.send(request_head("POST", "/v1/receipts", length=MAX_BODY_BYTES + 1, key=market.client_key, host="hub"))
        await conn.send(b"x" * 65536)
        status, headers, body = await conn.response()
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert headers["connection"] == "close"
        assert await conn.closed()
        await _then_answered(await _open(url))  # the client reconnects, as connection: close told it to


async def test_an_unread_body_beyond_the_drain_bound_closes_cleanly(served):
    market, url, _ = served
    with trio.fail_after(DEADLINE_S):
        conn = await _open(url)
        await conn.send(request_head("POST", "/v1/receipts", length=DRAIN_BYTES + 100_000, host="hub"))  # no key: 401 unread
        await conn.send(b"x" * 1000)
        status, headers, _ = await conn.response()
        assert status == 401 and headers["connection"] == "close"
        assert await conn.closed()
