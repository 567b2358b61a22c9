"""The companion's side of Stripe sync: applying subscription state once per
event and never backwards (apply_subscription.lua), the per-account lock
around fetch + apply (release_lock.lua), and checkout claims (a key's
plaintext is shown for one checkout session only)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sidecar.errors import Busy, StoreUnavailable
from sidecar.store.accounts import Accounts, check_status
from sidecar.store.names import account_key, checkouts_key, events_key, lock_key
from sidecar.store.text import text

__all__ = ["StripeSync", "SubscriptionChange"]


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """apply_subscription.lua's answer."""

    result: str  # applied | duplicate | kept
    old_status: str
    new_status: str
    old_plan: str
    new_plan: str
    grace_until: int


class StripeSync(Accounts):
    async def event_seen(self, customer_id: str, event_id: str) -> bool:
        async with self._guard("event lookup"):
            return await self._redis.zscore(events_key(customer_id), event_id) is not None

    async def apply_subscription(
        self,
        customer_id: str,
        *,
        event_id: str,
        subscription_id: str,
        status: str,
        plan: str | None,
        error: str,
        period_end: int,
        grace_seconds: int,
        trouble_since: int,
        remember_events_for: int = 30 * 86400,
    ) -> SubscriptionChange:
        """Runs apply_subscription.lua (see its header for the contract)."""
        check_status(status)
        async with self._guard("subscription update"):
            raw = await self._run(
                "apply_subscription.lua",
                keys=[account_key(customer_id), events_key(customer_id)],
                args=[
                    event_id,
                    subscription_id,
                    status,
                    plan or "",
                    error,
                    period_end,
                    grace_seconds,
                    trouble_since,
                    remember_events_for,
                ],
            )
        change = SubscriptionChange(
            result=text(raw[0]),
            old_status=text(raw[1]),
            new_status=text(raw[2]),
            old_plan=text(raw[3]),
            new_plan=text(raw[4]),
            grace_until=int(raw[5]),
        )
        if change.result == "applied" and not change.old_plan:
            await self.index_account(customer_id)  # the subscription created the account
        return change

    @contextlib.asynccontextmanager
    async def account_lock(
        self, customer_id: str, *, ttl: float = 30.0, wait: float = 10.0, purpose: str = "sync"
    ) -> AsyncIterator[None]:
        """Serializes the companion's read-from-Stripe-then-write per account
        (purpose "sync") or its billing (purpose "bill"), across companion
        instances. The TTL frees a lock whose holder died."""
        name = lock_key(customer_id, purpose)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait
        while True:
            async with self._guard("lock"):
                acquired = await self._redis.set(name, token, nx=True, px=int(ttl * 1000))
            if acquired:
                break
            if time.monotonic() > deadline:
                raise Busy(f"account {customer_id} stayed locked for {wait:.0f}s")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            # If Redis is gone, so is our chance to unlock: the TTL frees it.
            with contextlib.suppress(StoreUnavailable):
                async with self._guard("unlock"):
                    await self._run("release_lock.lua", [name], [token])

    async def claim_checkout(self, customer_id: str, session_id: str, key_id: str) -> bool:
        """Records that session_id's key was shown; False if one already was."""
        async with self._guard("checkout claim"):
            return bool(await self._redis.hsetnx(checkouts_key(customer_id), session_id, key_id))
