"""Leased enforcement: allotments a sidecar admits from without asking Redis.

A plan with ``enforcement = "leased"`` lets a sidecar take, with an admission,
an allotment of units from the account's bucket and quota (store/admit.lua,
atomically with every check of that admission). Later requests of the account
are admitted here, in-process, until the allotment runs out or ages out; then
it goes back (store/return_allotment.lua): unused units to the bucket and the
quota (and the balance, on a plan with credits), used ones recorded as usage.
No I/O here: the Authorizer asks Redis and the returner (run_returns in
sidecar/authorizer.py) hands allotments back.

Why the bound stays exact: while units are held, the bucket in Redis refills
only up to burst minus the units held, so its level and every unspent unit
anywhere never sum to more than burst, refill at most at the rate, and fall by
each admission's cost wherever it is admitted: over any interval, admissions
stay within rate x t + burst, as with exact enforcement. The quota counts an
allotment's units when it is granted, so a period never admits more than its
quota either.

What it gives up, and the bounds:
- Staleness: an allotment is spent for at most MAX_AGE (under the one second
  Tollway promises), so a status, plan or key change reaches an account's
  allotments within it; an invalidation drops them at once.
- Held units: until an allotment returns, its unused units serve no other
  sidecar; it holds ~TARGET_SECONDS of the account's traffic, at most
  1/BURST_SHARE of its burst and 1/QUOTA_SHARE of the quota left, so a quiet
  account (under two requests per TARGET_SECONDS) is asked for nothing beyond
  each request: exact in effect.
- A crash (kill -9) loses the usage admitted from the allotments not yet
  returned: never billed twice, under-billed by that at most. An account is
  asked a new allotment only once Redis has taken back every one before the
  one in use, so that is two allotments per account at most (the one in use,
  and one on its way back). Their units lapse in Redis after HELD_FOR.
- Redis unreachable: the allotment in hand serves until it ages out; returns
  are retried until Redis answers (a return is applied once).
- Credits: on a plan with credits an allotment is paid for from the balance
  when granted (at most 1/QUOTA_SHARE of it), so no sidecar ever admits what
  was not paid; its return refunds what it did not use. A crash keeps what its
  two allotments paid: over-charged by that at most, never under-paid.

Requests that need Redis anyway are never admitted here: a concurrency lease,
a reservation a backend asked for, a key with limits of its own, a feature the
plan lacks; they go to Redis, exactly as with exact enforcement.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sidecar.plans import Plan

__all__ = [
    "BURST_SHARE",
    "HELD_FOR",
    "MAX_AGE",
    "QUOTA_SHARE",
    "RENEW_AT",
    "TARGET_SECONDS",
    "Allotment",
    "Allotments",
]

MAX_AGE: Final = 0.9  # seconds an allotment is spent for; the returner wakes within 0.05
HELD_FOR: Final = 10  # seconds Redis holds its units for a sidecar that never returns it
# An allotment holds about this much of the account's traffic: a Redis round trip
# (a grant, and later a return) per quarter second of a busy account.
TARGET_SECONDS: Final = 0.25
BURST_SHARE: Final = 4  # and at most burst / BURST_SHARE
QUOTA_SHARE: Final = 8  # and at most (quota left) / QUOTA_SHARE
RENEW_AT: Final = 0.25  # the next is fetched once this share of an allotment is left
_DEMAND_WINDOW: Final = 0.5  # seconds over which an account's rate is measured
_DEMAND_MAX: Final = 50_000  # accounts whose rate is tracked, at most


@dataclass(slots=True)
class Allotment:
    """Units granted to this sidecar with one admission, and what became of them."""

    id: str
    customer: str
    plan: Plan
    units: int
    granted_at: int  # Redis's clock at the grant, Unix s (its usage's time)
    deadline: float  # monotonic: spent until then, then returned
    tokens: float  # the bucket's level in Redis right after the grant (for headers)
    quota_used: int  # the quota counter right after it, this allotment's units included
    period_end: int
    balance: int | None = None  # a credits plan's balance right after it (paid for)
    status: str = "active"
    used: int = 0

    @property
    def left(self) -> int:
        return self.units - self.used


@dataclass(slots=True)
class _Demand:
    since: float
    units: int = 0
    rate: float = 0.0  # units per second over the last full window
    quota_used: int = 0  # the quota counter as Redis last reported it
    balance: int = 0  # a credits plan's balance as Redis last reported it


@dataclass(slots=True)
class _Pending:
    """An allotment asked for and not yet answered: others wait for it."""

    landed: asyncio.Event = field(default_factory=asyncio.Event)
    stale: bool = False  # the account changed meanwhile: what lands goes straight back


class Allotments:
    """This sidecar's allotments, one per account at most, and those to hand back."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._held: dict[str, Allotment] = {}
        self._pending: dict[str, _Pending] = {}
        self._demand: dict[str, _Demand] = {}
        self.done: list[Allotment] = []  # to hand back: spent, aged out or dropped
        self._returning: dict[str, int] = {}  # per account: finished, Redis yet to take back
        self.hits = 0  # admissions from an allotment (tollway_cache_lookups_total)
        self.misses = 0  # requests of a leased plan that had to ask Redis
        self.woken = asyncio.Event()  # set when an allotment joins `done`

    def take(self, customer: str, plan: Plan, cost: int, *, renew: bool = True) -> Allotment | None:
        """Admits cost from the account's allotment under plan, if it has one that
        covers it. When what it would leave is under RENEW_AT of it (and renew), the
        request goes to Redis instead to fetch the next one, while others spend the
        rest; should Redis deny it or not answer, it may come back with renew off."""
        held = self._held.get(customer)
        if held is None:
            self.misses += 1
            return None
        if held.plan.name != plan.name or self._clock() >= held.deadline:
            self._finish(customer)
            self.misses += 1
            return None
        if held.left < cost or (
            renew
            and (held.left - cost) < held.units * RENEW_AT
            and customer not in self._pending
            and self.want(customer, plan)
        ):
            self.misses += 1
            return None  # (a cheaper request may still fit)
        self.hits += 1
        held.used += cost
        self.note(customer, cost)
        if held.left == 0:
            self._finish(customer)
        return held

    def note(
        self,
        customer: str,
        cost: int,
        *,
        quota_used: int | None = None,
        balance: int | None = None,
    ) -> None:
        """Counts an admission of the account's, wherever it was decided (with the
        quota counter and the balance Redis reported, when it was Redis)."""
        now = self._clock()
        demand = self._demand.get(customer)
        if demand is None:
            if len(self._demand) >= _DEMAND_MAX:
                self._demand.clear()  # bounded: at worst, rates measured afresh
            demand = self._demand[customer] = _Demand(since=now)
        elapsed = now - demand.since
        if elapsed >= _DEMAND_WINDOW:
            demand.rate, demand.units, demand.since = demand.units / elapsed, 0, now
        demand.units += cost
        if quota_used is not None:
            demand.quota_used = quota_used
        if balance is not None:
            demand.balance = balance

    def want(self, customer: str, plan: Plan) -> int:
        """Units to ask for beyond a request's cost: about TARGET_SECONDS of the
        account's traffic, within the shares of burst, of the quota left (a quota
        that blocks) and of a credits plan's balance (Redis caps the grant by what
        is left in any case)."""
        demand = self._demand.get(customer)
        if demand is None or customer in self._returning:
            return 0  # (one on its way back: a crash must not lose more than two)
        elapsed = self._clock() - demand.since
        rate = demand.rate
        if elapsed >= 0.02:  # the window so far says more than the last one, if busier
            rate = max(rate, demand.units / elapsed)
        units = math.floor(rate * TARGET_SECONDS)
        units = min(units, plan.burst // BURST_SHARE)
        if plan.quota is not None and plan.overage == "block":
            units = min(units, max(0, plan.quota.limit - demand.quota_used) // QUOTA_SHARE)
        if plan.credits:
            units = min(units, max(0, demand.balance) // QUOTA_SHARE)
        return units if units >= 2 else 0  # one unit is no saving: exact

    def pending(self, customer: str) -> _Pending | None:
        return self._pending.get(customer)

    def asking(self, customer: str) -> str:
        """Marks an allotment as asked for (others wait for it); returns its new id."""
        self._pending[customer] = _Pending()
        return uuid.uuid4().hex

    def answered(self, customer: str, allotment: Allotment | None) -> None:
        """The allotment asked for was granted (or not): it replaces any held one."""
        pending = self._pending.pop(customer, None)
        if allotment is not None:
            self._finish(customer)
            self._held[customer] = allotment
            if pending is not None and pending.stale:
                self._finish(customer)  # granted before an invalidation landed: back
        if pending is not None:
            pending.landed.set()

    def abandon(self, customer: str, allotment_id: str, plan: Plan) -> None:
        """An ask that got no answer (Redis slow, the request cancelled): Redis may
        have granted it all the same, so it is handed back like any other (a return
        of an allotment never granted changes nothing)."""
        self._returning[customer] = self._returning.get(customer, 0) + 1
        self.done.append(Allotment(allotment_id, customer, plan, 0, 0, self._clock(), 0.0, 0, 0))
        self.woken.set()

    def deadline(self, period_left: float = MAX_AGE) -> float:
        """When an allotment granted now is done: MAX_AGE from now, or sooner when
        less of its period is left (seconds, by Redis's clock)."""
        return self._clock() + max(0.0, min(MAX_AGE, period_left))

    def due(self) -> list[Allotment]:
        """Allotments to hand back now: those done, and those aged out."""
        now = self._clock()
        for customer in [c for c, a in self._held.items() if now >= a.deadline]:
            self._finish(customer)
        done, self.done = self.done, []
        self.woken.clear()
        return done

    def returned(self, allotment: Allotment) -> None:
        """Redis took the allotment back (or knew it was back already)."""
        customer = allotment.customer
        left = self._returning.get(customer, 0) - 1
        if left > 0:
            self._returning[customer] = left
        else:
            self._returning.pop(customer, None)

    def drop(self, customer: str) -> None:
        """The account changed (plan, status, a revoked key): its allotment goes back
        now, and so does one still being asked for."""
        self._finish(customer)
        if (pending := self._pending.get(customer)) is not None:
            pending.stale = True

    def drop_all(self) -> None:
        for customer in list(self._held):
            self._finish(customer)
        for pending in self._pending.values():
            pending.stale = True

    def held(self, customer: str) -> Allotment | None:
        return self._held.get(customer)

    def __len__(self) -> int:
        return len(self._held)

    def _finish(self, customer: str) -> None:
        allotment = self._held.pop(customer, None)
        if allotment is not None:
            self._returning[customer] = self._returning.get(customer, 0) + 1
            self.done.append(allotment)
            self.woken.set()
