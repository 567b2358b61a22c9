"""The decision core: what a request's outcome means, in words and numbers.

No I/O here. The store runs the atomic script and hands back an Outcome; this
module turns it (or an early refusal such as a malformed key) into a Decision
that both the gRPC Authorize answer and the Envoy Check answer are built from.

Subscription status → access (applied atomically in store/admit.lua):
    active, trialing              allowed
    past_due                      allowed until grace_until, then denied
    anything else                 denied (incomplete, incomplete_expired,
                                  unpaid, canceled, paused)
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from sidecar.key_policy import NO_POLICY, KeyPolicy
from sidecar.plans import Plan

__all__ = [
    "STATUSES",
    "Decision",
    "Outcome",
    "OutcomeCode",
    "QuotaState",
    "RateState",
    "Reason",
    "admitted_locally",
    "bucket_state",
    "decision_from_outcome",
    "rate_limited",
    "refuse",
]

STATUSES: Final = (
    "active",
    "trialing",
    "past_due",
    "incomplete",
    "incomplete_expired",
    "unpaid",
    "canceled",
    "paused",
)


class Reason(enum.Enum):
    OK = "ok"
    MISSING_KEY = "missing_key"
    INVALID_KEY = "invalid_key"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    SUBSCRIPTION_INACTIVE = "subscription_inactive"
    FEATURE_NOT_IN_PLAN = "feature_not_in_plan"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    CONCURRENCY_LIMITED = "concurrency_limited"
    CREDITS_EXHAUSTED = "credits_exhausted"
    KEY_SCOPE = "key_scope"
    KEY_USES_EXHAUSTED = "key_uses_exhausted"


class OutcomeCode(enum.IntEnum):
    """admit.lua's first return value."""

    OK = 0
    NO_ACCOUNT = 1
    PLAN_CHANGED = 2
    KEY_EXPIRED = 3
    INACTIVE = 4
    FEATURE = 5
    RATE_LIMITED = 6
    QUOTA_EXCEEDED = 7
    CONCURRENCY = 8
    CREDITS = 9
    KEY_USES = 10
    KEY_RATE_LIMITED = 11
    KEY_QUOTA_EXCEEDED = 12


@dataclass(frozen=True, slots=True)
class Outcome:
    """What admit.lua found, read by store.admission.parse_outcome."""

    code: OutcomeCode
    plan: str
    status: str
    tokens: float
    reset_ms: int
    retry_ms: int  # -1: waiting can never help
    quota_used: int
    period_end: int
    now: int  # the script's clock, Unix seconds
    thresholds: tuple[int, ...] = ()  # quota percentages first crossed by this request
    credits: int | None = None  # the prepaid balance after it (None: the plan has none)
    low_balance: tuple[int, ...] = ()  # low-balance marks this request reached
    top_up: str = ""  # the id of the fall past the auto top-up mark it made, if it did
    allotted: int = 0  # units granted in the allotment asked for, beyond the request's cost
    held: int = 0  # units sidecars hold in allotments: they may come back to bucket and quota
    shadow: OutcomeCode | None = None  # what a limit in shadow mode would have denied with


@dataclass(frozen=True, slots=True)
class RateState:
    limit: int
    remaining: int
    reset_seconds: int
    rate_per_second: float
    window_seconds: int  # time to refill a whole burst: the policy's window


@dataclass(frozen=True, slots=True)
class QuotaState:
    limit: int  # 0: no quota
    used: int
    remaining: int
    period_end: int
    reset_seconds: int
    window_seconds: int  # the period's length: the policy's window


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason
    message: str
    customer_id: str = ""
    plan: str = ""
    rate: RateState | None = None
    quota: QuotaState | None = None
    retry_after: int = 0
    lease_id: str = ""  # the concurrency lease this request holds, if any
    cost: int = 0  # units taken (an estimate when reserved)
    reserved: str = ""  # the request id the cost is reserved under, to settle later
    bill_only_success: bool = False  # a 5xx answer refunds the cost (settled by ext_proc)
    credits: int | None = None  # the prepaid balance left (None: the plan burns none)
    shadow: Reason | None = None  # allowed, though a limit in shadow mode would deny it so

    @property
    def deciding_limit(self) -> RateState | QuotaState | None:
        """The limit that decided: the one that denied, or the closest to denying."""
        if self.reason is Reason.QUOTA_EXCEEDED:
            return self.quota
        if self.reason is Reason.RATE_LIMITED or self.rate is None:
            return self.rate
        if self.quota and self.quota.limit and self.quota.remaining < self.rate.remaining:
            return self.quota
        return self.rate


def refuse(reason: Reason, message: str, *, customer_id: str = "", plan: str = "") -> Decision:
    """A denial decided before the limits were reached (key, account, feature)."""
    return Decision(
        allowed=False, reason=reason, message=message, customer_id=customer_id, plan=plan
    )


_INACTIVE_HELP: Final = {
    "past_due": "the last payment failed and the grace period is over; "
    "update the payment method to restore access",
    "unpaid": "invoices are unpaid; pay them to restore access",
    "canceled": "the subscription was cancelled; subscribe again to restore access",
    "paused": "the subscription is paused; resume it to restore access",
    "incomplete": "the first payment has not completed; finish checkout to get access",
    "incomplete_expired": "the first payment was never completed; subscribe again",
}


@functools.lru_cache(maxsize=64)  # one period end per month: the same few, every request
def _period_seconds(period: str, period_end: int) -> int:
    if period == "hour":
        return 3600
    if period == "day":
        return 86400
    end = datetime.fromtimestamp(period_end, UTC)
    start = (end - timedelta(days=1)).replace(day=1, hour=0, minute=0, second=0)
    return int((end - start).total_seconds())


def bucket_state(plan: Plan, tokens: float, reset_ms: float) -> RateState:
    """The plan's token bucket holding `tokens`, full again in reset_ms."""
    return RateState(
        limit=plan.burst,
        remaining=max(0, math.floor(tokens + 1e-9)),
        reset_seconds=max(0, math.ceil(reset_ms / 1000)),
        rate_per_second=plan.rate.per_second,
        window_seconds=max(1, math.ceil(plan.burst / plan.rate.per_second)),
    )


def rate_limited(
    plan: Plan,
    *,
    customer_id: str,
    cost: int,
    rate: RateState,
    retry_ms: float,
    quota: QuotaState | None = None,
) -> Decision:
    """An empty bucket's denial; retry_ms < 0: waiting can never help (cost > burst)."""
    if retry_ms < 0:
        message = f"Request cost {cost} exceeds plan {plan.name}'s burst of {plan.burst}"
        retry_after = 0
    else:
        message = f"Rate limit exceeded for plan {plan.name}: {plan.rate}"
        retry_after = max(1, math.ceil(retry_ms / 1000))
    return Decision(
        False, Reason.RATE_LIMITED, message, customer_id, plan.name, rate, quota, retry_after
    )


def _limits(plan: Plan, outcome: Outcome) -> tuple[RateState, QuotaState]:
    rate = bucket_state(plan, outcome.tokens, outcome.reset_ms)
    limit = plan.quota.limit if plan.quota else 0
    quota = QuotaState(
        limit=limit,
        used=outcome.quota_used,
        remaining=max(0, limit - outcome.quota_used) if limit else 0,
        period_end=outcome.period_end,
        reset_seconds=max(0, outcome.period_end - outcome.now),
        window_seconds=_period_seconds(plan.quota.period, outcome.period_end) if plan.quota else 0,
    )
    return rate, quota


def admitted_locally(
    plan: Plan,
    *,
    customer_id: str,
    cost: int,
    tokens: float,
    quota_used: int,
    period_end: int,
    now: int,
    credits: int | None = None,
) -> Decision:
    """An admission decided without Redis (from an allotment, sidecar/allotments.py),
    its limits as the sidecar can tell them: the bucket at `tokens`, the counter at
    quota_used, a credits plan's balance at `credits`."""
    reset_ms = max(0.0, plan.burst - tokens) * 1000 / plan.rate.per_second
    seen = Outcome(
        OutcomeCode.OK, plan.name, "", tokens, int(reset_ms), 0, quota_used, period_end, now
    )
    rate, quota = _limits(plan, seen)
    return Decision(
        True, Reason.OK, "OK", customer_id, plan.name, rate, quota, cost=cost, credits=credits
    )


# The limits shadow mode applies to, by the code they would have denied with.
_SHADOW_REASONS: Final[dict[OutcomeCode, Reason]] = {
    OutcomeCode.RATE_LIMITED: Reason.RATE_LIMITED,
    OutcomeCode.QUOTA_EXCEEDED: Reason.QUOTA_EXCEEDED,
    OutcomeCode.CONCURRENCY: Reason.CONCURRENCY_LIMITED,
}


def decision_from_outcome(
    outcome: Outcome,
    *,
    plan: Plan | None,
    customer_id: str,
    cost: int,
    feature: str | None,
    top_up_url: str = "",
    key_policy: KeyPolicy = NO_POLICY,
) -> Decision:
    """Reads an outcome of a script run with plan's limits (None: no plan known yet);
    a denial for want of credits points to top_up_url when there is one; one by
    the key's own limits describes key_policy's."""
    code = outcome.code
    if code is OutcomeCode.NO_ACCOUNT:
        return refuse(Reason.INVALID_KEY, "API key belongs to no account", customer_id=customer_id)
    if code is OutcomeCode.KEY_EXPIRED:
        return refuse(
            Reason.KEY_EXPIRED, "API key has expired; issue a new key", customer_id=customer_id
        )
    if code is OutcomeCode.INACTIVE:  # decided before the plan is compared
        help_text = _INACTIVE_HELP.get(outcome.status, "contact support")
        return refuse(
            Reason.SUBSCRIPTION_INACTIVE,
            f"Subscription is {outcome.status or 'missing'}: {help_text}",
            customer_id=customer_id,
            plan=outcome.plan,
        )
    if code is OutcomeCode.PLAN_CHANGED or plan is None:
        raise ValueError("a plan change must be retried with the new plan's limits")
    who = {"customer_id": customer_id, "plan": plan.name}
    if code is OutcomeCode.OK:
        rate, quota = _limits(plan, outcome)
        shadow = _SHADOW_REASONS.get(outcome.shadow) if outcome.shadow else None
        return Decision(
            True,
            Reason.OK,
            "OK",
            customer_id,
            plan.name,
            rate,
            quota,
            credits=outcome.credits,
            shadow=shadow,
        )
    if code is OutcomeCode.FEATURE:
        return refuse(
            Reason.FEATURE_NOT_IN_PLAN,
            f"Feature {(feature or '')[:64]!r} is not in plan {plan.name}; upgrade to use it",
            **who,
        )
    if code is OutcomeCode.KEY_USES:
        return refuse(
            Reason.KEY_USES_EXHAUSTED,
            f"API key has answered all {key_policy.uses} requests it was issued for; "
            "use another key",
            **who,
        )
    if code in (OutcomeCode.KEY_RATE_LIMITED, OutcomeCode.KEY_QUOTA_EXCEEDED):
        return _key_limited(outcome, plan, key_policy, customer_id=customer_id, cost=cost)
    rate, quota = _limits(plan, outcome)
    if code is OutcomeCode.CREDITS:
        where = f" at {top_up_url}" if top_up_url else ""
        # (a leased plan's credits paid for allotments and unused come back in a second)
        held = outcome.retry_ms > 0
        return Decision(
            False,
            Reason.CREDITS_EXHAUSTED,
            f"Prepaid credits exhausted: this request costs {cost} and the balance is "
            f"{outcome.credits or 0}; "
            + (
                "some are held for requests in flight and may come back: retry in a second, or "
                if held
                else ""
            )
            + f"top up{where} to continue",
            customer_id,
            plan.name,
            rate,
            quota,
            retry_after=1 if held else 0,
            credits=outcome.credits,
        )
    if code is OutcomeCode.RATE_LIMITED:
        return rate_limited(
            plan,
            customer_id=customer_id,
            cost=cost,
            rate=rate,
            retry_ms=outcome.retry_ms,
            quota=quota,
        )
    if code is OutcomeCode.CONCURRENCY:
        return Decision(
            False,
            Reason.CONCURRENCY_LIMITED,
            f"Too many requests in flight for plan {plan.name}: at most {plan.concurrency} "
            "at once; retry when one finishes",
            customer_id,
            plan.name,
            rate,
            quota,
            retry_after=max(1, math.ceil(outcome.retry_ms / 1000)),
        )
    assert plan.quota is not None  # the script reports code 7 only for a quota
    if outcome.retry_ms < 0:
        return Decision(
            False,
            Reason.QUOTA_EXCEEDED,
            f"Request cost {cost} can never fit plan {plan.name}'s limits "
            f"(quota {plan.quota}, burst {plan.burst})",
            customer_id,
            plan.name,
            rate,
            quota,
        )
    return Decision(
        False,
        Reason.QUOTA_EXCEEDED,
        f"Quota exceeded for plan {plan.name}: {plan.quota}; resets at the period's end",
        customer_id,
        plan.name,
        rate,
        quota,
        retry_after=max(1, quota.reset_seconds),
    )


def _key_limited(
    outcome: Outcome, plan: Plan, policy: KeyPolicy, *, customer_id: str, cost: int
) -> Decision:
    """A denial by the key's own bucket or quota, in the key's numbers."""
    view = policy.plan_view(plan)
    rate, quota = _limits(view, outcome)
    if outcome.code is OutcomeCode.KEY_RATE_LIMITED:
        denied = rate_limited(
            view, customer_id=customer_id, cost=cost, rate=rate, retry_ms=outcome.retry_ms
        )
        return replace(denied, message=denied.message.replace(f"plan {plan.name}", "this key"))
    limit = policy.quota
    assert limit is not None  # the script reports code 12 only for a key's quota
    return Decision(
        False,
        Reason.QUOTA_EXCEEDED,
        f"Quota exceeded for this key: {limit}; resets at the period's end",
        customer_id,
        plan.name,
        None,
        quota,
        retry_after=max(1, quota.reset_seconds) if outcome.retry_ms >= 0 else 0,
    )
