"""Top-ups: a Stripe Checkout form, and the success and cancel pages Stripe sends the person back to.

The success page (``/billing/done?session=cs_...``, the ``success_url`` that
:meth:`StripeBilling.checkout` gives Stripe) reads the session back from
Stripe and credits it if paid, under the same journal key as the webhook:
reloading the page, or the webhook arriving before or after, credits once.
Without Stripe (manual-credits mode) the page says how credits are granted.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from quart import Blueprint, Response, redirect, render_template, request

from ..keys import User
from ..service import Hub, HubError
from . import auth, forms

MIN_TOPUP_MICRO = 500_000
"""Stripe's card minimum, 0.50 USD (the same bound :mod:`gpunexus.hub.stripe_billing` enforces)."""
MAX_TOPUP_MICRO = 10_000 * 1_000_000
PRESETS_USD = (10, 25, 50, 100)


@runtime_checkable
class Checkout(Protocol):
    """What the dashboard needs of the Stripe layer (:class:`~gpunexus.hub.stripe_billing.StripeBilling`)."""

    async def checkout(self, user: User, amount_micro: int) -> dict: ...

    async def confirm_checkout(self, user: User, session_id: str) -> dict: ...


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    async def page(user: User, *, error: str | None = None, amount: str = "", status: int = 200) -> tuple[str, int]:
        return await render_template("billing.html", balance=await hub.balance(user), error=error, amount=amount,
                                     presets=PRESETS_USD), status

    @bp.get("/billing")
    @auth.page(hub, "client", "admin")
    async def billing(user: User) -> tuple[str, int]:
        return await page(user)

    @bp.post("/billing/checkout")
    @auth.page(hub, "client", "admin")
    async def start_checkout(user: User) -> Response | tuple[str, int]:
        if checkout is None:
            raise HubError(409, "manual_credits", "This hub takes no card payments: the operator grants credits.")
        form = await request.form
        try:
            micro = forms.usd(form, "amount", minimum_micro=MIN_TOPUP_MICRO, maximum_micro=MAX_TOPUP_MICRO)
        except forms.FormError as exc:
            return await page(user, error=exc.message, amount=(form.get("amount") or "")[:20], status=400)
        session = await checkout.checkout(user, micro)
        return redirect(session["url"], 303)

    @bp.get("/billing/done")
    @auth.page(hub, "client", "admin")
    async def done(user: User) -> str:
        if checkout is None:
            raise HubError(404, "not_found", "This hub takes no card payments.")
        result = await checkout.confirm_checkout(user, request.args.get("session", ""))
        return await render_template("billing_done.html", result=result, balance=await hub.balance(user))

    @bp.get("/billing/cancelled")
    @auth.page(hub, "client", "admin")
    async def cancelled(user: User) -> str:
        return await render_template("billing_cancelled.html")
