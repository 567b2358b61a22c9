"""Durations in config files and on the command line: 90s, 15m, 24h, 7d."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_duration"]

_DURATION_RE: Final = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90s', '15m', '24h', '7d' → seconds; ValueError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected a duration like 30s, 15m, 24h or 7d, got {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
