"""The usage reporter: recorded usage → Stripe Billing Meter Events, exactly once.

For each customer with unbilled usage (the dirty index, plus a periodic scan of
usage streams as a safety net), under that customer's billing lock:

1. bill reservations past their settle-by time at their estimate;
2. plan_batch.lua fixes the next events (one per meter and minute) and their
   identifiers in Redis *before* anything is sent;
3. each event is sent with its identifier, so Stripe deduplicates any resend,
   whether after a timeout, a 5xx, or this process dying after Stripe accepted;
4. ack_batch.lua records acceptance; a duplicate-identifier answer counts as
   acceptance (Stripe already has it).

429, 5xx and network errors back off with jitter and leave events pending; a
Stripe outage only grows the backlog. Other 4xx are permanent: the event is
moved to the account's refused list and logged. Events go out one at a time
per customer (Stripe allows one concurrent call per customer and meter), and
no faster than [stripe] meter_events_per_second overall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import stripe

from sidecar.errors import Busy, StoreUnavailable
from sidecar.store import Store
from webhook.config import CompanionSettings
from webhook.metrics import BACKLOG, BILLED, LAG, STRIPE_ERRORS

__all__ = ["Reporter"]

log = logging.getLogger("tollway.reporter")


class _Pace:
    """At most `rate` calls per second, across the process."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._interval


def _is_duplicate(exc: stripe.InvalidRequestError) -> bool:
    text = (exc.user_message or str(exc) or "").lower()
    return exc.code == "duplicate_meter_event" or "already exists" in text


class Reporter:
    def __init__(
        self,
        store: Store,
        client: stripe.StripeClient,
        settings: CompanionSettings,
        *,
        attempts: int = 5,
        backoff: float = 0.5,
        max_entries: int = 1000,
    ) -> None:
        self._store = store
        self._client = client
        self._settings = settings
        self._attempts = attempts
        self._backoff = backoff
        self._max_entries = max_entries
        self._pace = _Pace(settings.stripe.meter_events_per_second)

    async def _send(self, customer: str, event: dict[str, Any]) -> str:
        """accepted | refused | retry-later."""
        meter = self._settings.core.catalog.meters.get(event["meter"])
        if meter is None:
            await self._store.ack_batch(
                customer, event["identifier"], refused=f"meter {event['meter']!r} is not configured"
            )
            return "refused"
        params = {
            "event_name": meter.event_name,
            "payload": {"stripe_customer_id": customer, "value": str(event["value"])},
            "identifier": event["identifier"],
            "timestamp": int(event["timestamp"]),
        }
        for attempt in range(self._attempts):
            await self._pace.wait()
            try:
                await self._client.v1.billing.meter_events.create_async(params)  # type: ignore[arg-type]
            except stripe.InvalidRequestError as exc:
                if not _is_duplicate(exc):
                    STRIPE_ERRORS.labels("refused").inc()
                    log.error(
                        "Stripe refused %s for %s: %s",
                        event["identifier"],
                        customer,
                        exc.user_message or type(exc).__name__,
                    )
                    await self._store.ack_batch(
                        customer, event["identifier"], refused=exc.user_message or "refused"
                    )
                    return "refused"
            except stripe.AuthenticationError:
                STRIPE_ERRORS.labels("auth").inc()
                log.error("Stripe rejected the API key; usage stays pending")
                return "retry-later"
            except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
                kind = {
                    stripe.RateLimitError: "rate_limited",
                    stripe.APIConnectionError: "network",
                }.get(type(exc), "server")
                STRIPE_ERRORS.labels(kind).inc()
                delay = self._backoff * 2**attempt
                await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
                continue
            except stripe.StripeError as exc:
                STRIPE_ERRORS.labels("server").inc()
                log.error(
                    "meter event %s for %s failed: %s",
                    event["identifier"],
                    customer,
                    type(exc).__name__,
                )
                return "retry-later"
            await self._store.ack_batch(customer, event["identifier"])
            BILLED.labels(event["meter"]).inc(int(event["value"]))
            return "accepted"
        return "retry-later"

    async def bill(self, customer: str) -> int:
        """Bills what the customer has pending; returns events Stripe accepted."""
        accepted = 0
        # The TTL bounds how long a reporter that died mid-bill holds the customer.
        async with self._store.account_lock(customer, purpose="bill", ttl=30, wait=0.0):
            for request in await self._store.due_reservations(customer):
                await self._store.expire_reservation(customer, request)
            while True:
                events = await self._store.plan_batch(customer, self._max_entries)
                if not events:
                    break
                for event in events:
                    outcome = await self._send(customer, event)
                    if outcome == "retry-later":
                        return accepted  # stays dirty; the next round resumes the same events
                    accepted += outcome == "accepted"
            await self._store.clear_dirty(customer)
        return accepted

    async def round(self, *, limit: int = 200) -> int:
        """One pass over customers with unbilled usage; returns events accepted."""
        customers = await self._store.dirty_customers(limit)
        BACKLOG.set(len(customers))
        oldest = [await self._store.unbilled_since(c) for c in customers]
        known = [t for t in oldest if t is not None]
        LAG.set(max(0.0, time.time() - min(known) / 1000) if known else 0.0)
        total = 0
        for customer in customers:
            with contextlib.suppress(Busy):  # another reporter is billing this customer
                total += await self.bill(customer)
        return total

    async def run_forever(self, *, interval: float = 1.0, sweep_every: float = 300.0) -> None:
        next_sweep = 0.0
        while True:
            try:
                if time.monotonic() >= next_sweep:
                    await self._store.mark_dirty(await self._store.find_usage_streams())
                    next_sweep = time.monotonic() + sweep_every
                if not await self.round():
                    await asyncio.sleep(interval)
            except StoreUnavailable as exc:
                log.error("reporter paused, Redis unavailable: %s", exc)
                await asyncio.sleep(interval)
