"""The hub's HTTP API on a real hypercorn server (trio worker) on loopback, driven by httpx."""

from __future__ import annotations

import base64

import httpx
from gpunexus.hub import keys
from gpunexus.hub.app import create_app
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
