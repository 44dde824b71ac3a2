"""Pages of every account: overview, API keys, usage, the request log and disputes, the receipts download.

A key may carry spend limits per UTC day and per calendar month and an
expiry; the list shows what each key spent today and this month against
them. A new key's secret is rendered once, in the answer to the form that made it,
and never stored (only its hash is, :mod:`gpunexus.hub.keys`). The form
carries a one-time nonce, so a reload that resubmits it makes no second key.
"""

from __future__ import annotations

import secrets
import time

from quart import Blueprint, Response, flash, render_template, request

from ..chain import log_lines
from .. import keys as keys_module
from .. import reports
from ..keys import User
from ..service import Hub
from . import auth, charts, forms
from .billing import Checkout

PAGE_ROWS = 100
MAX_REQUEST_ID = 32


def routes(bp: Blueprint, hub: Hub, checkout: Checkout | None) -> None:
    @bp.get("/")
    @auth.page(hub)
    async def overview(user: User) -> str:
        today = forms.today_utc(hub.clock())
        month = forms.DateRange(today.replace(day=1), today)
        side = "host" if user.role == "host" else "client"
        rows = await hub.daily(user, side, month.start, month.end)
        keys = await hub.list_keys(user)
        now = time.time()  # keys live on wall time (hub/keys.py); receipts on the hub's clock
        return await render_template(
            "overview.html", balance=await hub.balance(user), side=side,
            month_amount=sum(r.amount_micro for r in rows), month_requests=sum(r.requests for r in rows),
            month_tokens=sum(r.tokens for r in rows), active_keys=sum(k.status(now) == "active" for k in keys),
            welcome=request.args.get("welcome") == "1")

    async def keys_page(user: User, *, new_key: str | None = None, errors: dict | None = None,
                        values: dict | None = None, status: int = 200, notice: str | None = None) -> tuple[str, int]:
        now = time.time()
        return await render_template(
            "keys.html", keys=await hub.list_keys(user), spend=await hub.key_spend(user), now=now, new_key=new_key,
            errors=errors or {},
            values=values or {}, nonce=secrets.token_urlsafe(24), today=forms.today_utc(now).isoformat(),
            notice=notice), status

    @bp.route("/keys", methods=["GET", "POST"])  # one rule per path: other methods answer 405
    @auth.page(hub)
    async def keys(user: User) -> tuple[str, int]:
        if request.method == "GET":
            return await keys_page(user)
        form = await request.form
        values = {f: (form.get(f) or "").strip() for f in ("name", "expires", "limit_day", "limit_month")}
        try:
            name = forms.text(form, "name", max_chars=forms.MAX_NAME_CHARS, label="key name")
            expires_at = forms.expiry(form, "expires", forms.today_utc(time.time()))
            limits = {f"{f}_micro": forms.optional_usd(form, f, maximum_micro=keys_module.MAX_LIMIT_MICRO)
                      for f in ("limit_day", "limit_month")}
            key = await hub.create_key(user, name, expires_at, forms.nonce(form), **limits)
        except forms.FormError as exc:
            return await keys_page(user, errors={exc.field: exc.message}, values=values, status=400)
        if key is None:
            return await keys_page(user, notice="This form was already sent: the key it made is in the list below. "
                                                "Its secret was shown once and cannot be shown again.")
        return await keys_page(user, new_key=key)

    @bp.post("/keys/<key_id>/revoke")
    @auth.page(hub)
    async def revoke_key(user: User, key_id: str) -> Response:
        await hub.revoke_key(user, key_id[:32])
        await flash(f"Key {key_id[:32]} revoked: its next request gets 401.")
        return auth.see_other("web.keys")

    @bp.get("/usage")
    @auth.page(hub, "client", "admin")
    async def usage(user: User) -> tuple[str, int]:
        span, error = forms.requested_range(request.args, hub.clock())
        rows = await hub.daily(user, "client", span.start, span.end)
        days = span.days()
        return await render_template(
            "usage.html", span=span, error=error, rows=rows, by_model=reports.by_model(rows),
            spend_chart=charts.daily_chart("Spend per day (USD)", rows, days, lambda r: r.amount_micro / 1e6, charts.usd_axis),
            tokens_chart=charts.daily_chart("Tokens per day", rows, days, lambda r: r.tokens, charts.count_axis,
                                            width=430),
            requests_chart=charts.daily_chart("Requests per day", rows, days, lambda r: r.requests, charts.count_axis,
                                              width=430),
        ), 400 if error else 200

    @bp.get("/requests")
    @auth.page(hub)
    async def requests(user: User) -> tuple[str, int]:
        span, error = forms.requested_range(request.args, hub.clock())
        side = "host" if user.role == "host" else "client"
        before = request.args.get("before", "")
        before_seq = int(before) if before.isascii() and before.isdigit() and len(before) < 19 else None
        log = await hub.request_log(user, side, span.start, span.end, limit=PAGE_ROWS, before_seq=before_seq)
        return await render_template("requests.html", span=span, error=error, log=log, side=side,
                                     more=len(log) == PAGE_ROWS), 400 if error else 200

    @bp.get("/requests/<request_id>")
    @auth.page(hub)
    async def request_detail(user: User, request_id: str) -> str:
        item, side, reasons = await hub.request_detail(user, request_id[:MAX_REQUEST_ID])
        return await render_template("request.html", item=item, side=side, reasons=reasons,
                                     dispute=await hub.dispute_of(item.request_id))

    @bp.post("/requests/<request_id>/dispute")
    @auth.page(hub)
    async def dispute(user: User, request_id: str) -> Response:
        found = await hub.dispute(user, request_id[:MAX_REQUEST_ID])
        await flash("Dispute sent: the hub audits this request as soon as your gateway hands over what it kept of it."
                    if found.audit == "pending" else "This request was already audited: the verdict is below.")
        return auth.see_other("web.request_detail", request_id=found.request_id)

    @bp.get("/receipts.jsonl")
    @auth.page(hub)
    async def receipts(user: User) -> Response:
        rows = await hub.receipt_extract(user)
        body = "".join(log_lines(hub.hub_id, rows, account=user.account))
        return Response(body, mimetype="application/jsonl", headers={
            "content-disposition": f'attachment; filename="gpunexus-receipts-{user.account.replace(":", "-")}.jsonl"',
            "cache-control": "no-store"})
