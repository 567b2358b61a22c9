"""Calendar periods (UTC) of quotas and of the usage totals. No I/O.

The decision script gets the current period's bounds from its caller, so it
does no calendar arithmetic on the request path; it checks them against Redis
TIME and computes them itself only when they do not hold (a boundary, or a
skewed caller clock), so Redis's clock still decides.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

__all__ = ["Period", "month_start", "period_at"]

Period = tuple[int, int, int]  # (start, end, start of the month), Unix seconds

_HOUR: Final = 3600
_DAY: Final = 86400
_last: dict[str, Period] = {}  # the period each kind was last asked for: nearly always it again


def month_start(at: int) -> int:
    """Unix seconds of the first instant of at's calendar month (UTC)."""
    moment = datetime.fromtimestamp(at, UTC)
    return int(moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


def _next_month(start: int) -> int:
    moment = datetime.fromtimestamp(start, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def period_at(kind: str, at: int) -> Period:
    """The hour, day or month (UTC) that contains at, and the start of its month."""
    last = _last.get(kind)
    if last is not None and last[0] <= at < last[1]:
        return last
    month = month_start(at)
    if kind == "hour":
        start = at - at % _HOUR
        period = (start, start + _HOUR, month)
    elif kind == "day":
        start = at - at % _DAY
        period = (start, start + _DAY, month)
    else:
        period = (month, _next_month(month), month)
    _last[kind] = period
    return period
