"""Billing: which customers have usage to report (the dirty index), the
planned batches of Stripe meter events (plan_batch.lua) and their
acknowledgements (ack_batch.lua), and what Stripe refused for good."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sidecar.store.base import StoreBase
from sidecar.store.names import (
    DIRTY_KEY,
    bill_failed_key,
    bill_key,
    customer_of,
    reservations_key,
    totals_key,
    usage_key,
)
from sidecar.store.text import text

__all__ = ["Billing"]


class Billing(StoreBase):
    async def mark_dirty(self, customers: Iterable[str]) -> None:
        """Tells the reporter these customers have usage to bill."""
        batch = list(customers)
        if batch:
            async with self._guard("usage index"):
                await self._redis.sadd(DIRTY_KEY, *batch)

    async def dirty_customers(self, limit: int) -> list[str]:
        async with self._guard("usage index"):
            members: Any = await self._redis.srandmember(DIRTY_KEY, limit)
        return sorted(text(m) for m in members or [])

    async def clear_dirty(self, customer_id: str) -> None:
        """Drops the customer from the index, then puts it back if usage arrived
        meanwhile (the check comes after the removal, so nothing slips through)."""
        async with self._guard("usage index"):
            await self._redis.srem(DIRTY_KEY, customer_id)
            open_reservations = await self._redis.zcard(reservations_key(customer_id))
        if open_reservations or await self.unbilled_since(customer_id) is not None:
            await self.mark_dirty([customer_id])

    async def find_usage_streams(self, count: int = 1000) -> list[str]:
        """Customers with a usage stream, found by scanning (the index's safety net)."""
        found = []
        async with self._guard("usage scan"):
            async for name in self._redis.scan_iter(match="tw:{*}:usage", count=count):
                found.append(customer_of(text(name)))
        return found

    async def plan_batch(self, customer_id: str, max_entries: int) -> list[dict[str, Any]]:
        async with self._guard("billing plan"):
            raw = await self._run(
                "plan_batch.lua",
                keys=[usage_key(customer_id), bill_key(customer_id)],
                args=[customer_id, max_entries],
            )
        events: list[dict[str, Any]] = json.loads(text(raw))
        return events

    async def ack_batch(self, customer_id: str, identifier: str, *, refused: str = "") -> int:
        async with self._guard("billing ack"):
            left = await self._run(
                "ack_batch.lua",
                keys=[
                    bill_key(customer_id),
                    totals_key(customer_id),
                    usage_key(customer_id),
                    bill_failed_key(customer_id),
                ],
                args=[identifier, refused],
            )
        return int(left)

    async def unbilled_since(self, customer_id: str) -> int | None:
        """Unix ms of the oldest usage not yet planned for billing, or of the pending
        plan's cursor; None when everything recorded is billed."""
        async with self._guard("usage read"):
            state: Any = await self._redis.hmget(bill_key(customer_id), "cursor", "pending")
            cursor, pending = state
            after = "(" + text(cursor) if cursor else "-"
            entries: Any = await self._redis.xrange(usage_key(customer_id), after, "+", count=1)
        if pending and text(pending) != "[]":
            return int(text(cursor).split("-")[0]) if cursor else 0
        if entries:
            return int(text(entries[0][0]).split("-")[0])
        return None

    async def refused_events(self, customer_id: str) -> list[dict[str, Any]]:
        async with self._guard("billing read"):
            raw = await self._redis.lrange(bill_failed_key(customer_id), 0, -1)
        return [json.loads(text(item)) for item in raw]
