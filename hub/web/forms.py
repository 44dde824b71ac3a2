"""Form and query values, checked before use: every parser returns a clean value or raises :class:`FormError`.

A form field arrives as text of any length and content; nothing from a form
reaches the service layer before one of these has looked at it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from gpunexus.protocol.money import MICRO_PER_USD, usd_to_micro
from werkzeug.datastructures import MultiDict

MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30
MAX_NAME_CHARS = 100
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FormError(Exception):
    """A value a person typed that cannot be used; ``field`` names it, ``message`` says what to do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def text(form: MultiDict, name: str, *, max_chars: int, required: bool = True, label: str | None = None) -> str:
    """A stripped single-line text field of at most ``max_chars`` characters."""
    value = (form.get(name) or "").strip()
    label = label or name.replace("_", " ")
    if required and not value:
        raise FormError(name, f"Enter a {label}.")
    if len(value) > max_chars:
        raise FormError(name, f"The {label} can be at most {max_chars} characters.")
    if _CONTROL.search(value):
        raise FormError(name, f"The {label} cannot contain control characters.")
    return value


def secret(form: MultiDict, name: str) -> str:
    """A password as typed (not stripped: spaces are part of it)."""
    return form.get(name) or ""


def choice(form: MultiDict, name: str, options: tuple[str, ...], message: str) -> str:
    value = form.get(name) or ""
    if value not in options:
        raise FormError(name, message)
    return value


def nonce(form: MultiDict) -> str:
    """The one-time token a form was rendered with (see ``key_requests`` in :mod:`gpunexus.hub.db`)."""
    value = form.get("nonce") or ""
    if not _NONCE.fullmatch(value):
        raise FormError("nonce", "This form is incomplete; reload the page and try again.")
    return value


def usd(form: MultiDict, name: str, *, whole_cents: bool = True, minimum_micro: int = 1,
        maximum_micro: int = 1_000_000 * MICRO_PER_USD) -> int:
    """A dollar amount ("5", "12.50", "$3") in micro-USD, within bounds."""
    raw = (form.get(name) or "").strip().removeprefix("$").replace(",", "")
    try:
        micro = usd_to_micro(raw)
    except ValueError:
        raise FormError(name, "Enter an amount in US dollars, like 10 or 12.50.") from None
    if whole_cents and micro % 10_000:
        raise FormError(name, "Enter the amount in whole cents, like 12.50.")
    if not minimum_micro <= micro <= maximum_micro:
        raise FormError(name, f"Enter an amount between {minimum_micro / MICRO_PER_USD:.2f} and "
                              f"{maximum_micro / MICRO_PER_USD:,.2f} USD.")
    return micro


def optional_usd(form: MultiDict, name: str, *, maximum_micro: int) -> int | None:
    """An optional dollar amount (empty: None) of more than zero, to the micro-USD."""
    if not (form.get(name) or "").strip():
        return None
    return usd(form, name, whole_cents=False, minimum_micro=1, maximum_micro=maximum_micro)


def optional_int(form: MultiDict, name: str, *, minimum: int, maximum: int, label: str) -> int | None:
    raw = (form.get(name) or "").strip().replace(",", "")
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise FormError(name, f"The {label} must be a whole number from {minimum:,} to {maximum:,}.")
    return int(raw)


def optional_number(form: MultiDict, name: str, *, minimum: float, maximum: float, label: str) -> float | None:
    """An optional decimal number (empty: None) within bounds."""
    raw = (form.get(name) or "").strip().replace(",", "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not raw.isascii() or not minimum <= value <= maximum:
        raise FormError(name, f"The {label} must be a number from {minimum:g} to {maximum:g}.")
    return value


def compute_capability(form: MultiDict, name: str) -> str:
    """An empty string or a CUDA compute capability such as ``8.0`` or ``12.0``."""
    raw = (form.get(name) or "").strip()
    if raw and not re.fullmatch(r"\d{1,2}\.\d", raw):
        raise FormError(name, "The compute capability must look like 8.0 or 8.9 (major.minor).")
    return raw


def url(form: MultiDict, name: str, *, max_chars: int, label: str) -> str:
    """An empty string or an ``http(s)://`` URL (nothing that a link could run, like ``javascript:``)."""
    value = text(form, name, max_chars=max_chars, required=False, label=label)
    if value and not re.fullmatch(r"https?://[^\s<>\"']+", value):
        raise FormError(name, f"The {label} must start with https:// (or http://).")
    return value


def _date(raw: str, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise FormError(name, "Enter dates as YYYY-MM-DD.") from None


def expiry(form: MultiDict, name: str, today: dt.date) -> float | None:
    """An optional last day of validity (YYYY-MM-DD): the key works until the end of that UTC day."""
    raw = (form.get(name) or "").strip()
    if not raw:
        return None
    day = _date(raw, name)
    if day < today:
        raise FormError(name, "The expiry date must be today or later.")
    if day > today + dt.timedelta(days=3660):
        raise FormError(name, "The expiry date can be at most ten years away.")
    return _timestamp(day + dt.timedelta(days=1))


@dataclass(frozen=True, slots=True)
class DateRange:
    """Whole UTC days ``first``..``last`` (both included); ``start``/``end`` in epoch seconds, end exclusive."""

    first: dt.date
    last: dt.date

    @property
    def start(self) -> float:
        return _timestamp(self.first)

    @property
    def end(self) -> float:
        return _timestamp(self.last + dt.timedelta(days=1))

    def days(self) -> list[dt.date]:
        return [self.first + dt.timedelta(days=i) for i in range((self.last - self.first).days + 1)]


def date_range(args: MultiDict, today: dt.date) -> DateRange:
    """``?from=YYYY-MM-DD&to=YYYY-MM-DD``, by default the last 30 days, at most a year long."""
    last = _date(args["to"], "to") if args.get("to") else today
    first = _date(args["from"], "from") if args.get("from") else last - dt.timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if first > last:
        raise FormError("from", "The start date must be before the end date.")
    if (last - first).days >= MAX_RANGE_DAYS:
        raise FormError("from", f"Choose a range of at most {MAX_RANGE_DAYS} days.")
    return DateRange(first, last)


def requested_range(args: MultiDict, now: float) -> tuple[DateRange, str | None]:
    """The page's date range, or the default one and the reason when the asked one is bad."""
    today = today_utc(now)
    try:
        return date_range(args, today), None
    except FormError as exc:
        return date_range({}, today), exc.message


def _timestamp(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def today_utc(now: float) -> dt.date:
    return dt.datetime.fromtimestamp(now, dt.UTC).date()
