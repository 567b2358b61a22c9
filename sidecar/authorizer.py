"""One decision, start to finish: key → record → plan → local check → store → learn.

Shared by the gRPC Authorize method and Envoy's Check; neither knows Redis.
The store's atomic script decides; what this sidecar keeps locally cannot
change an outcome beyond the one-second staleness Tollway promises
(cache.MAX_STALENESS):

- key records (and unknown keys) for up to a second, so a hot key costs one
  round trip, not two; a revocation still lands within the second. Requests
  with one uncached key share one read;
- the shortcuts (sidecar.shortcuts, which states their rules): plan hints,
  bucket bounds, quota denials, and what each account has in flight;
- for plans with leased enforcement, allotments (sidecar.allotments, which
  states why the bounds stay exact): units taken from the bucket and the
  quota with one admission, admitting the account's next requests here; they
  go back to Redis when spent, aged out or invalidated (run_returns).

What an admission reports beyond its answer goes to callbacks, which must
not block (whatever they set off runs off the request path): each customer
whose usage was just recorded (metered), each quota threshold crossed for
the first time this period, and each low-balance mark a prepaid balance
reached (on_alert).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from sidecar import keys
from sidecar.allotments import HELD_FOR, Allotment, Allotments
from sidecar.cache import TtlCache
from sidecar.decision import (
    Decision,
    Outcome,
    OutcomeCode,
    Reason,
    admitted_locally,
    decision_from_outcome,
    refuse,
)
from sidecar.errors import TollwayError
from sidecar.metrics import ALLOTMENTS
from sidecar.plans import Plan, Route
from sidecar.settings import Settings
from sidecar.shortcuts import BucketReading, QuotaDenial, Shortcuts
from sidecar.store import SUBSCRIPTION_ENDED, AllotmentReturn, KeyRecord, Store
from sidecar.store.admission import admission
from sidecar.store.names import parse_invalidation

__all__ = ["Alert", "Authorizer", "BalanceAlert", "QuotaAlert", "TopUpDue"]

log = logging.getLogger("tollway.authorizer")

_TOUCH_EVERY: Final = 60.0  # seconds between writes of one key's last_used
# Denials by the account's bucket or quota: units this sidecar holds may still serve.
# (credits too: the units held were paid for when they were granted)
_HELD_MAY_SERVE: Final = frozenset(
    {Reason.RATE_LIMITED, Reason.QUOTA_EXCEEDED, Reason.CREDITS_EXHAUSTED}
)


@dataclass(frozen=True, slots=True)
class QuotaAlert:
    """An account's usage crossed one of [usage] thresholds, first this period."""

    customer_id: str
    plan: str
    percent: int
    used: int


@dataclass(frozen=True, slots=True)
class BalanceAlert:
    """An account's prepaid balance reached one of [credits] low_balance, first
    since a grant lifted it above that mark."""

    customer_id: str
    plan: str
    mark: int
    balance: int


@dataclass(frozen=True, slots=True)
class TopUpDue:
    """A burn took the balance to the auto top-up mark: buy a pack, once for
    this fall (crossing identifies it, so retries charge once)."""

    customer_id: str
    plan: str
    crossing: str
    balance: int


Alert = QuotaAlert | BalanceAlert | TopUpDue


@dataclass(frozen=True, slots=True)
class _Answer:
    """The script's outcome, the plan whose limits decided it, and the lease taken."""

    outcome: Outcome
    plan: Plan | None
    lease: str
    credits_fallback: bool = False  # plan was enforced because the account's balance is short
    reserved: str = ""  # the request id the cost was reserved under ("" for none)


def _no_alerts(alert: Alert) -> None:
    pass


class Authorizer:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        metered: Callable[[str], None] = lambda customer: None,
        on_alert: Callable[[Alert], None] = _no_alerts,
        clock: Callable[[], float] = time.monotonic,
        record_last_use: bool = False,
    ) -> None:
        self._store = store
        self._settings = settings  # a getter: SIGHUP swaps plans under us
        self._metered = metered  # told of each customer whose usage was just recorded
        self._on_alert = on_alert  # called on the request path: it must not block
        self._clock = clock
        self.shortcuts = Shortcuts(clock=clock)
        self.key_cache: TtlCache[str, tuple[KeyRecord | None]] = TtlCache(clock=clock)
        self._lookups: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._record_last_use = record_last_use  # the sidecar does; bare tests need not
        self._touched: dict[str, float] = {}  # key id -> when last_used was last noted
        self._unwritten: dict[str, int] = {}  # key hash -> when used, for the next batch
        self.allotments = Allotments(clock=clock)
        self._unreturned: list[Allotment] = []  # returns Redis did not take yet: retried

    @property
    def buckets(self) -> TtlCache[str, BucketReading]:
        return self.shortcuts.buckets

    @property
    def denials(self) -> TtlCache[str, QuotaDenial]:
        return self.shortcuts.denials

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
        reservation_optional: bool = False,
    ) -> Decision:
        """reservation_optional: request_id reserves the cost only so that the
        upstream's cost header can settle it (Envoy's settlement); a plan with
        leased enforcement goes without, and charges the route's cost."""
        record = await self._record(api_key)
        if isinstance(record, Decision):
            return record  # no key, or one that is malformed, unknown or revoked
        customer = record.customer_id
        settings = self._settings()  # read once: a reload must not split a decision
        route = settings.catalog.route_for(method, path)
        cost = cost or (route.cost if route else 1)
        feature = feature or (route.feature if route else None)
        if not record.policy.allows(method, path, feature):
            return refuse(
                Reason.KEY_SCOPE,
                "This API key may not make this request (outside the key's scope)",
                customer_id=customer,
            )
        hinted = settings.catalog.plans.get(self.shortcuts.hints.get(customer) or "")
        exact_route = route is not None and route.exact
        leased = (
            hinted is not None
            and not exact_route
            and self._leasable(hinted, record, request_id, reservation_optional)
        )
        if leased and hinted is not None:
            local = self._from_allotment(record, hinted, cost, feature)
            if local is None and (pending := self.allotments.pending(customer)) is not None:
                await pending.landed.wait()  # the allotment asked for may cover this one too
                local = self._from_allotment(record, hinted, cost, feature)
            if local is not None:
                self._used(api_key, record)
                return local
        # Redis not answering is UNAVAILABLE here, as with exact enforcement (Redis
        # may yet admit it); the asks that went unanswered stop the renewals, so the
        # next requests are served from what this sidecar holds.
        decision = await self._in_redis(
            api_key,
            record,
            settings,
            route,
            cost=cost,
            feature=feature,
            request_id=request_id,
            lease_id=lease_id,
            reservation_optional=reservation_optional,
            exact=exact_route,
        )
        if leased and hinted is not None and decision.reason in _HELD_MAY_SERVE:
            # Redis's bucket or quota is short by what this sidecar holds: spend it.
            local = self._from_allotment(record, hinted, cost, feature, renew=False)
            if local is not None:
                self._used(api_key, record)
                return local
        return decision

    async def _in_redis(
        self,
        api_key: str,
        record: KeyRecord,
        settings: Settings,
        route: Route | None,
        *,
        cost: int,
        feature: str | None,
        request_id: str,
        lease_id: str,
        reservation_optional: bool,
        exact: bool,
    ) -> Decision:
        """The decision when no allotment answered: a shortcut's, or Redis's."""
        customer = record.customer_id
        # The account's plan as last seen, and what this sidecar knows of its limits.
        turn = await self.shortcuts.take_turn(
            customer, settings.catalog.plans, cost=cost, feature=feature
        )
        if isinstance(turn, Decision):
            return turn  # Redis would deny it too
        with turn:  # in flight until Redis has answered and the shortcuts have learned
            answer = await self._ask_store(
                settings,
                record,
                turn.plan,
                cost=cost,
                feature=feature,
                request_id=request_id,
                lease_id=lease_id,
                reservation_optional=reservation_optional,
                exact=exact,
            )
            if isinstance(answer, Decision):
                return answer  # the account is on a plan this sidecar does not know
            outcome, plan = answer.outcome, answer.plan
            decision = decision_from_outcome(
                outcome,
                plan=plan,
                customer_id=customer,
                cost=cost,
                feature=feature,
                top_up_url=settings.credits.top_up_url,
                key_policy=record.policy,
            )
            # A plan enforced for want of credits teaches nothing: the account is
            # still on its own plan, and a top-up must restore it at once.
            if plan is not None and not answer.credits_fallback:
                self.shortcuts.learn(turn, plan, outcome, decision)
        if outcome.top_up and outcome.code is not OutcomeCode.OK:
            # Refused at zero, nothing burned: a due top-up whose report may be lost, again.
            self._on_alert(TopUpDue(customer, outcome.plan, outcome.top_up, outcome.credits or 0))
        if outcome.code is not OutcomeCode.OK or plan is None:
            return decision
        self._used(api_key, record)
        return self._admitted(decision, plan, answer, cost=cost, route=route)

    def _leasable(
        self, plan: Plan, record: KeyRecord, request_id: str, reservation_optional: bool
    ) -> bool:
        """Whether plan's requests with this key may be admitted from allotments:
        not those that need Redis anyway (sidecar/allotments.py lists them)."""
        return (
            plan.enforcement == "leased"
            and not plan.concurrency
            and not record.policy.limited
            and (not request_id or reservation_optional)
        )

    def _from_allotment(
        self,
        record: KeyRecord,
        plan: Plan,
        cost: int,
        feature: str | None,
        *,
        renew: bool = True,
    ) -> Decision | None:
        """An admission from the account's allotment, or None (Redis decides).
        renew: leave the last of it, and ask Redis for the next one instead."""
        if feature is not None and feature not in plan.features:
            return None  # Redis words the denial
        if record.expires_at_us and time.time() * 1_000_000 >= record.expires_at_us:
            return None
        customer = record.customer_id
        allotment = self.allotments.take(customer, plan, cost, renew=renew)
        if allotment is None:
            return None
        # What this sidecar can tell: Redis's bucket and counter at the grant, with
        # the units it still holds. Nothing is reserved: the cost is the route's.
        return admitted_locally(
            plan,
            customer_id=customer,
            cost=cost,
            tokens=allotment.tokens + allotment.left,
            quota_used=allotment.quota_used - allotment.left,
            period_end=allotment.period_end,
            now=int(time.time()),
            credits=None if allotment.balance is None else allotment.balance + allotment.left,
        )

    async def _record(self, api_key: str) -> KeyRecord | Decision:
        """The key's record, or the refusal of a key that cannot be used."""
        if not api_key:
            return refuse(Reason.MISSING_KEY, "API key required: send it in the x-api-key header")
        # Only well-formed keys enter the key cache, so a hit needs no second check.
        hashed = keys.key_hash(api_key) if len(api_key) == keys.KEY_LEN else ""
        cached = self.key_cache.get(hashed) if hashed else None
        if cached is None:
            if not keys.is_well_formed(api_key):
                return refuse(Reason.INVALID_KEY, "API key is malformed; check it was copied whole")
            cached = (await self._lookup(hashed),)
        record = cached[0]
        if record is None:
            return refuse(Reason.INVALID_KEY, "API key is not recognised")
        if record.revoked and record.revoked_reason == SUBSCRIPTION_ENDED:
            return refuse(
                Reason.SUBSCRIPTION_INACTIVE,
                "Subscription has ended: subscribe again to restore access",
                customer_id=record.customer_id,
            )
        if record.revoked:
            return refuse(Reason.KEY_REVOKED, "API key was revoked", customer_id=record.customer_id)
        return record

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

    async def _ask_store(
        self,
        settings: Settings,
        record: KeyRecord,
        plan: Plan | None,
        *,
        cost: int,
        feature: str | None,
        request_id: str,
        lease_id: str,
        reservation_optional: bool = False,
        exact: bool = False,
    ) -> _Answer | Decision:
        """The script's answer, decided with the account's actual plan: a
        stale guess is retried with the plan the script names (a plan that is
        not configured is refused). A leased plan's admission may take an
        allotment for this sidecar too (others of the account wait for it),
        unless exact (the route keeps its requests exact)."""
        customer = record.customer_id
        lease, parent = "", ""
        asked = ""  # the allotment this request asks for, once it asks
        unanswered: Plan | None = None  # the plan an ask was sent under, until answered
        try:
            for _ in range(3):
                if plan is not None and plan.concurrency and not lease:
                    lease = lease_id or request_id or uuid.uuid4().hex
                leased = (
                    plan is not None
                    and not parent
                    and not exact
                    and self._leasable(plan, record, request_id, reservation_optional)
                )
                reserve = "" if leased else request_id
                allotment: tuple[str, int, int] = ("", 0, 0)
                if leased and plan is not None:
                    units = self.allotments.want(customer, plan)
                    if units and not asked and self.allotments.pending(customer) is None:
                        asked = self.allotments.asking(customer)  # others wait for it
                    if units and asked:
                        allotment = (asked, units, HELD_FOR)
                request = admission(
                    plan,
                    cost=cost,
                    feature_ok=feature is None or (plan is not None and feature in plan.features),
                    key_expires_at_us=record.expires_at_us,
                    fallback_plan=settings.billing.fallback_plan,
                    request_id=reserve,
                    reservation_ttl=settings.usage.reservation_ttl,
                    thresholds=settings.usage.thresholds,
                    lease_id=lease,
                    credits_parent=parent,
                    low_balance=settings.credits.low_balance,
                    top_up_at=settings.credits.auto_top_up_at,
                    key_policy=record.policy,
                    allotment=allotment,
                )
                key_id = record.key_id if record.policy.limited else ""
                unanswered = plan if allotment[0] else None
                outcome = await self._store.admit(customer, request, key_id=key_id)
                unanswered = None
                if outcome.code is not OutcomeCode.PLAN_CHANGED:
                    if asked and plan is not None:
                        self._granted(customer, plan, asked, outcome)
                        asked = ""
                    if leased and outcome.code is OutcomeCode.OK:
                        self.allotments.note(
                            customer, cost, quota_used=outcome.quota_used, balance=outcome.credits
                        )
                    return _Answer(
                        outcome, plan, lease, credits_fallback=bool(parent), reserved=reserve
                    )
                # The plan's balance is short and it falls back to another plan meanwhile:
                # that plan's limits, asked as this plan's fallback (no hint learned: the
                # account is still on its own plan, and a top-up restores it at once).
                fallback = plan is not None and outcome.plan == plan.credits_fallback
                parent = plan.name if plan is not None and fallback else ""
                plan = settings.catalog.plans.get(outcome.plan)
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
                if not parent:
                    # Learned now, not with the answer: requests arriving meanwhile guess it.
                    self.shortcuts.hints.learn(customer, plan.name)
            raise RuntimeError(f"plan of {customer} kept changing during the decision")
        except BaseException:
            if unanswered is not None:
                # No answer (a timeout, a cancelled request), but Redis may have granted
                # it all the same: hand it back, or its units stay out for HELD_FOR.
                self.allotments.abandon(customer, asked, unanswered)
            raise
        finally:
            if asked:
                self.allotments.answered(customer, None)  # none granted: the waiters go on

    def _granted(self, customer: str, plan: Plan, allotment_id: str, outcome: Outcome) -> None:
        """Keeps the allotment an admission granted (none: lets the waiters go on)."""
        granted = None
        if outcome.code is OutcomeCode.OK and outcome.allotted > 0:
            granted = Allotment(
                id=allotment_id,
                customer=customer,
                plan=plan,
                units=outcome.allotted,
                granted_at=outcome.now,
                # Spent within its period (and month): the quota counted it there.
                deadline=self.allotments.deadline(outcome.period_end - outcome.now - 1),
                tokens=outcome.tokens,
                quota_used=outcome.quota_used,
                period_end=outcome.period_end,
                balance=outcome.credits,
            )
            ALLOTMENTS.labels("granted").inc()
        self.allotments.answered(customer, granted)

    def _used(self, api_key: str, record: KeyRecord) -> None:
        """Notes that the key was used, for the next batch of last_used writes
        (run_last_use): at most one write a minute per key, none on the request's
        path, and one pipeline for all keys however many there are."""
        if not self._record_last_use:
            return
        now = self._clock()
        if now - self._touched.get(record.key_id, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()  # bounded: at worst, one more write per key
        self._touched[record.key_id] = now
        self._unwritten[keys.key_hash(api_key)] = int(time.time())

    async def write_last_use(self) -> int:
        """Writes the keys used since the last call; returns how many."""
        batch, self._unwritten = self._unwritten, {}
        if batch:
            with contextlib.suppress(TollwayError):  # Redis away: that minute is lost
                await self._store.touch_keys(batch)
        return len(batch)

    async def run_last_use(self, *, every: float = 5.0) -> None:
        """Writes last_used in batches until cancelled."""
        while True:
            await asyncio.sleep(every)
            await self.write_last_use()

    def _admitted(
        self,
        decision: Decision,
        plan: Plan,
        answer: _Answer,
        *,
        cost: int,
        route: Route | None,
    ) -> Decision:
        """An admission, told to whoever bills and alerts, and how it settles."""
        customer = decision.customer_id
        if plan.meter or answer.reserved:
            self._metered(customer)  # usage to bill, or a reservation to watch
        used = answer.outcome.quota_used
        for percent in answer.outcome.thresholds:  # the script reports each once per period
            self._on_alert(QuotaAlert(customer, plan.name, percent, used))
        balance = answer.outcome.credits
        for mark in answer.outcome.low_balance:  # and each mark once per fall past it
            self._on_alert(BalanceAlert(customer, plan.name, mark, balance or 0))
        if answer.outcome.top_up:
            self._on_alert(TopUpDue(customer, plan.name, answer.outcome.top_up, balance or 0))
        only_success = plan.bill_only_success
        if route is not None and route.bill_only_success is not None:
            only_success = route.bill_only_success
        return replace(
            decision,
            lease_id=answer.lease,
            cost=cost,
            reserved=answer.reserved,
            bill_only_success=only_success,
        )

    async def close(self) -> None:
        """Hands every allotment back and writes the last batch of last_used
        (before the store closes)."""
        self.allotments.drop_all()
        for _ in range(20):  # Redis refusing them: tried for about two seconds
            if not await self.return_allotments():
                break
            await asyncio.sleep(0.1)
        if self._unreturned:
            units = sum(a.used for a in self._unreturned)
            log.warning(
                "%d allotments not handed back (Redis unavailable): %d units admitted "
                "from them go unbilled; their units lapse in Redis after %d s",
                len(self._unreturned),
                units,
                HELD_FOR,
            )
        await self.write_last_use()

    async def return_allotments(self, *, retry: bool = True) -> int:
        """Hands back the allotments that are done (and, with retry, those Redis
        did not take before); returns how many are still waiting for Redis."""
        retried, kept = (self._unreturned, []) if retry else ([], self._unreturned)
        batch, self._unreturned = retried + self.allotments.due(), kept
        if not batch:
            return 0
        try:
            results = await asyncio.gather(
                *(self._store.return_allotment(_return_of(a)) for a in batch),
                return_exceptions=True,
            )
        except BaseException:  # cancelled (a shutdown): all go again, each applies once
            self._unreturned = batch + self._unreturned
            raise
        for allotment, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, TollwayError):
                    log.error("handing back an allotment failed: %r", result)
                self._unreturned.append(allotment)  # applied once, so retried safely
                ALLOTMENTS.labels("retried").inc()
                continue
            ALLOTMENTS.labels(result.state).inc()
            self.allotments.returned(allotment)
            if allotment.plan.meter and allotment.used:
                self._metered(allotment.customer)  # usage to bill
        return len(self._unreturned)

    async def run_returns(self) -> None:
        """Hands allotments back as they finish (and at least every 50 ms, for
        those aging out), until cancelled; retries what Redis refused every 0.5 s
        (so one account's failing shard does not hold the others' back)."""
        retry_at = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.allotments.woken.wait()
            retry = self._clock() >= retry_at
            if await self.return_allotments(retry=retry) and retry:
                retry_at = self._clock() + 0.5

    def forget(self, message: str) -> None:
        """Drops what is cached about the key or account an invalidation names."""
        kind, name = parse_invalidation(message)
        if kind == "key":
            self.key_cache.discard(name)
        elif kind == "account":
            self.shortcuts.forget(name)
            self.allotments.drop(name)  # its plan or status changed: hand it back now

    def forget_everything(self) -> None:
        """After missing invalidations (a lost connection), trust nothing cached."""
        self.key_cache.clear()
        self.shortcuts.forget_everything()
        self.allotments.drop_all()


def _return_of(allotment: Allotment) -> AllotmentReturn:
    plan = allotment.plan
    return AllotmentReturn(
        customer_id=allotment.customer,
        allotment_id=allotment.id,
        used=allotment.used,
        rate=plan.rate.per_second,
        burst=plan.burst,
        meter="" if plan.credits else plan.meter or "",  # (paid in advance: unbilled)
        granted_at=allotment.granted_at,
        period=plan.quota.period if plan.quota else "month",
        credits=plan.credits,
    )
