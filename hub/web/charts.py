"""Charts as server-rendered SVG, with pygal.

Why pygal: it is maintained, pure Python, and writes SVG on the server, so a
chart is part of the HTML page and shows without any JavaScript (the
dashboard's rule for core content) and without shipping a JS library.
pygal's optional tooltip script is switched off (``js=[]``): it would be
fetched from a CDN, and the hub loads nothing from outside. pygal builds the
SVG with an XML library, so model names (which hosts choose) are escaped;
``tests/web`` checks that.

Legends sit under the plot, whole. pygal (3.0) reserves room under the
plot for ``entries // columns`` legend rows where ``ceil(entries / columns)``
are drawn, so a last, partly filled row (with fewer entries than columns,
the only row) lies in the bottom margin or past the SVG's edge; and its
columns are a fixed share of the plot's width whatever the names, so on a
narrow chart names overlapped and ran off the right edge. :func:`_legend`
adds the rows pygal leaves out to the bottom margin, grows the drawing by a
row's height per legend row so the plot keeps its size, picks the columns
from the drawing's width, and cuts names in the middle to what a column
holds (model names differ at the end: ``...-8b`` and ``...-70b``), the whole
name being the entry's tooltip. ``tests/web/test_browser_billing.py``
measures every legend entry in Chromium: inside its chart, none overlapping.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

import pygal
from markupsafe import Markup
from pygal.style import Style

from ..reports import DayModel

_STYLE = Style(
    background="transparent", plot_background="transparent", foreground="#353740", foreground_strong="#202123",
    foreground_subtle="#e5e5e5", opacity=".9", opacity_hover="1", transition="0s",
    colors=("#10a37f", "#6e56cf", "#f59e0b", "#0ea5e9", "#ef4444", "#64748b", "#14b8a6", "#d946ef"),
    font_family="-apple-system, BlinkMacSystemFont, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif",
    label_font_size=11, major_label_font_size=11, legend_font_size=12, title_font_size=14, value_font_size=11,
    no_data_font_size=20,
)
EPOCH = dt.date(1970, 1, 1)
MAX_SERIES = 7
"""More models than this are summed into "other", so a legend stays readable."""


def _series(rows: Iterable[DayModel], days: list[dt.date], value: Callable[[DayModel], float]) -> dict[str, list[float]]:
    index = {d: i for i, d in enumerate(days)}
    per_model: dict[str, list[float]] = {}
    for r in rows:
        i = index.get(EPOCH + dt.timedelta(days=r.day))
        if i is not None:
            per_model.setdefault(r.model, [0.0] * len(days))[i] += value(r)
    ranked = sorted(per_model, key=lambda m: -sum(per_model[m]))
    if len(ranked) > MAX_SERIES:
        other = [sum(col) for col in zip(*(per_model[m] for m in ranked[MAX_SERIES - 1:]), strict=True)]
        per_model = {m: per_model[m] for m in ranked[:MAX_SERIES - 1]} | {"other": other}
    return per_model


PLOT_HEIGHT = 320
LEGEND_ROW = 18
"""pygal's legend row: 1.5 times the 12-pixel box (the legend font is 12 pixels too)."""
_MARGIN = 12
_DESCENDERS = 4  # below the last row's box, for the g and y of its text


def _legend(width: int, series: int) -> dict:
    """pygal options that lay ``series`` legend entries out whole under a plot ``width`` wide (see the module doc)."""
    columns = 4 if width > 600 else 2
    rows = max(1, -(-series // columns))
    left_out = rows - series // columns  # the rows pygal's margin does not count
    return {"legend_at_bottom": True, "legend_at_bottom_columns": columns, "truncate_legend": -1,
            "height": PLOT_HEIGHT + (rows - 1) * LEGEND_ROW, "margin": _MARGIN,
            "margin_bottom": _MARGIN + left_out * LEGEND_ROW + _DESCENDERS}


def _legend_chars(width: int) -> int:
    """How many characters of a name fit one legend column of a chart ``width`` wide."""
    columns = 4 if width > 600 else 2
    column_px = (width - 2 * _MARGIN - 60) / columns  # 60: the y-axis labels' room, where the legend starts
    return max(8, int((column_px - 24) / (0.62 * _STYLE.legend_font_size)))  # 24: the colour box and a gap


def _title(name: str, width: int) -> dict:
    """A legend entry: the name cut in the middle to fit its column, the whole name as its tooltip."""
    chars = _legend_chars(width)
    if len(name) <= chars:
        return {"title": name}
    head = (chars - 1) // 3
    return {"title": f"{name[:head]}…{name[len(name) - (chars - 1 - head):]}", "tooltip": name}


def _options(title: str, width: int, series: int, labels: int, formatter: Callable[[float], str], no_data: str) -> dict:
    return {"style": _STYLE, "js": [], "disable_xml_declaration": True, "width": width, "explicit_size": False,
            "title": title, "show_minor_x_labels": False, "x_labels_major_every": max(1, labels // (8 if width > 600 else 4)),
            "truncate_label": -1, "print_values": False, "value_formatter": formatter, "no_data_text": no_data,
            **_legend(width, series)}


def daily_chart(title: str, rows: Iterable[DayModel], days: list[dt.date], value: Callable[[DayModel], float],
                formatter: Callable[[float], str], *, width: int = 860, no_data: str = "No requests in this range") -> Markup:
    """A bar per day, stacked by model, as inline SVG (``width``: the drawing's own size, so text stays legible)."""
    series = _series(rows, days, value)
    chart = pygal.StackedBar(**_options(title, width, len(series), len(days), formatter, no_data))
    chart.x_labels = [d.strftime("%b %d") for d in days]
    for model, values in series.items():
        chart.add(_title(model, width), values)
    return Markup(chart.render(is_unicode=True))


def timeline_chart(title: str, series: dict[str, list[float | None]], labels: list[str],
                   formatter: Callable[[float], str], *, width: int = 860, no_data: str = "No market data in this range") -> Markup:
    """A line per series over ``labels`` (None: no value there, drawn as a gap), as inline SVG."""
    chart = pygal.Line(allow_interruptions=True, show_dots=len(labels) <= 60, dots_size=2, stroke_style={"width": 2},
                       **_options(title, width, min(len(series), MAX_SERIES), len(labels), formatter, no_data))
    chart.x_labels = labels
    for name, values in list(series.items())[:MAX_SERIES]:
        chart.add(_title(name, width), values)
    return Markup(chart.render(is_unicode=True))


def usd_axis(value: float) -> str:
    """Dollars with the decimals that tell neighbouring axis steps apart ($0.011 and $0.012, not $0.01 twice)."""
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    whole, frac = f"{value:.4f}".rstrip("0").split(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def rate_axis(value: float) -> str:
    """Tokens per second: whole numbers from 10 on, one decimal under."""
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"


def count_axis(value: float) -> str:
    """Whole counts; the axis's fractional steps (2.5 requests) stay unlabelled."""
    return f"{value:,.0f}" if float(value).is_integer() else ""
