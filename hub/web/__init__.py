"""The hub's web dashboard: server-rendered pages for people, on the hub's own port.

Pages are Jinja templates rendered by Quart over the same service layer as
the JSON API (:class:`~gpunexus.hub.service.Hub`): one code path per
operation, so a page and the API never disagree. Every core action is a
plain HTML form (no JavaScript needed); charts are SVG rendered on the
server (:mod:`.charts`).

One module per job:

``auth``      cookie sessions (quart-auth), CSRF (quart-wtforms), role guards, cookie flags
``forms``     parse and check every form and query value
``fmt``       money, time and id formatting for templates
``charts``    pygal SVG charts
``account``   sign-up, login, logout, terms, the public model catalogue
``client``    overview, API keys, usage, request log, receipts download
``billing``   Stripe Checkout top-ups, their success and cancel pages, auto-recharge
``host``      earnings, payouts and Stripe Connect onboarding, offers, reputation, verdicts
``admin``     ledger totals and conservation, the market and fees over time, users, hosts, model catalogue

Routes are outside ``/v1/`` (the JSON API) and ``/openapi.json``; the
dashboard's static files are under ``/static/dashboard/``.
"""

from __future__ import annotations

from quart import Blueprint, Response, render_template, request
from quart_trio import QuartTrio
from quart_wtf import CSRFError
from werkzeug.exceptions import HTTPException

from .. import accounts
from ..service import Hub, HubError
from . import account, admin, auth, billing, client, fmt, forms, host
from .billing import Checkout


def mount(app: QuartTrio, hub: Hub, checkout: Checkout | None = None) -> None:
    """Serve the dashboard from ``app``; ``checkout`` is the Stripe layer when the hub takes card payments."""
    csrf = auth.setup(app, hub)
    fmt.install(app)
    bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/static/dashboard")

    @bp.before_request
    async def check_csrf() -> None:
        if request.method == "POST":
            await csrf.protect()

    @bp.context_processor
    async def page_context() -> dict:
        return {"viewer": await auth.viewer(hub), "stripe": checkout is not None,
                "terms_version": accounts.TERMS_VERSION}

    @bp.errorhandler(CSRFError)
    async def on_csrf(exc: CSRFError) -> tuple[str, int]:
        return await _error(400, "This form has expired or did not come from this site. Go back, reload the page "
                                 "and try again.")

    @bp.errorhandler(forms.FormError)
    async def on_form_error(exc: forms.FormError) -> tuple[str, int]:
        return await _error(400, exc.message)

    @bp.errorhandler(HubError)
    async def on_hub_error(exc: HubError) -> tuple[str, int]:
        return await _error(exc.status, exc.message)

    @bp.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> tuple[str, int] | Response:
        return await _error(exc.code or 500, exc.description or exc.name)

    for module in (account, client, billing, host, admin):
        module.routes(bp, hub, checkout)
    app.register_blueprint(bp)


async def _error(status: int, message: str) -> tuple[str, int]:
    titles = {400: "Something is not right", 403: "Not available", 404: "Not found", 429: "Too many attempts"}
    return await render_template("error.html", status=status, title=titles.get(status, "Error"), message=message), status
