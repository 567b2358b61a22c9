"""Logging: one JSON object per line (or plain text), with the request id.

    {"ts": "2026-11-27T18:20:01.123Z", "level": "WARNING", "logger": "tollway.authorizer",
     "msg": "quota alert: cus_1 reached 80% of plan pro's quota", "request_id": "…"}

The request id is Envoy's x-request-id (Check) or the caller's request_id
(Authorize), set for the duration of one request by bind_request_id(). Keys
and Stripe secrets are never passed to a logger; the test suite scans every
log it produces to hold that line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Final

__all__ = ["REQUEST_ID", "JsonFormatter", "RepeatLimit", "bind_request_id", "configure"]

REQUEST_ID: Final[contextvars.ContextVar[str]] = contextvars.ContextVar(
    "tollway_request_id", default=""
)


def bind_request_id(request_id: str) -> None:
    """Tags every log line of the current request (an asyncio task's context)."""
    REQUEST_ID.set(request_id[:128])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _Kind:
    __slots__ = ("held", "passed", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.passed = 1
        self.held = 0


class RepeatLimit(logging.Filter):
    """Lets through at most `burst` records of one kind (logger and message
    template) per `window` seconds; the first one let through after that says
    how many were held back. Tollway's own lines below ERROR are all kept: none
    of them comes once per request.

    Why: some lines come once per bad request. gRPC logs a traceback for every
    undecodable message, and every request fails the same way while Redis is
    down. A client sending garbage must not be able to fill the disk, or cost
    the sidecar a formatted traceback per request."""

    def __init__(
        self, *, burst: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._clock = clock
        self._kinds: dict[tuple[str, object], _Kind] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("tollway.") and record.levelno < logging.ERROR:
            return True  # Tollway's own notes (a quota alert, a plan reload) all count
        now = self._clock()
        key = (record.name, record.msg)
        kind = self._kinds.get(key)
        if kind is None or now - kind.since >= self._window:
            if len(self._kinds) >= 10_000:
                self._kinds.clear()  # that many kinds: forget them rather than grow
            self._kinds[key] = _Kind(now)
            if kind is not None and kind.held:
                record.msg = f"{record.msg} [and {kind.held} more like this, not logged]"
            return True
        if kind.passed < self._burst:
            kind.passed += 1
            return True
        kind.held += 1
        return False


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatLimit())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
