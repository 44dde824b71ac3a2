"""The gateway's kept-alive connections: after any early answer the next request is answered.

A raw socket against the real gateway (hypercorn, trio worker) on loopback:
every route with a method it does not serve and a body, the body sent with
the headers or 10 ms after them, then a second request on the same
connection. Every exchange runs under a deadline.
"""

from __future__ import annotations

import json

import pytest
import trio
from gpunexus.node.gateway.app import HOT_PATHS, MAX_BODY_BYTES, create_app
from peers import running_gateway, running_host, wait_for_offers
from rawhttp import open_conn, request_head

DEADLINE_S = 30
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
BODY = json.dumps({"model": "tiny", "input": "hello", "messages": [{"role": "user", "content": "hi"}]}).encode()
NEXT = b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n"


@pytest.fixture
async def gateway():
    async with running_host() as host, running_gateway([host.node.listen_addrs()[0]]) as gateway:
        await wait_for_offers(gateway)
        yield gateway


def _routes(gateway) -> list[tuple[str, frozenset[str]]]:
    """(path, methods served) of every gateway route, the hot completion routes included."""
    app = create_app(gateway.service)
    rules = [(rule.rule.replace("<path:model>", "tiny"), frozenset(rule.methods)) for rule in app.url_map.iter_rules()
             if not rule.rule.startswith("/static")]
    return rules + [(path, frozenset({"POST"})) for path in HOT_PATHS]


async def _then_answered(conn) -> None:
    await conn.send(NEXT)
    status, _, body = await conn.response()
    assert status == 200 and b"peer_id" in body


async def _exchange(url: str, method: str, path: str, *, late: bool, body: bytes = BODY) -> tuple[int, dict, bytes]:
    conn = await open_conn(url)
    head = request_head(method, path, length=len(body), host="gw")
    if late:  # the answer is ready before the body arrives
        await conn.send(head)
        await trio.sleep(0.01)
        await conn.send(body)
    else:
        await conn.send(head + body)
    answer = await conn.response()
    await _then_answered(conn)
    await _then_answered(conn)
    await conn.stream.aclose()
    return answer


async def test_every_route_with_an_unexpected_method_and_a_body_keeps_serving(gateway):
    routes = _routes(gateway)
    assert {"/healthz", "/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= {p for p, _ in routes}
    with trio.fail_after(DEADLINE_S):
        for path, methods in routes:
            method = next(m for m in METHODS if m not in methods)
            for late in (False, True):
                status, headers, body = await _exchange(gateway.base_url, method, path, late=late)
                assert status == 405, (method, path, status, body)
                assert json.loads(body)["error"]["code"] == "method_not_allowed"
                assert set(headers["allow"].replace(" ", "").split(",")) >= (methods - {"HEAD", "OPTIONS"})


@pytest.mark.parametrize("path", ["/v1/moderations", "/v1/responses", "/v1/no-such-route", "/v1/embeddings/x"])
async def test_a_post_to_a_route_the_gateway_does_not_serve_keeps_serving(gateway, path):
    with trio.fail_after(DEADLINE_S):
        for late in (False, True):
            status, _, body = await _exchange(gateway.base_url, "POST", path, late=late)
            assert status == 404, (path, status, body)
            assert json.loads(body)["error"]["code"] == "not_found"


async def test_served_routes_with_a_late_body_keep_serving(gateway):
    with trio.fail_after(DEADLINE_S):
        for method, path in (("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/health"), ("GET", "/v1/models/tiny")):
            for late in (False, True):
                status, _, body = await _exchange(gateway.base_url, method, path, late=late)
                assert status == 200, (path, body)
        chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        status, _, body = await _exchange(gateway.base_url, "POST", "/v1/chat/completions", late=True, body=chat)
        assert status == 200 and json.loads(body)["object"] == "chat.completion"
        embed = json.dumps({"model": "tiny", "input": "hi"}).encode()
        status, _, body = await _exchange(gateway.base_url, "POST", "/v1/embeddings", late=True, body=embed)
        assert status == 200 and json.loads(body)["object"] == "list"


async def test_a_body_too_large_is_413_then_a_clean_close(gateway):
    with trio.fail_after(DEADLINE_S):
        for path in ("/v1/chat/completions", "/v1/models"):
            conn = await open_conn(gateway.base_url)
            await conn.send(request_head("POST", path, length=MAX_BODY_BYTES + 1, host="gw"))
            await conn.send(b"x" * 65536)
            status, headers, body = await conn.response()
            assert status in (405, 413) and "error" in json.loads(body)
            assert headers["connection"] == "close"
            assert await conn.closed()
