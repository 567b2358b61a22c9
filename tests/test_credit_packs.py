"""Credit packs bought through Checkout, end to end: real companions and sidecars,
the test Valkey, the real stripe SDK against tests/fakestripe.py. A purchase
grants its credits exactly once, however Stripe and the browser deliver the news."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.store import Store
from tests import harness
from tests.conftest import (
    COMPANION_CONFIG,
    WEBHOOK_SECRET,
    Stack,
    companion_env,
    deliver,
    with_store,
)
from tests.fakestripe import FakeStripe, make_event, sign_payload

PACKS_CONFIG = COMPANION_CONFIG + '\n[[credit_packs]]\nname = "gift"\ncredits = 5\n'
JSON_ACCEPT = {"accept": "application/json"}


def add_pack_prices(fake: FakeStripe) -> None:
    # add_price replaces a price of the same id, so adding twice is harmless.
    fake.add_price("price_pack_starter", product="prod_pack", recurring=False, unit_amount=500)
    fake.add_price("price_pack_monthly", product="prod_pack", recurring=False, unit_amount=9000)


@pytest.fixture(scope="module")
def shop(stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe) -> tuple[Stack, Stack]:
    """Two companions (each beside a sidecar) selling packs, on one Redis and Stripe."""
    add_pack_prices(fake_stripe)
    return stack_factory(PACKS_CONFIG), stack_factory(PACKS_CONFIG)


def prepaid_account(redis_url: str, fake: FakeStripe, plan: str = "prepaid") -> tuple[str, str]:
    """A Stripe customer with a Tollway account on a credits plan, and its API key."""
    customer = fake.create_customer("credits@example.com")

    async def create(store: Store) -> str:
        await store.create_account(customer, plan, "active")
        key, _ = await store.issue_key(customer, environment="test")
        return key

    return customer, with_store(redis_url, create)


def balance(redis_url: str, customer: str) -> int:
    async def read(store: Store) -> int:
        return (await store.credit_balance(customer)).balance

    return int(with_store(redis_url, read))


def grants(redis_url: str, customer: str) -> list[dict[str, str]]:
    async def read(store: Store) -> list[dict[str, str]]:
        ledger = await store.credit_ledger(customer, count=0)
        return [{"credits": str(e.credits), **e.fields} for e in ledger if e.kind == "grant"]

    return list(with_store(redis_url, read))


def buy(stack: Stack, **fields: Any) -> httpx.Response:
    return httpx.post(f"{stack.companion}/checkout", json=fields, timeout=10)


def complete_url(stack: Stack, session_id: str) -> str:
    return f"{stack.companion}/checkout/complete?session_id={session_id}"


def test_a_pack_bought_through_checkout_adds_its_credits_for_the_next_request(
    shop: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, _ = shop
    customer, key = prepaid_account(redis_url, fake_stripe)
    assert stack.authorize(key).reason == pb.REASON_CREDITS_EXHAUSTED

    started = buy(stack, customer=customer, pack="starter")
    assert started.status_code == 200, started.text
    session_id = started.json()["id"]
    sent = fake_stripe.calls("POST", "/v1/checkout/sessions")[-1].params
    assert sent["mode"] == "payment" and sent["customer"] == customer
    assert sent["line_items"] == [{"price": "price_pack_starter", "quantity": "1"}]
    metadata = {"tollway_pack": "starter", "tollway_credits": "10"}
    assert sent["metadata"] == metadata
    assert sent["payment_intent_data"] == {
        "metadata": metadata,
        "setup_future_usage": "off_session",
    }

    session = fake_stripe.complete_checkout(session_id)
    answer = stack.deliver(make_event("checkout.session.completed", session))
    assert answer.json()["result"] == "applied"
    assert balance(redis_url, customer) == 10
    assert stack.authorize(key).allowed, "credits work at once"
    assert [(g["credits"], g["grant"], g["reason"]) for g in grants(redis_url, customer)] == [
        ("10", session_id, "pack starter")
    ]
    # The card is saved for auto top-up: attached to the customer, as Stripe does (the
    # customer's invoice default is left alone; webhook/top_up.py finds it all the same).
    intent = fake_stripe.payment_intent(fake_stripe.checkout_session(session_id)["payment_intent"])
    assert intent["setup_future_usage"] == "off_session"
    assert fake_stripe.payment_method(intent["payment_method"])["customer"] == customer


def test_a_pack_that_expires_grants_credits_that_lapse(
    shop: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, _ = shop
    customer, _ = prepaid_account(redis_url, fake_stripe)
    session_id = buy(stack, customer=customer, pack="monthly").json()["id"]
    session = fake_stripe.complete_checkout(session_id)
    assert stack.deliver(make_event("checkout.session.completed", session)).status_code == 200
    (grant,) = grants(redis_url, customer)
    assert grant["credits"] == "1000"
    assert abs(int(grant["expires"]) - (time.time() + 30 * 86400)) < 60


def deliver_together(stacks: tuple[Stack, Stack], events: list[dict[str, Any]]) -> list[str]:
    """Every event POSTed at once, alternating between the companions; their results."""

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=20) as client:

            async def send(n: int, event: dict[str, Any]) -> str:
                body = json.dumps(event).encode()
                answer = await client.post(
                    f"{stacks[n % 2].companion}/webhooks/stripe",
                    content=body,
                    headers={"stripe-signature": sign_payload(body, WEBHOOK_SECRET)},
                )
                assert answer.status_code == 200, answer.text
                return str(answer.json()["result"])

            return await asyncio.gather(*(send(n, e) for n, e in enumerate(events)))

    return asyncio.run(all_at_once())


def test_repeated_reordered_and_concurrent_deliveries_grant_once(
    shop: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    customer, _ = prepaid_account(redis_url, fake_stripe)
    session_id = buy(shop[0], customer=customer, pack="starter").json()["id"]
    session = fake_stripe.complete_checkout(session_id)
    completed = make_event("checkout.session.completed", session)
    other = fake_stripe.create_subscription(fake_stripe.create_customer(), "price_basic")
    unrelated = make_event("customer.subscription.created", other)

    results = deliver_together(shop, [completed, completed, unrelated, completed] * 2)
    assert set(results) == {"applied", "duplicate"}
    assert results.count("applied") == 2, results  # the grant once, the subscription once
    assert balance(redis_url, customer) == 10
    for event in (completed, unrelated, completed):  # Stripe retries, later, in any order
        assert shop[1].deliver(event).json()["result"] == "duplicate"
    assert balance(redis_url, customer) == 10
    assert len(grants(redis_url, customer)) == 1


def test_the_browser_back_before_the_webhook_grants_once_and_shows_the_balance(
    shop: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, other = shop
    customer, _ = prepaid_account(redis_url, fake_stripe)
    session_id = buy(stack, customer=customer, pack="starter").json()["id"]
    early = httpx.get(complete_url(stack, session_id), headers=JSON_ACCEPT, timeout=10)
    assert early.status_code == 409 and early.json()["code"] == "not_complete"
    session = fake_stripe.complete_checkout(session_id)
    event = make_event("checkout.session.completed", session)

    with ThreadPoolExecutor(4) as pool:
        pages = [
            pool.submit(httpx.get, complete_url(s, session_id), headers=JSON_ACCEPT, timeout=10)
            for s in (stack, other)
        ]
        hooks = [pool.submit(deliver, s.companion, event) for s in (stack, other)]
        shown = [p.result() for p in pages]
        results = [h.result().json()["result"] for h in hooks]
    assert results.count("applied") <= 1 and set(results) <= {"applied", "duplicate"}
    for answer in shown:
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "customer_id": customer,
            "pack": "starter",
            "credits": 10,
            "balance": 10,
        }
    assert balance(redis_url, customer) == 10 and len(grants(redis_url, customer)) == 1
    html = httpx.get(complete_url(stack, session_id), timeout=10)
    assert html.status_code == 200 and "balance is now 10 credits" in html.text


def test_an_unpaid_session_grants_nothing_until_its_payment_succeeds(
    shop: tuple[Stack, Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack, _ = shop
    customer, _ = prepaid_account(redis_url, fake_stripe)
    session_id = buy(stack, customer=customer, pack="starter").json()["id"]
    # The event says completed; Stripe, asked, says unpaid (a delayed payment method).
    claimed = make_event("checkout.session.completed", fake_stripe.checkout_session(session_id))
    assert stack.deliver(claimed).json()["result"] == "unpaid"
    assert balance(redis_url, customer) == 0

    paid = fake_stripe.complete_checkout(session_id)
    later = make_event("checkout.session.async_payment_succeeded", paid)
    assert stack.deliver(later).json()["result"] == "applied"
    assert stack.deliver(claimed).json()["result"] == "duplicate"
    assert balance(redis_url, customer) == 10


def test_a_companion_killed_mid_grant_grants_once_when_stripe_redelivers(
    tmp_path: Path, fake_stripe: FakeStripe, redis_url: str, shop: tuple[Stack, Stack]
) -> None:
    customer, _ = prepaid_account(redis_url, fake_stripe)
    session_id = buy(shop[0], customer=customer, pack="starter").json()["id"]
    event = make_event("checkout.session.completed", fake_stripe.complete_checkout(session_id))
    config = tmp_path / "tollway.toml"
    config.write_text(PACKS_CONFIG)
    port = harness.free_port()
    companion = f"http://127.0.0.1:{port}"
    env = companion_env(tmp_path, fake_stripe.url)

    def start() -> harness.Child:
        log = tmp_path / "companion.log"
        return harness.start_companion(config, redis_url=redis_url, port=port, log=log, env=env)

    child = start()
    try:
        read = f"/v1/checkout/sessions/{session_id}"
        fake_stripe.delay_next(1, 3.0, path_prefix=read)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(deliver, companion, event)
            deadline = time.monotonic() + 10
            while not fake_stripe.calls("GET", read):
                assert time.monotonic() < deadline, "the companion never asked Stripe"
                time.sleep(0.01)
            child.process.kill()  # mid-grant: Stripe has not answered yet
            child.process.wait(5)
            child.stop()
            with pytest.raises(httpx.HTTPError):
                first.result(timeout=10)  # what Stripe sees: no answer, so it retries
        assert balance(redis_url, customer) == 0
        child = start()
        assert deliver(companion, event).json()["result"] == "applied"
        assert deliver(companion, event).json()["result"] == "duplicate"
        assert balance(redis_url, customer) == 10 and len(grants(redis_url, customer)) == 1
    finally:
        child.stop()


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({"pack": "jumbo"}, "unknown_pack", "starter, monthly, gift"),
        ({"pack": "gift"}, "pack_not_for_sale", "gift"),
        ({"pack": "starter", "plan": "basic"}, "plan_or_pack", "not both"),
        ({"pack": "starter", "email": "new@example.com"}, "account_required", "customer id"),
        ({"pack": "starter", "customer": "cus_nobodyhere"}, "account_required", "no Tollway"),
        ({"pack": "starter", "customer": "basic"}, "plan_without_credits", "basic"),
    ],
)
def test_pack_checkout_mistakes_are_400_and_say_why(
    shop: tuple[Stack, Stack],
    fake_stripe: FakeStripe,
    redis_url: str,
    fields: dict[str, str],
    code: str,
    says: str,
) -> None:
    if fields.get("customer") == "basic":
        fields = {**fields, "customer": prepaid_account(redis_url, fake_stripe, plan="basic")[0]}
    elif "customer" not in fields and "email" not in fields:
        fields = {**fields, "customer": prepaid_account(redis_url, fake_stripe)[0]}
    answer = buy(shop[0], **fields)
    assert answer.status_code == 400 and answer.json()["code"] == code, answer.text
    assert says in answer.json()["message"]
