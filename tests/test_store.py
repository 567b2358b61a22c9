"""admit.lua and the Store against the real Valkey.

Time is injected (Store's clock_us) wherever a test depends on it, so every
refill, period boundary and grace period is exact. Each test works on fresh
customer ids; nothing is flushed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from redis.crc import key_slot

from sidecar import keys
from sidecar.decision import STATUSES, Outcome, OutcomeCode
from sidecar.errors import NotFound, StoreUnavailable, TollwayError
from sidecar.periods import period_at
from sidecar.plans import Plan, Quota, Rate, parse_catalog
from sidecar.store import KeyRecord, Store, connect
from sidecar.store.admission import admission
from sidecar.store.names import (
    account_key,
    key_index_key,
    key_record_key,
    legacy_quota_key,
    limits_key,
)
from tests import harness
from tests.conftest import new_customer

# rate 10/s: one token every 100 ms, exactly 100_000 µs.
BASIC = Plan("basic", Rate(10, 1), burst=5, quota=Quota(1000, "month"), features=frozenset({"a"}))
FAST_3_PER_DAY = Plan("quota3", Rate(100, 1), burst=100, quota=Quota(3, "day"))
FREE = Plan("free", Rate(1, 60), burst=2)
BILLED_3_PER_DAY = Plan("billed", Rate(100, 1), burst=100, quota=Quota(3, "day"), overage="bill")

SECOND = 1_000_000


def at(*args: int) -> int:
    """Microseconds since the epoch of a UTC wall-clock time."""
    return int(datetime(*args, tzinfo=UTC).timestamp()) * SECOND  # type: ignore[misc]


def unix(dt: datetime) -> int:
    return int(dt.timestamp())


NOON = at(2024, 6, 15, 12, 0, 0)  # a Saturday in June, a whole second


class Clock:
    """The injected clock: microseconds, moved by the test."""

    def __init__(self, now_us: int) -> None:
        self.now = now_us

    def __call__(self) -> int:
        return self.now

    def advance(self, micros: int) -> None:
        self.now += micros


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
def tstore(aio: asyncio.Runner, redis_url: str, clock: Clock) -> Iterator[Store]:
    """A Store on the test Valkey whose decisions read the injected clock."""

    async def make() -> Store:
        return Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=clock)

    store = aio.run(make())
    yield store
    aio.run(store.close())


async def account(store: Store, plan: Plan | str = BASIC, status: str = "active") -> str:
    customer = new_customer()
    await store.create_account(customer, plan if isinstance(plan, str) else plan.name, status)
    return customer


async def decide(
    store: Store,
    customer: str,
    plan: Plan | None,
    *,
    cost: int = 1,
    feature_ok: bool = True,
    key_expires_at_us: int = 0,
    fallback_plan: str | None = None,
) -> Outcome:
    return await store.admit(
        customer,
        admission(
            plan,
            cost=cost,
            feature_ok=feature_ok,
            key_expires_at_us=key_expires_at_us,
            fallback_plan=fallback_plan,
        ),
    )


@dataclass(frozen=True)
class State:
    bucket: dict[bytes, bytes]
    quota: dict[bytes, bytes]


async def state(store: Store, customer: str) -> State:
    return State(
        # The bucket and the period's counter share the limits hash.
        bucket=await store.redis.hgetall(limits_key(customer)),
        quota=await store.redis.hgetall(limits_key(customer)),
    )


async def quota_used(store: Store, customer: str) -> int:
    return int(await store.redis.hget(limits_key(customer), "used") or 0)


# -- key names ---------------------------------------------------------------


def test_key_names_put_an_account_under_one_hash_tag() -> None:
    assert account_key("cus_1") == "tw:{cus_1}:a"
    assert limits_key("cus_1") == "tw:{cus_1}:rl"
    assert legacy_quota_key("cus_1") == "tw:{cus_1}:q"
    assert key_index_key("cus_1") == "tw:{cus_1}:keys"
    assert key_record_key("ab12") == "tw:k:{ab12}"
    # In Redis Cluster the decision script's three keys must share one slot.
    names = [f("cus_1") for f in (account_key, limits_key, legacy_quota_key, key_index_key)]
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"cus_1")}
    hashed = keys.key_hash(keys.generate())
    assert key_slot(key_record_key(hashed).encode()) == key_slot(hashed.encode())


@pytest.mark.parametrize("bad", ["cus_{1}", "{cus}", "cus}", "cus{", "", "cus 1", "c:1", "x" * 129])
def test_customer_id_that_would_move_the_hash_tag_is_refused(
    aio: asyncio.Runner, tstore: Store, bad: str
) -> None:
    for key_name in (account_key, limits_key, legacy_quota_key, key_index_key):
        with pytest.raises(TollwayError, match="customer id"):
            key_name(bad)

    async def scenario() -> None:
        with pytest.raises(TollwayError, match="customer id"):
            await tstore.create_account(bad, "basic")
        with pytest.raises(TollwayError, match="customer id"):
            await decide(tstore, bad, BASIC)

    aio.run(scenario())


def test_longest_allowed_customer_id_works(aio: asyncio.Runner, tstore: Store) -> None:
    customer = "x" * 110 + new_customer()
    assert len(customer) == 128

    async def scenario() -> None:
        await tstore.create_account(customer, BASIC.name)
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK

    aio.run(scenario())


# -- token bucket ------------------------------------------------------------


def test_full_bucket_admits_burst_then_denies(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        outcomes = [await decide(tstore, customer, BASIC) for _ in range(BASIC.burst)]
        assert [o.code for o in outcomes] == [OutcomeCode.OK] * BASIC.burst
        assert [o.tokens for o in outcomes] == [4, 3, 2, 1, 0]
        denied = await decide(tstore, customer, BASIC)
        assert denied.code is OutcomeCode.RATE_LIMITED
        # An empty bucket, cost 1, 10 tokens/s: 100 ms until one token.
        assert denied.retry_ms == 100
        assert denied.tokens == 0
        assert denied.reset_ms == 500  # 5 tokens at 10/s until full
        assert denied.now == NOON // SECOND

    aio.run(scenario())


def test_one_refill_interval_admits_exactly_one_more(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        for _ in range(BASIC.burst):
            assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        for _ in range(3):
            clock.advance(SECOND // 10)  # 1/rate seconds
            assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
            assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.RATE_LIMITED

    aio.run(scenario())


@pytest.mark.parametrize(
    ("waited_us", "cost"),
    [(0, 1), (30_000, 1), (30_000, 3), (123_457, 2), (399_999, 5), (1, 1)],
)
def test_retry_ms_is_the_time_the_missing_tokens_take(
    aio: asyncio.Runner, tstore: Store, clock: Clock, waited_us: int, cost: int
) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        for _ in range(BASIC.burst):
            assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        emptied = clock.now
        clock.advance(waited_us)
        denied = await decide(tstore, customer, BASIC, cost=cost)
        assert denied.code is OutcomeCode.RATE_LIMITED
        tokens = Fraction(waited_us, SECOND) * 10
        expected_ms = (cost - tokens) * 1000 / 10
        # Rounded up to whole ms (float rounding may add one more), never down.
        assert math.ceil(expected_ms) <= denied.retry_ms <= math.ceil(expected_ms) + 1
        # Waiting a whole ms less than needed is not enough; waiting retry_ms is.
        clock.now = emptied + waited_us + (math.ceil(expected_ms) - 1) * 1000
        assert (await decide(tstore, customer, BASIC, cost=cost)).code is OutcomeCode.RATE_LIMITED
        clock.now = emptied + waited_us + denied.retry_ms * 1000
        assert (await decide(tstore, customer, BASIC, cost=cost)).code is OutcomeCode.OK

    aio.run(scenario())


def test_refill_never_exceeds_burst(aio: asyncio.Runner, tstore: Store, clock: Clock) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        assert (await decide(tstore, customer, BASIC, cost=2)).code is OutcomeCode.OK
        clock.advance(3600 * SECOND)  # enough for 36_000 tokens
        outcomes = [await decide(tstore, customer, BASIC) for _ in range(BASIC.burst + 1)]
        assert outcomes[0].tokens == BASIC.burst - 1
        assert [o.code for o in outcomes] == [OutcomeCode.OK] * BASIC.burst + [
            OutcomeCode.RATE_LIMITED
        ]
        stored = await tstore.redis.hget(limits_key(customer), "tokens")
        assert float(stored) == 0

    aio.run(scenario())


def test_limits_live_a_day_past_the_period_and_an_admission_is_one_write(
    aio: asyncio.Runner, quiet_redis_url: str, clock: Clock
) -> None:
    async def scenario() -> None:
        tstore = Store(connect(quiet_redis_url, timeout=2.0), timeout=2.0, clock_us=clock)
        try:
            await counted(tstore)
        finally:
            await tstore.close()

    async def counted(tstore: Store) -> None:
        customer = await account(tstore)
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        now = clock.now // SECOND
        _, end, _ = period_at("month", now)
        # Relative to the script's clock: a day past the period, for people and the reporter.
        assert await tstore.redis.ttl(limits_key(customer)) == end + 86400 - now
        await tstore.redis.config_resetstat()
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        stats = await tstore.redis.info("commandstats")
        writes = {name: stats[name]["calls"] for name in stats if name.startswith("cmdstat_")}
        writes.pop("cmdstat_config|resetstat", None)
        # The account, the limits, one write; no expiry moved (it is set once a period).
        assert writes == {"cmdstat_evalsha": 1, "cmdstat_hmget": 2, "cmdstat_hset": 1}

    aio.run(scenario())


def test_cost_above_burst_can_never_be_admitted(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        denied = await decide(tstore, customer, BASIC, cost=BASIC.burst + 1)
        assert denied.code is OutcomeCode.RATE_LIMITED
        assert denied.retry_ms == -1
        assert denied.tokens == BASIC.burst  # the bucket was full all along
        assert await state(tstore, customer) == State({}, {})
        # A cost equal to the burst fits a full bucket.
        clock.advance(SECOND)
        assert (await decide(tstore, customer, BASIC, cost=BASIC.burst)).code is OutcomeCode.OK

    aio.run(scenario())


# -- a denial consumes nothing ------------------------------------------------


@pytest.mark.parametrize("reason", ["rate", "quota", "feature", "inactive", "expired", "plan"])
def test_denied_request_consumes_nothing(
    aio: asyncio.Runner, tstore: Store, clock: Clock, reason: str
) -> None:
    # 10 tokens/s, burst 5; a quota of 4 a day, or of 100 when the bucket must deny.
    limit = 100 if reason == "rate" else 4
    plan = Plan("tiny", Rate(10, 1), burst=5, quota=Quota(limit, "day"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        # Some state first: 2 tokens left at NOON, 3 used today.
        assert (await decide(tstore, customer, plan, cost=3)).code is OutcomeCode.OK
        clock.advance(1000)  # 2.01 tokens now: a write would change tokens and ts
        before = await state(tstore, customer)
        assert before.bucket
        assert before.quota

        if reason == "rate":
            expected = OutcomeCode.RATE_LIMITED
            outcome = await decide(tstore, customer, plan, cost=3)  # 3 > 2.01 tokens
        elif reason == "quota":
            expected = OutcomeCode.QUOTA_EXCEEDED
            outcome = await decide(tstore, customer, plan, cost=2)  # 3 + 2 > 4
        elif reason == "feature":
            expected = OutcomeCode.FEATURE
            outcome = await decide(tstore, customer, plan, feature_ok=False)
        elif reason == "inactive":
            await tstore.set_status(customer, "canceled")
            expected = OutcomeCode.INACTIVE
            outcome = await decide(tstore, customer, plan)
        elif reason == "expired":
            expected = OutcomeCode.KEY_EXPIRED
            outcome = await decide(tstore, customer, plan, key_expires_at_us=clock.now)
        else:
            expected = OutcomeCode.PLAN_CHANGED
            outcome = await decide(tstore, customer, BASIC)

        assert outcome.code is expected
        assert await state(tstore, customer) == before
        # The same request, had it been allowed, would have written.
        if reason in ("feature", "expired"):
            assert (await decide(tstore, customer, plan)).code is OutcomeCode.OK
            assert await state(tstore, customer) != before

    aio.run(scenario())


@pytest.mark.parametrize("status", ["canceled", "active"])
def test_first_request_denied_leaves_no_state(
    aio: asyncio.Runner, tstore: Store, status: str
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC, status)
        outcome = await decide(tstore, customer, BASIC, feature_ok=False)
        assert outcome.code is (
            OutcomeCode.INACTIVE if status == "canceled" else OutcomeCode.FEATURE
        )
        names = (limits_key(customer), legacy_quota_key(customer))
        assert await tstore.redis.exists(*names) == 0

    aio.run(scenario())


def test_quota_denial_takes_no_tokens(aio: asyncio.Runner, tstore: Store, clock: Clock) -> None:
    plan = Plan("q", Rate(1, 60), burst=10, quota=Quota(5, "day"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        assert (await decide(tstore, customer, plan, cost=4)).code is OutcomeCode.OK
        # 6 tokens left, 1 quota left: the quota refuses a cost of 2 ...
        outcome = await decide(tstore, customer, plan, cost=2)
        assert outcome.code is OutcomeCode.QUOTA_EXCEEDED
        assert outcome.tokens == 6
        # ... and the 6 tokens are all still there (1/min refills nothing in this test).
        clock.advance(1)
        got = [await decide(tstore, customer, plan, cost=1) for _ in range(2)]
        assert [o.code for o in got] == [OutcomeCode.OK, OutcomeCode.QUOTA_EXCEEDED]
        assert got[0].tokens == 5
        assert await quota_used(tstore, customer) == 5

    aio.run(scenario())


def test_rate_denial_does_not_count_against_the_quota(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    plan = Plan("q", Rate(10, 1), burst=2, quota=Quota(3, "day"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        for _ in range(2):
            assert (await decide(tstore, customer, plan)).code is OutcomeCode.OK
        for _ in range(5):
            denied = await decide(tstore, customer, plan)
            assert denied.code is OutcomeCode.RATE_LIMITED
            assert denied.quota_used == 2
        assert await quota_used(tstore, customer) == 2
        clock.advance(SECOND)
        third = await decide(tstore, customer, plan)
        assert third.code is OutcomeCode.OK
        assert third.quota_used == 3
        assert (await decide(tstore, customer, plan)).code is OutcomeCode.QUOTA_EXCEEDED

    aio.run(scenario())


# -- quota -------------------------------------------------------------------


def test_blocking_quota_denies_at_the_limit_until_the_period_ends(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, FAST_3_PER_DAY)
        used = [await decide(tstore, customer, FAST_3_PER_DAY) for _ in range(3)]
        assert [o.quota_used for o in used] == [1, 2, 3]
        assert {o.code for o in used} == {OutcomeCode.OK}
        denied = await decide(tstore, customer, FAST_3_PER_DAY)
        assert denied.code is OutcomeCode.QUOTA_EXCEEDED
        assert denied.quota_used == 3
        midnight = at(2024, 6, 16)
        assert denied.period_end == midnight // SECOND
        assert denied.retry_ms == (midnight - NOON) // 1000  # 12 hours
        # Later the same day, still denied, and the retry shrinks with the day.
        clock.now = at(2024, 6, 15, 23, 0, 0)
        later = await decide(tstore, customer, FAST_3_PER_DAY)
        assert later.code is OutcomeCode.QUOTA_EXCEEDED
        assert later.retry_ms == 3600 * 1000

    aio.run(scenario())


def test_a_cost_that_fits_the_rest_of_the_quota_is_admitted(
    aio: asyncio.Runner, tstore: Store
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, FAST_3_PER_DAY)
        assert (await decide(tstore, customer, FAST_3_PER_DAY, cost=2)).code is OutcomeCode.OK
        assert (
            await decide(tstore, customer, FAST_3_PER_DAY, cost=2)
        ).code is OutcomeCode.QUOTA_EXCEEDED
        last = await decide(tstore, customer, FAST_3_PER_DAY, cost=1)
        assert last.code is OutcomeCode.OK
        assert last.quota_used == 3

    aio.run(scenario())


def test_billed_overage_keeps_admitting_and_counts_beyond_the_limit(
    aio: asyncio.Runner, tstore: Store
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BILLED_3_PER_DAY)
        outcomes = [await decide(tstore, customer, BILLED_3_PER_DAY, cost=2) for _ in range(5)]
        assert {o.code for o in outcomes} == {OutcomeCode.OK}
        assert [o.quota_used for o in outcomes] == [2, 4, 6, 8, 10]
        assert await quota_used(tstore, customer) == 10

    aio.run(scenario())


def test_usage_without_a_quota_is_still_counted(aio: asyncio.Runner, tstore: Store) -> None:
    plan = Plan("free", Rate(100, 1), burst=100)

    async def scenario() -> None:
        customer = await account(tstore, plan)
        for _ in range(7):
            assert (await decide(tstore, customer, plan)).code is OutcomeCode.OK
        tokens, used, period = await tstore.usage(customer)
        assert used == 7
        assert tokens == 93
        assert period == unix(datetime(2024, 6, 1, tzinfo=UTC))  # the default period: month

    aio.run(scenario())


def test_day_quota_rolls_over_at_midnight_utc(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, FAST_3_PER_DAY)
        for _ in range(3):
            assert (await decide(tstore, customer, FAST_3_PER_DAY)).code is OutcomeCode.OK
        midnight = at(2024, 6, 16)
        clock.now = midnight - 1
        last_moment = await decide(tstore, customer, FAST_3_PER_DAY)
        assert last_moment.code is OutcomeCode.QUOTA_EXCEEDED
        assert last_moment.retry_ms == 1000  # now is 23:59:59, in whole seconds
        clock.now = midnight
        next_day = await decide(tstore, customer, FAST_3_PER_DAY, cost=2)
        assert next_day.code is OutcomeCode.OK
        assert next_day.quota_used == 2
        assert next_day.period_end == (midnight // SECOND) + 86400
        assert await tstore.usage(customer) == (98.0, 2, midnight // SECOND)

    aio.run(scenario())


def test_hour_quota_rolls_over_on_the_hour(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    plan = Plan("hourly", Rate(100, 1), burst=100, quota=Quota(2, "hour"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        clock.now = at(2024, 6, 15, 12, 59, 30)
        for _ in range(2):
            assert (await decide(tstore, customer, plan)).code is OutcomeCode.OK
        clock.now = at(2024, 6, 15, 13) - 1
        denied = await decide(tstore, customer, plan)
        assert denied.code is OutcomeCode.QUOTA_EXCEEDED
        assert denied.period_end == at(2024, 6, 15, 13) // SECOND
        clock.now = at(2024, 6, 15, 13)
        admitted = await decide(tstore, customer, plan)
        assert admitted.code is OutcomeCode.OK
        assert admitted.quota_used == 1
        assert admitted.period_end == at(2024, 6, 15, 14) // SECOND

    aio.run(scenario())


def _first_of_next_month(day: datetime) -> datetime:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


@pytest.mark.parametrize(
    ("year", "month"),
    [(2023, 12), (2024, 2), (2023, 2), (2000, 2), (2100, 2), (2024, 1), (2024, 4), (2024, 11)],
)
def test_month_quota_rolls_over_on_the_first(
    aio: asyncio.Runner, tstore: Store, clock: Clock, year: int, month: int
) -> None:
    plan = Plan("monthly", Rate(100, 1), burst=100, quota=Quota(3, "month"))
    start = datetime(year, month, 1, tzinfo=UTC)
    boundary = _first_of_next_month(start)
    after = _first_of_next_month(boundary)

    async def scenario() -> None:
        customer = await account(tstore, plan)
        clock.now = unix(start + timedelta(days=9, hours=7)) * SECOND
        for _ in range(3):
            outcome = await decide(tstore, customer, plan)
            assert outcome.code is OutcomeCode.OK
            assert outcome.period_end == unix(boundary)
        assert (await tstore.usage(customer))[2] == unix(start)

        clock.now = unix(boundary) * SECOND - 1
        last_moment = await decide(tstore, customer, plan)
        assert last_moment.code is OutcomeCode.QUOTA_EXCEEDED
        assert last_moment.period_end == unix(boundary)

        clock.now = unix(boundary) * SECOND
        next_month = await decide(tstore, customer, plan, cost=2)
        assert next_month.code is OutcomeCode.OK
        assert next_month.quota_used == 2
        assert next_month.period_end == unix(after)
        assert (await tstore.usage(customer))[1:] == (2, unix(boundary))

    aio.run(scenario())


# -- subscription status --------------------------------------------------------


@pytest.mark.parametrize("status", ["active", "trialing"])
def test_paying_statuses_are_admitted(aio: asyncio.Runner, tstore: Store, status: str) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC, status)
        outcome = await decide(tstore, customer, BASIC)
        assert outcome.code is OutcomeCode.OK
        assert (outcome.plan, outcome.status) == ("basic", status)

    aio.run(scenario())


@pytest.mark.parametrize(
    "status", ["canceled", "unpaid", "paused", "incomplete", "incomplete_expired", "past_due"]
)
def test_other_statuses_are_denied(aio: asyncio.Runner, tstore: Store, status: str) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC, status)  # past_due with no grace at all
        outcome = await decide(tstore, customer, BASIC)
        assert outcome.code is OutcomeCode.INACTIVE
        assert (outcome.plan, outcome.status) == ("basic", status)

    aio.run(scenario())


@pytest.mark.parametrize(
    "status", ["canceled", "unpaid", "paused", "incomplete", "incomplete_expired"]
)
def test_inactive_is_decided_before_the_plan_and_ignores_the_fallback(
    aio: asyncio.Runner, tstore: Store, status: str
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC, status)
        for hint in (None, FREE, BASIC):
            outcome = await decide(tstore, customer, hint, fallback_plan="free")
            assert outcome.code is OutcomeCode.INACTIVE
            assert (outcome.plan, outcome.status) == ("basic", status)
        assert await tstore.redis.exists(limits_key(customer), legacy_quota_key(customer)) == 0

    aio.run(scenario())


def test_every_known_status_is_covered() -> None:
    assert set(STATUSES) == {
        "active",
        "trialing",
        "canceled",
        "unpaid",
        "paused",
        "incomplete",
        "incomplete_expired",
        "past_due",
    }


def test_past_due_is_admitted_only_during_the_grace_period(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC)
        grace_until = NOON // SECOND + 3 * 86400
        updated = await tstore.set_status(customer, "past_due", grace_until=grace_until)
        assert (updated.status, updated.grace_until) == ("past_due", grace_until)
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        clock.now = grace_until * SECOND - 1
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK
        clock.now = grace_until * SECOND
        ended = await decide(tstore, customer, BASIC)
        assert ended.code is OutcomeCode.INACTIVE
        assert ended.status == "past_due"
        # Paying again restores access.
        await tstore.set_status(customer, "active")
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK

    aio.run(scenario())


def test_past_due_after_grace_is_enforced_on_the_fallback_plan(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC)
        grace_until = NOON // SECOND + 60
        await tstore.set_status(customer, "past_due", grace_until=grace_until)
        # During the grace period the paid plan still applies.
        during = await decide(tstore, customer, BASIC, fallback_plan="free")
        assert (during.code, during.plan) == (OutcomeCode.OK, "basic")

        clock.now = grace_until * SECOND
        before = await state(tstore, customer)
        moved = await decide(tstore, customer, BASIC, fallback_plan="free")
        assert (moved.code, moved.plan, moved.status) == (
            OutcomeCode.PLAN_CHANGED,
            "free",
            "past_due",
        )
        assert await state(tstore, customer) == before
        # With the fallback's limits: its burst of 2, then denied.
        fallback = [await decide(tstore, customer, FREE, fallback_plan="free") for _ in range(3)]
        assert [o.code for o in fallback] == [
            OutcomeCode.OK,
            OutcomeCode.OK,
            OutcomeCode.RATE_LIMITED,
        ]
        assert {o.plan for o in fallback} == {"free"}
        # Without a configured fallback the same account is simply inactive.
        for hint in (BASIC, FREE):
            denied = await decide(tstore, customer, hint)
            assert (denied.code, denied.plan) == (OutcomeCode.INACTIVE, "basic")
        # Paying again brings back the paid plan.
        await tstore.set_status(customer, "active")
        back = await decide(tstore, customer, FREE, fallback_plan="free")
        assert (back.code, back.plan) == (OutcomeCode.PLAN_CHANGED, "basic")

    aio.run(scenario())


def test_unknown_status_is_refused_by_the_store(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = new_customer()
        with pytest.raises(TollwayError, match="status 'deleted'"):
            await tstore.create_account(customer, "basic", "deleted")
        assert await tstore.get_account(customer) is None

    aio.run(scenario())


def test_creating_an_account_twice_is_refused(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = await account(tstore, BASIC, "trialing")
        with pytest.raises(TollwayError, match="already exists"):
            await tstore.create_account(customer, "pro", "active")
        kept = await tstore.require_account(customer)
        assert (kept.plan, kept.status) == ("basic", "trialing")

    aio.run(scenario())


# -- plan hint, key expiry, missing account ---------------------------------------


def test_wrong_plan_hint_returns_the_real_plan_and_writes_nothing(
    aio: asyncio.Runner, tstore: Store
) -> None:
    catalog = parse_catalog(
        {
            "plans": [
                {"name": "basic", "rate": "10/s", "burst": 5},
                {"name": "pro", "rate": "100/s", "burst": 100, "quota": "100000/month"},
            ]
        }
    )
    basic, pro = catalog.plans["basic"], catalog.plans["pro"]

    async def scenario() -> None:
        customer = await account(tstore, "pro", "trialing")
        for hint in (basic, None):
            outcome = await decide(tstore, customer, hint, cost=3)
            assert outcome.code is OutcomeCode.PLAN_CHANGED
            assert (outcome.plan, outcome.status) == ("pro", "trialing")
        assert await tstore.redis.exists(limits_key(customer), legacy_quota_key(customer)) == 0
        # Retrying with the real plan's limits is a normal decision.
        retried = await decide(tstore, customer, pro, cost=3)
        assert retried.code is OutcomeCode.OK
        assert retried.tokens == 97
        # After a plan change the old plan is the stale hint.
        await tstore.set_plan(customer, "basic")
        assert (await decide(tstore, customer, pro)).plan == "basic"
        assert (await decide(tstore, customer, basic)).code is OutcomeCode.OK

    aio.run(scenario())


@pytest.mark.parametrize(
    ("expires_at", "expected"),
    [
        (NOON - 3600 * SECOND, OutcomeCode.KEY_EXPIRED),
        (NOON - 1, OutcomeCode.KEY_EXPIRED),
        (NOON, OutcomeCode.KEY_EXPIRED),
        (NOON + 1, OutcomeCode.OK),
        (NOON + 86400 * SECOND, OutcomeCode.OK),
        (0, OutcomeCode.OK),  # never expires
    ],
)
def test_key_expiry(
    aio: asyncio.Runner, tstore: Store, expires_at: int, expected: OutcomeCode
) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        outcome = await decide(tstore, customer, BASIC, key_expires_at_us=expires_at)
        assert outcome.code is expected

    aio.run(scenario())


def test_missing_account_is_no_account(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = new_customer()
        outcome = await decide(tstore, customer, BASIC)
        assert outcome.code is OutcomeCode.NO_ACCOUNT
        assert outcome.plan == ""
        assert await tstore.redis.exists(limits_key(customer), legacy_quota_key(customer)) == 0

    aio.run(scenario())


def test_decisions_use_redis_time_without_an_injected_clock(
    aio: asyncio.Runner, store: Store
) -> None:
    async def scenario() -> None:
        customer = await account(store)
        before = int(time.time())
        outcome = await decide(store, customer, BASIC)
        assert outcome.code is OutcomeCode.OK
        assert before - 5 <= outcome.now <= int(time.time()) + 5
        ts = int(await store.redis.hget(limits_key(customer), "ts"))
        assert ts // SECOND == outcome.now
        assert abs(ts - await store.now_us()) < 5 * SECOND

    aio.run(scenario())


# -- key records -----------------------------------------------------------------


def _record(customer: str, hashed: str, **fields: Any) -> KeyRecord:
    return KeyRecord(key_id=keys.key_id(hashed), customer_id=customer, state="active", **fields)


def test_key_records_round_trip(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        first_hash = keys.key_hash(keys.generate("live"))
        second_hash = keys.key_hash(keys.generate("test"))
        first = _record(customer, first_hash, created_at=200, expires_at_us=NOON)
        second = _record(customer, second_hash, created_at=100, environment="test")
        await tstore.add_key(first_hash, first)
        await tstore.add_key(second_hash, second)

        assert await tstore.lookup_key(first_hash) == first
        assert await tstore.lookup_key(second_hash) == second
        assert await tstore.lookup_key(keys.key_hash(keys.generate())) is None
        assert await tstore.list_keys(customer) == [second, first]  # by creation time
        assert await tstore.list_keys(new_customer()) == []

    aio.run(scenario())


def test_revoked_key_reads_as_revoked(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        hashed = keys.key_hash(keys.generate())
        kept_hash = keys.key_hash(keys.generate())
        await tstore.add_key(hashed, _record(customer, hashed, created_at=1))
        await tstore.add_key(kept_hash, _record(customer, kept_hash, created_at=2))
        await tstore.revoke_key(customer, keys.key_id(hashed))

        record = await tstore.lookup_key(hashed)
        assert record is not None
        assert record.revoked
        kept = await tstore.lookup_key(kept_hash)
        assert kept is not None
        assert not kept.revoked
        assert [r.revoked for r in await tstore.list_keys(customer)] == [True, False]
        with pytest.raises(NotFound):
            await tstore.revoke_key(customer, "key_0000000000000000")
        with pytest.raises(NotFound):  # another customer's key id
            await tstore.revoke_key(new_customer(), keys.key_id(kept_hash))
        kept = await tstore.lookup_key(kept_hash)
        assert kept is not None
        assert not kept.revoked

    aio.run(scenario())


def test_expire_key_only_ever_brings_the_expiry_closer(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        hashed = keys.key_hash(keys.generate())
        key_id = keys.key_id(hashed)
        await tstore.add_key(hashed, _record(customer, hashed))

        async def expiry() -> int:
            record = await tstore.lookup_key(hashed)
            assert record is not None
            return record.expires_at_us

        assert await expiry() == 0
        await tstore.expire_key(customer, key_id, NOON + 3600 * SECOND)
        assert await expiry() == NOON + 3600 * SECOND
        await tstore.expire_key(customer, key_id, NOON + 7200 * SECOND)  # later: ignored
        assert await expiry() == NOON + 3600 * SECOND
        await tstore.expire_key(customer, key_id, NOON + 60 * SECOND)  # sooner: applied
        assert await expiry() == NOON + 60 * SECOND
        with pytest.raises(NotFound):
            await tstore.expire_key(customer, "key_ffffffffffffffff", NOON)

    aio.run(scenario())


def test_plaintext_key_is_stored_nowhere(aio: asyncio.Runner, tstore: Store) -> None:
    async def scenario() -> None:
        customer = await account(tstore)
        plaintexts = [keys.generate("live"), keys.generate("test")]
        for created, plaintext in enumerate(plaintexts):
            hashed = keys.key_hash(plaintext)
            await tstore.add_key(hashed, _record(customer, hashed, created_at=created))
            await tstore.expire_key(customer, keys.key_id(hashed), NOON + SECOND)
        await tstore.revoke_key(customer, keys.key_id(keys.key_hash(plaintexts[0])))
        assert (await decide(tstore, customer, BASIC)).code is OutcomeCode.OK

        # Every key of this customer: those under its hash tag, and every key
        # record anywhere that names it.
        found: dict[bytes, dict[bytes, bytes]] = {}
        async for name in tstore.redis.scan_iter(match="tw:*", count=1000):
            if await tstore.redis.type(name) != b"hash":
                continue
            fields = await tstore.redis.hgetall(name)
            if f"{{{customer}}}".encode() in name or fields.get(b"customer") == customer.encode():
                found[name] = fields
        hashes = [keys.key_hash(p) for p in plaintexts]
        expected = {account_key(customer), limits_key(customer)}
        expected |= {key_index_key(customer)} | {key_record_key(h) for h in hashes}
        assert {name.decode() for name in found} == expected

        for plaintext in plaintexts:
            secret = plaintext[len("tw_live_") : -6]
            for name, fields in found.items():
                blobs = [name, *fields.keys(), *fields.values()]
                assert not any(plaintext.encode() in blob for blob in blobs), name
                assert not any(secret.encode() in blob for blob in blobs), name
        # What is stored is the hash: it finds the record.
        for plaintext in plaintexts:
            assert await tstore.lookup_key(keys.key_hash(plaintext)) is not None

    aio.run(scenario())


# -- a dead Redis ---------------------------------------------------------------


def test_dead_redis_fails_fast_with_store_unavailable() -> None:
    async def scenario() -> None:
        url = f"redis://127.0.0.1:{harness.free_port()}/0"
        store = Store(connect(url, timeout=0.05), timeout=0.05)
        try:
            calls = {
                "lookup_key": lambda: store.lookup_key(keys.key_hash(keys.generate())),
                "decide": lambda: decide(store, new_customer(), BASIC),
            }
            for what, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="Redis unavailable"):
                    await call()
                assert time.monotonic() - started < 0.5, what
        finally:
            await store.close()

    asyncio.run(scenario())


def test_unresponsive_redis_times_out_with_store_unavailable() -> None:
    """A server that accepts connections but never answers: the deadline decides."""

    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []

        def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # read nothing, answer nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = Store(connect(f"redis://127.0.0.1:{port}/0", timeout=0.05), timeout=0.05)
        try:
            for call in (
                lambda: store.lookup_key(keys.key_hash(keys.generate())),
                lambda: decide(store, new_customer(), BASIC),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - started < 0.5
        finally:
            await store.close()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        assert accepted  # the client did reach the server

    asyncio.run(scenario())


# -- data written by releases before 0.2 ----------------------------------------


def test_a_quota_counted_before_the_limits_hash_keeps_counting_and_moves_in(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    """Before 0.2 the period counter had its own key (tw:{c}:q) beside the bucket;
    an account counted then keeps its count, and the old key goes."""
    plan = Plan("q", Rate(10, 1), burst=5, quota=Quota(5, "day"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        start, _, _ = period_at("day", clock.now // SECOND)
        await tstore.redis.hset(limits_key(customer), mapping={"tokens": 5, "ts": clock.now})
        await tstore.redis.hset(
            legacy_quota_key(customer), mapping={"k": "day", "p": start, "used": 3}
        )
        assert (await tstore.usage(customer))[1] == 3  # shown as counted
        first = await decide(tstore, customer, plan)
        assert first.code is OutcomeCode.OK and first.quota_used == 4
        assert await tstore.redis.exists(legacy_quota_key(customer)) == 0
        assert (await decide(tstore, customer, plan)).quota_used == 5
        assert (await decide(tstore, customer, plan)).code is OutcomeCode.QUOTA_EXCEEDED

    aio.run(scenario())


def test_a_reservation_settled_against_a_counter_of_before_0_2_moves_it_and_settles_it(
    aio: asyncio.Runner, tstore: Store, clock: Clock
) -> None:
    plan = Plan("q", Rate(10, 1), burst=5, quota=Quota(100, "day"))

    async def scenario() -> None:
        customer = await account(tstore, plan)
        reserved = await tstore.admit(
            customer,
            admission(plan, cost=4, feature_ok=True, key_expires_at_us=0, request_id="req-1"),
        )
        assert reserved.code is OutcomeCode.OK and reserved.quota_used == 4
        # As a release before 0.2 left it: the counter in its own key.
        kind, start, used = await tstore.redis.hmget(limits_key(customer), "k", "p", "used")
        await tstore.redis.hdel(limits_key(customer), "k", "p", "used")
        await tstore.redis.hset(
            legacy_quota_key(customer), mapping={"k": kind, "p": start, "used": used}
        )
        settled = await tstore.record_usage(
            customer,
            meter="",
            quantity=1,
            at=clock.now // SECOND,
            idempotency="settle:req-1",
            dedupe_window=60,
            request_id="req-1",
        )
        assert settled.quota_used == 1  # the estimate of 4 became the real 1
        assert await tstore.redis.exists(legacy_quota_key(customer)) == 0
        assert (await decide(tstore, customer, plan)).quota_used == 2

    aio.run(scenario())
