"""Properties of the token bucket in admit.lua, run on the real Valkey.

The clock is injected, so hypothesis chooses exact arrival times. Every
example works on a fresh customer id. An exact model (fractions) follows the
server's decisions and checks each of them: no admission without the tokens,
no denial with them (up to float rounding, EPS).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.decision import Outcome, OutcomeCode
from sidecar.plans import Plan, Rate
from sidecar.store import Store, connect
from sidecar.store.admission import admission
from sidecar.store.names import limits_key
from tests.conftest import new_customer

SECOND = 1_000_000
EPS = Fraction(1, 10**6)  # tokens; the script computes in doubles
START = 1_700_000_000 * SECOND  # Nov 2023

# One Runner and one Store per test function, reused by all its examples;
# each example creates its own account.
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pstore(aio: asyncio.Runner, redis_url: str, clock: Clock) -> Iterator[Store]:
    async def make() -> Store:
        return Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=clock)

    store = aio.run(make())
    yield store
    aio.run(store.close())


@dataclass(frozen=True)
class Step:
    gap_us: int  # since the previous request
    cost: int


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    seconds = draw(st.sampled_from([1, 60, 3600]))
    count = draw(st.integers(1, 100 if seconds == 1 else 5000))
    burst = draw(st.integers(1, 60))
    return Plan("prop", Rate(count, seconds), burst=burst)


def per_token_us(plan: Plan) -> int:
    return math.ceil(plan.rate.seconds * SECOND / plan.rate.count)


@st.composite
def traffic(draw: st.DrawFn) -> tuple[Plan, int, list[Step]]:
    plan = draw(plans())
    token = per_token_us(plan)
    gaps = st.one_of(
        st.just(0),  # simultaneous arrivals
        st.integers(0, token),  # about one token apart
        st.integers(0, token * plan.burst * 2),  # up to two full refills
    )
    costs = st.one_of(st.just(1), st.integers(1, plan.burst + 1))  # sometimes above burst
    steps = draw(st.lists(st.builds(Step, gaps, costs), min_size=1, max_size=40))
    start = draw(st.integers(START, START + 86_400 * 365 * SECOND))
    return plan, start, steps


class ExactBucket:
    """The bucket in exact arithmetic, following the decisions the server made."""

    def __init__(self, plan: Plan) -> None:
        self.rate = Fraction(plan.rate.count, plan.rate.seconds)
        self.burst = plan.burst
        self.tokens = Fraction(plan.burst)
        self.ts: int | None = None

    def available(self, now_us: int) -> Fraction:
        if self.ts is None:
            return Fraction(self.burst)
        refill = self.rate * Fraction(now_us - self.ts, SECOND)
        return min(Fraction(self.burst), self.tokens + refill)

    def check(self, outcome: Outcome, now_us: int, cost: int) -> None:
        available = self.available(now_us)
        if outcome.code is OutcomeCode.OK:
            assert available >= cost - EPS, (available, cost)
            self.tokens, self.ts = available - cost, now_us
            assert abs(Fraction(outcome.tokens) - self.tokens) <= Fraction(2, 1000)
            return
        assert outcome.code is OutcomeCode.RATE_LIMITED, outcome
        assert abs(Fraction(outcome.tokens) - available) <= Fraction(2, 1000)
        if cost > self.burst:
            assert outcome.retry_ms == -1
            return
        assert available < cost + EPS, (available, cost)
        wait_ms = (cost - available) * 1000 / self.rate
        # Rounded up to whole ms (float rounding may add one), and always enough:
        # waiting retry_ms makes the request affordable.
        assert outcome.retry_ms <= math.ceil(wait_ms) + 1
        later = available + self.rate * Fraction(outcome.retry_ms, 1000)
        assert later >= cost - EPS


async def new_account(store: Store, plan: Plan) -> str:
    customer = new_customer()
    await store.create_account(customer, plan.name)
    return customer


async def run_traffic(
    store: Store, clock: Clock, plan: Plan, customer: str, start: int, steps: list[Step]
) -> list[tuple[int, int, bool]]:
    """Sends the steps; returns (time, cost, admitted) for each, checked against the model."""
    model = ExactBucket(plan)
    log = []
    clock.now = start
    for step in steps:
        clock.now += step.gap_us
        outcome = await store.admit(
            customer, admission(plan, cost=step.cost, feature_ok=True, key_expires_at_us=0)
        )
        model.check(outcome, clock.now, step.cost)
        log.append((clock.now, step.cost, outcome.code is OutcomeCode.OK))
    return log


@PROPERTY_SETTINGS
@given(case=traffic())
def test_admitted_cost_in_any_interval_is_at_most_rate_times_length_plus_burst(
    aio: asyncio.Runner, pstore: Store, clock: Clock, case: tuple[Plan, int, list[Step]]
) -> None:
    plan, start, steps = case

    async def scenario() -> list[tuple[int, int, bool]]:
        customer = await new_account(pstore, plan)
        return await run_traffic(pstore, clock, plan, customer, start, steps)

    log = aio.run(scenario())
    rate = Fraction(plan.rate.count, plan.rate.seconds)
    for i, (t0, _, _) in enumerate(log):
        admitted = 0
        for t1, cost, ok in log[i:]:
            admitted += cost if ok else 0
            allowed = rate * Fraction(t1 - t0, SECOND) + plan.burst
            assert admitted <= allowed + EPS, (t0, t1, admitted, allowed)
    # A fresh bucket is full: the first request is admitted whenever it fits.
    first_cost = steps[0].cost
    assert log[0][2] == (first_cost <= plan.burst)


@PROPERTY_SETTINGS
@given(case=traffic())
def test_a_bucket_left_idle_long_enough_is_full_again(
    aio: asyncio.Runner, pstore: Store, clock: Clock, case: tuple[Plan, int, list[Step]]
) -> None:
    plan, start, steps = case

    async def scenario() -> None:
        customer = await new_account(pstore, plan)
        await run_traffic(pstore, clock, plan, customer, start, steps)
        # A whole burst's refill time, and a microsecond for rounding.
        clock.now += math.ceil(Fraction(plan.burst * plan.rate.seconds * SECOND, plan.rate.count))
        clock.now += 1
        outcomes = [
            await pstore.admit(
                customer, admission(plan, cost=1, feature_ok=True, key_expires_at_us=0)
            )
            for _ in range(plan.burst + 1)
        ]
        assert [o.code for o in outcomes] == [OutcomeCode.OK] * plan.burst + [
            OutcomeCode.RATE_LIMITED
        ]
        assert [o.tokens for o in outcomes[: plan.burst]] == list(range(plan.burst - 1, -1, -1))

    aio.run(scenario())


def test_concurrent_requests_never_overdraw_the_bucket(aio: asyncio.Runner, redis_url: str) -> None:
    """200 requests at once on Redis TIME: the script is atomic, so no race admits extra."""
    plan = Plan("burst50", Rate(1, 1), burst=50)

    async def scenario() -> tuple[list[Outcome], float]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            customer = await new_account(store, plan)
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(
                    store.admit(
                        customer, admission(plan, cost=1, feature_ok=True, key_expires_at_us=0)
                    )
                    for _ in range(200)
                )
            )
            elapsed = time.monotonic() - started
            tokens = float(await store.redis.hget(limits_key(customer), "tokens"))
            assert tokens >= 0
            return list(outcomes), elapsed
        finally:
            await store.close()

    outcomes, elapsed = aio.run(scenario())
    admitted = sum(o.code is OutcomeCode.OK for o in outcomes)
    assert 50 <= admitted <= 50 + elapsed * 1 + 1
    denied = [o for o in outcomes if o.code is not OutcomeCode.OK]
    assert {o.code for o in denied} == {OutcomeCode.RATE_LIMITED}
    assert all(0 < o.retry_ms <= 1000 for o in denied)
