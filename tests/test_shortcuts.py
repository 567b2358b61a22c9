"""The decision's local shortcuts, without Redis: on a fake clock, each one
denies only what the script would deny, and holds a request back only until
the decisions ahead of it land."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

from hypothesis import given
from hypothesis import strategies as st

from sidecar.cache import MAX_STALENESS
from sidecar.decision import Decision, Outcome, OutcomeCode, Reason, decision_from_outcome
from sidecar.plans import Plan, Quota, Rate
from sidecar.shortcuts import HINTS_MAX, PlanHints, Shortcuts, Turn

SMALL = Plan(name="small", rate=Rate(5, 1), burst=3, features=frozenset({"search"}))
BIG = Plan(name="big", rate=Rate(100, 1), burst=50)
CAPPED = Plan(name="capped", rate=Rate(100, 1), burst=50, quota=Quota(10, "day"))
TIGHT = Plan(name="tight", rate=Rate(1, 60), burst=2)
PLANS = {plan.name: plan for plan in (SMALL, BIG, CAPPED, TIGHT)}
NOW_S = 1_900_000_000  # the script's clock, Unix seconds

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outcome(code: OutcomeCode, plan: Plan, *, tokens: float = 0.0, retry_ms: int = 0) -> Outcome:
    return Outcome(
        code=code,
        plan=plan.name,
        status="active",
        tokens=tokens,
        reset_ms=0,
        retry_ms=retry_ms,
        quota_used=10,
        period_end=NOW_S + 3600,
        now=NOW_S,
    )


def at_once(step: Coroutine[Any, Any, T]) -> T:
    """What step comes to without waiting for anything (it fails if it waits)."""
    try:
        step.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    step.close()
    raise AssertionError("it waited")


def ask(
    shortcuts: Shortcuts, cost: int = 1, *, feature: str | None = None, customer: str = "cus_1"
) -> Decision | Turn:
    """What the shortcuts make of a request, at once."""
    return at_once(shortcuts.take_turn(customer, PLANS, cost=cost, feature=feature))


def answered(
    shortcuts: Shortcuts, turn: Turn, plan: Plan, result: Outcome, *, customer: str = "cus_1"
) -> None:
    """The script answered result to turn, with plan's limits."""
    decision = decision_from_outcome(
        result, plan=plan, customer_id=customer, cost=turn.cost, feature=None
    )
    shortcuts.learn(turn, plan, result, decision)


def decided(shortcuts: Shortcuts, plan: Plan, result: Outcome, *, cost: int = 1) -> None:
    """One request of cus_1 went to Redis now and the script answered result."""
    turn = ask(shortcuts, cost)
    assert isinstance(turn, Turn)
    with turn:
        answered(shortcuts, turn, plan, result)


def denied(answer: Decision | Turn) -> Decision:
    assert isinstance(answer, Decision), "the request should have been denied locally"
    return answer


def test_hammering_an_empty_bucket_is_denied_locally_until_a_token_could_drop_in() -> None:
    clock = Clock()
    shortcuts = Shortcuts(clock=clock)
    decided(shortcuts, SMALL, outcome(OutcomeCode.RATE_LIMITED, SMALL, tokens=0.0, retry_ms=200))
    emptied = clock.now
    for ms in range(200):  # 5/s: a token takes 200 ms to drop in
        clock.now = emptied + ms / 1000
        denial = denied(ask(shortcuts))
        assert denial.reason is Reason.RATE_LIMITED and denial.retry_after == 1
    clock.now = emptied + 0.2
    assert isinstance(ask(shortcuts), Turn)  # now Redis may admit it: it is asked


def test_a_request_dearer_than_the_whole_burst_is_told_waiting_never_helps() -> None:
    clock = Clock()
    shortcuts = Shortcuts(clock=clock)
    decided(shortcuts, SMALL, outcome(OutcomeCode.OK, SMALL, tokens=2.0))
    denial = denied(ask(shortcuts, cost=SMALL.burst + 1))
    assert denial.reason is Reason.RATE_LIMITED and denial.retry_after == 0


@given(
    plan=st.sampled_from([SMALL, BIG, TIGHT]),
    level=st.floats(0, 1),  # of the burst, as Redis read it after this request
    there=st.floats(0, 0.05),  # seconds from sending the request to Redis reading the bucket
    back=st.floats(0, 0.05),  # seconds from Redis reading it to its answer landing
    later=st.floats(0, 2),  # seconds from the landing to the next request
)
def test_the_bound_never_falls_below_the_truth_after_the_refill_time(
    plan: Plan, level: float, there: float, back: float, later: float
) -> None:
    clock = Clock()
    shortcuts = Shortcuts(clock=clock)
    shortcuts.hints.learn("cus_1", plan.name)
    truth_then = level * plan.burst
    reported = math.floor(truth_then * 1000) / 1000  # the script reports milli-tokens
    turn = ask(shortcuts)
    assert isinstance(turn, Turn)
    sent_at = clock.now
    with turn:
        clock.now = sent_at + there + back
        answered(shortcuts, turn, plan, outcome(OutcomeCode.OK, plan, tokens=reported))
    clock.now = sent_at + there + back + later
    truth = min(plan.burst, truth_then + (back + later) * plan.rate.per_second)
    bound = shortcuts.bound("cus_1", plan)
    assert bound is None or bound >= truth  # None: too old to tell anything
    if truth >= 1:
        assert isinstance(ask(shortcuts, cost=math.floor(truth)), Turn)  # Redis would admit it


def test_a_bound_is_trusted_for_a_second_at_most() -> None:
    clock = Clock()
    shortcuts = Shortcuts(clock=clock)
    decided(shortcuts, TIGHT, outcome(OutcomeCode.RATE_LIMITED, TIGHT, tokens=0.0))
    clock.now += MAX_STALENESS - 0.01  # 1/min: no token yet, but the reading is aging
    denied(ask(shortcuts))
    clock.now += 0.01
    assert isinstance(ask(shortcuts), Turn)


def test_a_bound_read_under_another_plan_denies_nothing() -> None:
    shortcuts = Shortcuts(clock=Clock())
    decided(shortcuts, SMALL, outcome(OutcomeCode.RATE_LIMITED, SMALL, tokens=0.0))
    denied(ask(shortcuts))
    shortcuts.hints.learn("cus_1", "big")  # an upgrade: a new bucket
    turn = ask(shortcuts)
    assert isinstance(turn, Turn) and turn.plan is BIG


def test_no_local_denial_where_the_script_refuses_first_for_the_plan_or_feature() -> None:
    shortcuts = Shortcuts(clock=Clock())
    decided(shortcuts, SMALL, outcome(OutcomeCode.RATE_LIMITED, SMALL, tokens=0.0))
    denied(ask(shortcuts, feature="search"))
    assert isinstance(ask(shortcuts, feature="export"), Turn)  # "not in your plan" comes first
    unconfigured = {"big": BIG}  # a reload dropped the plan the account was on
    turn = at_once(shortcuts.take_turn("cus_1", unconfigured, cost=1, feature=None))
    assert isinstance(turn, Turn) and turn.plan is None  # the script names the plan


def test_a_cheaper_request_than_a_denied_quota_breaker_is_not_denied_locally() -> None:
    clock = Clock()
    shortcuts = Shortcuts(clock=clock)
    quota_ends_in_ms = 90_000
    result = outcome(OutcomeCode.QUOTA_EXCEEDED, CAPPED, tokens=40.0, retry_ms=quota_ends_in_ms)
    decided(shortcuts, CAPPED, result, cost=5)
    for cost in (5, 8):  # as dear, or dearer
        denial = denied(ask(shortcuts, cost))
        assert denial.reason is Reason.QUOTA_EXCEEDED and denial.retry_after == 90
    assert isinstance(ask(shortcuts, cost=4), Turn)  # it may still fit: Redis is asked
    clock.now += 0.6
    assert denied(ask(shortcuts, 5)).retry_after == 90  # 89.4 s, rounded up
    clock.now += MAX_STALENESS - 0.6
    assert isinstance(ask(shortcuts, 5), Turn)  # a second at most: a top-up lands in it
    period_ends = outcome(OutcomeCode.QUOTA_EXCEEDED, CAPPED, tokens=40.0, retry_ms=300)
    decided(shortcuts, CAPPED, period_ends, cost=5)
    denied(ask(shortcuts, 5))
    clock.now += 0.3
    assert isinstance(ask(shortcuts, 5), Turn)  # a new period: the quota may admit it


def test_hints_are_capped_and_the_oldest_dropped_first() -> None:
    hints = PlanHints(max_size=3)
    hints.learn("a", "small")
    hints.learn("b", "small")
    hints.learn("a", "big")  # learned again: now newer than b
    hints.learn("c", "big")
    hints.learn("d", "small")  # full: b, the oldest, goes
    assert [hints.get(customer) for customer in "abcd"] == ["big", None, "big", "small"]
    assert hints.guess("b") == "small"  # without a hint, the plan seen last


def test_a_million_accounts_touched_once_each_do_not_grow_the_hints() -> None:
    shortcuts = Shortcuts(clock=Clock())
    for n in range(HINTS_MAX + 5_000):
        shortcuts.hints.learn(f"cus_{n}", "big")
    assert len(shortcuts.hints) == HINTS_MAX
    assert shortcuts.hints.get("cus_0") is None
    assert shortcuts.hints.get(f"cus_{HINTS_MAX + 4_999}") == "big"


def test_a_right_guess_becomes_the_accounts_hint() -> None:
    shortcuts = Shortcuts(clock=Clock())
    turn = ask(shortcuts)
    assert isinstance(turn, Turn) and turn.plan is None  # nothing seen yet: the script is asked
    with turn:
        answered(shortcuts, turn, BIG, outcome(OutcomeCode.OK, BIG, tokens=49.0))
    assert shortcuts.hints.get("cus_1") == "big"
    other = ask(shortcuts, customer="cus_2")
    assert isinstance(other, Turn) and other.plan is BIG  # an account not seen: the last plan


def test_requests_that_fit_beside_those_in_flight_go_at_once_and_the_next_waits() -> None:
    async def run() -> None:
        shortcuts = Shortcuts(clock=Clock())
        decided(shortcuts, BIG, outcome(OutcomeCode.OK, BIG, tokens=10.0))
        with contextlib.ExitStack() as in_flight:
            for _ in range(10):  # ten tokens: ten requests, none waiting for another
                turn = ask(shortcuts)
                assert isinstance(turn, Turn)
                in_flight.enter_context(turn)
            eleventh = asyncio.ensure_future(
                shortcuts.take_turn("cus_1", PLANS, cost=1, feature=None)
            )
            await asyncio.sleep(0)
            assert not eleventh.done()  # it would only race them to Redis for a denial
        await asyncio.sleep(0)
        assert isinstance(eleventh.result(), Turn)

    asyncio.run(run())


def test_waiters_wake_at_every_landing_not_only_the_last() -> None:
    # Under steady traffic an account may never have nothing in flight: a
    # request waiting for room must look again as each decision lands.
    async def run() -> None:
        clock = Clock()
        shortcuts = Shortcuts(clock=clock)
        decided(shortcuts, BIG, outcome(OutcomeCode.OK, BIG, tokens=2.0))
        first = await shortcuts.take_turn("cus_1", PLANS, cost=1, feature=None)
        second = await shortcuts.take_turn("cus_1", PLANS, cost=1, feature=None)
        assert isinstance(first, Turn) and isinstance(second, Turn)
        with second:
            with first:
                waiter = asyncio.ensure_future(
                    shortcuts.take_turn("cus_1", PLANS, cost=1, feature=None)
                )
                await asyncio.sleep(0)
                assert not waiter.done()  # 1 on top of 2 in flight: more than the bucket holds
                clock.now += 0.05  # 5 tokens drip in; Redis answers the first
                answered(shortcuts, first, BIG, outcome(OutcomeCode.OK, BIG, tokens=6.0))
            await asyncio.sleep(0)  # the first landed; the second is still on its way
            assert waiter.done() and isinstance(waiter.result(), Turn)

    asyncio.run(run())


def test_a_request_held_behind_one_that_taught_nothing_asks_redis_itself() -> None:
    async def run() -> None:
        shortcuts = Shortcuts(clock=Clock())
        first, second = ask(shortcuts), ask(shortcuts)  # a cold account: nothing known
        assert isinstance(first, Turn) and isinstance(second, Turn)
        with second:
            with first:
                waiter = asyncio.ensure_future(
                    shortcuts.take_turn("cus_1", PLANS, cost=1, feature=None)
                )
                await asyncio.sleep(0)
                assert not waiter.done()  # the first answer may teach it the bucket
            await asyncio.sleep(0)  # it taught nothing (no such account, say)
            assert waiter.done() and isinstance(waiter.result(), Turn)

    asyncio.run(run())


def test_forgetting_an_account_drops_its_bound_and_hint_and_forgetting_all_keeps_hints() -> None:
    shortcuts = Shortcuts(clock=Clock())
    decided(shortcuts, SMALL, outcome(OutcomeCode.RATE_LIMITED, SMALL, tokens=0.0))
    shortcuts.forget_everything()  # invalidations were missed: trust no bound
    assert isinstance(ask(shortcuts), Turn) and shortcuts.hints.get("cus_1") == "small"
    decided(shortcuts, SMALL, outcome(OutcomeCode.RATE_LIMITED, SMALL, tokens=0.0))
    shortcuts.forget("cus_1")  # its plan or bucket changed
    assert shortcuts.bound("cus_1", SMALL) is None and shortcuts.hints.get("cus_1") is None
