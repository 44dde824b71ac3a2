"""Who is looking at a page: cookie sessions, CSRF, and the role each page needs.

Sessions. quart-auth (the Quart author's extension; plain Quart code, no
asyncio, so it runs under quart-trio as is) signs the login cookie. What it
signs is the random token of a server-side session
(:mod:`gpunexus.hub.accounts`), so the hub, not the cookie, decides whether a
session is still good: logout, suspension, a new password and the 12-hour
lifetime end it whatever a browser keeps.

CSRF. quart-wtforms' ``CSRFProtect`` (a port of Flask-WTF's): a raw token in
Quart's signed session cookie, a signed, time-limited copy in each form's
hidden ``csrf_token`` field; every POST of the dashboard is checked (the JSON
API is not: it takes no cookies, only bearer keys, so a browser cannot be
made to send its credentials). Only ``CSRFProtect`` is used from that
package; its WTForms form classes are not (their async validation runs on
asyncio).

Cookie flags, both cookies: ``HttpOnly`` (no script reads them),
``SameSite=Lax`` (not sent on cross-site POSTs; still sent when a person
follows a link to the dashboard), ``Path=/``. ``Secure`` when the hub's
public URL is ``https://`` (``hub serve --public-url``), and then the names
carry the ``__Host-`` prefix, which browsers only accept from a secure
origin without a Domain. On the plain-HTTP loopback default a ``Secure``
cookie would not be sent back by every client (Python's cookie jars, curl),
and nothing crosses a network there to protect, so it is left off; a hub
reached over a network must be put behind TLS with an ``https://`` public URL.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from quart import Quart, Response, g, redirect, request, url_for
from quart_auth import AuthUser, QuartAuth, current_user, login_user, logout_user
from quart_wtf import CSRFProtect

from .. import accounts
from ..keys import User
from ..service import Hub, HubError


def cookie_names(secure: bool) -> tuple[str, str]:
    """(login cookie, CSRF session cookie) names."""
    prefix = "__Host-" if secure else ""
    return prefix + "gnx_login", prefix + "gnx_csrf"


def setup(app: Quart, hub: Hub) -> CSRFProtect:
    """Sign cookies with the hub's shared secret and install quart-auth and CSRF protection on ``app``."""
    secure = hub.config.public_url.startswith("https://")
    login_cookie, csrf_cookie = cookie_names(secure)
    app.secret_key = hub.db.write_sync(accounts.cookie_secret)
    app.config.update(
        SESSION_COOKIE_NAME=csrf_cookie, SESSION_COOKIE_SECURE=secure, SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_PATH="/",
        WTF_CSRF_CHECK_DEFAULT=False,  # checked by the dashboard's own before_request, for its routes only
        WTF_CSRF_TIME_LIMIT=int(accounts.SESSION_TTL_S),
    )
    QuartAuth(app, cookie_name=login_cookie, cookie_secure=secure, cookie_samesite="Lax", cookie_http_only=True,
              cookie_path="/", duration=int(accounts.SESSION_TTL_S), mode="cookie")
    return CSRFProtect(app)


async def viewer(hub: Hub) -> User | None:
    """The logged-in user of this request (looked up once per request), or None."""
    if "viewer" not in g:
        token = current_user.auth_id
        g.viewer = await hub.session_user(token) if token else None
    return g.viewer


def start_session(user: User, token: str) -> None:
    login_user(AuthUser(token))
    g.viewer = user


async def end_session(hub: Hub) -> None:
    token = current_user.auth_id
    if token:
        await hub.log_out(token)
    logout_user()
    g.viewer = None


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site (no scheme, host or ``//``), else None: no open redirects."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def page(hub: Hub, *roles: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorate a view that needs a login (and one of ``roles``, if given); the view gets the user first.

    Anonymous: a redirect to the login page, coming back here after. Wrong
    role: 403, decided here on the server whatever the page's links show.
    """
    def wrap(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(view)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            user = await viewer(hub)
            if user is None:
                return redirect(url_for("web.login", next=request.full_path.rstrip("?")))
            if roles and user.role not in roles:
                raise HubError(403, "permission_denied", "This page is not available to your account.")
            return await view(user, *args, **kwargs)

        return guarded

    return wrap


def see_other(endpoint: str, **values: Any) -> Response:
    """303 to ``endpoint``: after a POST, the browser GETs the result (a reload does not resubmit)."""
    return redirect(url_for(endpoint, **values), 303)
