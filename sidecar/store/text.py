"""Redis answers bytes or str (decode_responses); Tollway reads text."""

from __future__ import annotations

__all__ = ["text"]


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
