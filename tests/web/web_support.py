"""Support for the dashboard tests: a real hub and its app, and a cookie-keeping client that fills in CSRF tokens.

The hub is :class:`test_hub_support.Market` (real database, real signatures)
on the wall clock, because API keys expire on wall time.
"""

from __future__ import annotations

import html
import re
import time

from gpunexus.hub import accounts, keys
from gpunexus.hub.app import create_app
from test_hub_support import Market

PASSWORD = "correct horse battery"
SCREENSHOTS: list[str] = []
"""Folders the browser tests saved screenshots in (listed at the end of the run by conftest.py)."""
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_NONCE = re.compile(r'name="nonce" value="([^"]+)"')


class Page:
    """One answer: status, headers and the body as text."""

    def __init__(self, status: int, headers, text: str) -> None:
        self.status, self.headers, self.text = status, headers, text

    def csrf(self) -> str:
        match = _CSRF.search(self.text)
        assert match, "no CSRF token on the page"
        return match.group(1)

    def nonce(self) -> str:
        match = _NONCE.search(self.text)
        assert match, "no nonce on the page"
        return match.group(1)

    def has(self, fragment: str) -> bool:
        return fragment in html.unescape(self.text)


class Visitor:
    """A browser-like client of the app: keeps cookies, sends forms with the page's CSRF token."""

    def __init__(self, app) -> None:
        self.client = app.test_client()

    async def get(self, path: str, **kw) -> Page:
        r = await self.client.get(path, **kw)
        return Page(r.status_code, r.headers, await r.get_data(as_text=True))

    async def post(self, path: str, form: dict, *, csrf_from: str | None = None, csrf: bool = True, **kw) -> Page:
        """POST ``form`` to ``path``, with the CSRF token of the page at ``csrf_from`` (default ``path``)."""
        data = dict(form)
        if csrf:
            data["csrf_token"] = (await self.get(csrf_from or path)).csrf()
        r = await self.client.post(path, form=data, **kw)
        return Page(r.status_code, r.headers, await r.get_data(as_text=True))

    async def sign_up(self, email: str, role: str = "client", password: str = PASSWORD) -> Page:
        return await self.post("/signup", {"email": email, "password": password, "confirm": password, "role": role,
                                           "terms": accounts.TERMS_VERSION})

    async def log_in(self, email: str, password: str = PASSWORD) -> Page:
        return await self.post("/login", {"email": email, "password": password})

    async def create_key(self, name: str, expires: str = "") -> Page:
        page = await self.get("/keys")
        r = await self.client.post("/keys", form={"csrf_token": page.csrf(), "nonce": page.nonce(), "name": name,
                                                  "expires": expires})
        return Page(r.status_code, r.headers, await r.get_data(as_text=True))


class Site:
    """A hub (client, registered host, gateway identity: :class:`Market`) with its dashboard app."""

    def __init__(self, db) -> None:
        self.market = Market(db)
        self.market.clock.now = time.time()
        self.hub = self.market.hub
        self.app = create_app(self.hub)

    def visitor(self) -> Visitor:
        return Visitor(self.app)

    def admin(self, email: str = "admin@example.com") -> None:
        """An admin account with :data:`PASSWORD` (admins are made on the command line, never by sign-up)."""
        user, _ = self.hub.db.write_sync(keys.add_user, email, "admin")
        self.hub.db.write_sync(accounts.set_password, user.id, accounts.hash_password(PASSWORD), time.time())

    def user(self, email: str) -> keys.User:
        return self.hub.db.read_sync(keys.get_user, email)

    def password_for(self, email: str) -> None:
        user = self.hub.db.read_sync(keys.get_user, email)
        self.hub.db.write_sync(accounts.set_password, user.id, accounts.hash_password(PASSWORD), time.time())

    async def settle(self, **receipt_kw) -> str:
        """Settle one receipt of the market's client through the service layer; its request id."""
        if not getattr(self, "_registered", False):
            await self.market.register_host()
            await self.hub.allowance(self.market.client, self.market.gateway.peer_id, 2_000_000)
            self._registered = True
        r = self.market.receipt(**receipt_kw)
        [outcome] = await self.hub.submit([r.encode()])
        assert outcome.status == "settled", outcome
        return r.request_id
