"""Leased enforcement on a plan with prepaid credits, in-process against real
Redis and one shared fake clock: an allotment is paid for when it is granted,
so sidecars admitting from allotments never admit more than the balance holds;
what they did not use is refunded, the ledger adds up, and a key with limits of
its own is still decided request by request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.allotments import HELD_FOR
from sidecar.authorizer import Authorizer
from sidecar.decision import Reason
from sidecar.key_policy import parse_policy
from sidecar.settings import Settings, settings_from_document
from sidecar.store import Store, connect
from sidecar.store.names import credits_key, totals_key
from tests.test_authorizer import customer_with_key
from tests.test_credits import ledger_sum
from tests.test_leased import Clock

CONFIG = settings_from_document(
    {
        "plans": [
            {
                "name": "prepaid",
                "rate": "1000/s",
                "burst": 2000,
                "credits": True,
                "enforcement": "leased",
            },
        ],
    },
    {},
)


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


async def prepaid(store: Store, credits: int) -> tuple[str, str]:
    customer, key = await customer_with_key(store, "prepaid")
    await store.grant_credits(customer, grant_id="pack-1", credits=credits)
    return customer, key


async def allow(sidecar: Authorizer, key: str, cost: int = 1) -> bool:
    decision = await sidecar.authorize(key, method="GET", path="/v1/x", cost=cost)
    return decision.allowed


async def hand_back(sidecars: list[Authorizer]) -> None:
    for sidecar in sidecars:
        sidecar.forget_everything()
        assert await sidecar.return_allotments() == 0


async def balance(store: Store, customer: str) -> int:
    return (await store.credit_balance(customer)).balance


def test_an_allotment_is_paid_when_granted_and_its_unused_credits_come_back(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        (sidecar,) = sidecars
        customer, key = await prepaid(store, 1000)
        for _ in range(40):
            assert await allow(sidecar, key)
            clock.advance(0.001)
        held = sidecar.allotments.held(customer)
        assert held is not None and held.left >= 3, "no allotment after 40 busy requests"
        # Paid in advance: the balance in Redis no longer holds the allotment's credits.
        paid = 1000 - 40 - held.left
        assert await balance(store, customer) == paid
        decision = await sidecar.authorize(key, method="GET", path="/v1/x")
        assert decision.allowed and decision.credits == 1000 - 41  # as the customer sees it
        assert await balance(store, customer) == paid  # Redis was not asked
        await hand_back(sidecars)
        # Back: the balance is what was granted less what was admitted, on the ledger too.
        assert await balance(store, customer) == 1000 - 41
        assert await ledger_sum(store, customer) == 1000 - 41
        # Nothing of it is billed as metered usage: it was paid in advance.
        assert not await store.redis.exists(totals_key(customer))

    with_sidecars(redis_url, 1, work)


def test_units_held_and_paid_for_serve_when_redis_says_the_balance_is_spent(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        first, second = sidecars
        customer, key = await prepaid(store, 400)
        for _ in range(40):
            assert await allow(first, key)
            clock.advance(0.001)
        held = first.allotments.held(customer)
        assert held is not None and held.left >= 1
        left = held.left
        left_in_redis = await balance(store, customer)
        for _ in range(left_in_redis):
            assert await allow(second, key)
        # Redis's balance is spent; the first sidecar's units are paid for: they serve.
        refused = await second.authorize(key, method="GET", path="/v1/x")
        assert refused.reason is Reason.CREDITS_EXHAUSTED
        served = 0
        while await allow(first, key):
            served += 1
        assert served == left
        await hand_back(sidecars)
        assert await balance(store, customer) == 400 - 40 - left_in_redis - served
        assert await ledger_sum(store, customer) == await balance(store, customer)

    with_sidecars(redis_url, 2, work)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    granted=st.integers(20, 400),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which sidecar
            st.integers(0, 29).map(lambda n: 950_000 if n == 0 else n * 200),  # µs before it
            st.sampled_from([1, 1, 1, 2, 3]),  # cost
            st.integers(0, 9),  # 0: that sidecar hands back what is done; 1: drops all
        ),
        min_size=50,
        max_size=300,
    ),
)
def test_sidecars_burning_one_balance_from_allotments_admit_exactly_what_it_holds(
    redis_url: str, granted: int, steps: list[tuple[int, int, int, int]]
) -> None:
    """Never more than the balance held, whatever the interleaving; once every
    allotment is back, the rest of the balance is admitted to the last credit
    and the ledger adds up to what is left: nothing lost, nothing charged twice."""

    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        customer, key = await prepaid(store, granted)
        admitted = 0
        for which, gap, cost, action in steps:
            clock.us += gap
            sidecar = sidecars[which % len(sidecars)]
            if action == 0:
                await sidecar.return_allotments()
            elif action == 1:
                sidecar.forget_everything()
            if await allow(sidecar, key, cost):
                admitted += cost
            assert admitted <= granted
        await hand_back(sidecars)
        assert await balance(store, customer) == granted - admitted
        # The rest, one credit at a time, wherever it is asked: exactly what is left.
        # A refusal while another sidecar holds paid credits says to retry in a
        # second (they come back by then): that retry is made after a hand-back.
        left = granted - admitted
        n = 0
        while left:
            n += 1
            clock.us += 300
            decision = await sidecars[n % len(sidecars)].authorize(key, method="GET", path="/v1/x")
            if decision.allowed:
                left -= 1
            else:
                assert decision.reason is Reason.CREDITS_EXHAUSTED and decision.retry_after == 1
                await hand_back(sidecars)
            assert n < 4 * granted
        await hand_back(sidecars)
        for sidecar in sidecars:
            refused = await sidecar.authorize(key, method="GET", path="/v1/x")
            assert refused.reason is Reason.CREDITS_EXHAUSTED and refused.retry_after == 0
        assert await balance(store, customer) == 0
        assert await ledger_sum(store, customer) == 0

    with_sidecars(redis_url, 3, work)


def test_a_crashed_sidecars_allotment_stays_paid_and_a_late_return_refunds_it(
    redis_url: str,
) -> None:
    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        crashed, other = sidecars
        customer, key = await prepaid(store, 1000)
        for _ in range(40):
            assert await allow(crashed, key)
            clock.advance(0.001)
        held = crashed.allotments.held(customer)
        assert held is not None
        paid = 1000 - 40 - held.left
        # Its return never comes in time: past HELD_FOR the units lapse, still paid for.
        clock.advance(HELD_FOR + 1)
        assert await allow(other, key)
        assert await balance(store, customer) == paid - 1
        # A late return (within the hour Redis remembers it) refunds what was unused.
        await hand_back([crashed])
        assert await balance(store, customer) == paid - 1 + held.left
        assert await ledger_sum(store, customer) == paid - 1 + held.left
        assert not await store.redis.hexists(credits_key(customer), f"al:{held.id}")

    with_sidecars(redis_url, 2, work)


def test_a_key_with_limits_of_its_own_on_a_leased_plan_is_never_admitted_from_an_allotment(
    redis_url: str,
) -> None:
    """Three uses mean three, with two sidecars holding the account's allotments."""

    async def work(store: Store, clock: Clock, sidecars: list[Authorizer]) -> None:
        customer, hot_key = await prepaid(store, 10_000)
        for sidecar in sidecars:
            for _ in range(40):
                assert await allow(sidecar, hot_key)
                clock.advance(0.001)
            assert sidecar.allotments.held(customer) is not None
        limited, _ = await store.issue_key(
            customer, environment="test", policy=parse_policy(uses=3)
        )
        results = await asyncio.gather(*(allow(sidecars[n % 2], limited) for n in range(20)))
        assert sum(results) == 3
        refused = await sidecars[0].authorize(limited, method="GET", path="/v1/x")
        assert refused.reason is Reason.KEY_USES_EXHAUSTED
        await hand_back(sidecars)

    with_sidecars(redis_url, 2, work)
