"""Operator pages: ledger totals and the conservation check, the market and platform fees over time, users,
hosts, the model catalogue.

Every route needs an admin session (403 for anyone else), and every service
call checks the role again (:meth:`Hub._require`), so a page added later
without the guard still refuses. A form value that does not parse answers
400 with what to fix (the blueprint's :class:`~.forms.FormError` handler).
"""

from __future__ import annotations

import datetime as dt
import secrets

from quart import Blueprint, Response, flash, render_template, request

from ..catalogue import Model
from ..keys import User
from ..service import Hub
from ..reports import MarketPoint
from . import auth, charts, forms
from .billing import Checkout

MAX_GRANT_MICRO = 100_000 * 1_000_000
HOURLY_UP_TO_DAYS = 3
"""Ranges of up to this many days chart the market per hour; longer ones per day."""


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    @bp.get("/admin")
    @auth.page(hub, "admin")
    async def admin(user: User) -> str:
        return await render_template("admin/overview.html", totals=await hub.ledger_totals(user),
                                     market=await hub.market.overview())

    @bp.get("/admin/market")
    @auth.page(hub, "admin")
    async def market(user: User) -> tuple[str, int]:
        span, error = forms.requested_range(request.args, hub.clock())
        hourly = len(span.days()) <= HOURLY_UP_TO_DAYS
        bucket_s = 3600 if hourly else 86400
        points = await hub.market_history(user, span.start, span.end, bucket_s)
        starts = [span.start + i * bucket_s for i in range(int((span.end - span.start) // bucket_s))]
        labels = [dt.datetime.fromtimestamp(t, dt.UTC).strftime("%b %d %H:00" if hourly else "%b %d") for t in starts]
        price, demand, supply = (_per_model(points, starts, f) for f in ("price_micro_per_mtok", "demand_tps", "supply_tps"))
        fees = await hub.fees_daily(user, span.start, span.end)
        return await render_template(
            "admin/market.html", span=span, error=error, hourly=hourly, fees_total=sum(r.amount_micro for r in fees),
            models=len(price),
            price_chart=charts.timeline_chart("Market price per million tokens (USD)",
                                              {m: [v and v / 1e6 for v in vs] for m, vs in price.items()}, labels,
                                              charts.usd_axis),
            demand_chart=charts.timeline_chart("Demand (tokens/s)", demand, labels, charts.rate_axis, width=430),
            supply_chart=charts.timeline_chart("Supply (tokens/s)", supply, labels, charts.rate_axis, width=430),
            fee_chart=charts.daily_chart("Platform fee earned per day (USD)", fees, span.days(),
                                         lambda r: r.amount_micro / 1e6, charts.usd_axis,
                                         no_data="No fees in this range"),
        ), 400 if error else 200

    @bp.get("/admin/users")
    @auth.page(hub, "admin")
    async def users(user: User) -> str:
        query = (request.args.get("q") or "").strip()[:320]
        return await render_template("admin/users.html", users=await hub.users(user, query), q=query,
                                     nonce=secrets.token_urlsafe(24), manual=checkout is None)

    @bp.post("/admin/users/<int:user_id>/suspend")
    @auth.page(hub, "admin")
    async def suspend(user: User, user_id: int) -> Response:
        form = await request.form
        suspended = forms.choice(form, "suspended", ("1", "0"), "Choose suspend or restore.") == "1"
        await hub.set_suspended(user, user_id, suspended)
        await flash("User suspended: sessions ended, keys revoked." if suspended else "User restored.")
        return auth.see_other("web.users", q=form.get("q", "")[:320])

    @bp.post("/admin/users/<int:user_id>/grant")
    @auth.page(hub, "admin")
    async def grant(user: User, user_id: int) -> Response:
        form = await request.form
        micro = forms.usd(form, "usd", whole_cents=False, maximum_micro=MAX_GRANT_MICRO)
        fresh = await hub.grant(user, user_id, micro, forms.nonce(form))
        await flash("Credits granted." if fresh else "That grant was already made (the form was sent twice).")
        return auth.see_other("web.users", q=form.get("q", "")[:320])

    @bp.get("/admin/hosts")
    @auth.page(hub, "admin")
    async def hosts(user: User) -> str:
        return await render_template("admin/hosts.html", hosts=await hub.admin_hosts(user))

    async def models_page(user: User, *, errors: dict | None = None, values: dict | None = None,
                          status: int = 200) -> tuple[str, int]:
        return await render_template("admin/models.html", models=await hub.models(), errors=errors or {},
                                     values=values or {}, uncatalogued=await hub.uncatalogued_models(user)), status

    @bp.route("/admin/models", methods=["GET", "POST"])  # one rule per path: other methods answer 405
    @auth.page(hub, "admin")
    async def models_admin(user: User) -> Response | tuple[str, int]:
        if request.method == "GET":
            return await models_page(user, values={"model": (request.args.get("model") or "")[:256]})
        form = await request.form
        values = {k: (form.get(k) or "").strip() for k in ("model", "display_name", "family", "licence_name", "licence_url",
                                                            "context_length", "available", "licence_ack", "min_vram_gb",
                                                            "min_compute_capability", "min_tokens_per_s")}
        try:
            entry = Model(
                model=forms.text(form, "model", max_chars=256, label="model id"),
                display_name=forms.text(form, "display_name", max_chars=200, label="display name"),
                licence_name=forms.text(form, "licence_name", max_chars=200, required=False, label="licence name"),
                licence_url=forms.url(form, "licence_url", max_chars=500, label="licence URL"),
                context_length=forms.optional_int(form, "context_length", minimum=1, maximum=10_000_000,
                                                  label="context length"),
                available=form.get("available") == "1", updated_at=hub.clock(),
                family=forms.text(form, "family", max_chars=100, required=False, label="family"),
                licence_ack=form.get("licence_ack") == "1",
                min_vram_gb=forms.optional_number(form, "min_vram_gb", minimum=0.1, maximum=10_000, label="minimum GPU memory"),
                min_compute_capability=forms.compute_capability(form, "min_compute_capability"),
                min_tokens_per_s=forms.optional_number(form, "min_tokens_per_s", minimum=0.1, maximum=1_000_000,
                                                       label="minimum tokens/s"))
            if entry.licence_ack and not (entry.licence_name or entry.licence_url):
                raise forms.FormError("licence_ack", "Name the licence (or give its URL) that clients must accept.")
        except forms.FormError as exc:
            return await models_page(user, errors={exc.field: exc.message}, values=values, status=400)
        await hub.save_model(user, entry)
        await flash(f"Saved {entry.model}.")
        return auth.see_other("web.models_admin")

    @bp.post("/admin/models/availability")
    @auth.page(hub, "admin")
    async def availability(user: User) -> Response:
        form = await request.form
        model = forms.text(form, "model", max_chars=256, label="model id")
        available = forms.choice(form, "available", ("1", "0"), "Choose on or off.") == "1"
        await hub.set_model_available(user, model, available)
        await flash(f"{model} is now {'available' if available else 'switched off'}.")
        return auth.see_other("web.models_admin")


def _per_model(points: list[MarketPoint], starts: list[float], field: str) -> dict[str, list[float | None]]:
    """One value per bucket for each model (None where the hub published nothing), busiest models first."""
    index = {t: i for i, t in enumerate(starts)}
    series: dict[str, list[float | None]] = {}
    demand: dict[str, float] = {}
    for p in points:
        i = index.get(p.start)
        if i is not None:
            series.setdefault(p.model, [None] * len(starts))[i] = getattr(p, field)
            demand[p.model] = demand.get(p.model, 0.0) + p.demand_tps
    return {m: series[m] for m in sorted(series, key=lambda m: (-demand[m], m))}
