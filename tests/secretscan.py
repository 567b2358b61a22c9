"""Finds secrets in text: API keys, admin tokens, Stripe secret keys, webhook signing secrets."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

PATTERNS = (
    re.compile(r"tw_(?:live|test)_[0-9A-Za-z]{49}"),
    re.compile(r"twadm_[0-9A-Za-z]{49}"),
    re.compile(r"(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{8,}"),
    re.compile(r"whsec_[0-9A-Za-z]{8,}"),
)


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for pattern in PATTERNS for m in pattern.finditer(text)]


def scan(paths: Iterable[Path]) -> dict[str, list[str]]:
    """{file: secrets found} over the given files (unreadable ones are skipped)."""
    found: dict[str, list[str]] = {}
    for path in paths:
        try:
            hits = secrets_in(path.read_text(errors="replace"))
        except OSError:
            continue
        if hits:
            found[str(path)] = [h[:12] + "…" for h in hits]  # never echo a whole secret
    return found
