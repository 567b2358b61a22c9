"""Accounts: one hash per customer (plan, status, grace), as the CLI and the
companion create and change them. Every change tells the sidecars to drop what
they cached about the account."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sidecar.decision import STATUSES
from sidecar.errors import AlreadyExists, NotFound, TollwayError
from sidecar.store.base import StoreBase
from sidecar.store.names import (
    ACCOUNTS_INDEX,
    INVALIDATE_CHANNEL,
    account_changed,
    account_key,
    customer_of,
    key_changed,
    legacy_quota_key,
    limits_key,
)
from sidecar.store.text import text

__all__ = ["Account", "Accounts", "check_status"]


@dataclass(frozen=True, slots=True)
class Account:
    customer_id: str
    plan: str
    status: str
    grace_until: int = 0
    created_at: int = 0
    subscription_id: str = ""
    period_end: int = 0
    error: str = ""


def check_status(status: str) -> None:
    if status not in STATUSES:
        raise TollwayError(f"status {status!r}: expected one of {', '.join(STATUSES)}")


@dataclass(frozen=True, slots=True)
class LimitsState:
    tokens: float | None  # None: the bucket was never used (it is full)
    written_us: int
    period_kind: str  # hour | day | month; "" before the first admission
    period_start: int
    used: int  # in the period starting at period_start


class Accounts(StoreBase):
    async def create_account(self, customer_id: str, plan: str, status: str = "active") -> Account:
        check_status(status)
        now = int(time.time())
        async with self._guard("account create"):
            created = await self._redis.hsetnx(account_key(customer_id), "plan", plan)
            if not created:
                raise AlreadyExists(f"account {customer_id} already exists")
            await self._redis.hset(
                account_key(customer_id),
                mapping={"status": status, "grace_until": 0, "created_at": now},
            )
        await self.index_account(customer_id)
        return Account(customer_id, plan, status, 0, now)

    async def index_account(self, customer_id: str) -> None:
        """Puts the account in the index list_accounts pages through (another slot:
        a write of its own, after the account's)."""
        async with self._guard("account index"):
            await self._redis.zadd(ACCOUNTS_INDEX, {customer_id: 0})

    async def list_accounts(self, *, after: str = "", limit: int = 100) -> list[Account]:
        """Up to limit accounts by customer id, those after `after`. The first
        call on a Redis without the index (accounts from before 0.3) builds it."""
        async with self._guard("account list"):
            if not await self._redis.exists(ACCOUNTS_INDEX):
                found = [
                    customer_of(text(name))
                    async for name in self._redis.scan_iter(match="tw:{*}:a", count=1000)
                ]
                if found:
                    await self._redis.zadd(ACCOUNTS_INDEX, dict.fromkeys(found, 0))
            low = f"({after}" if after else "-"
            ids = await self._redis.zrangebylex(ACCOUNTS_INDEX, low, "+", start=0, num=limit)
        accounts = []
        for raw in ids:
            account = await self.get_account(text(raw))
            if account is not None:
                accounts.append(account)
        return accounts

    async def get_account(self, customer_id: str) -> Account | None:
        async with self._guard("account read"):
            raw = await self._redis.hgetall(account_key(customer_id))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        return Account(
            customer_id=customer_id,
            plan=fields.get("plan", ""),
            status=fields.get("status", ""),
            grace_until=int(fields.get("grace_until") or 0),
            created_at=int(fields.get("created_at") or 0),
            subscription_id=fields.get("subscription_id", ""),
            period_end=int(fields.get("period_end") or 0),
            error=fields.get("error", ""),
        )

    async def require_account(self, customer_id: str) -> Account:
        account = await self.get_account(customer_id)
        if account is None:
            raise NotFound(f"account {customer_id} does not exist")
        return account

    async def set_status(self, customer_id: str, status: str, *, grace_until: int = 0) -> Account:
        check_status(status)
        await self.require_account(customer_id)
        async with self._guard("account update"):
            await self._redis.hset(
                account_key(customer_id), mapping={"status": status, "grace_until": grace_until}
            )
        await self.invalidate(customer=customer_id)
        return await self.require_account(customer_id)

    async def set_plan(self, customer_id: str, plan: str) -> Account:
        await self.require_account(customer_id)
        async with self._guard("account update"):
            await self._redis.hset(account_key(customer_id), "plan", plan)
        await self.invalidate(customer=customer_id)
        return await self.require_account(customer_id)

    async def invalidate(self, *, key_hash: str = "", customer: str = "") -> None:
        """Tells every sidecar to drop what it cached about a key or an account."""
        async with self._guard("invalidation"):
            if key_hash:
                await self._redis.publish(INVALIDATE_CHANNEL, key_changed(key_hash))
            if customer:
                await self._redis.publish(INVALIDATE_CHANNEL, account_changed(customer))

    async def limits_state(self, customer_id: str) -> LimitsState:
        """The account's bucket and period counter as last written, for display."""
        async with self._guard("usage read"):
            tokens, ts, kind, start, used = await self._redis.hmget(
                limits_key(customer_id), "tokens", "ts", "k", "p", "used"
            )
        return LimitsState(
            tokens=float(tokens) if tokens is not None else None,
            written_us=int(ts or 0),
            period_kind=text(kind) if kind is not None else "",
            period_start=int(start or 0),
            used=int(used or 0),
        )

    async def usage(self, customer_id: str) -> tuple[float | None, int, int]:
        """(tokens as last written or None, quota used, period start) for display."""
        async with self._guard("usage read"):
            bucket, kind, period, used = await self._redis.hmget(
                limits_key(customer_id), "tokens", "k", "p", "used"
            )
            if kind is None:  # not yet moved from where releases before 0.2 kept it
                period, used = await self._redis.hmget(legacy_quota_key(customer_id), "p", "used")
        return (
            float(bucket) if bucket is not None else None,
            int(used or 0),
            int(period or 0),
        )
