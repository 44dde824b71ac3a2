"""Client pages: keys shown once and revoked through the service layer, usage and the request log after
settlement, and a receipts download that ``gpunexus audit`` verifies."""

from __future__ import annotations

import base64
import json
import time

import sqlalchemy as sa
from gpunexus.hub import audit, keys
from gpunexus.hub.db import api_keys
from gpunexus.protocol.signing import Signer
from test_hub_support import make_receipt


async def _api(site, key: str, path: str = "/v1/balance") -> int:
    r = await site.app.test_client().get(path, headers={"authorization": f"Bearer {key}"})
    return r.status_code


async def test_a_key_is_shown_once_works_and_is_revoked(site):
    v = site.visitor()
    await v.sign_up("me@example.com")
    page = await v.get("/keys")
    form = {"csrf_token": page.csrf(), "nonce": page.nonce(), "name": "laptop", "expires": ""}
    r = await v.client.post("/keys", form=form)
    text = await r.get_data(as_text=True)
    key = text.split('id="new-key">')[1].split("<")[0]
    assert r.status_code == 200 and key.startswith("gnx_") and "only time the key is shown" in text
    assert key not in (await v.get("/keys")).text  # never again
    again = await v.client.post("/keys", form=form)  # the same form resubmitted (a reload)
    again_text = await again.get_data(as_text=True)
    assert "already sent" in again_text and 'id="new-key"' not in again_text
    assert len(await site.hub.list_keys(site.user("me@example.com"))) == 1
    assert await _api(site, key) == 200
    key_id = key.split("_")[1]
    r = await v.post(f"/keys/{key_id}/revoke", {}, csrf_from="/keys")
    assert r.status == 303
    listing = await v.get("/keys")
    assert listing.has("revoked") and f'id="revoke-{key_id}"' not in listing.text
    assert await _api(site, key) == 401


async def test_a_key_with_an_expiry_stops_working_after_it(site):
    v = site.visitor()
    await v.sign_up("me@example.com")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    r = await v.create_key("short-lived", expires=today)
    key = r.text.split('id="new-key">')[1].split("<")[0]
    assert await _api(site, key) == 200
    assert (await v.create_key("past", expires="2001-01-01")).has("must be today or later")
    site.hub.db.write_sync(lambda c: c.execute(sa.update(api_keys).where(api_keys.c.key_id == key.split("_")[1])
                                               .values(expires_at=time.time() - 1)))
    assert await _api(site, key) == 401
    assert (await v.get("/keys")).has("expired")


async def test_a_key_with_spend_limits_shows_them_and_its_spend(site):
    site.password_for("client@example.com")
    v = site.visitor()
    await v.log_in("client@example.com")
    page = await v.get("/keys")
    form = {"csrf_token": page.csrf(), "nonce": page.nonce(), "name": "capped", "expires": "",
            "limit_day": "0.50", "limit_month": "lots"}
    bad = await v.client.post("/keys", form=form)
    text = await bad.get_data(as_text=True)
    assert bad.status_code == 400 and "Enter an amount in US dollars" in text and 'value="0.50"' in text
    assert len(await site.hub.list_keys(site.market.client)) == 1  # nothing made
    form.update(limit_month="12", nonce=(await v.get("/keys")).nonce(), csrf_token=(await v.get("/keys")).csrf())
    made = await v.client.post("/keys", form=form)
    assert made.status_code == 200
    [capped] = [k for k in await site.hub.list_keys(site.market.client) if k.name == "capped"]
    assert (capped.limit_day_micro, capped.limit_month_micro) == (500_000, 12_000_000)
    listing = await v.get("/keys")
    assert listing.has("$0.00 / $0.50") and listing.has("$0.00 / $12.00") and listing.has("no limit")


async def test_usage_and_request_log_show_a_settled_request(site):
    site.password_for("client@example.com")
    v = site.visitor()
    await v.log_in("client@example.com")
    empty = await v.get("/usage")
    assert empty.status == 200 and empty.has("No requests in this range")
    request_id = await site.settle(tokens_in=1000, tokens_out=4000)  # 5,000 tokens at 2 USD/Mtok: 0.01 USD
    usage = await v.get("/usage")
    assert usage.status == 200 and "<svg" in usage.text and usage.has("ref-tiny")
    assert usage.has("$0.01") and usage.has("5,000")
    log = await v.get("/requests")
    assert log.has(request_id[:12]) and log.has(site.market.host_signer.peer_id[:10]) and log.has("1,000")
    detail = await v.get(f"/requests/{request_id}")
    assert detail.status == 200 and detail.has(request_id) and detail.has(site.market.host_signer.peer_id)
    old = await v.get("/usage?from=2020-01-01&to=2020-01-31")
    assert old.has("No requests in this range")
    bad = await v.get("/usage?from=2020-02-01&to=2020-01-01")
    assert bad.status == 400 and bad.has("start date must be before the end date")
    overview = await v.get("/")
    assert overview.has("Spent this month") and overview.has("$0.01")


async def test_the_receipts_download_passes_gpunexus_audit(site, tmp_path, capsys):
    site.password_for("client@example.com")
    ids = [await site.settle()]
    other, _ = site.hub.db.write_sync(keys.add_user, "other@example.com", "client")  # its entries make gaps in the extract
    site.hub.grant_sync("other@example.com", 1_000_000, "other")
    other_gateway = Signer.generate()
    await site.hub.allowance(other, other_gateway.peer_id, 500_000)
    for _ in range(2):
        await site.hub.submit([make_receipt(site.market.host_signer, other_gateway, issued_at=site.market.clock.now).encode()])
        ids.append(await site.settle())
    v = site.visitor()
    await v.log_in("client@example.com")
    r = await v.client.get("/receipts.jsonl")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(await r.get_data())
    header = json.loads(path.read_text().splitlines()[0])
    assert header["account"] == site.market.client.account and header["entries"] == 3
    report = audit.audit_file(str(path), hub_id=site.hub.hub_id)
    assert report.ok, report.faults
    assert "2 gaps" in report.notes[0]
    assert set(report.receipts) == set(ids)
    assert audit.run(str(path), site.hub.hub_id) == 0
    assert "OK" in capsys.readouterr().out
    # an edited entry is caught, as in a full log
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    raw = bytearray(base64.b64decode(entry["entry"]))
    raw[-12] ^= 1
    entry["entry"] = base64.b64encode(bytes(raw)).decode()
    lines[2] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    assert not audit.audit_file(str(path)).ok


async def test_a_dispute_is_the_clients_own_once_and_shows_its_verdict(site):
    request_id = await site.settle()
    site.password_for("client@example.com")
    stranger = site.visitor()
    await stranger.sign_up("other@example.com")
    r = await stranger.post(f"/requests/{request_id}/dispute", {}, csrf_from="/requests")
    assert r.status == 404 and await site.hub.dispute_of(request_id) is None
    v = site.visitor()
    await v.log_in("client@example.com")
    assert (await v.post(f"/requests/{request_id}/dispute", {}, csrf=False)).status == 400  # CSRF
    r = await v.post(f"/requests/{request_id}/dispute", {}, csrf_from=f"/requests/{request_id}")
    assert r.status == 303
    page = await v.get(f"/requests/{request_id}")
    assert page.has("Dispute sent") and page.has("waiting for your gateway") and not page.has("Dispute this request")
    assert await site.hub.pending_audits(site.market.client) == [request_id]  # the gateway is asked for its opening
    await site.hub.open_audit(site.market.client, request_id, None, "expired")  # it no longer has it
    page = await v.get(f"/requests/{request_id}")
    assert page.has("unopened") and page.has("no longer had this request") and page.has("gateway: expired")
    again = await site.hub.dispute(site.market.client, request_id)
    assert again.audit == "unopened"  # pressing again changes nothing
