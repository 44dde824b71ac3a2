"""Admin pages (ledger conservation, users, hosts, catalogue) and host pages (earnings, payouts, offers)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from gpunexus.hub.web import forms
from gpunexus.hub.db import users
from web_support import PASSWORD


async def _admin(site):
    site.admin()
    v = site.visitor()
    assert (await v.log_in("admin@example.com")).status == 303
    return v


async def test_the_ledger_page_shows_conservation_and_totals(site):
    await site.settle()
    v = await _admin(site)
    page = await v.get("/admin")
    assert page.status == 200 and page.has("Conservation holds") and page.has("Sum of all accounts")
    assert page.has("$0.0001")  # the 10% fee of a 0.001 USD receipt
    assert page.has("platform:holds") and page.has("Settled requests")


async def test_users_search_suspend_restore_and_grant(site):
    v = await _admin(site)
    page = await v.get("/admin/users?q=client")
    assert page.has("client@example.com") and not page.has("host@example.com") and page.has("$10.00")
    uid = site.market.client.id
    before = await site.hub.list_keys(site.market.client)
    assert any(k.status(0) == "active" for k in before)
    r = await v.post(f"/admin/users/{uid}/suspend", {"suspended": "1"}, csrf_from="/admin/users")
    assert r.status == 303
    assert (await v.get("/admin/users")).has("suspended")
    assert all(k.status(0) == "revoked" for k in await site.hub.list_keys(site.market.client))
    r = await site.app.test_client().get("/v1/balance", headers={"authorization": f"Bearer {site.market.client_key}"})
    assert r.status_code == 401
    await v.post(f"/admin/users/{uid}/suspend", {"suspended": "0"}, csrf_from="/admin/users")
    assert site.hub.db.read_sync(lambda c: c.execute(sa.select(users.c.suspended_at).where(users.c.id == uid)).scalar()) is None
    page = await v.get("/admin/users")
    form = {"usd": "2.5", "nonce": "grant-once-" + "x" * 12, "csrf_token": page.csrf()}
    for _ in range(2):  # the same form twice: credits once
        await v.client.post(f"/admin/users/{uid}/grant", form=form)
    assert (await v.get("/admin/users?q=client")).has("$12.50")
    assert (await v.get("/admin")).has("Conservation holds")
    r = await v.post(f"/admin/users/{site.user('admin@example.com').id}/suspend", {"suspended": "1"}, csrf_from="/admin/users")
    assert r.status == 400 and r.has("cannot suspend your own account")


async def test_hosts_page_lists_registered_hosts_with_reputation(site):
    await site.settle()
    v = await _admin(site)
    page = await v.get("/admin/hosts")
    peer = site.market.host_signer.peer_id
    assert page.status == 200 and page.has(peer[:10]) and page.has("host@example.com") and page.has("ref-tiny")


async def test_the_catalogue_records_models_and_availability(site):
    v = await _admin(site)
    await site.market.register_host()  # its offer names ref-tiny: listed as not catalogued yet
    assert (await v.get("/admin/models")).has("Offered by hosts but not catalogued")
    r = await v.post("/admin/models", {"model": "ref-tiny", "display_name": "Reference tiny", "licence_name": "Apache-2.0",
                                       "licence_url": "https://www.apache.org/licenses/LICENSE-2.0", "context_length": "2,048",
                                       "available": "1", "min_vram_gb": "0.5", "min_compute_capability": "", "min_tokens_per_s": "20"})
    assert r.status == 303
    assert (await v.get("/admin/models")).has("0.5 GB, 20 tok/s")
    public = await site.visitor().get("/models")  # no login needed
    assert public.has("Reference tiny") and public.has("Apache-2.0") and public.has("2,048") and public.has("available")
    r = await v.post("/admin/models/availability", {"model": "ref-tiny", "available": "0"}, csrf_from="/admin/models")
    assert r.status == 303
    assert (await site.visitor().get("/models")).has("unavailable")
    r = await v.post("/admin/models/availability", {"model": "nope", "available": "0"}, csrf_from="/admin/models")
    assert r.status == 404
    r = await v.post("/admin/models", {"model": "m", "display_name": "M", "context_length": "-3"})
    assert r.status == 400 and r.has("whole number")
    r = await v.post("/admin/models", {"model": "m", "display_name": "M", "min_compute_capability": "eight"})
    assert r.status == 400 and r.has("major.minor")
    r = await v.post("/admin/models", {"model": "m", "display_name": "M", "min_vram_gb": "lots"})
    assert r.status == 400 and r.has("minimum GPU memory must be a number")


async def test_host_earnings_payouts_and_offers(site):
    site.password_for("host@example.com")
    await site.settle(tokens_in=10_000, tokens_out=40_000)  # 0.10 USD, 0.09 USD to the host
    v = site.visitor()
    await v.log_in("host@example.com", PASSWORD)
    page = await v.get("/earnings")
    assert page.status == 200 and "<svg" in page.text and page.has("ref-tiny") and page.has("$0.09")
    assert page.has("Unpaid (pending)") and page.has("off")  # no threshold yet
    r = await v.post("/earnings/threshold", {"threshold": "25"}, csrf_from="/earnings")
    assert r.status == 303 and (await v.get("/earnings")).has("$25.00")
    assert (await site.hub.payouts(site.market.host))["threshold_micro"] == 25_000_000
    bad = await v.post("/earnings/threshold", {"threshold": "lots"}, csrf_from="/earnings")
    assert bad.status == 400 and bad.has("Enter an amount in US dollars")
    host = await v.get("/host")
    assert host.has(site.market.host_signer.peer_id[:10]) and host.has("live") and host.has("$2.00")
    overview = await v.get("/")
    assert overview.has("Unpaid earnings") and overview.has("$0.09")
    assert (await v.get("/usage")).status == 403  # a host's pages are its own


async def test_a_licence_that_must_be_accepted_is_accepted_on_the_models_page(site):
    v = await _admin(site)
    r = await v.post("/admin/models", {"model": "ref-tiny", "display_name": "Reference tiny", "family": "reference",
                                       "licence_ack": "1", "available": "1"})
    assert r.status == 400 and r.has("Name the licence")  # nothing to accept: refused, nothing saved
    assert not (await site.visitor().get("/models")).has("Reference tiny")
    r = await v.post("/admin/models", {"model": "ref-tiny", "display_name": "Reference tiny", "family": "reference",
                                       "licence_name": "Tiny Licence", "licence_url": "https://example.com/tiny",
                                       "licence_ack": "1", "available": "1"})
    assert r.status == 303 and (await v.get("/admin/models")).has("must be accepted")
    anonymous = await site.visitor().get("/models")
    assert anonymous.has("must be accepted") and anonymous.has("log in") and not anonymous.has("I accept")
    assert (await site.visitor().post("/models/accept", {"model": "ref-tiny"}, csrf_from="/login")).status == 302

    site.password_for("client@example.com")
    client = site.visitor()
    await client.log_in("client@example.com")
    page = await client.get("/models")
    assert page.has("I accept this licence") and page.has("reference")
    assert (await client.post("/models/accept", {"model": "ref-tiny"}, csrf=False)).status == 400  # CSRF
    r = await client.post("/models/accept", {"model": "ref-tiny"}, csrf_from="/models")
    assert r.status == 303
    page = await client.get("/models")
    assert page.has("You accepted the licence of Reference tiny") and page.has("accepted") and not page.has("I accept")
    assert "ref-tiny" in await site.hub.licence_acceptances(site.market.client)
    assert (await client.post("/models/accept", {"model": "nope"}, csrf_from="/models")).status == 404


async def _market_history(site, models: list[str], hours: int) -> None:
    """Hosts offer ``models`` over the last ``hours`` hours and the hub closes an epoch each hour (real market code)."""
    market, now = site.market, site.market.clock.now
    await market.register_host(offer=False)
    for h in range(hours, -1, -1):
        market.clock.now = now - h * 3600
        for seq, model in enumerate(models):
            await market.post_offer(model=model, ttl=120, seq=(hours - h) * len(models) + seq + 1)
        await site.hub.market.close_epoch(site.hub.market.current_epoch() + 1)
    market.clock.now = now


async def test_the_market_page_charts_price_demand_supply_and_fees_over_time(site):
    await site.settle(tokens_in=10_000, tokens_out=40_000)  # a 0.01 USD fee today
    await _market_history(site, ["ref-tiny", "other-model"], hours=4)
    v = await _admin(site)
    yesterday = forms.today_utc(site.market.clock.now) - dt.timedelta(days=1)
    page = await v.get(f"/admin/market?from={yesterday.isoformat()}")
    assert page.status == 200 and page.has("averaged per hour")
    for chart in ("price-chart", "demand-chart", "supply-chart", "fee-chart"):
        assert f'id="{chart}"><svg' in page.text, chart
    assert page.has("Market price per million tokens (USD)") and page.has("other-model") and page.has("ref-tiny")
    assert page.has("Platform fee earned per day (USD)") and page.has("$0.01")
    month = await v.get("/admin/market")
    assert month.status == 200 and month.has("averaged per day")
    bad = await v.get("/admin/market?from=2026-13-01")
    assert bad.status == 400 and bad.has("YYYY-MM-DD")
    site.password_for("client@example.com")
    client = site.visitor()
    await client.log_in("client@example.com")
    assert (await client.get("/admin/market")).status == 403
