"""Sign-up, login and logout on the dashboard: every bad input answered clearly, nothing half-created."""

from __future__ import annotations

import sqlalchemy as sa
from gpunexus.hub import accounts
from gpunexus.hub.db import accounts as account_table
from gpunexus.hub.db import passwords, terms_acceptances, users, web_sessions
from web_support import PASSWORD


def _count(site, table) -> int:
    return site.hub.db.read_sync(lambda c: c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


async def test_sign_up_logs_in_and_records_the_terms(site):
    v = site.visitor()
    page = await v.get("/signup")
    assert page.status == 200 and page.has("processed on independent hosts' hardware")
    r = await v.sign_up("new@example.com", role="host")
    assert r.status == 303 and r.headers["location"].startswith("/")
    home = await v.get("/")
    assert home.status == 200 and home.has("new@example.com") and home.has("host account")
    row = site.hub.db.read_sync(lambda c: c.execute(
        sa.select(users.c.id, users.c.role, terms_acceptances.c.version, terms_acceptances.c.address)
        .join(terms_acceptances, terms_acceptances.c.user_id == users.c.id)
        .where(users.c.email == "new@example.com")).one())
    assert (row.role, row.version) == ("host", accounts.TERMS_VERSION)


async def test_every_bad_sign_up_is_refused_whole_with_a_clear_message(site):
    v = site.visitor()
    await v.sign_up("taken@example.com")
    before = {t.name: _count(site, t) for t in (users, passwords, terms_acceptances, account_table)}
    cases = [
        ({"email": "Taken@Example.com"}, "An account with this email already exists"),
        ({"email": "not-an-email"}, "Enter a valid email address"),
        ({"password": "short", "confirm": "short"}, "at least 10 characters"),
        ({"password": "password123", "confirm": "password123"}, "too easy to guess"),
        ({"password": "aaaaaaaaaaaaaa", "confirm": "aaaaaaaaaaaaaa"}, "too easy to guess"),
        ({"confirm": "something else entirely"}, "do not match"),
        ({"role": "admin"}, "Choose whether you use models"),
        ({"terms": ""}, "Accept the terms"),
    ]
    for change, message in cases:
        form = {"email": "someone@example.com", "password": PASSWORD, "confirm": PASSWORD, "role": "client",
                "terms": accounts.TERMS_VERSION, **change}
        other = site.visitor()
        r = await other.post("/signup", form)
        assert r.status == 400 and r.has(message), (change, r.text[:300])
        assert (await other.get("/")).status == 302  # not logged in
    assert {t.name: _count(site, t) for t in (users, passwords, terms_acceptances, account_table)} == before


async def test_log_in_wrong_password_log_out(site):
    v = site.visitor()
    await v.sign_up("me@example.com")
    await v.post("/logout", {}, csrf_from="/")
    assert (await v.get("/")).status == 302
    for email, password in (("me@example.com", "wrong password!"), ("nobody@example.com", PASSWORD)):
        r = await v.log_in(email, password)
        assert r.status == 401 and r.has("Wrong email or password.")  # the same answer: no account discovery
    r = await v.log_in("ME@example.com")
    assert r.status == 303
    assert (await v.get("/keys")).status == 200
    sessions = _count(site, web_sessions)
    await v.post("/logout", {}, csrf_from="/")
    assert _count(site, web_sessions) == sessions - 1  # ended on the server, not only in the browser
    assert (await v.get("/keys")).status == 302


async def test_login_comes_back_to_the_page_asked_for_and_never_elsewhere(site):
    await site.visitor().sign_up("me@example.com")
    v = site.visitor()
    r = await v.get("/usage?from=2025-01-01")
    assert r.status == 302 and "/login?next=" in r.headers["location"]
    r = await v.post("/login?next=/usage", {"email": "me@example.com", "password": PASSWORD})
    assert r.headers["location"] == "/usage"
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        v = site.visitor()
        r = await v.post(f"/login?next={evil}", {"email": "me@example.com", "password": PASSWORD})
        assert r.headers["location"] == "/", evil


async def test_login_attempts_are_rate_limited(site):
    await site.visitor().sign_up("me@example.com")
    v = site.visitor()
    statuses = [(await v.log_in("me@example.com", "wrong password!")).status for _ in range(6)]
    assert statuses[:5] == [401] * 5 and statuses[5] == 429
    r = await v.log_in("me@example.com")  # even the right password waits now
    assert r.status == 429 and r.has("Too many attempts")


async def test_suspended_user_cannot_log_in_and_its_sessions_end(site):
    site.admin()
    v = site.visitor()
    await v.sign_up("bad@example.com")
    admin = site.visitor()
    await admin.log_in("admin@example.com")
    uid = site.hub.db.read_sync(lambda c: c.execute(sa.select(users.c.id).where(users.c.email == "bad@example.com")).scalar_one())
    r = await admin.post(f"/admin/users/{uid}/suspend", {"suspended": "1"}, csrf_from="/admin/users")
    assert r.status == 303
    assert (await v.get("/keys")).status == 302  # the open session is gone
    r = await site.visitor().log_in("bad@example.com")
    assert r.status == 403 and r.has("suspended")
