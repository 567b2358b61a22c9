"""One decision, start to finish: key → record → account's plan → atomic script.

Shared by the gRPC Authorize method and Envoy's Check; neither knows Redis.
Local state, none of which can change an outcome beyond the one-second
staleness Tollway promises (cache.MAX_STALENESS):

- a hint of each account's plan, which saves the script a round trip; the
  script re-checks it and answers "plan changed" when it is stale;
- key records (and unknown keys) for up to a second, so a hot key costs one
  round trip, not two; a revocation still lands within the second;
- denials for an empty bucket or an exhausted quota, until the bucket could
  admit again (at most a second): until then the same request, or a dearer
  one, must be denied anyway, so a client hammering an exhausted key costs
  Redis nothing;
- what each account has in flight: when the bucket's bound could not cover a
  request on top of the decisions still on their way to Redis, the request
  waits for the next of them to land and looks at the (fresher) bound again,
  instead of racing them to Redis for a denial. So when a token drops into an
  empty bucket under attack, one request asks Redis, not all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from sidecar import keys
from sidecar.cache import TtlCache
from sidecar.decide import (
    Decision,
    OutcomeCode,
    Reason,
    bucket_state,
    decision_from_outcome,
    rate_limited,
    refuse,
)
from sidecar.errors import StoreUnavailable
from sidecar.plans import Plan, Route
from sidecar.settings import Settings
from sidecar.store import SUBSCRIPTION_ENDED, KeyRecord, Store

__all__ = ["Authorizer"]

log = logging.getLogger("tollway.authorizer")

# Plan hints are only a saved round trip (the script re-checks them), so they
# are few: a million accounts touched once each must not grow the sidecar.
_HINTS_MAX: Final = 20_000
_SLACK: Final = 0.002  # tokens


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


class Authorizer:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        metered: Callable[[str], None] = lambda customer: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings  # a getter: SIGHUP swaps plans under us
        self._metered = metered  # told of each customer whose usage was just recorded
        self._plan_hints: dict[str, str] = {}
        self._likely_plan = ""
        self._notifications: set[asyncio.Task[None]] = set()
        self.key_cache: TtlCache[str, tuple[KeyRecord | None]] = TtlCache(clock=clock)
        self.denials: TtlCache[str, tuple[int, Decision, float]] = TtlCache(clock=clock)
        self.buckets: TtlCache[str, tuple[str, float, float]] = TtlCache(clock=clock)
        self._in_flight: dict[str, _InFlight] = {}
        self._lookups: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._clock = clock

    async def authorize(
        self,
        api_key: str,
        *,
        method: str,
        path: str,
        cost: int = 0,
        feature: str | None = None,
        request_id: str = "",
        lease_id: str = "",
    ) -> Decision:
        if not api_key:
            return refuse(Reason.MISSING_KEY, "API key required: send it in the x-api-key header")
        # Only well-formed keys enter the key cache, so a hit needs no second check.
        hashed = keys.key_hash(api_key) if len(api_key) == keys.KEY_LEN else ""
        cached_record = self.key_cache.get(hashed) if hashed else None
        if cached_record is None:
            if not keys.is_well_formed(api_key):
                return refuse(Reason.INVALID_KEY, "API key is malformed; check it was copied whole")
            cached_record = (await self._lookup(hashed),)
        record = cached_record[0]
        if record is None:
            return refuse(Reason.INVALID_KEY, "API key is not recognised")
        customer = record.customer_id
        if record.revoked and record.revoked_reason == SUBSCRIPTION_ENDED:
            return refuse(
                Reason.SUBSCRIPTION_INACTIVE,
                "Subscription has ended: subscribe again to restore access",
                customer_id=customer,
            )
        if record.revoked:
            return refuse(Reason.KEY_REVOKED, "API key was revoked", customer_id=customer)

        settings = self._settings()
        catalog = settings.catalog
        route = catalog.route_for(method, path)
        cost = cost or (route.cost if route else 1)
        feature = feature or (route.feature if route else None)

        waited = False
        while True:
            # Without a hint, the plan seen last is the best guess: the script
            # compares plans first, so a wrong guess costs what no guess does.
            plan = catalog.plans.get(self._plan_hints.get(customer) or self._likely_plan)
            cached = self._cached_denial(customer, cost, feature, plan)
            if cached is not None:
                return cached
            flight = self._in_flight.get(customer)
            if flight is None:
                break
            room = self._room(customer, plan)
            if room is None and waited:
                break  # their answers taught nothing: go ask
            if room is not None and cost + flight.cost <= room:
                break
            await flight.next_landing()  # then the bound is fresher: look again
            waited = True
        if flight is None:
            flight = self._in_flight[customer] = _InFlight()
        flight.cost += cost
        try:
            return await self._decide(
                settings, customer, record, plan, cost=cost, feature=feature, route=route,
                request_id=request_id, lease_id=lease_id,
            )  # fmt: skip
        finally:
            flight.landed(cost)
            if flight.cost <= 0 and self._in_flight.get(customer) is flight:
                del self._in_flight[customer]

    async def _lookup(self, hashed: str) -> KeyRecord | None:
        """The key's record; concurrent requests with one uncached key share
        one read (a cold cache under load is one round trip per key, not per
        request)."""
        lookup = self._lookups.get(hashed)
        if lookup is None:
            lookup = asyncio.ensure_future(self._store.lookup_key(hashed))
            self._lookups[hashed] = lookup
            lookup.add_done_callback(lambda done: self._looked_up(hashed, done))
        return await asyncio.shield(lookup)

    def _looked_up(self, hashed: str, lookup: asyncio.Future[KeyRecord | None]) -> None:
        del self._lookups[hashed]
        if not lookup.cancelled() and lookup.exception() is None:
            self.key_cache.put(hashed, (lookup.result(),))  # an unknown key is remembered too

    async def _decide(
        self,
        settings: Settings,
        customer: str,
        record: KeyRecord,
        plan: Plan | None,
        *,
        cost: int,
        feature: str | None,
        route: Route | None,
        request_id: str,
        lease_id: str,
    ) -> Decision:
        """The script's decision, with what it teaches the local caches."""
        catalog = settings.catalog
        sent_at = self._clock()  # before the call: the refill bound is never too low
        lease = ""
        for _ in range(3):
            if plan is not None and plan.concurrency and not lease:
                lease = lease_id or request_id or uuid.uuid4().hex
            outcome = await self._store.decide(
                customer,
                plan,
                cost=cost,
                feature_ok=feature is None or (plan is not None and feature in plan.features),
                key_expires_at_us=record.expires_at_us,
                fallback_plan=settings.billing.fallback_plan,
                request_id=request_id,
                reservation_ttl=settings.usage.reservation_ttl,
                thresholds=settings.usage.thresholds,
                lease_id=lease,
            )
            if outcome.code is not OutcomeCode.PLAN_CHANGED:
                break
            plan = catalog.plans.get(outcome.plan)
            if plan is None:
                log.warning(
                    "account %s is on plan %r, which is not configured", customer, outcome.plan
                )
                return refuse(
                    Reason.SUBSCRIPTION_INACTIVE,
                    f"Plan {outcome.plan!r} is not available; contact support",
                    customer_id=customer,
                    plan=outcome.plan,
                )
            self._remember(customer, plan.name)
        else:  # the plan flipped under us three times in a row
            raise RuntimeError(f"plan of {customer} kept changing during the decision")
        if plan is not None and outcome.plan == plan.name != self._plan_hints.get(customer):
            self._remember(customer, plan.name)  # a right guess is kept as a hint too
        decision = decision_from_outcome(
            outcome, plan=plan, customer_id=customer, cost=cost, feature=feature
        )
        if plan is not None and outcome.code in (OutcomeCode.OK, OutcomeCode.RATE_LIMITED):
            self.buckets.put(customer, (plan.name, outcome.tokens, sent_at))
        if outcome.code is OutcomeCode.QUOTA_EXCEEDED and outcome.retry_ms > 0:
            retry_at = self._clock() + outcome.retry_ms / 1000
            self.denials.put(customer, (cost, decision, retry_at), ttl=outcome.retry_ms / 1000)
        if outcome.code is not OutcomeCode.OK or plan is None:
            return decision
        if plan.meter or request_id:
            self._metered(customer)  # usage to bill, or a reservation to watch
        for percent in outcome.thresholds:
            self._quota_alert(customer, plan.name, percent, outcome.quota_used)
        only_success = plan.bill_only_success
        if route is not None and route.bill_only_success is not None:
            only_success = route.bill_only_success
        return replace(
            decision,
            lease_id=lease,
            cost=cost,
            reserved=request_id,
            bill_only_success=only_success,
        )

    def forget(self, message: str) -> None:
        """Drops what is cached about a key ("k:<hash>") or an account ("c:<id>")."""
        kind, _, name = message.partition(":")
        if kind == "k":
            self.key_cache.discard(name)
        elif kind == "c":
            self.denials.discard(name)
            self.buckets.discard(name)
            self._plan_hints.pop(name, None)

    def forget_everything(self) -> None:
        """After missing invalidations (a lost connection), trust nothing cached."""
        self.key_cache.clear()
        self.denials.clear()
        self.buckets.clear()

    def _room(self, customer: str, plan: Plan | None) -> float | None:
        """The most the bucket can hold now, or None if nothing is known."""
        bound = self.buckets.get(customer)
        if plan is None or bound is None or bound[0] != plan.name:
            return None
        return self._upper_bound(plan, bound[1], bound[2])

    def _upper_bound(self, plan: Plan, tokens: float, at: float) -> float:
        # Slack for the script's milli-token rounding and float clocks: the
        # bound must never fall below the truth, or a paying request is refused.
        rate = plan.rate.per_second
        return min(plan.burst, tokens + (self._clock() - at) * rate + _SLACK)

    def _cached_denial(
        self, customer: str, cost: int, feature: str | None, plan: Plan | None
    ) -> Decision | None:
        """A denial that must hold whatever Redis says now, or None."""
        if plan is None or (feature is not None and feature not in plan.features):
            return None  # the script would answer "plan changed" or "feature" first
        bound = self.buckets.get(customer)
        if bound is not None and bound[0] == plan.name:
            upper = self._upper_bound(plan, bound[1], bound[2])
            if cost > upper:
                return self._rate_denial(customer, plan, cost, upper)
        cached = self.denials.get(customer)
        if cached is None:
            return None
        denied_cost, decision, retry_at = cached
        if cost < denied_cost:
            return None  # a cheaper request may still fit in the quota
        wait = max(1, math.ceil(retry_at - self._clock()))
        return replace(decision, retry_after=wait)

    @staticmethod
    def _rate_denial(customer: str, plan: Plan, cost: int, upper: float) -> Decision:
        per_ms = plan.rate.per_second / 1000
        state = bucket_state(plan, upper, (plan.burst - upper) / per_ms)
        retry_ms = -1 if cost > plan.burst else (cost - upper) / per_ms
        return rate_limited(plan, customer_id=customer, cost=cost, rate=state, retry_ms=retry_ms)

    def _quota_alert(self, customer: str, plan: str, percent: int, used: int) -> None:
        """The script notes each threshold once per period; deliver it off the
        request path (the companion posts it to the callback)."""
        payload = {"type": "quota_threshold", "customer_id": customer, "plan": plan,
                   "percent": percent, "used": used}  # fmt: skip
        log.warning("quota alert: %s reached %d%% of plan %s's quota", customer, percent, plan)
        task = asyncio.get_running_loop().create_task(self._send(payload))
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _send(self, payload: dict[str, object]) -> None:
        try:
            await self._store.notify(payload)
        except StoreUnavailable:
            log.error("quota alert for %s not queued: Redis unavailable", payload["customer_id"])

    def _remember(self, customer: str, plan: str) -> None:
        self._likely_plan = plan
        hints = self._plan_hints
        hints.pop(customer, None)  # re-inserted last: the oldest are dropped first
        if len(hints) >= _HINTS_MAX:
            del hints[next(iter(hints))]
        hints[customer] = plan
