"""Notifications for people: a payment failed, a trial ends, a subscription ended.

Each is one structured log line and, when [stripe] notify_url is set, a JSON
POST to it. Delivery is best effort and never delays the webhook's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx

__all__ = ["Notifier"]

log = logging.getLogger("tollway.notify")


class Notifier:
    def __init__(self, url: str | None, *, timeout: float = 5.0) -> None:
        self._url = url
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, kind: str, customer_id: str, **details: Any) -> None:
        payload = {"type": kind, "customer_id": customer_id, **details}
        log.warning("notification %s", json.dumps(payload, sort_keys=True))
        if self._url:
            task = asyncio.get_running_loop().create_task(self._post(payload))
            self._tasks.add(task)  # held so it is not collected mid-flight
            task.add_done_callback(self._tasks.discard)

    async def _post(self, payload: dict[str, Any]) -> None:
        assert self._url is not None
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.post(self._url, json=payload)
                response.raise_for_status()
        except httpx.HTTPError as exc:
            log.error("notification %s to callback failed: %s", payload["type"], type(exc).__name__)

    async def drain(self) -> None:
        """Waits for callbacks in flight (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
