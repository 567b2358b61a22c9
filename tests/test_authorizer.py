"""The authorizer's caches change nothing a customer could count: against real
Redis and one shared fake clock, the cached path admits exactly what the bare
decision script admits, and a hostile client costs Redis almost nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import keys
from sidecar.authorizer import Authorizer
from sidecar.decide import OutcomeCode
from sidecar.settings import settings_from_document
from sidecar.store import KeyRecord, Store, connect
from tests.conftest import new_customer

CONFIG = settings_from_document(
    {
        "plans": [
            {"name": "small", "rate": "5/s", "burst": 3},
            {"name": "big", "rate": "100/s", "burst": 50},
        ],
    },
    {},
)


class Clock:
    """Drives both the store (Redis-side time, µs) and the authorizer's caches (s)."""

    def __init__(self) -> None:
        self.us = 1_900_000_000_000_000

    def seconds(self) -> float:
        return self.us / 1_000_000


async def customer_with_key(store: Store, plan: str) -> tuple[str, str]:
    customer = new_customer()
    await store.create_account(customer, plan)
    key = keys.generate("test")
    hashed = keys.key_hash(key)
    await store.add_key(hashed, KeyRecord(keys.key_id(hashed), customer, "active"))
    return customer, key


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, 400_000), st.integers(1, 4)),  # (µs since previous, cost)
        min_size=1,
        max_size=60,
    )
)
def test_cached_and_bare_paths_admit_the_same_requests(
    redis_url: str, arrivals: list[tuple[int, int]]
) -> None:
    async def both() -> tuple[list[bool], list[bool]]:
        clock = Clock()
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=lambda: clock.us)
        try:
            authorizer = Authorizer(store, lambda: CONFIG, clock=clock.seconds)
            _, key = await customer_with_key(store, "small")
            bare_customer, _ = await customer_with_key(store, "small")
            plan = CONFIG.catalog.plans["small"]
            cached, bare = [], []
            for gap, cost in arrivals:
                clock.us += gap
                decision = await authorizer.authorize(key, method="GET", path="/", cost=cost)
                cached.append(decision.allowed)
                outcome = await store.decide(
                    bare_customer, plan, cost=cost, feature_ok=True, key_expires_at_us=0
                )
                bare.append(outcome.code is OutcomeCode.OK)
            return cached, bare
        finally:
            await store.close()

    cached, bare = asyncio.run(both())
    assert cached == bare


def commands(info: dict[str, Any]) -> int:
    return sum(
        int(stats["calls"])
        for name, stats in info.items()
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_hgetall")
    )


@pytest.mark.parametrize("attack", [500])
def test_a_client_hammering_an_exhausted_key_barely_reaches_redis(
    redis_url: str, attack: int
) -> None:
    async def hammer() -> tuple[int, int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            authorizer = Authorizer(store, lambda: CONFIG)
            _, key = await customer_with_key(store, "small")
            before = commands(await store.redis.info("commandstats"))
            denied = 0
            for _ in range(attack):
                decision = await authorizer.authorize(key, method="GET", path="/")
                denied += not decision.allowed
            after = commands(await store.redis.info("commandstats"))
            return denied, after - before
        finally:
            await store.close()

    denied, redis_calls = asyncio.run(hammer())
    assert denied >= attack - 10  # a burst of 3, then the refill while we hammer
    assert redis_calls < attack * 0.10, f"{redis_calls} Redis commands for {attack} requests"
