"""Durable notifications: queued in Redis first, delivered by a relay.

Every notification, the sidecars' (quota thresholds, low balances) and the
companion's own (a payment failed, an unknown price, auto top-up results),
is an entry of the store's notification stream (Store.notify) before anyone
is told. The relay delivers each entry: one log line, one POST to [stripe]
notify_url carrying a stable ``notification_id`` (a receiver drops a repeat
by it), retried with backoff up to [stripe] notify_attempts times, then
logged and dropped; the relay never stalls on one callback forever. Commands
in the stream (``auto_top_up_due``) go to their handler instead of a POST.

Who delivers: a Redis consumer group on the stream, one per notify_url
(companions sharing a callback share the work; companions with another one,
or none, each see every entry). A group hands each entry to one companion
and keeps it pending until acknowledged, which happens only after its POST
(or its handler) finished; so two companions never deliver one entry, and an
entry whose companion was killed mid-delivery is taken over by another (or
by the restarted one) once it sat [stripe] notify_reclaim_after untouched
(XAUTOCLAIM). The owner touches an entry before each retry, so only a silent
companion loses its entries. A per-entry claim (SET NX with a TTL) would
also stop two companions sending one entry, but it needs the shared cursor
still, and a cursor moved past a claimed entry whose owner died loses it;
the group's pending list is exactly the record of "taken, not yet done".

A new group starts where the single shared cursor of earlier releases
(tw:notifications:cursor) stopped, else at the stream's end.

Queued once: a notification about a Stripe event is queued under a claim
(``queue_once``): its id goes into the account's notified set after the
entry is in the stream, under the account's "notify" lock. A redelivered
event that was applied but whose notification was never queued (the
companion died in between) finds no claim and queues it; one that was
queued finds the claim and queues nothing. The one window left, a companion
killed between the stream entry and the claim, queues a second entry with
the same notification_id, which the receiver drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

from redis.exceptions import ResponseError

from sidecar.errors import TollwayError
from sidecar.store import Store
from sidecar.store.connection import translate_errors
from sidecar.store.names import NOTIFICATIONS_CURSOR_KEY, NOTIFICATIONS_KEY, events_key
from sidecar.store.text import text
from webhook.config import StripeSettings
from webhook.notify import Notifier

__all__ = ["Handler", "Outbox", "Relay", "group_name", "notified_key"]

log = logging.getLogger("tollway.outbox")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

_REMEMBER: Final = 30 * 86400  # notified ids are kept as long as Stripe event ids
_DEADLINE: Final = 5.0
_FORGET_CONSUMERS: Final = 86400  # a consumer silent this long, with nothing pending, is gone


def notified_key(customer_id: str) -> str:
    """tw:{cus}:notified: notification ids queued for the account -> when (sorted set).
    TODO(lead): move to sidecar/store/names.py beside events_key."""
    return events_key(customer_id).removesuffix(":events") + ":notified"


def group_name(notify_url: str | None) -> str:
    """The consumer group of companions posting to one notify_url (none: "log").
    TODO(lead): list beside NOTIFICATIONS_KEY in sidecar/store/names.py."""
    if not notify_url:
        return "tw-relay-log"
    return "tw-relay-" + hashlib.sha256(notify_url.encode()).hexdigest()[:16]


class Outbox:
    """Queues notifications in the store's stream, for the relay to deliver."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextlib.asynccontextmanager
    async def _redis(self, what: str) -> AsyncIterator[None]:
        async with translate_errors(self._store.redis, what, deadline=_DEADLINE):
            yield

    async def queue(
        self, kind: str, customer_id: str, *, notification_id: str = "", **details: Any
    ) -> None:
        payload = {
            "type": kind,
            "customer_id": customer_id,
            "notification_id": notification_id or f"{kind}:{uuid.uuid4().hex}",
            **details,
        }
        await self._store.notify(payload)

    async def was_queued(self, customer_id: str, notification_id: str) -> bool:
        async with self._redis("notified lookup"):
            found = await self._store.redis.zscore(notified_key(customer_id), notification_id)
        return found is not None

    async def queue_once(
        self, kind: str, customer_id: str, *, notification_id: str, **details: Any
    ) -> bool:
        """Queues it unless a notification with this id was queued; True if it did."""
        if await self.was_queued(customer_id, notification_id):
            return False
        async with self._store.account_lock(customer_id, purpose="notify", ttl=10, wait=10):
            if await self.was_queued(customer_id, notification_id):
                return False
            await self.queue(kind, customer_id, notification_id=notification_id, **details)
            key, now = notified_key(customer_id), time.time()
            async with self._redis("notified claim"):
                pipe = self._store.redis.pipeline(transaction=False)
                pipe.zadd(key, {notification_id: now})
                pipe.zremrangebyscore(key, "-inf", now - _REMEMBER)
                pipe.expire(key, _REMEMBER)
                await pipe.execute()
        return True


def _entries(raw: Any) -> list[tuple[str, dict[str, Any] | None]]:
    """(entry id, payload) from XREADGROUP / XAUTOCLAIM answers;
    None for an entry the stream no longer holds (trimmed) or cannot be read."""
    found: list[tuple[str, dict[str, Any] | None]] = []
    for item in raw or []:
        entry_id, fields = item[0], item[1] if len(item) > 1 else None
        payload: dict[str, Any] | None = None
        if fields:
            body = {text(k): text(v) for k, v in fields.items()}
            with contextlib.suppress(KeyError, ValueError):
                decoded = json.loads(body["json"])
                payload = decoded if isinstance(decoded, dict) else None
        found.append((text(entry_id), payload))
    return found


class Relay:
    """Delivers the notification stream through one consumer group (see the module)."""

    def __init__(
        self,
        store: Store,
        notifier: Notifier,
        settings: StripeSettings,
        *,
        handlers: Mapping[str, Handler] | None = None,
        backoff: float = 0.5,
    ) -> None:
        self._store = store
        self._notifier = notifier
        self._attempts = settings.notify_attempts
        self._reclaim_ms = settings.notify_reclaim_after * 1000
        self._handlers = dict(handlers or {})
        self._backoff = backoff
        self.group = group_name(notifier.url)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._ready = False
        self._next_cleanup = 0.0

    @contextlib.asynccontextmanager
    async def _redis(self, what: str) -> AsyncIterator[None]:
        async with translate_errors(self._store.redis, what, deadline=_DEADLINE):
            yield

    def reset(self) -> None:
        """After a Redis failure: the group is checked again (a new Redis has none)."""
        self._ready = False

    async def ensure_group(self) -> None:
        if self._ready:
            return
        async with self._redis("notification group"):
            cursor = await self._store.redis.get(NOTIFICATIONS_CURSOR_KEY)
            start = text(cursor) if cursor else "$"
            try:
                await self._store.redis.xgroup_create(
                    NOTIFICATIONS_KEY, self.group, id=start, mkstream=True
                )
                log.info("notification group %s created at %s", self.group, start)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    async def round(self, count: int = 50) -> int:
        """Delivers what is due: entries a silent companion held, then new ones.
        Returns how many were taken."""
        await self.ensure_group()
        redis = self._store.redis
        async with self._redis("notification reclaim"):
            claimed: Any = await redis.xautoclaim(
                NOTIFICATIONS_KEY, self.group, self.consumer, self._reclaim_ms, "0-0", count=count
            )
        taken = _entries(claimed[1] if claimed else [])
        if taken:
            log.info("took over %d notifications a silent companion held", len(taken))
        async with self._redis("notification read"):
            raw: Any = await redis.xreadgroup(
                self.group, self.consumer, {NOTIFICATIONS_KEY: ">"}, count=count
            )
        new = [e for _, items in raw or [] for e in _entries(items)]  # RESP2, as connect() speaks
        for entry_id, payload in taken + new:
            await self._take(entry_id, payload)
        await self._forget_dead_consumers()
        return len(taken) + len(new)

    async def _take(self, entry_id: str, payload: dict[str, Any] | None) -> None:
        if payload is not None:
            handler = self._handlers.get(str(payload.get("type")))
            if handler is not None:
                try:
                    await handler(payload)
                except TollwayError as exc:  # Redis or Stripe away, a lock held too long
                    log.error(
                        "%s for %s left pending, retried in %ss: %s",
                        payload.get("type"),
                        payload.get("customer_id"),
                        self._reclaim_ms // 1000,
                        exc,
                    )
                    return  # not acknowledged: taken over again once it sat reclaim_after
            elif payload.get("type") == "auto_top_up_due":
                log.info("auto top-up due for %s: not configured here", payload.get("customer_id"))
            else:
                await self._deliver(entry_id, payload)
        async with self._redis("notification ack"):
            await self._store.redis.xack(NOTIFICATIONS_KEY, self.group, entry_id)

    async def _deliver(self, entry_id: str, payload: dict[str, Any]) -> None:
        payload.setdefault("notification_id", f"tw-{entry_id}")
        self._notifier.log(payload)
        for attempt in range(self._attempts):
            if attempt:
                delay = self._backoff * 2 ** (attempt - 1)
                await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
                async with self._redis("notification touch"):  # still ours: not reclaimed
                    await self._store.redis.xclaim(
                        NOTIFICATIONS_KEY, self.group, self.consumer, 0, [entry_id], justid=True
                    )
            if await self._notifier.post(payload):
                return
        log.error(
            "notification %s dropped after %d failed attempts",
            payload["notification_id"],
            self._attempts,
        )

    async def _forget_dead_consumers(self) -> None:
        if time.monotonic() < self._next_cleanup:
            return
        self._next_cleanup = time.monotonic() + 600
        async with self._redis("notification consumers"):
            consumers = await self._store.redis.xinfo_consumers(NOTIFICATIONS_KEY, self.group)
            for consumer in consumers:
                name = text(consumer.get("name", b""))
                idle = int(consumer.get("idle", 0))
                silent = idle > _FORGET_CONSUMERS * 1000
                if name != self.consumer and not consumer.get("pending") and silent:
                    await self._store.redis.xgroup_delconsumer(NOTIFICATIONS_KEY, self.group, name)
