"""The dashboard's security properties, each tested on the real app and database.

CSRF, roles and ownership enforced on the server, cookie flags, no clear
password anywhere, escaping of what users type.
"""

from __future__ import annotations

import logging
import os

import pytest
import sqlalchemy as sa
from gpunexus.hub.app import create_app
from gpunexus.hub.config import HubConfig
from gpunexus.hub.db import api_keys
from gpunexus.hub.service import Hub
from gpunexus.protocol.signing import Signer
from web_support import PASSWORD, Visitor

ADMIN_PAGES = ["/admin", "/admin/market", "/admin/users", "/admin/hosts", "/admin/models"]


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(site):
    v = site.visitor()
    await v.sign_up("me@example.com")
    me = site.user("me@example.com")
    keys_before = len(await site.hub.list_keys(me))
    page = await v.get("/keys")
    for token in (None, "forged", page.csrf()[:-2] + "xx"):
        form = {"name": "sneaky", "nonce": page.nonce()}
        if token:
            form["csrf_token"] = token
        r = await v.post("/keys", form, csrf=False)
        assert r.status == 400 and r.has("did not come from this site"), token
    r = await site.visitor().post("/login", {"email": "me@example.com", "password": PASSWORD}, csrf=False)
    assert r.status == 400  # the login form is protected too (login CSRF)
    assert len(await site.hub.list_keys(me)) == keys_before


async def test_a_csrf_token_of_another_session_is_refused(site):
    a, b = site.visitor(), site.visitor()
    await a.sign_up("a@example.com")
    await b.sign_up("b@example.com")
    page = await a.get("/keys")
    r = await b.post("/keys", {"name": "x", "nonce": page.nonce(), "csrf_token": page.csrf()}, csrf=False)
    assert r.status == 400


async def test_a_client_gets_403_on_admin_and_host_pages(site):
    v = site.visitor()
    await v.sign_up("me@example.com")
    for path in [*ADMIN_PAGES, "/earnings", "/earnings/connect/refresh", "/earnings/connect/return", "/host"]:
        r = await v.get(path)
        assert r.status == 403 and r.has("not available to your account"), path
    for path, form in (("/admin/users/1/suspend", {"suspended": "1"}), ("/admin/models", {"model": "m", "display_name": "M"}),
                       ("/admin/models/availability", {"model": "m", "available": "0"}),
                       ("/admin/users/1/grant", {"usd": "5", "nonce": "n" * 20}), ("/earnings/connect", {}),
                       ("/earnings/threshold", {"threshold": "5"})):
        r = await v.post(path, form, csrf_from="/keys")
        assert r.status == 403, path
    anonymous = site.visitor()
    for path in [*ADMIN_PAGES, "/", "/keys", "/usage", "/requests", "/receipts.jsonl", "/billing"]:
        assert (await anonymous.get(path)).status == 302, path


async def test_another_users_resources_are_404(site):
    owner, other = site.visitor(), site.visitor()
    await owner.sign_up("owner@example.com")
    await other.sign_up("other@example.com")
    key_page = await owner.create_key("mine")
    owner_user = site.user("owner@example.com")
    [key] = [k for k in await site.hub.list_keys(owner_user) if k.name == "mine"]
    r = await other.post(f"/keys/{key.key_id}/revoke", {}, csrf_from="/keys")
    assert r.status == 404
    assert [k.status(0) for k in await site.hub.list_keys(owner_user) if k.name == "mine"] == ["active"]
    assert key_page.status == 200
    # a settled request of the market's client is no one else's
    site.password_for("client@example.com")
    request_id = await site.settle()
    client = site.visitor()
    await client.log_in("client@example.com")
    assert (await client.get(f"/requests/{request_id}")).status == 200
    assert (await other.get(f"/requests/{request_id}")).status == 404
    assert request_id not in (await other.get("/requests")).text
    assert (await other.get("/receipts.jsonl")).text.count("\n") == 1  # the header only


async def test_cookie_flags_on_loopback_http(site):
    v = site.visitor()
    r = await v.client.get("/login")
    csrf_cookie = r.headers.get("set-cookie")
    assert "gnx_csrf=" in csrf_cookie and "HttpOnly" in csrf_cookie and "SameSite=Lax" in csrf_cookie
    page = await v.get("/signup")
    r = await v.client.post("/signup", form={"csrf_token": page.csrf(), "email": "me@example.com", "password": PASSWORD,
                                              "confirm": PASSWORD, "role": "client", "terms": "2025-06"})
    login = [c for c in r.headers.get_all("set-cookie") if c.startswith("gnx_login=")]
    assert login and "HttpOnly" in login[0] and "SameSite=Lax" in login[0] and "Path=/" in login[0]
    assert "Secure" not in login[0]  # plain-HTTP loopback (see hub/web/auth.py)


async def test_cookies_are_secure_and_host_prefixed_behind_https(db):
    hub = Hub(db, Signer.generate(), HubConfig(public_url="https://hub.example"))
    v = Visitor(create_app(hub))
    r = await v.client.get("/login", scheme="https")
    cookie = r.headers.get("set-cookie")
    assert cookie.startswith("__Host-gnx_csrf=") and "Secure" in cookie and "HttpOnly" in cookie


async def test_the_password_is_never_stored_or_logged_in_clear(site, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    v = site.visitor()
    await v.sign_up("me@example.com", password="Zebra-Quartz-7781")
    await v.post("/logout", {}, csrf_from="/")
    await v.log_in("me@example.com", "Zebra-Quartz-7781")
    await site.visitor().log_in("me@example.com", "Wrong-Quartz-7781")
    assert "Zebra-Quartz" not in caplog.text and "Wrong-Quartz" not in caplog.text
    if site.hub.db.url.startswith("sqlite"):
        path = site.hub.db.url.removeprefix("sqlite:///")
        site.hub.db.dispose()  # checkpoints the WAL into the file
        blob = b"".join(open(p, "rb").read() for p in (path, path + "-wal") if os.path.exists(p))
        assert b"Zebra-Quartz" not in blob and b"argon2id" in blob
    stored = site.hub.db.read_sync(lambda c: c.execute(sa.text("SELECT hash FROM passwords")).scalars().all())
    assert all(h.startswith("$argon2id$") for h in stored)


@pytest.mark.parametrize("evil", ['<script>alert("k")</script>', '"><img src=x onerror=alert(1)>'])
async def test_what_users_type_is_escaped(site, evil):
    v = site.visitor()
    await v.sign_up("me@example.com")
    r = await v.create_key(evil)
    assert r.status == 200 and evil not in r.text and "&lt;" in r.text
    assert evil not in (await v.get("/keys")).text
    r = await site.visitor().post("/signup", {"email": f"x{evil}@example.com", "password": PASSWORD, "confirm": PASSWORD,
                                              "role": "client", "terms": "2025-06"})
    assert r.status == 400 and evil not in r.text
    site.admin()
    admin = site.visitor()
    await admin.log_in("admin@example.com")
    r = await admin.post("/admin/models", {"model": evil, "display_name": evil, "licence_url": "javascript:alert(1)"},
                         csrf_from="/admin/models")
    assert r.status == 400 and r.has("must start with https://")
    await admin.post("/admin/models", {"model": evil, "display_name": evil, "available": "1"}, csrf_from="/admin/models")
    for page in ("/models", "/admin/models"):
        assert evil not in (await admin.get(page)).text
    assert site.hub.db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(api_keys)
                                                     .where(api_keys.c.name == evil)).scalar_one()) == 1
