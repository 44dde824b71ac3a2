"""The hub's HTTP API on a real hypercorn server (trio worker) on loopback, driven by httpx."""

from __future__ import annotations

import base64

import httpx
import pytest
import sqlalchemy as sa
from gpunexus.hub import keys
from gpunexus.hub.app import create_app
from gpunexus.hub.db import users
from gpunexus.protocol.messages import host_registration_statement
from test_hub_support import backend, db, make_offer, served  # noqa: F401


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_full_settlement_over_http(served):
    market, url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        info = (await http.get("/v1/hub")).json()
        assert info["hub_id"] == market.hub.hub_id and info["billing"] == "manual"

        proof = market.host_signer.sign(host_registration_statement(info["hub_id"], market.host_signer.peer_id))
        r = await http.post("/v1/hosts/register", headers=_auth(market.host_key),
                            json={"peer_id": market.host_signer.peer_id, "proof": base64.b64encode(proof).decode()})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/hosts/register", headers=_auth(market.host_key),
                            json={"peer_id": market.gateway.peer_id, "proof": base64.b64encode(proof).decode()})
        assert r.status_code == 400 and r.json()["error"]["param"] == "proof"
        offer = make_offer(market.host_signer, issued_at=market.clock.now)
        r = await http.post("/v1/offers", headers=_auth(market.host_key),
                            json={"offer": base64.b64encode(offer.encode()).decode()})
        assert r.json() == {"accepted": True}

        r = await http.post("/v1/allowances", headers=_auth(market.client_key),
                            json={"gateway_id": market.gateway.peer_id, "budget_micro": 1_000_000})
        assert r.status_code == 200, r.text
        assert r.json()["budget_micro"] == 1_000_000

        receipts = [market.receipt() for _ in range(3)]
        r = await http.post("/v1/receipts", headers=_auth(market.client_key),
                            json={"receipts": [base64.b64encode(x.encode()).decode() for x in receipts + receipts[:1]]})
        assert [x["status"] for x in r.json()["results"]] == ["settled"] * 3 + ["duplicate"]

        bal = (await http.get("/v1/balance", headers=_auth(market.client_key))).json()
        assert bal == {"account": market.client.account, "available_micro": 9_000_000, "held_micro": 997_000}
        earn = (await http.get("/v1/earnings", headers=_auth(market.host_key))).json()
        assert earn["amount_micro"] == 2700 and earn["by_model"][0]["model"] == "ref-tiny"
        usage = (await http.get("/v1/usage", headers=_auth(market.client_key))).json()
        assert usage["requests"] == 3

        r = await http.put("/v1/payout-settings", headers=_auth(market.host_key),
                           json={"threshold_micro": 5_000_000, "connect_account_id": "acct_123"})
        assert r.json() == {"threshold_micro": 5_000_000, "connect_account_id": "acct_123"}
        r = await http.put("/v1/payout-settings", headers=_auth(market.client_key), json={"threshold_micro": 1})
        assert r.status_code == 403


async def test_errors_have_openai_shape(served):
    market, url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.get("/v1/balance")
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = await http.post("/v1/allowances", headers=_auth(market.host_key), json={"gateway_id": market.gateway.peer_id})
        assert r.status_code == 402 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["code"] == "insufficient_quota"
        r = await http.post("/v1/allowances", headers=_auth(market.client_key), content=b"not json")
        assert r.status_code == 400
        r = await http.post("/v1/allowances", headers=_auth(market.client_key), json={"gateway_id": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "gateway_id"
        r = await http.post("/v1/receipts", headers=_auth(market.client_key), json={"receipts": ["***"]})
        assert r.status_code == 400
        assert (await http.get("/v1/nothing")).status_code == 404


async def test_revocation_is_effective_on_next_request(served):
    market, url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/v1/balance", headers=_auth(market.client_key))).status_code == 200
        market.hub.db.write_sync(keys.revoke_key, market.client_key)
        assert (await http.get("/v1/balance", headers=_auth(market.client_key))).status_code == 401


async def test_rate_limit_per_key(served):
    market, url, clock = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        codes = [(await http.get("/v1/balance", headers=_auth(market.client_key))).status_code for _ in range(31)]
        assert codes == [200] * 30 + [429]
        r = await http.get("/v1/balance", headers=_auth(market.client_key))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # another key has its own bucket; time refills the first
        assert (await http.get("/v1/earnings", headers=_auth(market.host_key))).status_code == 200
        clock.now += 2.0
        assert (await http.get("/v1/balance", headers=_auth(market.client_key))).status_code == 200


async def test_openapi_describes_every_route(served):
    market, url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    app = create_app(market.hub)
    routes = {(rule.rule, m.lower()) for rule in app.url_map.iter_rules() for m in rule.methods
              if m not in ("HEAD", "OPTIONS") and rule.rule.startswith("/v1/")}
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == described


JSON_POSTS = ["/v1/allowances", "/v1/receipts", "/v1/hosts/register", "/v1/offers", "/v1/audits/roots", "/v1/audits/openings"]


async def test_malformed_bodies_are_400s_that_change_nothing(served):
    """What an operator measured as 500s: each is a 400 in the error shape, naming the param where there is one."""
    market, url, _ = served
    auth = _auth(market.host_key)
    gateway = market.gateway.peer_id
    cases = [("POST", path, b'{"a": "\xff\xfe"}', None) for path in JSON_POSTS] + [
        ("POST", "/v1/allowances", b"[" * 100_000 + b"]" * 100_000, None),
        ("PUT", "/v1/payout-settings", b'{"threshold_micro": %d}' % 2**63, "threshold_micro"),
        ("PUT", "/v1/payout-settings", b'{"connect_account_id": "acct_' + b"x" * 100_000 + b'"}', "connect_account_id"),
        ("POST", "/v1/receipts", '{"receipts": ["\u00e9\u00e9\u00e9\u00e9"]}'.encode(), "receipts"),
        ("POST", "/v1/offers", '{"offer": "\u00e9AAA"}'.encode(), "offer"),
        ("POST", "/v1/audits/roots", '{"root": "\u00e9AAA"}'.encode(), "root"),
        ("POST", "/v1/hosts/register", ('{"peer_id": "%s", "proof": "\u00e9AAA"}' % gateway).encode(), "proof"),
        ("POST", "/v1/audits/openings", ('{"request_id": "%s", "opening": "\u00e9AAA"}' % ("a" * 32)).encode(), "opening"),
        ("POST", "/v1/allowances", b'{"gateway_id": "%s", "budget_micro": -1}' % gateway.encode(), "budget_micro"),
    ]
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=auth) as http:
        before = (await http.get("/v1/earnings")).json()
        for method, path, raw, param in cases:
            r = await http.request(method, path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, raw[:40], r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (path, error)
        settings = market.hub.db.read_sync(lambda c: c.execute(
            sa.select(users.c.payout_threshold_micro, users.c.connect_account_id).where(users.c.id == market.host.id)).one())
        assert tuple(settings) == (None, None)
        assert (await http.get("/v1/earnings")).json() == before


async def test_405_names_the_allowed_methods(served):
    _, url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.delete("/v1/hub")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}
        r = await http.get("/v1/receipts")
        assert r.status_code == 405 and "POST" in r.headers["allow"]


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not in /metrics")


async def test_metrics_show_requests_receipts_and_the_ledger_to_an_admin_only(served):
    market, url, _ = served
    _, admin_key = market.hub.db.write_sync(keys.add_user, "ops@example.com", "admin")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=_auth(market.client_key))).status_code == 403
        await market.register_host()
        await market.hub.allowance(market.client, market.gateway.peer_id, 1_000_000)
        receipts = [market.receipt() for _ in range(2)]
        r = await http.post("/v1/receipts", headers=_auth(market.client_key),
                            json={"receipts": [base64.b64encode(x.encode()).decode() for x in receipts + receipts[:1]]})
        assert [x["status"] for x in r.json()["results"]] == ["settled", "settled", "duplicate"]
        r = await http.get("/metrics", headers=_auth(admin_key))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _sample(text, "gpunexus_hub_receipts_total", status="settled") == 2
    assert _sample(text, "gpunexus_hub_receipts_total", status="duplicate") == 1
    assert _sample(text, "gpunexus_hub_requests_total", route="/v1/receipts", status="200") == 1
    assert _sample(text, "gpunexus_hub_requests_total", route="/metrics", status="403") == 1
    assert _sample(text, "gpunexus_hub_request_seconds_count", route="/v1/receipts") == 1
    assert _sample(text, "gpunexus_hub_receipts_settled") == 2
    assert _sample(text, "gpunexus_hub_ledger_total_micro_usd") == 0
    fee = sum(x.cost_micro for x in receipts) * market.hub.config.fee_bps // 10_000
    assert _sample(text, "gpunexus_hub_platform_balance_micro_usd", account="platform:fee") == pytest.approx(fee, abs=2)


async def test_the_catalogue_is_public_with_licences_and_host_minimums(served):
    from gpunexus.hub import catalogue

    market, url, _ = served
    market.hub.db.write_sync(catalogue.upsert, catalogue.Model(
        "llama3.1:8b", "Llama 3.1 8B", "Llama 3.1 Community License", "https://llama.com/llama3_1/license", 131072, True,
        0.0, family="Llama 3.1", licence_ack=True, min_vram_gb=16.0, min_compute_capability="8.0", min_tokens_per_s=30.0))
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.get("/v1/catalogue")
    assert r.status_code == 200
    [entry] = r.json()["models"]
    assert entry["licence_name"] == "Llama 3.1 Community License" and entry["licence_ack"] is True and entry["available"] is True
    assert entry["minimums"] == {"vram_gb": 16.0, "compute_capability": "8.0", "tokens_per_s": 30.0}
