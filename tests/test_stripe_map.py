"""Stripe objects → account state, without I/O: what each event is about, and
what a subscription grants, across API versions."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.plans import parse_catalog
from webhook.stripe_map import SubscriptionState, event_ref, preferred, subscription_state

CATALOG = parse_catalog(
    {
        "plans": [
            {"name": "basic", "rate": "1/s", "stripe_price": "price_basic"},
            {"name": "pro", "rate": "1/s", "stripe_lookup_key": "pro_monthly"},
        ]
    }
)


def subscription(**overrides: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_1",
        "status": "active",
        "created": 1_700_000_000,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "price": {"id": "price_basic", "lookup_key": None},
                    "current_period_end": 1_702_000_000,
                }
            ],
        },
    }
    sub.update(overrides)
    return sub


def test_plan_comes_from_the_items_price_id() -> None:
    state = subscription_state(subscription(), CATALOG)
    assert state == SubscriptionState(
        "cus_1", "sub_1", "active", "basic", "price_basic", 1_702_000_000, 1_700_000_000
    )
    assert state.error == ""


def test_plan_comes_from_a_lookup_key_and_expanded_customers_work() -> None:
    item = {"id": "si_1", "price": {"id": "price_x", "lookup_key": "pro_monthly"}}
    sub = subscription(customer={"id": "cus_9", "object": "customer"}, items={"data": [item]})
    state = subscription_state(sub, CATALOG)
    assert (state.customer_id, state.plan) == ("cus_9", "pro")


def test_old_api_versions_carry_the_plan_and_the_period_on_the_subscription() -> None:
    item = {"id": "si_1", "plan": {"id": "price_basic", "object": "plan"}}
    sub = subscription(items={"data": [item]}, current_period_end=1_705_000_000)
    state = subscription_state(sub, CATALOG)
    assert (state.plan, state.period_end) == ("basic", 1_705_000_000)


def test_an_unknown_price_is_named_in_the_error() -> None:
    item = {"id": "si_1", "price": {"id": "price_gold"}}
    state = subscription_state(subscription(items={"data": [item]}), CATALOG)
    assert state.plan is None
    assert state.error == "price price_gold is in no configured plan"


@pytest.mark.parametrize(
    "bad",
    [
        {"object": "invoice"},
        {"customer": None},
        {"status": "sleeping"},
        {"id": "sub_{1}"},
    ],
)
def test_what_is_not_a_subscription_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        subscription_state(subscription(**bad), CATALOG)


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": "evt_1", "type": kind, "created": 1, "data": {"object": obj}}


def test_each_handled_event_names_its_account_and_subscription() -> None:
    checkout = event(
        "checkout.session.completed",
        {"customer": "cus_1", "subscription": "sub_1", "metadata": {"tollway_plan": "pro"}},
    )
    ref = event_ref(checkout)
    assert ref is not None and (ref.customer_id, ref.subscription_id) == ("cus_1", "sub_1")
    assert ref.plan_hint == "pro"
    for kind in ("created", "updated", "deleted", "paused", "resumed", "trial_will_end"):
        ref = event_ref(event(f"customer.subscription.{kind}", subscription()))
        assert ref is not None and ref.subscription_id == "sub_1"
    new_invoice = {
        "customer": "cus_1",
        "parent": {"subscription_details": {"subscription": "sub_2"}},
    }
    old_invoice = {"customer": "cus_1", "subscription": "sub_3"}
    for kind in ("invoice.paid", "invoice.payment_failed"):
        assert event_ref(event(kind, new_invoice)).subscription_id == "sub_2"  # type: ignore[union-attr]
        assert event_ref(event(kind, old_invoice)).subscription_id == "sub_3"  # type: ignore[union-attr]


def test_every_invoice_or_subscription_event_naming_a_subscription_re_syncs_it() -> None:
    # An endpoint may deliver invoice.payment_succeeded and not invoice.paid: a paid
    # invoice must restore access whichever event says so.
    invoice = {"customer": "cus_1", "parent": {"subscription_details": {"subscription": "sub_2"}}}
    for kind in ("invoice.payment_succeeded", "invoice.updated", "invoice.finalized"):
        ref = event_ref(event(kind, invoice))
        assert ref is not None and (ref.customer_id, ref.subscription_id) == ("cus_1", "sub_2")
    for kind in ("pending_update_applied", "pending_update_expired"):
        ref = event_ref(event(f"customer.subscription.{kind}", subscription()))
        assert ref is not None and ref.subscription_id == "sub_1"
    one_off = event_ref(event("invoice.payment_succeeded", {"customer": "cus_1"}))
    assert one_off is not None and one_off.subscription_id is None  # nothing to re-sync


def test_events_tollway_does_not_act_on_are_ignored() -> None:
    assert event_ref(event("charge.succeeded", {"customer": "cus_1"})) is None
    assert event_ref(event("invoice.paid", {"customer": None})) is None
    assert event_ref({"type": "invoice.paid"}) is None


def test_a_live_subscription_decides_over_an_ended_one() -> None:
    def state(sub: str, status: str, created: int) -> SubscriptionState:
        return SubscriptionState("cus_1", sub, status, "basic", "price_basic", 0, created)

    old_active = state("sub_old", "active", 1)
    new_canceled = state("sub_new", "canceled", 2)
    assert preferred([new_canceled, old_active]) is old_active
    newer_active = state("sub_newer", "trialing", 3)
    assert preferred([old_active, new_canceled, newer_active]) is newer_active
    assert preferred([]) is None
