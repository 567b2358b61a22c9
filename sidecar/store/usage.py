"""Usage: recording it at most once per idempotency key (record_usage.lua),
settling or expiring the reservations Authorize made (expire_reservation.lua),
releasing concurrency leases, and the per-month totals.

The usage stream's fields are written once, in shared/usage_stream.lua.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from sidecar.errors import StoreUnavailable
from sidecar.periods import month_start
from sidecar.store.base import StoreBase
from sidecar.store.names import (
    credit_ledger_key,
    credits_key,
    idempotency_key,
    leases_key,
    legacy_quota_key,
    limits_key,
    request_hash,
    reservation_key,
    reservations_key,
    totals_key,
    usage_key,
)
from sidecar.store.text import text

__all__ = ["Recorded", "UsageStore"]


@dataclass(frozen=True, slots=True)
class Recorded:
    """record_usage.lua's answer."""

    duplicate: bool
    record_id: str
    units: int  # units recorded now (0 for a duplicate or a pure refund)
    quota_used: int  # the quota counter after any settlement
    # A settlement in credits: the balance after it (None: none happened), the
    # low-balance marks it reached, and the fall past the auto top-up mark it made
    # (or a due one to report again; "" for none), as an admission reports them.
    credits: int | None = None
    low_balance: tuple[int, ...] = ()
    top_up: str = ""


class UsageStore(StoreBase):
    async def record_usage(
        self,
        customer_id: str,
        *,
        meter: str,
        quantity: int,
        at: int,
        idempotency: str,
        dedupe_window: int,
        request_id: str = "",
        lease_id: str = "",
        low_balance: tuple[int, ...] = (),
        top_up_at: int | None = None,
        wait_for_aof: bool = False,
        wait_for_replicas: int = 0,
    ) -> Recorded:
        """record_usage.lua (see its header). low_balance and top_up_at are the
        marks a settlement in credits reports crossing, as admit.lua's (the plan's:
        Credits.low_balance_for and top_up_at_for). With wait_for_aof, returns only
        once the record is fsynced to Redis's append-only file (WAITAOF); with
        wait_for_replicas, once that many replicas have it (WAIT): a failover
        then cannot lose it. Else raises StoreUnavailable, and the client's
        retry with the same idempotency key waits again (the record counts once)."""
        settle = request_hash(request_id) if request_id else ""
        keys = [
            idempotency_key(customer_id, idempotency),
            usage_key(customer_id),
            totals_key(customer_id),
            reservation_key(customer_id, settle or "-"),
            reservations_key(customer_id),
            limits_key(customer_id),
            leases_key(customer_id),
            legacy_quota_key(customer_id),
            credits_key(customer_id),
            credit_ledger_key(customer_id),
        ]
        args: list[Any] = [
            meter,
            quantity,
            at,
            month_start(at),
            idempotency,
            dedupe_window,
            settle,
            lease_id,
            ",".join(map(str, low_balance)),
            "" if top_up_at is None else top_up_at,
            "" if self._clock_us is None else self._clock_us(),
        ]
        async with self._guard("usage record"):
            raw = await self._run("record_usage.lua", keys, args)
            if wait_for_aof or wait_for_replicas:
                await self._confirm(keys[0], text(raw[1]), wait_for_aof, wait_for_replicas)
        return Recorded(
            duplicate=text(raw[0]) == "duplicate",
            record_id=text(raw[1]),
            units=int(raw[2]),
            quota_used=int(raw[3]),
            credits=None if raw[4] in (b"", "") else int(raw[4]),
            low_balance=tuple(int(n) for n in text(raw[5]).split(",") if n),
            top_up=text(raw[6]),
        )

    async def _confirm(self, claim: str, record_id: str, aof: bool, replicas: int) -> None:
        """Waits until the usage claim (and so its record) is fsynced or replicated.

        WAIT and WAITAOF count the writes of the connection they are sent on,
        and the script may have run on another pooled connection, or on another
        sidecar (a duplicate writes nothing). So this connection first rewrites
        the claim unchanged: a write after the record on the same master, which
        the waits then cover. A claim that is gone (a failover lost it before a
        replica had it) is not confirmed: the client's retry records it anew.
        On a cluster all of it goes to the node that holds the account, with no
        redirect followed (that would leave the waits on another connection)."""
        # Bounded like every call here, and under the socket timeout (half the
        # deadline), so a wait that falls short answers before the socket gives up.
        wait_ms = max(1, int(self._deadline * 1000) // 4)
        if isinstance(self._redis, RedisCluster):
            node = self._redis.get_node_from_key(claim)
            pipe: Any = self._redis.pipeline()
            pipe.execute_command("SET", claim, record_id, "XX", "KEEPTTL", target_nodes=node)
            if replicas:
                pipe.execute_command("WAIT", replicas, wait_ms, target_nodes=node)
            if aof:
                pipe.execute_command("WAITAOF", 1, 0, wait_ms, target_nodes=node)
            replies = await pipe.execute(allow_redirections=False)
        else:
            async with self._redis.pipeline(transaction=False) as plain:
                plain.set(claim, record_id, xx=True, keepttl=True)
                if replicas:
                    plain.execute_command("WAIT", replicas, wait_ms)
                if aof:
                    plain.execute_command("WAITAOF", 1, 0, wait_ms)
                replies = await plain.execute()
        if not replies[0]:
            raise StoreUnavailable("usage record lost in a failover; retry to record it")
        if replicas and int(replies[1]) < replicas:
            raise StoreUnavailable(
                f"usage record on {int(replies[1])} of {replicas} replicas (WAIT)"
            )
        if aof and int(replies[-1][0]) < 1:
            raise StoreUnavailable("usage record not yet on disk (WAITAOF)")

    async def release(self, customer_id: str, lease_id: str) -> bool:
        """Frees a concurrency lease; False if it was not held (expired, released)."""
        async with self._guard("lease release"):
            return bool(await self._redis.zrem(leases_key(customer_id), lease_id))

    async def due_reservations(self, customer_id: str, limit: int = 1000) -> list[str]:
        async with self._guard("reservations"):
            now = int(time.time())
            members: Any = await self._redis.zrangebyscore(
                reservations_key(customer_id), "-inf", now, start=0, num=limit
            )
        return [text(m) for m in members]

    async def expire_reservation(self, customer_id: str, request_hash: str) -> int:
        async with self._guard("reservation expiry"):
            billed = await self._run(
                "expire_reservation.lua",
                keys=[
                    reservation_key(customer_id, request_hash),
                    reservations_key(customer_id),
                    usage_key(customer_id),
                    totals_key(customer_id),
                ],
                args=[request_hash],
            )
        return int(billed)

    async def daily_usage(self, customer_id: str, meter: str, days: list[int]) -> list[int]:
        """Units of meter recorded on each day (UTC day starts, Unix s), in order."""
        if not days:
            return []
        async with self._guard("usage read"):
            raw: Any = await self._redis.hmget(
                totals_key(customer_id), [f"d|{meter}|{day}" for day in days]
            )
        return [int(v) if v is not None else 0 for v in raw]

    async def usage_totals(self, customer_id: str, month: int) -> dict[str, tuple[int, int]]:
        """{meter: (units recorded, units Stripe accepted)} for the month starting at month."""
        async with self._guard("usage read"):
            raw = await self._redis.hgetall(totals_key(customer_id))
        used: dict[str, int] = {}
        billed: dict[str, int] = {}
        for field, value in raw.items():
            parts = text(field).split("|")
            if parts[0] == "r" and len(parts) == 3 and parts[2] == str(month):
                billed[parts[1]] = int(value)
            elif len(parts) == 2 and parts[1] == str(month):
                used[parts[0]] = int(value)
        return {m: (used.get(m, 0), billed.get(m, 0)) for m in sorted(used.keys() | billed.keys())}
