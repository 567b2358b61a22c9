"""The decision core, without I/O: what each script outcome means to a customer."""

from __future__ import annotations

import pytest

from sidecar.decision import (
    Outcome,
    OutcomeCode,
    QuotaState,
    RateState,
    Reason,
    admitted_locally,
    decision_from_outcome,
)
from sidecar.plans import Plan, Quota, Rate

FREE = Plan(name="free", rate=Rate(10, 1), burst=20, quota=Quota(1000, "month"))
PERIOD_END = 1_801_440_000  # 2027-02-01T00:00Z, end of a 31-day month
NOW = PERIOD_END - 3600


def outcome(code: OutcomeCode, **fields: object) -> Outcome:
    base: dict[str, object] = {
        "code": code,
        "plan": "free",
        "status": "active",
        "tokens": 19.0,
        "reset_ms": 100,
        "retry_ms": 0,
        "quota_used": 1,
        "period_end": PERIOD_END,
        "now": NOW,
    }
    base.update(fields)
    return Outcome(**base)  # type: ignore[arg-type]


def decide(result: Outcome, cost: int = 1, feature: str | None = None):  # type: ignore[no-untyped-def]
    return decision_from_outcome(result, plan=FREE, customer_id="cus_1", cost=cost, feature=feature)


def test_allowed_decision_reports_both_limits() -> None:
    decision = decide(outcome(OutcomeCode.OK))
    assert decision.allowed and decision.reason is Reason.OK
    assert (decision.customer_id, decision.plan) == ("cus_1", "free")
    assert decision.rate == RateState(20, 19, 1, 10.0, 2)
    assert decision.quota == QuotaState(1000, 1, 999, PERIOD_END, 3600, 31 * 86400)
    assert decision.retry_after == 0


def test_rate_denial_says_plan_and_limit_and_when_to_retry() -> None:
    decision = decide(outcome(OutcomeCode.RATE_LIMITED, tokens=0.2, retry_ms=80))
    assert not decision.allowed and decision.reason is Reason.RATE_LIMITED
    assert decision.message == "Rate limit exceeded for plan free: 10 requests/s"
    assert decision.retry_after == 1  # rounded up, never 0 for a retryable denial
    assert decision.deciding_limit is decision.rate


def test_a_cost_above_the_burst_is_not_retryable() -> None:
    decision = decide(outcome(OutcomeCode.RATE_LIMITED, retry_ms=-1), cost=50)
    assert decision.reason is Reason.RATE_LIMITED and decision.retry_after == 0
    assert "cost 50 exceeds plan free's burst of 20" in decision.message


def test_quota_denial_retries_at_the_period_end() -> None:
    decision = decide(outcome(OutcomeCode.QUOTA_EXCEEDED, quota_used=1000))
    assert decision.reason is Reason.QUOTA_EXCEEDED
    assert decision.retry_after == 3600
    assert decision.quota is not None and decision.quota.remaining == 0
    assert decision.deciding_limit is decision.quota
    assert "Quota exceeded for plan free: 1000 per month" in decision.message


def test_an_allowed_decision_reports_the_quota_when_it_is_closer_to_denying() -> None:
    decision = decide(outcome(OutcomeCode.OK, quota_used=995))
    assert decision.deciding_limit is decision.quota
    fresh = decide(outcome(OutcomeCode.OK))
    assert fresh.deciding_limit is fresh.rate


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        ("canceled", "subscribe again"),
        ("past_due", "update the payment method"),
        ("unpaid", "pay them"),
        ("paused", "resume it"),
        ("incomplete", "finish checkout"),
    ],
)
def test_inactive_subscriptions_say_why_and_what_to_do(status: str, hint: str) -> None:
    decision = decide(outcome(OutcomeCode.INACTIVE, status=status))
    assert decision.reason is Reason.SUBSCRIPTION_INACTIVE
    assert f"Subscription is {status}" in decision.message and hint in decision.message


def test_key_and_feature_outcomes() -> None:
    assert decide(outcome(OutcomeCode.KEY_EXPIRED)).reason is Reason.KEY_EXPIRED
    assert decide(outcome(OutcomeCode.NO_ACCOUNT)).reason is Reason.INVALID_KEY
    feature = decide(outcome(OutcomeCode.FEATURE), feature="export")
    assert feature.reason is Reason.FEATURE_NOT_IN_PLAN
    assert "'export' is not in plan free" in feature.message


def test_a_stale_plan_is_never_turned_into_a_decision() -> None:
    with pytest.raises(ValueError, match="retried"):
        decide(outcome(OutcomeCode.PLAN_CHANGED, plan="pro"))


def test_an_admission_from_an_allotment_reports_limits_as_redis_would() -> None:
    end = 1_901_232_000  # 2030-04-01: March's quota period ends
    local = admitted_locally(
        FREE, customer_id="cus_1", cost=2, tokens=5.0, quota_used=400, period_end=end, now=end - 60
    )
    assert local.allowed and local.cost == 2 and local.plan == "free"
    assert local.rate is not None and local.quota is not None
    assert (local.rate.remaining, local.rate.reset_seconds) == (5, 2)  # 15 tokens at 10/s
    assert (local.quota.remaining, local.quota.reset_seconds) == (600, 60)
    assert local.quota.window_seconds == 31 * 86400
