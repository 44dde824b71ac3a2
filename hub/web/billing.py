"""Top-ups and auto-recharge: a Stripe Checkout form, the success and cancel pages Stripe sends the person
back to, and the auto-recharge threshold and amount.

The success page (``/billing/done?session=cs_...``, the ``success_url`` that
:meth:`StripeBilling.checkout` gives Stripe) reads the session back from
Stripe and credits it if paid, under the same journal key as the webhook:
reloading the page, or the webhook arriving before or after, credits once.
Without Stripe (manual-credits mode) the page says how credits are granted.

Auto-recharge is set through the same call as ``PUT /v1/billing/auto-recharge``
(:meth:`StripeBilling.set_auto_recharge`); the page also shows whether a card
is saved (the first Checkout top-up saves it) and the last recharge error.
A form that does not parse re-renders with the reason and changes nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from quart import Blueprint, Response, flash, redirect, render_template, request

from ..keys import User
from ..service import Hub, HubError
from . import auth, fmt, forms

MIN_TOPUP_MICRO = 500_000
"""Stripe's card minimum, 0.50 USD (the same bound :mod:`gpunexus.hub.stripe_billing` enforces)."""
MAX_TOPUP_MICRO = 10_000 * 1_000_000
MAX_THRESHOLD_MICRO = 100_000 * 1_000_000
PRESETS_USD = (10, 25, 50, 100)


@runtime_checkable
class Checkout(Protocol):
    """What the dashboard needs of the Stripe layer (:class:`~gpunexus.hub.stripe_billing.StripeBilling`)."""

    async def checkout(self, user: User, amount_micro: int) -> dict: ...

    async def confirm_checkout(self, user: User, session_id: str) -> dict: ...

    async def status(self, user: User) -> dict: ...

    async def set_auto_recharge(self, user: User, threshold_micro: int | None, amount_micro: int | None) -> dict: ...

    async def connect_onboarding(self, user: User) -> str: ...

    async def connect_status(self, user: User) -> dict: ...


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    async def page(user: User, *, error: str | None = None, amount: str = "", status: int = 200,
                   recharge_error: str | None = None, recharge_values: dict | None = None) -> tuple[str, int]:
        recharge = (await checkout.status(user))["auto_recharge"] if checkout else None
        return await render_template("billing.html", balance=await hub.balance(user), error=error, amount=amount,
                                     presets=PRESETS_USD, recharge=recharge, recharge_error=recharge_error,
                                     recharge_values=recharge_values), status

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

    @bp.post("/billing/auto-recharge")
    @auth.page(hub, "client", "admin")
    async def auto_recharge(user: User) -> Response | tuple[str, int]:
        if checkout is None:
            raise HubError(409, "manual_credits", "This hub takes no card payments: there is nothing to recharge.")
        form = await request.form
        values = {f: (form.get(f) or "").strip()[:20] for f in ("recharge_threshold", "recharge_amount")}
        try:
            threshold, amount = _recharge_settings(form)
        except forms.FormError as exc:
            return await page(user, recharge_error=exc.message, recharge_values=values, status=400)
        await checkout.set_auto_recharge(user, threshold, amount)
        await flash(f"Auto-recharge on: {fmt.usd(amount)} whenever your balance falls under {fmt.usd(threshold)}."
                    if threshold is not None else "Auto-recharge switched off.")
        return auth.see_other("web.billing")

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


def _recharge_settings(form) -> tuple[int | None, int | None]:
    """(threshold, amount) in micro-USD, both None when both fields are empty (auto-recharge off)."""
    filled = [bool((form.get(f) or "").strip()) for f in ("recharge_threshold", "recharge_amount")]
    if not any(filled):
        return None, None
    if not all(filled):
        raise forms.FormError("recharge_threshold" if not filled[0] else "recharge_amount",
                              "Enter both a threshold and an amount, or leave both empty to switch auto-recharge off.")
    threshold = forms.usd(form, "recharge_threshold", minimum_micro=10_000, maximum_micro=MAX_THRESHOLD_MICRO)
    amount = forms.usd(form, "recharge_amount", minimum_micro=MIN_TOPUP_MICRO, maximum_micro=MAX_TOPUP_MICRO)
    return threshold, amount
