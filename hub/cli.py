"""``gpunexus hub ...`` (run and administer a hub) and ``gpunexus audit`` (check a receipt log).

Administration commands work on the database directly (the same one a
running ``hub serve`` uses; SQLite's WAL and PostgreSQL both allow that), so
an operator needs no admin API key on the machine that hosts the hub.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
import uuid

import trio

from gpunexus.usage import check_bindable, port_arg
from gpunexus.protocol.money import micro_to_usd, usd_to_micro

from . import audit, chain, keys, receipts
from .config import HubConfig
from .service import Hub

STRIPE_KEY_ENV = "STRIPE_SECRET_KEY"
STRIPE_WEBHOOK_ENV = "STRIPE_WEBHOOK_SECRET"


def _home() -> str:
    return os.environ.get("GPUNEXUS_HOME") or os.path.expanduser("~/.gpunexus")


def register(sub: argparse._SubParsersAction) -> None:
    hub = sub.add_parser("hub", help="run and administer the settlement hub",
                         description="Run the hub (accounts, allowances, receipts, Stripe) and manage users, keys and credits.")
    actions = hub.add_subparsers(dest="hub_command", metavar="ACTION", required=True)

    serve = _with_db(actions.add_parser("serve", help="serve the hub HTTP API", description="Serve the hub API (OpenAPI at /openapi.json). "
                                        f"Stripe is used when ${STRIPE_KEY_ENV} and ${STRIPE_WEBHOOK_ENV} are set; otherwise manual-credits mode."))
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=port_arg, default=8080, help="port (default 8080)")
    serve.add_argument("--fee-bps", type=int, default=HubConfig().fee_bps, help="platform fee in basis points (default 1000 = 10%%)")
    serve.add_argument("--public-url", default=None, help="URL people reach the hub at: Stripe Checkout and Connect "
                       "onboarding return links; https:// also makes the dashboard's cookies Secure")
    serve.add_argument("--verify-workers", type=int, default=0, metavar="N",
                       help="verify receipt signatures in N worker processes (default 0: in the request's thread)")
    serve.add_argument("--epoch-s", type=float, default=HubConfig().epoch_s, metavar="S",
                       help="market epoch: prices are stepped every S seconds (default 60)")
    serve.add_argument("--reference-price", action="append", default=[], metavar="MODEL=USD",
                       help="the reference (ceiling) price of MODEL in USD per million tokens; repeatable; "
                            f"a bare USD sets it for every other model (default {micro_to_usd(HubConfig().reference_price_micro_per_mtok)})")
    serve.add_argument("--audit-rate", type=float, default=HubConfig().audit_rate, metavar="FRACTION",
                       help="fraction of settled receipts audited (default 0.05; suspect hosts are audited more)")
    _audit_timing(serve)
    serve.add_argument("--no-hub-replay", dest="hub_replay", action="store_false",
                       help="send every audit to peer verifiers, even of models the hub could replay itself")
    serve.add_argument("--verifier-fee", type=int, default=HubConfig().verifier_fee_micro, metavar="MICRO_USD",
                       help="what a peer verifier earns per answered job, from the platform fee "
                            f"(default {HubConfig().verifier_fee_micro} micro-USD)")
    serve.add_argument("--known-answer-rate", type=float, default=HubConfig().known_answer_rate, metavar="FRACTION",
                       help="share of peer audits that also send a verifier a job whose answer the hub knows "
                            f"(default {HubConfig().known_answer_rate})")
    serve.add_argument("--challenge-account", action="append", default=[], metavar="EMAIL",
                       help="an account whose requests are the hub's challenges: all its receipts are audited; repeatable")
    serve.set_defaults(func=_serve)

    user = actions.add_parser("user", help="manage users").add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = _with_db(user.add_parser("add", help="add a user and print its first API key (shown once)"))
    add.add_argument("email")
    add.add_argument("--role", choices=keys.ROLES, required=True)
    add.set_defaults(func=_user_add)
    password = _with_db(user.add_parser("password", help="set a user's dashboard password (read from the terminal or stdin)",
                                        description="Set or replace the password EMAIL logs in to the dashboard with; "
                                                    "the user's open dashboard sessions end. Admins get theirs this way."))
    password.add_argument("email")
    password.set_defaults(func=_user_password)

    key = actions.add_parser("key", help="manage API keys").add_subparsers(dest="key_command", metavar="ACTION", required=True)
    create = _with_db(key.add_parser("create", help="create an API key for a user (shown once)",
                                     description="Create an API key for EMAIL and print it (the only time it is shown). "
                                                 "Spend limits cap what gateways may spend with it per UTC day and per "
                                                 "calendar month (UTC); past its expiry it gets 401, like a revoked key."))
    create.add_argument("email", help="the user the key acts for")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--limit-day", type=_limit, metavar="USD", help="most the key may spend per UTC day, e.g. 5 or 0.50")
    create.add_argument("--limit-month", type=_limit, metavar="USD", help="most the key may spend per calendar month (UTC)")
    create.add_argument("--expires", type=_expires, metavar="DATE|DAYS",
                        help="last day of validity, YYYY-MM-DD (valid to the end of that UTC day), or a number of days from now")
    create.set_defaults(func=_key_create)
    listing = _with_db(key.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("email", nargs="?")
    listing.set_defaults(func=_key_list)
    revoke = _with_db(key.add_parser("revoke", help="revoke a key; effective on its next request"))
    revoke.add_argument("key_id", help="the key id from 'key list' (or the full key)")
    revoke.set_defaults(func=_key_revoke)

    credits = actions.add_parser("credits", help="manual credits").add_subparsers(dest="credits_command", metavar="ACTION", required=True)
    grant = _with_db(credits.add_parser("grant", help="grant credits to a user (manual-credits mode only)"))
    grant.add_argument("email")
    grant.add_argument("usd", help="amount in USD, e.g. 5 or 0.25")
    grant.set_defaults(func=_grant)

    rec = actions.add_parser("receipts", help="the settled-receipt log").add_subparsers(dest="receipts_command", metavar="ACTION", required=True)
    export = _with_db(rec.add_parser("export", help="write the signed, hash-chained receipt log (JSON lines)",
                                     description="Write the receipt log to FILE and the audit log (verdicts, revealed "
                                                 "secrets, hosts' signed roots; see hub/honesty.py export_audits) to FILE.audits."))
    export.add_argument("file")
    _audit_timing(export)
    export.set_defaults(func=_export)

    aud_admin = actions.add_parser("audits", help="the audits' openings").add_subparsers(dest="audits_command", metavar="ACTION", required=True)
    openings = _with_db(aud_admin.add_parser("export", help="write the openings the hub audited (JSON lines)",
                                             description='Write one JSON line {"request_id", "opening": base64 Opening} per '
                                                         "opening the hub received, for 'gpunexus audit LOG --openings FILE'."))
    openings.add_argument("file")
    openings.set_defaults(func=_export_openings)

    hosts = _with_db(actions.add_parser("hosts", help="hosts' audit reputation and recent verdicts",
                                        description="Every audited host: audits, failures, probability of honesty, "
                                                    "whether gateways exclude it, and its recent verdicts with reasons."))
    hosts.add_argument("--recent", type=int, default=5, help="verdicts shown per host (default 5)")
    hosts.add_argument("--json", action="store_true", help="print JSON")
    hosts.set_defaults(func=_hosts)

    chal = actions.add_parser("challenge", help="send challenge requests through an ordinary gateway",
                              description="Send ordinary-looking requests through a gateway (run 'gpunexus node gateway --hub ... "
                                          "--api-key KEY' with a fresh identity, KEY of an account the hub serves with "
                                          "--challenge-account) so that every receipt they produce is audited.")
    chal.add_argument("--gateway", required=True, metavar="URL", help="the gateway's base URL, e.g. http://127.0.0.1:8000/v1")
    chal.add_argument("--api-key", required=True, help="the challenge account's API key")
    chal.add_argument("--model", default="tiny")
    chal.add_argument("--count", type=int, default=10)
    chal.add_argument("--interval", type=float, default=30.0, metavar="S", help="mean seconds between requests (default 30)")
    chal.set_defaults(func=_challenge)

    aud = sub.add_parser("audit", help="verify a receipt log", description="Verify every signature (host, gateway, hub), the hash chain, "
                         "exactly-once settlement and the balances the log implies. Exit 0 when all holds, 1 naming each fault.")
    aud.add_argument("file", metavar="RECEIPT_LOG")
    aud.add_argument("--hub-id", help="the hub peer id the log must be signed by")
    aud.add_argument("--openings", metavar="FILE", help="JSON lines {request_id, opening: base64 Opening}: recompute every "
                     "audited receipt's verdict with the reference model and recheck its selection")
    aud.add_argument("--audits", metavar="FILE", help="the hub's audit log (default RECEIPT_LOG.audits)")
    aud.set_defaults(func=lambda a: audit.run(a.file, a.hub_id, a.openings, a.audits))


def _audit_timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audit-period-s", type=float, default=HubConfig().audit_period_s, metavar="S",
                   help="audit period: secrets and hosts' receipt roots are per period (default 3600; "
                        "the same for 'hub serve' and 'hub receipts export')")
    p.add_argument("--audit-root-grace-s", type=float, default=HubConfig().audit_root_grace_s, metavar="S",
                   help="how long after a period hosts may publish its root; then its secret is revealed (default 300)")


def _with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--db", metavar="URL", help="database URL (default sqlite under $GPUNEXUS_HOME/hub/; "
                   "postgresql+psycopg://user:pw@host/db for PostgreSQL)")
    return p


_now = time.time
"""The clock of hubs the CLI opens (a test seam)."""


def _open(args: argparse.Namespace, config: HubConfig | None = None) -> Hub:
    return Hub.open(_home(), args.db, config, clock=lambda: _now())


def _fail(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 1


def _user_add(args: argparse.Namespace) -> int:
    hub = _open(args)
    try:
        user, key = hub.db.write_sync(keys.add_user, args.email, args.role)
    except keys.UserError as exc:
        return _fail(str(exc))
    print(f"user {user.email} ({user.role}) created; API key (shown once, store it now):")
    print(key)
    return 0


def _user_password(args: argparse.Namespace) -> int:
    import getpass

    from . import accounts

    if sys.stdin.isatty():
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            return _fail("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    hub = _open(args)
    try:
        user = hub.db.read_sync(keys.get_user, args.email)
    except keys.UserError as exc:
        return _fail(str(exc))
    problem = accounts.password_problem(password, user.email)
    if problem:
        return _fail(problem)
    hub.db.write_sync(accounts.set_password, user.id, accounts.hash_password(password), time.time())
    print(f"password set for {user.email}; log in at the hub's dashboard (/login)")
    return 0


def _limit(value: str) -> int:
    """``--limit-day`` / ``--limit-month``: a positive USD amount, in micro-USD."""
    try:
        micro = usd_to_micro(value.strip().removeprefix("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r} (e.g. 5 or 0.50)") from None
    if not 0 < micro <= keys.MAX_LIMIT_MICRO:
        raise argparse.ArgumentTypeError(f"a spend limit must be more than 0 and at most {keys.MAX_LIMIT_MICRO // 1_000_000:,} USD")
    return micro


def _expires(value: str) -> float:
    """``--expires``: YYYY-MM-DD (the end of that UTC day) or a whole number of days from now, as epoch seconds."""
    import datetime as dt

    value = value.strip()
    if value.isascii() and value.isdigit():
        days = int(value)
        if not 1 <= days <= 3660:
            raise argparse.ArgumentTypeError("--expires DAYS must be 1 to 3660")
        return time.time() + days * 86400
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--expires takes YYYY-MM-DD or a number of days, not {value!r}") from None
    end = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() + 86400
    if end <= time.time():
        raise argparse.ArgumentTypeError(f"--expires {value} is in the past")
    return end


def _key_create(args: argparse.Namespace) -> int:
    hub = _open(args)
    try:
        key = hub.db.write_sync(lambda c: keys.create_key(c, keys.get_user(c, args.email), args.name, args.expires,
                                                          limit_day_micro=args.limit_day,
                                                          limit_month_micro=args.limit_month))
    except keys.UserError as exc:
        return _fail(str(exc))
    print(key)
    return 0


def _key_list(args: argparse.Namespace) -> int:
    import datetime as dt

    hub = _open(args)
    rows = hub.db.read_sync(keys.list_keys, args.email)
    spend = hub.db.read_sync(keys.spend, [k.key_id for k in rows], hub.clock())
    now = time.time()  # keys expire on wall time (hub/keys.py)

    def usd(micro: int | None) -> str:
        return "-" if micro is None else keys.usd_text(micro)

    print(f"{'KEY ID':<14} {'USER':<32} {'STATUS':<8} {'EXPIRES (UTC)':<17} {'TODAY/LIMIT USD':<18} {'MONTH/LIMIT USD':<18} NAME")
    for k in rows:
        expires = dt.datetime.fromtimestamp(k.expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M") if k.expires_at else "never"
        s = spend[k.key_id]
        print(f"{k.key_id:<14} {k.email:<32} {k.status(now):<8} {expires:<17} "
              f"{keys.usd_text(s.day_micro) + '/' + usd(k.limit_day_micro):<18} "
              f"{keys.usd_text(s.month_micro) + '/' + usd(k.limit_month_micro):<18} {k.name}")
    return 0


def _key_revoke(args: argparse.Namespace) -> int:
    if not _open(args).db.write_sync(keys.revoke_key, args.key_id):
        return _fail(f"no active key {args.key_id}")
    print(f"revoked {args.key_id}")
    return 0


def _grant(args: argparse.Namespace) -> int:
    if os.environ.get(STRIPE_KEY_ENV):
        return _fail(f"Stripe is configured (${STRIPE_KEY_ENV}): credits come from Checkout top-ups, not manual grants")
    try:
        micro = usd_to_micro(args.usd)
    except ValueError as exc:
        return _fail(str(exc))
    hub = _open(args)
    try:
        hub.grant_sync(args.email, micro, uuid.uuid4().hex)
    except keys.UserError as exc:
        return _fail(str(exc))
    print(f"granted {micro_to_usd(micro)} USD to {args.email}")
    return 0


def _hosts(args: argparse.Namespace) -> int:
    import json

    from . import honesty

    report = _open(args).db.read_sync(honesty.host_report, args.recent)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report:
        print("no audited hosts yet")
        return 0
    print(f"{'HOST':<54} {'AUDITS':>6} {'FAILED':>6} {'PENDING':>7} {'P(HONEST)':>9}  STATUS")
    for h in report:
        status = "excluded" if h["excluded"] else "ok"
        print(f"{h['peer_id']:<54} {h['audits']:>6} {h['failures']:>6} {h['pending']:>7} {h['p_honest']:>9.4f}  {status}")
        for v in h["recent"]:
            money = f" (withheld {micro_to_usd(v['withheld_micro'])} USD, debt {micro_to_usd(v['debt_micro'])} USD)" if v["status"] == "failed" else ""
            print(f"    {v['request_id']}  {v['status']}{money}")
            for judged in v.get("verifiers", []):
                print(f"        verifier round {judged['round']}: {judged['verifier_id'] or '(not drawn yet)'} {judged['verdict']}")
            for reason in v["reasons"]:
                print(f"        {reason}")
    return 0


def _challenge(args: argparse.Namespace) -> int:
    from .challenge import send_challenges

    statuses = trio.run(functools.partial(send_challenges, args.gateway, args.api_key, args.model, args.count,
                                          interval_s=args.interval))
    ok = sum(s == 200 for s in statuses)
    print(f"sent {len(statuses)} challenge requests, {ok} answered; their receipts are audited once settled")
    return 0 if ok == len(statuses) else 1


def _export(args: argparse.Namespace) -> int:
    import json

    from . import honesty

    try:
        config = HubConfig(audit_period_s=args.audit_period_s, audit_root_grace_s=args.audit_root_grace_s)
    except ValueError as exc:
        return _fail(str(exc))
    hub = _open(args, config)
    n = chain.write_log(args.file, hub.hub_id, hub.db.read_sync(receipts.export))
    lines = hub.db.read_sync(honesty.export_audits, config, hub.clock())
    path = audit.audit_log_path(args.file)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    verdicts = sum(x.get("kind") == "verdict" for x in lines)
    print(f"wrote {n} entries to {args.file} (hub {hub.hub_id}) and {verdicts} audits to {path}")
    return 0


def _export_openings(args: argparse.Namespace) -> int:
    import base64
    import json

    from . import honesty

    rows = _open(args).db.read_sync(honesty.export_openings)
    with open(args.file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"request_id": rid, "opening": base64.b64encode(blob).decode()}) + "\n" for rid, blob in rows)
    print(f"wrote {len(rows)} openings to {args.file}")
    return 0


def _reference_prices(items: list[str]) -> tuple[int | None, dict[str, int]]:
    """``--reference-price`` values: (default for every model or None, per-model overrides), in micro-USD."""
    default, per_model = None, {}
    for item in items:
        model, sep, usd = item.rpartition("=")
        try:
            micro = usd_to_micro(usd)
        except ValueError as exc:
            raise ValueError(f"--reference-price {item!r}: {exc}") from None
        if sep and not model:
            raise ValueError(f"--reference-price {item!r}: expected MODEL=USD")
        if sep:
            per_model[model] = micro
        else:
            default = micro
    return default, per_model


def _serve(args: argparse.Namespace) -> int:
    from .app import create_app, serve
    from .stripe_billing import StripeBilling

    try:
        default_ref, refs = _reference_prices(args.reference_price)
        config = HubConfig(fee_bps=args.fee_bps, epoch_s=args.epoch_s, reference_prices=refs, audit_rate=args.audit_rate,
                           audit_period_s=args.audit_period_s, audit_root_grace_s=args.audit_root_grace_s,
                           challenge_accounts=frozenset(args.challenge_account), public_url=args.public_url or "",
                           hub_replay=args.hub_replay, verifier_fee_micro=args.verifier_fee,
                           known_answer_rate=args.known_answer_rate,
                           **({"reference_price_micro_per_mtok": default_ref} if default_ref else {}))
    except ValueError as exc:
        return _fail(str(exc))
    check_bindable(args.host, args.port, "the hub")
    hub = _open(args, config)
    stripe_key, webhook_secret = os.environ.get(STRIPE_KEY_ENV), os.environ.get(STRIPE_WEBHOOK_ENV)
    billing = None
    if stripe_key:
        if not webhook_secret:
            return _fail(f"${STRIPE_KEY_ENV} is set but ${STRIPE_WEBHOOK_ENV} is not")
        billing = StripeBilling.attach(hub, stripe_key, webhook_secret,
                                       public_url=args.public_url or f"http://{args.host}:{args.port}")
    app = create_app(hub, billing=billing)
    if args.verify_workers > 1:
        hub.precheck = receipts.ParallelPrecheck(args.verify_workers)

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, hub, app, host=args.host, port=args.port,
                                                          shutdown_trigger=stop.wait))
            mode = "stripe" if billing else "manual credits"
            print(f"hub {hub.hub_id} listening on {binds[0]} ({mode}; db {hub.db.url.split('@')[-1]})", flush=True)
            print(f"dashboard: {args.public_url or binds[0]}/", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()  # drain in-flight requests, then stop
                    break

    try:
        trio.run(main)
    finally:
        if isinstance(hub.precheck, receipts.ParallelPrecheck):
            hub.precheck.close()
    return 0
