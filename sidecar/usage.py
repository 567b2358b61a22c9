"""Usage: what RecordUsage accepts, and the index that tells the reporter
which customers have something to bill.

Validation is pure. The rules follow Stripe's for meter events, so nothing
acknowledged here can be refused there later: a positive whole quantity, a
timestamp at most 35 days old and at most 5 minutes ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from sidecar.errors import StoreUnavailable
from sidecar.plans import Catalog
from sidecar.store import Store

__all__ = ["MAX_AGE", "MAX_AHEAD", "DirtyIndex", "UsageError", "validate"]

log = logging.getLogger("tollway.usage")

MAX_AGE: Final = 35 * 86400
MAX_AHEAD: Final = 300
MAX_QUANTITY: Final = 10**12  # exact in Lua's doubles, and far past any real event
MAX_IDEMPOTENCY_KEY: Final = 256


@dataclass(frozen=True, slots=True)
class UsageError(Exception):
    """A usage event refused; kind is invalid_argument, unauthenticated, not_found,
    permission_denied or rate_limited (the last two: service credentials)."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def validate(
    catalog: Catalog, *, meter: str, quantity: int, idempotency_key: str, at: int, now: int
) -> None:
    if meter not in catalog.meters:
        known = ", ".join(sorted(catalog.meters)) or "none configured"
        # Quote at most 64 characters: the message must fit a gRPC trailer.
        raise UsageError("invalid_argument", f"unknown meter {meter[:64]!r} (meters: {known})")
    if quantity <= 0:
        raise UsageError("invalid_argument", f"quantity must be positive, got {quantity}")
    if quantity > MAX_QUANTITY:
        raise UsageError("invalid_argument", f"quantity must be at most {MAX_QUANTITY}")
    if not idempotency_key:
        raise UsageError("invalid_argument", "idempotency_key is required")
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise UsageError(
            "invalid_argument", f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters"
        )
    if at < now - MAX_AGE:
        raise UsageError("invalid_argument", "timestamp is more than 35 days old")
    if at > now + MAX_AHEAD:
        raise UsageError("invalid_argument", "timestamp is more than 5 minutes in the future")


class DirtyIndex:
    """Batches "this customer has usage to bill" into one SADD every interval,
    off the request path. A crash loses at most one interval's marks; the
    reporter's periodic scan of usage streams finds those customers anyway."""

    def __init__(self, store: Store, *, interval: float = 0.1) -> None:
        self._store = store
        self._interval = interval
        self._pending: set[str] = set()

    def add(self, customer_id: str) -> None:
        self._pending.add(customer_id)

    async def flush(self) -> None:
        batch, self._pending = self._pending, set()
        try:
            await self._store.mark_dirty(batch)
        except StoreUnavailable:
            self._pending |= batch  # next time

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                if self._pending:
                    await self.flush()
        finally:
            with contextlib.suppress(StoreUnavailable):
                if self._pending:
                    await self.flush()
