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
stopped, else at the stream's end (Store.create_notification_group).

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
import logging
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from sidecar.errors import TollwayError
from sidecar.store import Store
from sidecar.store.names import notification_group
from webhook.config import StripeSettings
from webhook.notify import Notifier

__all__ = ["Handler", "Outbox", "Relay"]

log = logging.getLogger("tollway.outbox")

Handler = Callable[[dict[str, Any]], Awaitable[None]]

_REMEMBER: Final = 30 * 86400  # notified ids are kept as long as Stripe event ids
_FORGET_CONSUMERS: Final = 86400  # a consumer silent this long, with nothing pending, is gone


class Outbox:
    """Queues notifications in the store's stream, for the relay to deliver."""

    def __init__(self, store: Store) -> None:
        self._store = store

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
        return await self._store.was_notified(customer_id, notification_id)

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
            await self._store.mark_notified(customer_id, notification_id, remember_for=_REMEMBER)
        return True


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
        self.group = notification_group(notifier.url)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._ready = False
        self._next_cleanup = 0.0

    def reset(self) -> None:
        """After a Redis failure: the group is checked again (a new Redis has none)."""
        self._ready = False

    async def ensure_group(self) -> None:
        if self._ready:
            return
        start = await self._store.create_notification_group(self.group)
        if start is not None:
            log.info("notification group %s created at %s", self.group, start)
        self._ready = True

    async def round(self, count: int = 50) -> int:
        """Delivers what is due: entries a silent companion held, then new ones.
        Returns how many were taken."""
        await self.ensure_group()
        taken = await self._store.reclaim_notifications(
            self.group, self.consumer, idle_ms=self._reclaim_ms, count=count
        )
        if taken:
            log.info("took over %d notifications a silent companion held", len(taken))
        new = await self._store.read_notifications(self.group, self.consumer, count=count)
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
        await self._store.ack_notification(self.group, entry_id)

    async def _deliver(self, entry_id: str, payload: dict[str, Any]) -> None:
        payload.setdefault("notification_id", f"tw-{entry_id}")
        self._notifier.log(payload)
        for attempt in range(self._attempts):
            if attempt:
                delay = self._backoff * 2 ** (attempt - 1)
                await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
                # a live owner's entry must not look silent and be reclaimed
                await self._store.touch_notification(self.group, self.consumer, entry_id)
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
        await self._store.forget_silent_consumers(
            self.group, keep=self.consumer, idle_ms=_FORGET_CONSUMERS * 1000
        )
