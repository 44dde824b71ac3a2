"""Sign-up, login, logout, the terms, and the public model catalogue (where licences are accepted).

Login attempts are rate-limited with the hub's own token buckets
(:mod:`gpunexus.hub.ratelimit`, already tested and clock-injectable), per
email and per client address, so guessing one account's password and
spraying many accounts from one address are both slowed. quart-rate-limiter
was the other candidate; it limits whole routes per address and cannot key a
bucket by the email in the form body without reading the body twice.
Sign-ups are limited per address too (accounts are free to make).
"""

from __future__ import annotations

from quart import Blueprint, Response, flash, redirect, render_template, request

from .. import accounts
from ..keys import User
from ..ratelimit import RateLimiter
from ..service import Hub, HubError
from . import auth, forms
from .billing import Checkout

LOGIN_PER_EMAIL = (1 / 60, 5)
"""(refill per second, burst): five tries per email, then one a minute."""
LOGIN_PER_ADDRESS = (1 / 6, 20)
SIGNUP_PER_ADDRESS = (1 / 30, 20)


def _limited(limiter: RateLimiter, key: str) -> None:
    wait = limiter.take(key)
    if wait:
        raise HubError(429, "rate_limit_exceeded",
                       f"Too many attempts. Try again in {RateLimiter.retry_after(wait)} seconds.")


def _address() -> str:
    return request.remote_addr or ""


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    per_email, per_address, signups = (RateLimiter(*spec) for spec in (LOGIN_PER_EMAIL, LOGIN_PER_ADDRESS, SIGNUP_PER_ADDRESS))

    @bp.route("/signup", methods=["GET", "POST"])
    async def signup() -> str | Response:
        if request.method == "GET":
            return await render_template("signup.html", values={"role": request.args.get("role", "client")}, errors={})
        form = await request.form
        values = {"email": (form.get("email") or "").strip(), "role": form.get("role") or ""}
        try:
            _limited(signups, _address())
            password = forms.secret(form, "password")
            if password != forms.secret(form, "confirm"):
                raise forms.FormError("confirm", "The two passwords do not match.")
            terms = accounts.TERMS_VERSION if form.get("terms") == accounts.TERMS_VERSION else ""
            user = await hub.sign_up(values["email"], password, values["role"], terms_version=terms,
                                     address=_address())
            _, token = await hub.log_in(user.email, password)
        except forms.FormError as exc:
            return await _signup_error(values, exc.field, exc.message)
        except HubError as exc:
            if exc.status == 429:
                raise
            return await _signup_error(values, exc.param or "email", exc.message)
        auth.start_session(user, token)
        return auth.see_other("web.overview", welcome=1)

    async def _signup_error(values: dict, field: str, message: str) -> tuple[str, int]:
        return await render_template("signup.html", values=values, errors={field: message}), 400

    @bp.route("/login", methods=["GET", "POST"])
    async def login() -> str | Response | tuple[str, int]:
        next_url = auth.safe_next(request.args.get("next"))
        if request.method == "GET":
            if await auth.viewer(hub):
                return auth.see_other("web.overview")
            return await render_template("login.html", email="", error=None, next=next_url)
        form = await request.form
        email = (form.get("email") or "").strip()
        _limited(per_address, _address())
        _limited(per_email, email.lower())
        try:
            user, token = await hub.log_in(email, forms.secret(form, "password"))
        except HubError as exc:
            if exc.status == 429:
                raise
            return await render_template("login.html", email=email, error=exc.message, next=next_url), exc.status
        auth.start_session(user, token)
        return redirect(next_url, 303) if next_url else auth.see_other("web.overview")

    @bp.post("/logout")
    async def logout() -> Response:
        await auth.end_session(hub)
        return auth.see_other("web.login")

    @bp.get("/terms")
    async def terms() -> str:
        return await render_template("terms.html", version=accounts.TERMS_VERSION)

    @bp.get("/models")
    async def models() -> str:
        user = await auth.viewer(hub)
        accepted = await hub.licence_acceptances(user) if user else {}
        return await render_template("models.html", models=await hub.models(), accepted=accepted)

    @bp.post("/models/accept")
    @auth.page(hub)
    async def accept_licence(user: User) -> Response:
        form = await request.form
        entry = await hub.accept_licence(user, forms.text(form, "model", max_chars=256, label="model id"))
        await flash(f"You accepted the licence of {entry.display_name} ({entry.licence}). "
                    "Your keys may use it now: a gateway that refused it has asked the hub again.")
        return auth.see_other("web.models")
