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
from typing import Final

__all__ = ["REQUEST_ID", "JsonFormatter", "bind_request_id", "configure"]

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


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
