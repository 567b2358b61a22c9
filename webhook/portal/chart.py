"""Inline SVG for the dashboard: a daily usage bar chart and a gauge.

Drawn on the server from numbers, with presentation attributes only (no
style attributes, no script), so the portal's CSP needs no exception and the
chart reads the same without JavaScript. Each bar carries its exact count in a
<title> (a tooltip, and what a screen reader says).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape
from typing import Final

__all__ = ["daily_chart", "gauge"]

_WIDTH: Final = 640
_HEIGHT: Final = 180
_LEFT: Final = 48  # room for the y axis' labels
_BOTTOM: Final = 24  # room for the dates
_TOP: Final = 12
_BAR: Final = "#3b6fd8"
_TRACK: Final = "#e6e9ef"
_INK: Final = "#555"


def _day_label(day: int) -> str:
    return time.strftime("%b %d", time.gmtime(day))


def _compact(units: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if units >= size:
            return f"{units / size:.1f}".rstrip("0").rstrip(".") + suffix
    return str(units)


def daily_chart(days: Sequence[tuple[int, int]], *, label: str, today: int | None = None) -> str:
    """Bars of units per day; days: (UTC day start in Unix s, units), oldest first.
    today: that day's bar is labelled "today" (where the label has room)."""
    peak = max((units for _, units in days), default=0)
    plot_w, plot_h = _WIDTH - _LEFT - 4, _HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(days), 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_WIDTH - 4}" y2="{_TOP + plot_h}" '
        f'stroke="{_TRACK}"/>',
        f'<text x="{_LEFT - 6}" y="{_TOP + 8}" text-anchor="end" font-size="11" '
        f'fill="{_INK}">{_compact(peak)}</text>',
        f'<text x="{_LEFT - 6}" y="{_TOP + plot_h}" text-anchor="end" font-size="11" '
        f'fill="{_INK}">0</text>',
    ]
    for i, (day, units) in enumerate(days):
        height = 0.0 if peak == 0 else plot_h * units / peak
        if units > 0:
            height = max(height, 1.0)  # a day with use is never drawn as none
        x = _LEFT + i * slot + slot * 0.15
        y = _TOP + plot_h - height
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{height:.1f}" fill="{_BAR}" data-day="{day}" data-units="{units}">'
            f"<title>{_day_label(day)}: {units:,}</title></rect>"
        )
        # A date every week, and the last day's and today's where they do not overlap one.
        apart = min(i % 7, 7 - i % 7) >= 3
        text = ""
        if day == today and (i % 7 == 0 or apart):
            text = "today"
        elif i % 7 == 0 or (i == len(days) - 1 and apart):
            text = _day_label(day)
        if text:
            parts.append(
                f'<text x="{x + slot * 0.35:.1f}" y="{_HEIGHT - 6}" text-anchor="middle" '
                f'font-size="11" fill="{_INK}">{text}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def gauge(used: float, limit: float, *, label: str) -> str:
    """A bar filled to used / limit (capped at full), labelled with both."""
    share = 0.0 if limit <= 0 else min(max(used / limit, 0.0), 1.0)
    colour = "#c0392b" if share >= 0.9 else "#d68910" if share >= 0.75 else _BAR
    return (
        f'<svg class="gauge" viewBox="0 0 300 14" preserveAspectRatio="none" role="img" '
        f'aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg" data-share="{share:.4f}">'
        f'<rect x="0" y="0" width="300" height="14" rx="7" fill="{_TRACK}"/>'
        f'<rect x="0" y="0" width="{300 * share:.1f}" height="14" rx="7" fill="{colour}"/>'
        f"</svg>"
    )
