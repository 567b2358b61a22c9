"""Auto top-up, end to end: a burn (or a settlement) takes a prepaid balance to
its mark, a sidecar queues the fall, a companion charges the saved card
off-session and grants the pack, once per fall. Real companions and sidecars on
the test Valkey, the real stripe SDK against tests/fakestripe.py; a small HTTP
server is notify_url."""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.plans import parse_catalog
from sidecar.store import Store, connect
from sidecar.store.admission import admission
from tests.conftest import COMPANION_CONFIG, STRIPE_SECRET, TEST_CONFIG, Stack, with_store
from tests.fakestripe import FakeStripe, make_event
from tests.test_two_companions import Inbox

MARK = 3
PREPAID = parse_catalog(tomllib.loads(TEST_CONFIG)).plans["prepaid"]
# A plan with an auto top-up of its own: at 20 it buys "monthly" (1000 credits).
OWN_PLAN = """
[[plans]]
name = "prepaid_own"
rate = "100/s"
burst = 100
credits = true
auto_top_up_at = 20
auto_top_up_pack = "monthly"
"""


@pytest.fixture(scope="module")
def inbox() -> Iterator[Inbox]:
    box = Inbox()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def companions(
    stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe, inbox: Inbox
) -> tuple[Stack, Stack]:
    """Two companions (each beside a sidecar) that top up at 3 credits with "starter"."""
    fake_stripe.add_price(
        "price_pack_starter", product="prod_pack", recurring=False, unit_amount=500
    )
    fake_stripe.add_price(
        "price_pack_monthly", product="prod_pack", recurring=False, unit_amount=9000
    )
    line = 'top_up_url = "https://api.example.com/pricing"\n'
    config = COMPANION_CONFIG.replace(
        line, f'{line}auto_top_up_at = {MARK}\nauto_top_up_pack = "starter"\n', 1
    ).replace(
        "[stripe]\n",
        f'[stripe]\nnotify_url = "{inbox.url}"\nnotify_reclaim_after = "2s"\n',
        1,
    )
    assert config.count("auto_top_up_pack") == 1 and inbox.url in config
    config += OWN_PLAN
    return stack_factory(config), stack_factory(config)


def prepaid_customer(
    redis_url: str, fake: FakeStripe, *, credits: int, card: bool = True, plan: str = "prepaid"
) -> tuple[str, str]:
    """A prepaid account with `credits` granted (if any), a saved card as the customer's
    invoice default (or none), and a key."""
    customer = fake.create_customer("topup@example.com")
    if card:
        fake.attach_payment_method(customer)

    async def create(store: Store) -> str:
        await store.create_account(customer, plan, "active")
        if credits:
            await store.grant_credits(customer, grant_id=f"welcome-{customer}", credits=credits)
        key, _ = await store.issue_key(customer, environment="test")
        return key

    return customer, with_store(redis_url, create)


def burn(redis_url: str, customer: str, cost: int) -> str:
    """One decision as a sidecar makes it, and its auto_top_up_due queued the way the
    sidecar queues it (sidecar/quota_alerts.py); returns the fall's crossing ("")."""

    async def decide(store: Store) -> str:
        request = admission(
            PREPAID, cost=cost, feature_ok=True, key_expires_at_us=0, top_up_at=MARK
        )
        outcome = await store.admit(customer, request)
        if outcome.top_up:
            await queue_due(store, customer, outcome.top_up, outcome.credits or 0)
        return outcome.top_up

    return str(with_store(redis_url, decide))


async def queue_due(store: Store, customer: str, crossing: str, balance: int) -> None:
    payload = {
        "type": "auto_top_up_due",
        "customer_id": customer,
        "plan": "prepaid",
        "crossing": crossing,
        "balance": balance,
    }
    await store.notify(payload)


def balance(redis_url: str, customer: str) -> int:
    async def read(store: Store) -> int:
        return (await store.credit_balance(customer)).balance

    return int(with_store(redis_url, read))


def top_ups(fake: FakeStripe, customer: str) -> list[dict[str, Any]]:
    return [p for p in fake.payment_intents(customer) if "tollway_crossing" in p["metadata"]]


def wait_for(check: Callable[[], object], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "did not happen in time"
        time.sleep(0.05)


def test_a_real_burn_past_the_mark_buys_the_pack_with_the_saved_card(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    stack, _ = companions
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    for _ in range(3):  # through the sidecar: 5 -> 2 credits, past the mark at 3
        assert stack.authorize(key).allowed
    wait_for(lambda: balance(redis_url, customer) == 12, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["status"] == "succeeded" and charge["amount"] == 500
    assert (
        charge["payment_method"]
        == fake_stripe.customer(customer)["invoice_settings"]["default_payment_method"]
    )
    crossing = charge["metadata"]["tollway_crossing"]
    assert charge["metadata"] == {
        "tollway_pack": "starter",
        "tollway_credits": "10",
        "tollway_crossing": crossing,
    }
    (call,) = [
        c
        for c in fake_stripe.calls("POST", "/v1/payment_intents")
        if c.params.get("customer") == customer
    ]
    assert call.params["off_session"] == "true" and call.params["confirm"] == "true"
    assert call.idempotency_key == f"tollway-top-up-{customer}-{crossing}"
    (told,) = inbox.about(customer, "auto_top_up_succeeded")
    assert (told["credits"], told["balance"], told["payment_intent"]) == (10, 12, charge["id"])
    assert told["notification_id"] == f"auto_top_up:{crossing}"


def test_one_charge_per_fall_across_two_companions_and_redeliveries(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    crossing = burn(redis_url, customer, 3)
    assert crossing

    async def again(store: Store) -> None:  # the same fall, queued twice more
        for _ in range(2):
            await queue_due(store, customer, crossing, 2)

    with_store(redis_url, again)
    wait_for(lambda: balance(redis_url, customer) == 12, 10)
    (charge,) = top_ups(fake_stripe, customer)
    for stack in companions:  # Stripe's own news of the charge: already granted
        event = make_event("payment_intent.succeeded", charge)
        assert stack.deliver(event).json()["result"] == "duplicate"
    assert len(inbox.about(customer, "auto_top_up_succeeded")) == 1
    assert balance(redis_url, customer) == 12 and len(top_ups(fake_stripe, customer)) == 1


def test_a_charge_whose_answer_was_lost_is_granted_once_on_the_retry(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    # Stripe charges, then the connection drops: as if the companion died after the
    # charge and before the grant. The entry is taken over; the idempotency key
    # gives back the same PaymentIntent.
    fake_stripe.accept_then_drop_next(1, path_prefix="/v1/payment_intents")
    burn(redis_url, customer, 3)
    wait_for(lambda: balance(redis_url, customer) == 12, 15)
    assert len(top_ups(fake_stripe, customer)) == 1
    assert len(inbox.about(customer, "auto_top_up_succeeded")) == 1


def test_a_declined_card_is_notified_once_and_never_retried(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    fake_stripe.decline_payment_methods_of(customer)
    crossing = burn(redis_url, customer, 3)

    async def again(store: Store) -> None:
        await queue_due(store, customer, crossing, 2)

    with_store(redis_url, again)
    wait_for(lambda: inbox.about(customer, "auto_top_up_failed"), 10)
    assert burn(redis_url, customer, 1) == "", "no new fall before a grant"
    (failed,) = inbox.about(customer, "auto_top_up_failed")
    assert (failed["reason"], failed["decline_code"], failed["pack"]) == (
        "card_declined",
        "insufficient_funds",
        "starter",
    )
    assert "pm_" not in json.dumps(failed) and "card" not in set(failed) - {"reason"}
    assert len(top_ups(fake_stripe, customer)) == 1  # the declined one, not retried
    assert balance(redis_url, customer) == 1


def test_no_saved_card_is_notified_once(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2, card=False)
    burn(redis_url, customer, 3)
    wait_for(lambda: inbox.about(customer, "auto_top_up_failed"), 10)
    (failed,) = inbox.about(customer, "auto_top_up_failed")
    assert failed["reason"] == "no_payment_method" and not top_ups(fake_stripe, customer)


def test_a_customer_who_turned_it_off_is_never_charged(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    stack, _ = companions
    url = f"{stack.companion}/credits/auto-top-up"
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    shown = httpx.get(url, headers={"x-api-key": key}, timeout=10).json()
    assert (shown["enabled"], shown["at"], shown["pack"]) == (True, MARK, "starter")
    assert httpx.post(url, json={"enabled": False}, timeout=10).status_code == 401
    bad = httpx.post(url, headers={"x-api-key": "tw_test_nope"}, json={"enabled": False})
    assert bad.status_code == 401

    # The fall happens while it is on; the customer turns it off before it is served.
    async def fall(store: Store) -> str:
        request = admission(PREPAID, cost=3, feature_ok=True, key_expires_at_us=0, top_up_at=MARK)
        return (await store.admit(customer, request)).top_up

    crossing = with_store(redis_url, fall)
    assert crossing
    off = httpx.post(url, headers={"x-api-key": key}, json={"enabled": False}, timeout=10)
    assert off.status_code == 200 and off.json()["enabled"] is False

    async def queue(store: Store) -> None:  # the sidecar's notice arrives after the change
        await queue_due(store, customer, crossing, 2)

    with_store(redis_url, queue)
    inbox.about(customer, "auto_top_up_succeeded")  # the relay has had its chance
    assert not top_ups(fake_stripe, customer) and balance(redis_url, customer) == 2

    on = httpx.post(url, headers={"x-api-key": key}, json={"enabled": True, "at": 50}, timeout=10)
    assert (on.json()["enabled"], on.json()["at"]) == (True, 50)
    wrong = httpx.post(url, headers={"x-api-key": key}, json={"enabled": True, "at": -1})
    assert wrong.status_code == 400 and wrong.json()["code"] == "bad_setting"


# -- the card Stripe keeps ------------------------------------------------------------


def stripe_checkout(fake: FakeStripe, **params: str) -> dict[str, Any]:
    """A Checkout Session created on the fake over its API, then paid (as the customer
    paying it on Stripe's page); the completed session."""
    form = {"success_url": "https://example.com/ok?session_id={CHECKOUT_SESSION_ID}", **params}
    created = httpx.post(
        f"{fake.url}/v1/checkout/sessions",
        data=form,
        headers={"authorization": f"Bearer {STRIPE_SECRET}"},
        timeout=10,
    )
    assert created.status_code == 200, created.text
    return fake.complete_checkout(created.json()["id"])


def test_a_card_saved_by_a_packs_checkout_is_charged_though_stripe_only_attached_it(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, _ = companions
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=0, card=False)
    bought = httpx.post(
        f"{stack.companion}/checkout", json={"pack": "starter", "customer": customer}, timeout=10
    )
    assert bought.status_code == 200, bought.text
    session = fake_stripe.complete_checkout(bought.json()["id"])
    assert stack.deliver(make_event("checkout.session.completed", session)).status_code == 200
    paid_with = fake_stripe.payment_intent(session["payment_intent"])["payment_method"]
    assert fake_stripe.customer(customer)["invoice_settings"]["default_payment_method"] is None
    assert balance(redis_url, customer) == 10
    for _ in range(7):  # 10 -> 3: the mark
        assert stack.authorize(key).allowed
    wait_for(lambda: balance(redis_url, customer) == 13, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["payment_method"] == paid_with and charge["status"] == "succeeded"


def test_a_card_saved_by_a_subscriptions_checkout_is_charged(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2, card=False)
    session = stripe_checkout(
        fake_stripe,
        mode="subscription",
        customer=customer,
        **{"line_items[0][price]": "price_basic", "line_items[0][quantity]": "1"},
    )
    card = fake_stripe.subscription(session["subscription"])["default_payment_method"]
    assert card and fake_stripe.payment_method(card)["customer"] == customer
    fake_stripe.attach_payment_method(customer, default=False)  # newer, but not a default
    burn(redis_url, customer, 3)
    wait_for(lambda: balance(redis_url, customer) == 12, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["payment_method"] == card


def test_the_customers_invoice_default_card_is_charged_first(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 2)
    default = fake_stripe.customer(customer)["invoice_settings"]["default_payment_method"]
    fake_stripe.attach_payment_method(customer, default=False)  # newer, attached only
    burn(redis_url, customer, 3)
    wait_for(lambda: balance(redis_url, customer) == 12, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["payment_method"] == default


# -- settlements, lost reports, grants that leave the balance low -----------------------


def settle(stack: Stack, key: str, request_id: str, cost: int) -> None:
    """RecordUsage settling the request Authorize reserved under request_id at its real cost."""
    request = pb.RecordUsageRequest(
        api_key=key,
        meter="api_calls",
        quantity=cost,
        idempotency_key=f"settle:{request_id}",
        request_id=request_id,
    )
    assert not stack.stub.RecordUsage(request, timeout=5).duplicate


def test_a_settled_cost_past_the_mark_buys_one_pack_and_notifies_the_low_balance_once(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    stack, _ = companions
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=8)
    assert stack.authorize(key, request_id="req-1").allowed  # the estimate, 1: 7 left
    settle(stack, key, "req-1", 5)  # it cost 5: 4 more burn, 7 -> 3, past 5 and the mark
    wait_for(lambda: balance(redis_url, customer) == 13, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["status"] == "succeeded" and charge["metadata"]["tollway_pack"] == "starter"
    (low,) = inbox.about(customer, "low_balance")
    assert (low["mark"], low["balance"], low["plan"]) == (5, 3, "prepaid")
    assert len(inbox.about(customer, "auto_top_up_succeeded")) == 1


def test_a_top_up_whose_report_was_lost_is_reported_again_and_charged_once(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    customer, _ = prepaid_customer(redis_url, fake_stripe, credits=MARK + 3)
    now_us = [time.time_ns() // 1000]

    async def decide(cost: int) -> str:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=lambda: now_us[0])
        try:
            request = admission(
                PREPAID, cost=cost, feature_ok=True, key_expires_at_us=0, top_up_at=MARK
            )
            return (await store.admit(customer, request)).top_up
        finally:
            await store.close()

    crossing = asyncio.run(decide(3))  # 6 -> 3: the fall, whose report is lost
    assert crossing
    inbox.about(customer, "auto_top_up_succeeded")  # the relay has had its chance
    assert not top_ups(fake_stripe, customer) and balance(redis_url, customer) == MARK
    now_us[0] += 61_000_000  # a minute later, the next decision reports it again
    assert asyncio.run(decide(1)) == crossing

    async def queue_twice(store: Store) -> None:  # the sidecar's, and a late copy
        for _ in range(2):
            await queue_due(store, customer, crossing, MARK - 1)

    with_store(redis_url, queue_twice)
    wait_for(lambda: balance(redis_url, customer) == 12, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["metadata"]["tollway_crossing"] == crossing
    assert len(inbox.about(customer, "auto_top_up_succeeded")) == 1


def test_a_top_up_that_leaves_the_balance_at_the_mark_is_bought_again(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    """The balance fell far below the mark before the pack landed (a settled cost
    above what was left: a debt), and one pack does not lift it above the mark."""
    stack, _ = companions
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=5)
    assert stack.authorize(key, request_id="req-1").allowed  # 4 left
    settle(stack, key, "req-1", 13)  # 12 more: -8, a debt of 8
    wait_for(lambda: balance(redis_url, customer) == 12, 15)  # -8 + 10 = 2, then + 10
    first, second = top_ups(fake_stripe, customer)
    assert first["metadata"]["tollway_crossing"] != second["metadata"]["tollway_crossing"]
    assert len(inbox.about(customer, "auto_top_up_succeeded")) == 2
    assert stack.authorize(key).allowed


def test_a_plans_own_auto_top_up_buys_its_own_pack_at_its_own_mark(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, _ = companions
    customer, key = prepaid_customer(redis_url, fake_stripe, credits=25, plan="prepaid_own")
    shown = httpx.get(
        f"{stack.companion}/credits/auto-top-up", headers={"x-api-key": key}, timeout=10
    ).json()
    assert (shown["enabled"], shown["at"], shown["pack"], shown["credits"]) == (
        True,
        20,
        "monthly",
        1000,
    )
    assert stack.authorize(key, cost=5).allowed  # 25 -> 20: this plan's mark, not 3
    wait_for(lambda: balance(redis_url, customer) == 1020, 10)
    (charge,) = top_ups(fake_stripe, customer)
    assert charge["amount"] == 9000 and charge["metadata"]["tollway_pack"] == "monthly"
