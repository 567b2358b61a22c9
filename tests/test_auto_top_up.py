"""Auto top-up, end to end: a burn takes a prepaid balance to its mark, a sidecar
queues the fall, a companion charges the saved card off-session and grants the
pack, once per fall. Real companions and sidecars on the test Valkey, the real
stripe SDK against tests/fakestripe.py; a small HTTP server is notify_url."""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sidecar.plans import parse_catalog
from sidecar.store import Store
from sidecar.store.admission import admission
from tests.conftest import COMPANION_CONFIG, TEST_CONFIG, Stack, with_store
from tests.fakestripe import FakeStripe, make_event
from tests.test_two_companions import Inbox

MARK = 3
PREPAID = parse_catalog(tomllib.loads(TEST_CONFIG)).plans["prepaid"]


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
    line = 'top_up_url = "https://api.example.com/pricing"\n'
    config = COMPANION_CONFIG.replace(
        line, f'{line}auto_top_up_at = {MARK}\nauto_top_up_pack = "starter"\n', 1
    ).replace(
        "[stripe]\n",
        f'[stripe]\nnotify_url = "{inbox.url}"\nnotify_reclaim_after = "2s"\n',
        1,
    )
    assert config.count("auto_top_up_pack") == 1 and inbox.url in config
    return stack_factory(config), stack_factory(config)


def prepaid_customer(
    redis_url: str, fake: FakeStripe, *, credits: int, card: bool = True
) -> tuple[str, str]:
    """A prepaid account with `credits` granted, a saved card (or none), and a key."""
    customer = fake.create_customer("topup@example.com")
    if card:
        fake.attach_payment_method(customer)

    async def create(store: Store) -> str:
        await store.create_account(customer, "prepaid", "active")
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
