"""Charts as server-rendered SVG, with pygal.

Why pygal: it is maintained, pure Python, and writes SVG on the server, so a
chart is part of the HTML page and shows without any JavaScript (the
dashboard's rule for core content) and without shipping a JS library.
pygal's optional tooltip script is switched off (``js=[]``): it would be
fetched from a CDN, and the hub loads nothing from outside. pygal builds the
SVG with an XML library, so model names (which hosts choose) are escaped;
``tests/web`` checks that.
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


def daily_chart(title: str, rows: Iterable[DayModel], days: list[dt.date], value: Callable[[DayModel], float],
                formatter: Callable[[float], str], *, width: int = 860) -> Markup:
    """A bar per day, stacked by model, as inline SVG (``width``: the drawing's own size, so text stays legible)."""
    chart = pygal.StackedBar(
        style=_STYLE, js=[], disable_xml_declaration=True, width=width, height=320, explicit_size=False,
        title=title, legend_at_bottom=True, legend_at_bottom_columns=4, show_minor_x_labels=False,
        x_labels_major_every=max(1, len(days) // (8 if width > 600 else 4)), truncate_legend=28, truncate_label=-1, print_values=False,
        value_formatter=formatter, no_data_text="No requests in this range", margin=12, margin_bottom=30,
    )
    chart.x_labels = [d.strftime("%b %d") for d in days]
    for model, values in _series(rows, days, value).items():
        chart.add(model, values)
    return Markup(chart.render(is_unicode=True))


def usd_axis(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def count_axis(value: float) -> str:
    """Whole counts; the axis's fractional steps (2.5 requests) stay unlabelled."""
    return f"{value:,.0f}" if float(value).is_integer() else ""
