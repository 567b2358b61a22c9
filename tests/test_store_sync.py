"""The companion's half of the store against real Redis: subscription state
applied at most once per event, never locking a paying customer out, grace
counted from the first failure; the lock and the once-only key reveal."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.decision import OutcomeCode
from sidecar.errors import StoreUnavailable
from sidecar.plans import Plan, Quota, Rate
from sidecar.store import Store, SubscriptionChange
from sidecar.store.admission import admission
from sidecar.store.names import events_key
from tests.conftest import new_customer

GRACE = 3600


def apply(aio: asyncio.Runner, store: Store, customer: str, **fields: Any) -> SubscriptionChange:
    args: dict[str, Any] = {
        "event_id": "",
        "subscription_id": "sub_1",
        "status": "active",
        "plan": "basic",
        "error": "",
        "period_end": 0,
        "grace_seconds": GRACE,
        "trouble_since": 1_000,
    }
    args.update(fields)
    return aio.run(store.apply_subscription(customer, **args))


def test_an_event_is_applied_once(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    first = apply(aio, store, customer, event_id="evt_1", status="trialing")
    assert (first.result, first.old_status, first.new_status) == ("applied", "", "trialing")
    again = apply(aio, store, customer, event_id="evt_1", status="canceled")
    assert again.result == "duplicate"
    assert aio.run(store.require_account(customer)).status == "trialing"
    assert aio.run(store.event_seen(customer, "evt_1"))
    ttl = aio.run(store.redis.ttl(events_key(customer)))
    assert ttl > 3 * 86400  # longer than Stripe's retry window


def test_a_new_account_is_provisioned_from_stripe(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    apply(aio, store, customer, plan="pro", period_end=1_900_000_000)
    account = aio.run(store.require_account(customer))
    assert (account.plan, account.status, account.subscription_id) == ("pro", "active", "sub_1")
    assert account.period_end == 1_900_000_000 and account.created_at > 0


def test_an_unknown_price_keeps_the_plan_and_records_why(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    apply(aio, store, customer, plan="basic")
    change = apply(aio, store, customer, plan=None, error="price price_gold is in no plan")
    assert change.new_plan == "basic"
    account = aio.run(store.require_account(customer))
    assert account.plan == "basic" and account.error == "price price_gold is in no plan"
    apply(aio, store, customer, plan="pro")
    assert aio.run(store.require_account(customer)).error == ""


def test_an_ended_old_subscription_never_locks_out_a_paying_customer(
    aio: asyncio.Runner, store: Store
) -> None:
    customer = new_customer()
    apply(aio, store, customer, subscription_id="sub_new", status="active", plan="pro")
    stale = apply(aio, store, customer, subscription_id="sub_old", status="canceled")
    assert stale.result == "kept"
    account = aio.run(store.require_account(customer))
    assert (account.status, account.plan, account.subscription_id) == ("active", "pro", "sub_new")
    # The same subscription ending does end access.
    ended = apply(aio, store, customer, subscription_id="sub_new", status="canceled")
    assert ended.result == "applied" and ended.new_status == "canceled"


def test_grace_counts_from_the_earliest_failure_seen(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    late = apply(aio, store, customer, status="past_due", trouble_since=5_000)
    assert late.grace_until == 5_000 + GRACE
    earlier = apply(aio, store, customer, status="past_due", trouble_since=4_000)
    assert earlier.grace_until == 4_000 + GRACE
    later = apply(aio, store, customer, status="past_due", trouble_since=9_000)
    assert later.grace_until == 4_000 + GRACE
    paid = apply(aio, store, customer, status="active")
    assert paid.grace_until == 0
    next_episode = apply(aio, store, customer, status="past_due", trouble_since=20_000)
    assert next_episode.grace_until == 20_000 + GRACE


def test_the_account_lock_serializes_holders(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with store.account_lock(customer):
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    async def both() -> None:
        await asyncio.gather(hold("a"), hold("b"))

    aio.run(both())
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])

    async def stuck() -> None:
        async with store.account_lock(customer, ttl=5), store.account_lock(customer, wait=0.1):
            pass

    with pytest.raises(StoreUnavailable, match="stayed locked"):
        aio.run(stuck())


def test_a_checkout_reveals_one_key_only(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    assert aio.run(store.claim_checkout(customer, "cs_1", "key_a"))
    assert not aio.run(store.claim_checkout(customer, "cs_1", "key_b"))
    assert aio.run(store.claim_checkout(customer, "cs_2", "key_c"))


def test_revoke_all_keys_keeps_records_for_audit(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    aio.run(store.create_account(customer, "basic"))
    for _ in range(3):
        aio.run(store.issue_key(customer, environment="test"))
    assert aio.run(store.revoke_all_keys(customer)) == 3
    records = aio.run(store.list_keys(customer))
    assert len(records) == 3 and all(r.revoked for r in records)
    assert aio.run(store.revoke_all_keys(customer)) == 0


BASIC = Plan(name="basic", rate=Rate(100, 1), burst=100, quota=Quota(3, "day"))


def test_a_cost_that_can_never_fit_the_quota_is_not_retryable(
    aio: asyncio.Runner, store: Store
) -> None:
    customer = new_customer()
    aio.run(store.create_account(customer, "basic"))
    outcome = aio.run(
        store.admit(customer, admission(BASIC, cost=4, feature_ok=True, key_expires_at_us=0))
    )
    assert outcome.code is OutcomeCode.QUOTA_EXCEEDED and outcome.retry_ms == -1


def test_changing_the_quota_period_starts_a_fresh_count(aio: asyncio.Runner, store: Store) -> None:
    customer = new_customer()
    aio.run(store.create_account(customer, "basic"))
    monthly = Plan(name="basic", rate=Rate(100, 1), burst=100, quota=Quota(1000, "month"))
    for _ in range(5):
        aio.run(
            store.admit(customer, admission(monthly, cost=1, feature_ok=True, key_expires_at_us=0))
        )
    daily = aio.run(
        store.admit(customer, admission(BASIC, cost=1, feature_ok=True, key_expires_at_us=0))
    )
    assert daily.code is OutcomeCode.OK and daily.quota_used == 1
