"""Notifications for the companion to deliver (quota alerts and the like): a
capped stream, and the cursor of the last one delivered."""

from __future__ import annotations

import json
from typing import Any

from sidecar.store.base import StoreBase
from sidecar.store.names import NOTIFICATIONS_CURSOR_KEY, NOTIFICATIONS_KEY
from sidecar.store.text import text

__all__ = ["Notifications"]


class Notifications(StoreBase):
    async def notify(self, payload: dict[str, Any]) -> None:
        """Queues a notification for the companion to deliver (log + callback)."""
        async with self._guard("notification"):
            await self._redis.xadd(
                NOTIFICATIONS_KEY, {"json": json.dumps(payload)}, maxlen=10_000, approximate=True
            )

    async def notifications_after(
        self, last_id: str, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        async with self._guard("notification read"):
            raw: Any = await self._redis.xrange(NOTIFICATIONS_KEY, "(" + last_id, "+", count=count)
        found = []
        for entry_id, fields in raw or []:
            body = {text(k): text(v) for k, v in fields.items()}
            found.append((text(entry_id), json.loads(body["json"])))
        return found

    async def notification_cursor(self) -> str:
        async with self._guard("notification cursor"):
            raw = await self._redis.get(NOTIFICATIONS_CURSOR_KEY)
        return text(raw) if raw else "0-0"

    async def set_notification_cursor(self, entry_id: str) -> None:
        async with self._guard("notification cursor"):
            await self._redis.set(NOTIFICATIONS_CURSOR_KEY, entry_id)
