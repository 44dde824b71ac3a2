"""Pages of a host account: earnings per day and model, payouts, threshold and Stripe Connect onboarding;
offers, reputation, verdicts.

The payout threshold is set through the same service call as
``PUT /v1/payout-settings`` (:meth:`Hub.set_payout_settings`); the Connect
account already on file is kept as it is.

"Set up payouts" goes through :meth:`StripeBilling.connect_onboarding` (as
``POST /v1/connect/onboarding`` does): the host is sent to a Stripe Account
Link and comes back to ``/earnings/connect/return``, which reads the account
back from Stripe. Stripe sends a browser whose link expired (or was used) to
``/earnings/connect/refresh``, which sends it to a fresh link; that GET only
makes links for an account that exists, never an account.
"""

from __future__ import annotations

from quart import Blueprint, Response, flash, redirect, render_template, request

from .. import reports
from ..keys import User
from ..service import Hub, HubError
from . import auth, charts, forms
from .billing import Checkout

MAX_THRESHOLD_MICRO = 100_000 * 1_000_000


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    async def earnings_page(user: User, *, error: str | None = None, status: int = 200) -> tuple[str, int]:
        span, range_error = forms.requested_range(request.args, hub.clock())
        if range_error:
            error, status = range_error, 400
        rows = await hub.daily(user, "host", span.start, span.end)
        return await render_template(
            "earnings.html", span=span, error=error, by_model=reports.by_model(rows),
            total=sum(r.amount_micro for r in rows), payouts=await hub.payouts(user),
            chart=charts.daily_chart("Earnings per day (USD)", rows, span.days(), lambda r: r.amount_micro / 1e6,
                                     charts.usd_axis),
        ), status

    @bp.get("/earnings")
    @auth.page(hub, "host", "admin")
    async def earnings(user: User) -> tuple[str, int]:
        return await earnings_page(user)

    @bp.post("/earnings/threshold")
    @auth.page(hub, "host", "admin")
    async def threshold(user: User) -> Response | tuple[str, int]:
        form = await request.form
        try:
            micro = None if not (form.get("threshold") or "").strip() else forms.usd(
                form, "threshold", minimum_micro=10_000, maximum_micro=MAX_THRESHOLD_MICRO)
        except forms.FormError as exc:
            return await earnings_page(user, error=exc.message, status=400)
        current = await hub.payouts(user)
        await hub.set_payout_settings(user, micro, current["connect_account_id"])
        await flash("Payout threshold saved." if micro is not None else "Automatic payouts switched off.")
        return auth.see_other("web.earnings")

    def stripe_layer() -> Checkout:
        if checkout is None:
            raise HubError(409, "manual_credits", "This hub has no Stripe account to pay hosts through.")
        return checkout

    @bp.post("/earnings/connect")
    @auth.page(hub, "host", "admin")
    async def connect(user: User) -> Response:
        return redirect(await stripe_layer().connect_onboarding(user), 303)

    @bp.get("/earnings/connect/refresh")
    @auth.page(hub, "host", "admin")
    async def connect_refresh(user: User) -> Response:
        layer = stripe_layer()
        if (await hub.payouts(user))["connect_account_id"] is None:
            return auth.see_other("web.earnings")
        return redirect(await layer.connect_onboarding(user), 303)

    @bp.get("/earnings/connect/return")
    @auth.page(hub, "host", "admin")
    async def connect_return(user: User) -> str:
        return await render_template("connect_return.html", account=await stripe_layer().connect_status(user))

    @bp.get("/host")
    @auth.page(hub, "host", "admin")
    async def host(user: User) -> str:
        return await render_template("host.html", view=await hub.host_view(user), now=hub.clock(),
                                     payouts=await hub.payouts(user))
