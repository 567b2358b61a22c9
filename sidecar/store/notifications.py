"""Notifications for the companion to deliver (quota alerts and the like): a
capped stream, delivered through one consumer group per notify_url
(webhook/outbox.py says why), and each account's set of notification ids
queued once.

The group's pending list is the record of "taken, not yet done": an entry is
acknowledged only after its delivery, and one whose consumer fell silent is
reclaimed by another. The cursor of earlier releases, which delivered through
one shared cursor, is read only to start a new group where it stopped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.exceptions import ResponseError

from sidecar.store.base import StoreBase
from sidecar.store.names import NOTIFICATIONS_CURSOR_KEY, NOTIFICATIONS_KEY, notified_key
from sidecar.store.text import text

__all__ = ["Notifications", "StreamEntry"]

# (entry id, payload); None for an entry the stream no longer holds (trimmed)
# or whose body cannot be read, so that it is acknowledged all the same.
StreamEntry = tuple[str, dict[str, Any] | None]


def _entries(raw: Any) -> list[StreamEntry]:
    """The entries of an XREADGROUP stream or an XAUTOCLAIM answer."""
    found: list[StreamEntry] = []
    for item in raw or []:
        entry_id, fields = item[0], item[1] if len(item) > 1 else None
        payload: dict[str, Any] | None = None
        if fields:
            body = {text(k): text(v) for k, v in fields.items()}
            try:
                decoded = json.loads(body["json"])
            except (KeyError, ValueError):
                decoded = None
            payload = decoded if isinstance(decoded, dict) else None
        found.append((text(entry_id), payload))
    return found


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

    # -- delivery through a consumer group ---------------------------------

    async def create_notification_group(self, group: str) -> str | None:
        """Creates the group (and the stream) unless it exists; returns where it
        starts, or None if it existed. It starts after the last entry the shared
        cursor of earlier releases delivered, so an upgrade neither repeats nor
        skips any; with no such cursor, at the stream's end."""
        async with self._guard("notification group"):
            cursor = await self._redis.get(NOTIFICATIONS_CURSOR_KEY)
            start = text(cursor) if cursor else "$"
            try:
                await self._redis.xgroup_create(NOTIFICATIONS_KEY, group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                return None
        return start

    async def reclaim_notifications(
        self, group: str, consumer: str, *, idle_ms: int, count: int
    ) -> list[StreamEntry]:
        """Takes over entries pending idle_ms or longer: their consumer was killed
        or fell silent mid-delivery (an owner touches what it still works on)."""
        async with self._guard("notification reclaim"):
            raw: Any = await self._redis.xautoclaim(
                NOTIFICATIONS_KEY, group, consumer, idle_ms, "0-0", count=count
            )
        return _entries(raw[1] if raw else [])

    async def read_notifications(
        self, group: str, consumer: str, *, count: int
    ) -> list[StreamEntry]:
        """Takes entries no consumer of the group was given yet; they stay pending
        (this consumer's) until acknowledged."""
        async with self._guard("notification read"):
            raw: Any = await self._redis.xreadgroup(
                group, consumer, {NOTIFICATIONS_KEY: ">"}, count=count
            )
        return [e for _, items in raw or [] for e in _entries(items)]  # RESP2, as connect() speaks

    async def ack_notification(self, group: str, entry_id: str) -> None:
        """The entry is done (delivered, handled or dropped): no one takes it again."""
        async with self._guard("notification ack"):
            await self._redis.xack(NOTIFICATIONS_KEY, group, entry_id)

    async def touch_notification(self, group: str, consumer: str, entry_id: str) -> None:
        """Resets the entry's idle time while its consumer still works on it (a
        retry after backoff), so that it is not reclaimed from a live consumer."""
        async with self._guard("notification touch"):
            await self._redis.xclaim(NOTIFICATIONS_KEY, group, consumer, 0, [entry_id], justid=True)

    async def forget_silent_consumers(self, group: str, *, keep: str, idle_ms: int) -> int:
        """Deletes the group's consumers silent longer than idle_ms with nothing
        pending (each companion process is a new consumer, so the list would only
        grow); keep is the caller's own. Returns how many were deleted."""
        forgotten = 0
        async with self._guard("notification consumers"):
            consumers = await self._redis.xinfo_consumers(NOTIFICATIONS_KEY, group)
            for consumer in consumers:
                name = text(consumer.get("name", b""))
                silent = int(consumer.get("idle", 0)) > idle_ms
                if name != keep and not consumer.get("pending") and silent:
                    await self._redis.xgroup_delconsumer(NOTIFICATIONS_KEY, group, name)
                    forgotten += 1
        return forgotten

    # -- queued once --------------------------------------------------------

    async def was_notified(self, customer_id: str, notification_id: str) -> bool:
        """Whether a notification with this id was queued for the account (and
        marked) within the last remember_for seconds."""
        async with self._guard("notified lookup"):
            found = await self._redis.zscore(notified_key(customer_id), notification_id)
        return found is not None

    async def mark_notified(
        self, customer_id: str, notification_id: str, *, remember_for: int = 30 * 86400
    ) -> None:
        """Records that the notification was queued; ids older than remember_for
        seconds are dropped (as long as Stripe event ids are kept)."""
        key = notified_key(customer_id)
        now = self._clock_us() / 1_000_000 if self._clock_us is not None else time.time()
        async with self._guard("notified claim"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(key, {notification_id: now})
            pipe.zremrangebyscore(key, "-inf", now - remember_for)
            pipe.expire(key, remember_for)
            await pipe.execute()
