"""Telling people: one structured log line per notification and, when [stripe]
notify_url is set, one JSON POST to it.

This module only sends. What to send, and when, is the outbox's
(webhook/outbox.py): every notification is queued in Redis first and
delivered by the relay, which retries a failing callback and advances only
after a success, so a receiver sees each notification at least once and
drops a repeat by its notification_id.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

__all__ = ["Notifier"]

log = logging.getLogger("tollway.notify")


class Notifier:
    def __init__(self, url: str | None, *, timeout: float = 5.0) -> None:
        self.url = url
        self._timeout = timeout

    def log(self, payload: dict[str, Any]) -> None:
        # The line log pipelines alert on; payloads never hold keys or Stripe secrets.
        log.warning("notification %s", json.dumps(payload, sort_keys=True))

    async def post(self, payload: dict[str, Any]) -> bool:
        """One POST to notify_url; True once it answered 2xx (or there is none)."""
        if not self.url:
            return True
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.post(self.url, json=payload)
                response.raise_for_status()
        except httpx.HTTPError as exc:
            log.error(
                "notification %s to callback failed: %s",
                payload.get("notification_id", payload.get("type")),
                type(exc).__name__,
            )
            return False
        return True
