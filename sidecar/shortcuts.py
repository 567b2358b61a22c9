"""The decision's local shortcuts: what one sidecar may answer, or guess,
without asking Redis, and why none of it changes an outcome.

Redis's script decides every request, and nothing here admits one. A shortcut
may only guess a plan the script re-checks, deny a request the script would
deny anyway, or hold a request back until the decisions ahead of it land.
Hints, bounds and denials are bounded in size. A hint may be old, but the
script checks it; what denies locally is never staler than the one second
Tollway promises (cache.MAX_STALENESS), so a plan change, a top-up or a new
period still lands within it:

- Plan hints: each account's plan as last seen, so the script is told the
  right limits up front and answers in one round trip. It compares plans
  first and answers "plan changed" to a stale hint: a wrong hint costs a
  round trip, never a wrong answer. Without a hint, the plan seen last is the
  guess (a wrong guess costs what no guess does). At most HINTS_MAX are kept,
  the oldest dropped first: a million accounts touched once each must not
  grow the sidecar.
- Bucket bounds: from each answer that reports the bucket (an admission or a
  rate-limit denial), the most it can hold now: its level then, plus the
  refill since the request was sent (sent, not answered: Redis read the level
  later, so the bound is never below the truth), plus slack for the script's
  milli-token rounding, plus the units sidecars then held in allotments (a
  leased plan's: they may come back), never above the burst. Other requests,
  here or on other sidecars, only lower the truth (an allotment granted later
  comes back no larger than it was taken). A request dearer than the bound is
  denied here until a token could have dropped in: a client hammering an
  empty bucket costs Redis nothing.
- Quota denials: until the quota could admit again (at most a second), the
  same request or a dearer one must be denied; a cheaper one may still fit,
  so it goes to Redis. Not while units are held in allotments: their return
  may give the quota back.
- What each account has in flight: when the bound cannot cover a request on
  top of the decisions still on their way to Redis, the request waits for the
  next of them to land and looks at the (fresher) bound again, instead of
  racing them to Redis for a denial. So when a token drops into an empty
  bucket under attack, one request asks Redis, not all of them. Every landing
  wakes the waiters, not only the last (under steady traffic there may never
  be a last one), and a waiter whose wait taught nothing goes to Redis.

No request is denied here whose guessed plan is unknown or lacks the feature
it needs: the script would answer "plan changed" or "feature" first.

No I/O: time is the injected clock (monotonic seconds), and the waiting is on
asyncio events that only a landing sets.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from sidecar.cache import TtlCache
from sidecar.decision import Decision, Outcome, OutcomeCode, bucket_state, rate_limited
from sidecar.plans import Plan

__all__ = ["HINTS_MAX", "BucketReading", "PlanHints", "QuotaDenial", "Shortcuts", "Turn"]

HINTS_MAX: Final = 20_000
# Tokens: the script rounds the level down to milli-tokens, and float clocks
# err; the bound must never fall below the truth, or a paying request is refused.
_SLACK: Final = 0.002


@dataclass(frozen=True, slots=True)
class BucketReading:
    """An account's bucket as an answer from the script reported it."""

    plan: str  # whose limits it was read with: it bounds no other plan's bucket
    tokens: float
    sent_at: float  # when the request was sent; Redis read the level no earlier
    held: int = 0  # units then held in allotments, which may come back to the bucket


@dataclass(frozen=True, slots=True)
class QuotaDenial:
    """A quota denial from the script, replayed until the quota could admit again."""

    cost: int  # a request this dear or dearer is denied too
    decision: Decision
    retry_at: float


class PlanHints:
    """Each account's plan as last seen, the oldest dropped first when full."""

    __slots__ = ("_hints", "_likely", "_max_size")

    def __init__(self, *, max_size: int = HINTS_MAX) -> None:
        self._hints: dict[str, str] = {}  # in the order learned: the oldest first
        self._likely = ""
        self._max_size = max_size

    def get(self, customer: str) -> str | None:
        return self._hints.get(customer)

    def guess(self, customer: str) -> str:
        """The account's plan as last seen, else the plan seen last ("" before any)."""
        return self._hints.get(customer) or self._likely

    def learn(self, customer: str, plan: str) -> None:
        self._likely = plan
        hints = self._hints
        hints.pop(customer, None)  # re-inserted last: the oldest are dropped first
        if len(hints) >= self._max_size:
            del hints[next(iter(hints))]
        hints[customer] = plan

    def forget(self, customer: str) -> None:
        self._hints.pop(customer, None)

    def __len__(self) -> int:
        return len(self._hints)


class _InFlight:
    """Decisions of one account on their way to Redis."""

    __slots__ = ("cost", "waiting")

    def __init__(self) -> None:
        self.cost = 0  # their costs, summed
        self.waiting: asyncio.Event | None = None  # set as the next of them lands

    async def next_landing(self) -> None:
        if self.waiting is None:
            self.waiting = asyncio.Event()
        await self.waiting.wait()

    def landed(self, cost: int) -> None:
        self.cost -= cost
        # Every landing wakes the waiters (not only the last one: under steady
        # traffic there may never be a last one), to look at the fresh bound.
        if self.waiting is not None:
            self.waiting.set()
            self.waiting = None


class Turn:
    """A request's go at Redis, once no shortcut could answer it.

    `with turn:` around the call to Redis and the learning from its answer:
    inside, the request's cost counts as in flight for its account (and
    sent_at is when it set off); leaving, it lands and wakes the waiters.
    """

    __slots__ = ("_clock", "_flight", "_flights", "cost", "customer", "plan", "sent_at")

    def __init__(
        self,
        flights: dict[str, _InFlight],
        clock: Callable[[], float],
        *,
        customer: str,
        plan: Plan | None,
        cost: int,
    ) -> None:
        self._flights = flights
        self._clock = clock
        self._flight: _InFlight | None = None
        self.customer = customer
        self.plan = plan  # the guess to send: None asks the script for the plan
        self.cost = cost
        self.sent_at = 0.0

    def __enter__(self) -> Turn:
        # Counted here, not when the turn was given: a turn never entered
        # cannot hold its account's waiters back for ever.
        flight = self._flights.get(self.customer)
        if flight is None:
            flight = self._flights[self.customer] = _InFlight()
        flight.cost += self.cost
        self._flight = flight
        self.sent_at = self._clock()  # before the call: the bound is never too low
        return self

    def __exit__(self, *exc_info: object) -> None:
        flight, self._flight = self._flight, None
        if flight is None:
            return
        flight.landed(self.cost)
        if flight.cost <= 0 and self._flights.get(self.customer) is flight:
            del self._flights[self.customer]


class Shortcuts:
    def __init__(self, *, clock: Callable[[], float], hints_max: int = HINTS_MAX) -> None:
        self._clock = clock
        self.hints = PlanHints(max_size=hints_max)
        self.buckets: TtlCache[str, BucketReading] = TtlCache(clock=clock)
        self.denials: TtlCache[str, QuotaDenial] = TtlCache(clock=clock)
        self._in_flight: dict[str, _InFlight] = {}

    async def take_turn(
        self, customer: str, plans: Mapping[str, Plan], *, cost: int, feature: str | None
    ) -> Decision | Turn:
        """A denial Redis would give too, or, once the account's decisions in
        flight leave room for this one, its turn to ask Redis."""
        waited = False
        while True:
            # Guessed again after each wait: a landing may have taught the plan.
            plan = plans.get(self.hints.guess(customer))
            denial = self.denial(customer, plan, cost=cost, feature=feature)
            if denial is not None:
                return denial
            flight = self._in_flight.get(customer)
            if flight is None:
                break
            room = self.bound(customer, plan)
            if room is None and waited:
                break  # their answers taught nothing: go ask
            if room is not None and cost + flight.cost <= room:
                break
            await flight.next_landing()  # then the bound is fresher: look again
            waited = True
        return Turn(self._in_flight, self._clock, customer=customer, plan=plan, cost=cost)

    def denial(
        self, customer: str, plan: Plan | None, *, cost: int, feature: str | None
    ) -> Decision | None:
        """A denial that must hold whatever Redis says now, or None."""
        if plan is None or (feature is not None and feature not in plan.features):
            return None  # the script would answer "plan changed" or "feature" first
        reading = self.buckets.get(customer)
        if reading is not None and reading.plan == plan.name and "rate" not in plan.shadow:
            upper = self._upper_bound(plan, reading)
            if cost > upper:
                return _rate_denial(customer, plan, cost, upper)
        denied = self.denials.get(customer)
        if denied is None or cost < denied.cost:
            return None  # (cheaper than the denied request: it may still fit the quota)
        wait = max(1, math.ceil(denied.retry_at - self._clock()))
        return replace(denied.decision, retry_after=wait)

    def bound(self, customer: str, plan: Plan | None) -> float | None:
        """The most the account's bucket can hold now under plan, or None if unknown."""
        reading = self.buckets.get(customer)
        if plan is None or reading is None or reading.plan != plan.name or "rate" in plan.shadow:
            return None  # (a rate limit in shadow mode never holds a request back)
        return self._upper_bound(plan, reading)

    def learn(self, turn: Turn, plan: Plan, outcome: Outcome, decision: Decision) -> None:
        """What the script's answer to turn, decided with plan's limits, teaches."""
        customer = turn.customer
        if outcome.plan == plan.name != self.hints.get(customer):
            self.hints.learn(customer, plan.name)  # a right guess is kept as a hint too
        if outcome.code in (OutcomeCode.OK, OutcomeCode.RATE_LIMITED):
            reading = BucketReading(plan.name, outcome.tokens, turn.sent_at, outcome.held)
            self.buckets.put(customer, reading)
        if outcome.code is OutcomeCode.QUOTA_EXCEEDED and outcome.retry_ms > 0 and not outcome.held:
            retry_in = outcome.retry_ms / 1000
            denied = QuotaDenial(turn.cost, decision, self._clock() + retry_in)
            self.denials.put(customer, denied, ttl=retry_in)  # the cache caps it at a second

    def forget(self, customer: str) -> None:
        """Drops what is known of an account (its plan, bucket or status changed)."""
        self.denials.discard(customer)
        self.buckets.discard(customer)
        self.hints.forget(customer)

    def forget_everything(self) -> None:
        """Drops every bound and denial; the hints stay, the script re-checks them."""
        self.denials.clear()
        self.buckets.clear()

    def _upper_bound(self, plan: Plan, reading: BucketReading) -> float:
        refilled = (self._clock() - reading.sent_at) * plan.rate.per_second
        return min(plan.burst, reading.tokens + reading.held + refilled + _SLACK)


def _rate_denial(customer: str, plan: Plan, cost: int, upper: float) -> Decision:
    per_ms = plan.rate.per_second / 1000
    state = bucket_state(plan, upper, (plan.burst - upper) / per_ms)
    retry_ms = -1 if cost > plan.burst else (cost - upper) / per_ms
    return rate_limited(plan, customer_id=customer, cost=cost, rate=state, retry_ms=retry_ms)
