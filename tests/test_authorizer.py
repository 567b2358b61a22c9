"""The authorizer's caches change nothing a customer could count: against real
Redis and one shared fake clock, the cached path admits exactly what the bare
decision script admits, and a hostile client costs Redis almost nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import keys
from sidecar.authorizer import Authorizer
from sidecar.decision import OutcomeCode
from sidecar.settings import settings_from_document
from sidecar.store import KeyRecord, Store, connect
from sidecar.store.admission import admission
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
                outcome = await store.admit(
                    bare_customer, admission(plan, cost=cost, feature_ok=True, key_expires_at_us=0)
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


@pytest.mark.parametrize("concurrency", [1, 50])
def test_a_client_hammering_an_exhausted_key_barely_reaches_redis(
    quiet_redis_url: str, concurrency: int
) -> None:
    # Concurrent: when a token drops into the empty bucket, every request in
    # the air sees room for it; only one of them may ask Redis.
    attack = 500

    async def hammer() -> tuple[int, int]:
        store = Store(connect(quiet_redis_url, timeout=2.0), timeout=2.0)
        try:
            authorizer = Authorizer(store, lambda: CONFIG)
            _, key = await customer_with_key(store, "small")
            before = commands(await store.redis.info("commandstats"))

            async def client() -> int:
                denied = 0
                for _ in range(attack // concurrency):
                    decision = await authorizer.authorize(key, method="GET", path="/")
                    denied += not decision.allowed
                    await asyncio.sleep(0.001)
                return denied

            denied = sum(await asyncio.gather(*(client() for _ in range(concurrency))))
            after = commands(await store.redis.info("commandstats"))
            return denied, after - before
        finally:
            await store.close()

    denied, redis_calls = asyncio.run(hammer())
    allowed = attack - denied
    assert 3 <= allowed <= 3 + 5 * 2  # the burst, then 5/s of refill (it runs < 2 s)
    # Redis is asked for the key once, for each allowed request, and at most
    # once more per token as it drops in (the local clock may run a hair
    # ahead of Redis's); never for the hundreds of other denials.
    print(f"{concurrency=}: {redis_calls} Redis commands, {allowed} allowed of {attack}")
    assert redis_calls <= 1 + 2 * allowed, f"{redis_calls} Redis commands, {allowed} allowed"


def test_concurrent_requests_admit_exactly_what_the_bucket_holds(redis_url: str) -> None:
    # Requests waiting on others in flight are neither let through nor turned
    # away wrongly: each wave admits exactly the tokens the bucket has.
    async def waves() -> list[int]:
        clock = Clock()
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=lambda: clock.us)
        try:
            authorizer = Authorizer(store, lambda: CONFIG, clock=clock.seconds)
            _, key = await customer_with_key(store, "small")  # 5/s, burst 3
            admitted = []
            for advance_us in (0, 200_000, 600_000, 0):  # +1 token, then +3 (full)
                clock.us += advance_us
                decisions = await asyncio.gather(
                    *(authorizer.authorize(key, method="GET", path="/") for _ in range(20))
                )
                admitted.append(sum(decision.allowed for decision in decisions))
            return admitted
        finally:
            await store.close()

    assert asyncio.run(waves()) == [3, 1, 3, 0]


def test_a_dear_request_is_answered_promptly_amid_steady_cheap_traffic(redis_url: str) -> None:
    # Cheap requests keep the account's decisions in flight without a pause;
    # a dear one that must wait for room is still answered within moments.
    async def run() -> tuple[float, int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            authorizer = Authorizer(store, lambda: CONFIG)
            _, key = await customer_with_key(store, "big")  # 100/s, burst 50
            stop = asyncio.Event()

            async def cheap() -> None:
                while not stop.is_set():
                    await authorizer.authorize(key, method="GET", path="/", cost=1)
                    await asyncio.sleep(0)  # a local denial does not yield by itself

            async def dear() -> tuple[float, int]:
                slowest, answered = 0.0, 0
                for _ in range(20):
                    started = time.monotonic()
                    await authorizer.authorize(key, method="GET", path="/", cost=30)
                    slowest = max(slowest, time.monotonic() - started)
                    answered += 1
                    await asyncio.sleep(0.02)
                return slowest, answered

            cheap_clients = [asyncio.ensure_future(cheap()) for _ in range(10)]
            await asyncio.sleep(0.1)
            try:
                return await asyncio.wait_for(dear(), 10)
            finally:
                stop.set()
                await asyncio.gather(*cheap_clients)
        finally:
            await store.close()

    slowest, answered = asyncio.run(run())
    assert answered == 20
    assert slowest < 0.5, f"a dear request waited {slowest:.2f} s"


def test_a_new_accounts_first_request_costs_one_script_call_on_a_common_plan(
    quiet_redis_url: str,
) -> None:
    # A sidecar meeting many accounts for the first time (a restart, a million
    # customers) guesses each one's plan from the last; one plan, one call each.
    async def run() -> tuple[int, int]:
        store = Store(connect(quiet_redis_url, timeout=2.0), timeout=2.0)
        try:
            authorizer = Authorizer(store, lambda: CONFIG)
            pairs = [await customer_with_key(store, "big") for _ in range(40)]
            before = await script_calls_so_far(store)
            allowed = 0
            for _, key in pairs:
                allowed += (await authorizer.authorize(key, method="GET", path="/")).allowed
            return allowed, await script_calls_so_far(store) - before
        finally:
            await store.close()

    allowed, script_calls = asyncio.run(run())
    assert allowed == 40
    assert script_calls <= 41, f"{script_calls} script calls for 40 first requests"


async def script_calls_so_far(store: Store) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
