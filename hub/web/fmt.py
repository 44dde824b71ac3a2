"""How the dashboard writes money, times and ids (Jinja filters).

Money is integer micro-USD everywhere in the hub; a page shows dollars with
cents. An amount under one cent is shown exactly (``$0.0012``) rather than
as ``$0.00``: a single request often costs less than a cent, and a bill of
zero for real work would be wrong.
"""

from __future__ import annotations

import datetime as dt

from gpunexus.protocol.money import MICRO_PER_USD
from quart import Quart

_CENT = MICRO_PER_USD // 100


def usd(micro: int | None) -> str:
    if micro is None:
        return "—"
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO_PER_USD)
    if whole == 0 and frac and frac < _CENT:
        return f"{sign}$0.{f'{frac:06d}'.rstrip('0')}"
    cents = (frac + _CENT // 2) // _CENT  # half a cent and up rounds up
    if cents == 100:
        whole, cents = whole + 1, 0
    return f"{sign}${whole:,}.{cents:02d}"


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def day(ts: float | None) -> str:
    return "—" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def short_id(peer_id: str, keep: int = 10) -> str:
    """``12D3KooWAbCd…xyz``: enough to tell peers apart at a glance (the full id is in the title attribute)."""
    return peer_id if len(peer_id) <= 2 * keep else f"{peer_id[:keep]}…{peer_id[-4:]}"


def install(app: Quart) -> None:
    app.jinja_env.filters.update(usd=usd, when=when, day=day, short_id=short_id)
