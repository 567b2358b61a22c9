"""The Stripe companion end to end: real processes, real Redis, the real stripe
SDK against a Stripe-compatible server, webhooks signed as Stripe signs them."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import httpx
import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.store import Store
from tests.conftest import COMPANION_CONFIG, WEBHOOK_SECRET, Stack, with_store
from tests.fakestripe import FakeStripe, invoice_event, make_event

ReadAccount = Callable[[str], dict[str, Any]]
IssueKey = Callable[[str], str]


@pytest.fixture
def read_account(redis_url: str) -> ReadAccount:
    """The account as the companion left it, read straight from Redis ({} if none)."""

    async def read(store: Store, customer: str) -> dict[str, Any]:
        found = await store.get_account(customer)
        return asdict(found) if found else {}

    return lambda customer: with_store(redis_url, lambda store: read(store, customer))


@pytest.fixture
def issue_key(redis_url: str) -> IssueKey:
    """A new key for an account, as `tollway keys issue` would make it."""

    async def issue(store: Store, customer: str) -> str:
        key, _ = await store.issue_key(customer, environment="test")
        return key

    return lambda customer: with_store(redis_url, lambda store: issue(store, customer))


def subscribe(
    fake: FakeStripe, price: str = "price_basic", status: str = "active"
) -> dict[str, Any]:
    customer = fake.create_customer("buyer@example.com")
    return fake.create_subscription(customer, price, status=status)


def sub_event(kind: str, sub: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    return make_event(kind, sub, created=created)


# -- the webhook endpoint ----------------------------------------------------


def test_a_signed_event_provisions_the_account(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    sub = subscribe(fake_stripe)
    answer = stack.deliver(sub_event("customer.subscription.created", sub))
    assert answer.status_code == 200 and answer.json()["result"] == "applied"
    state = read_account(sub["customer"])
    assert (state["plan"], state["status"], state["subscription_id"]) == (
        "basic",
        "active",
        sub["id"],
    )
    assert state["period_end"] == sub["items"]["data"][0]["current_period_end"]


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("missing", "missing_signature"),
        ("wrong secret", "invalid_signature"),
        ("stale", "invalid_signature"),
        ("future", "invalid_signature"),
        ("tampered", "invalid_signature"),
    ],
)
def test_unverified_deliveries_are_refused_and_change_nothing(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount, how: str, expected: str
) -> None:
    sub = subscribe(fake_stripe)
    event = sub_event("customer.subscription.created", sub)
    body = json.dumps(event).encode()
    if how == "missing":
        answer = httpx.post(f"{stack.companion}/webhooks/stripe", content=body, timeout=10)
    elif how == "wrong secret":
        answer = stack.deliver(event, secret="whsec_" + "x" * 32)
    elif how == "stale":
        answer = stack.deliver(event, timestamp=int(time.time()) - 400)
    elif how == "future":
        answer = stack.deliver(event, timestamp=int(time.time()) + 400)
    else:
        from tests.fakestripe import sign_payload

        header = sign_payload(body, WEBHOOK_SECRET)
        forged = body.replace(b'"active"', b'"trialing"')
        answer = httpx.post(
            f"{stack.companion}/webhooks/stripe",
            content=forged,
            headers={"stripe-signature": header},
            timeout=10,
        )
    assert answer.status_code == 400 and answer.json()["code"] == expected
    assert read_account(sub["customer"]) == {}


def test_malformed_and_oversized_bodies(stack: Stack) -> None:
    assert stack.deliver({}, body=b"{not json").json()["code"] == "malformed"
    assert stack.deliver({}, body=b"[1, 2]").status_code == 400
    huge = stack.deliver({}, body=b'{"id": "evt_1", "pad": "' + b"x" * 70_000 + b'"}')
    assert huge.status_code == 413


def test_unhandled_event_types_are_acknowledged(stack: Stack) -> None:
    answer = stack.deliver(make_event("charge.refunded", {"id": "ch_1", "customer": "cus_1"}))
    assert answer.status_code == 200 and answer.json()["result"] == "ignored"


def test_a_redelivered_event_is_applied_once(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    sub = subscribe(fake_stripe)
    event = sub_event("customer.subscription.created", sub)
    assert stack.deliver(event).json()["result"] == "applied"
    fake_stripe.update_subscription(sub["id"], status="past_due")
    assert stack.deliver(event).json()["result"] == "duplicate"
    assert read_account(sub["customer"])["status"] == "active"  # the retry changed nothing


def test_an_upgrade_takes_effect_on_the_next_request(
    stack: Stack, fake_stripe: FakeStripe, issue_key: IssueKey
) -> None:
    sub = subscribe(fake_stripe)
    stack.deliver(sub_event("customer.subscription.created", sub))
    key = issue_key(sub["customer"])
    assert stack.authorize(key, feature="export").reason == pb.REASON_FEATURE_NOT_IN_PLAN
    upgraded = fake_stripe.update_subscription(sub["id"], price="price_pro")  # by lookup key
    assert stack.deliver(sub_event("customer.subscription.updated", upgraded)).status_code == 200
    answer = stack.authorize(key, feature="export")
    assert answer.allowed and answer.plan == "pro"


def test_an_unknown_price_is_recorded_and_nothing_crashes(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    fake_stripe.add_price("price_mystery", product="prod_mystery")
    sub = subscribe(fake_stripe)
    stack.deliver(sub_event("customer.subscription.created", sub))
    changed = fake_stripe.update_subscription(sub["id"], price="price_mystery")
    assert stack.deliver(sub_event("customer.subscription.updated", changed)).status_code == 200
    state = read_account(sub["customer"])
    assert state["plan"] == "basic"  # kept
    assert state["error"] == "price price_mystery is in no configured plan"
    log = stack.logs[1].read_text()
    assert "price price_mystery is in no configured plan" in log


def test_stripe_down_means_503_so_stripe_retries(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    sub = subscribe(fake_stripe)
    event = sub_event("customer.subscription.created", sub)
    fake_stripe.fail_next(1, status=500, path_prefix="/v1/subscriptions")
    assert stack.deliver(event).status_code == 503
    assert read_account(sub["customer"]) == {}
    assert stack.deliver(event).json()["result"] == "applied"  # Stripe's retry


# -- onboarding: checkout, the key shown once, the billing portal -----------------


def start_checkout(stack: Stack, **fields: Any) -> httpx.Response:
    return httpx.post(f"{stack.companion}/checkout", json=fields, timeout=10)


def test_checkout_then_the_key_is_shown_exactly_once(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    started = start_checkout(stack, email="new@example.com", plan="basic")
    assert started.status_code == 200
    session_id, url = started.json()["id"], started.json()["url"]
    assert url == f"{fake_stripe.url}/c/pay/{session_id}" and session_id.startswith("cs_")
    created = fake_stripe.checkout_session(session_id)
    assert created["mode"] == "subscription" and created["metadata"] == {"tollway_plan": "basic"}
    assert created["success_url"].endswith("/checkout/complete?session_id={CHECKOUT_SESSION_ID}")

    complete_url = f"{stack.companion}/checkout/complete?session_id={session_id}"
    early = httpx.get(complete_url, headers={"accept": "application/json"}, timeout=10)
    assert early.status_code == 409 and early.json()["code"] == "not_complete"

    session = fake_stripe.complete_checkout(session_id)
    # The browser comes back before the webhook: the account is provisioned anyway.
    shown = httpx.get(complete_url, headers={"accept": "application/json"}, timeout=10)
    assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
    key = shown.json()["api_key"]
    assert shown.json()["customer_id"] == session["customer"] and shown.json()["plan"] == "basic"
    assert stack.authorize(key).allowed

    again = httpx.get(complete_url, headers={"accept": "application/json"}, timeout=10)
    assert again.status_code == 410 and again.json()["code"] == "key_already_shown"
    assert "new key" in again.json()["message"] and key not in again.text
    page = httpx.get(complete_url, timeout=10)
    assert page.status_code == 410 and "text/html" in page.headers["content-type"]
    assert "tw_" not in page.text

    # The webhook arriving afterwards is applied once and changes nothing visible.
    event = make_event("checkout.session.completed", session)
    assert stack.deliver(event).json()["result"] == "applied"
    assert stack.deliver(event).json()["result"] == "duplicate"
    assert read_account(session["customer"])["status"] == "active"
    assert stack.authorize(key).allowed


def test_the_key_page_is_html_for_browsers(stack: Stack, fake_stripe: FakeStripe) -> None:
    session_id = start_checkout(stack, email="browser@example.com", plan="pro").json()["id"]
    fake_stripe.complete_checkout(session_id)
    page = httpx.get(f"{stack.companion}/checkout/complete?session_id={session_id}", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<code id="api-key">tw_test_' in page.text and "pro plan" in page.text


def test_a_form_post_is_redirected_to_stripe(stack: Stack, fake_stripe: FakeStripe) -> None:
    answer = httpx.post(
        f"{stack.companion}/checkout",
        data={"email": "form@example.com", "plan": "basic"},
        timeout=10,
    )
    assert answer.status_code == 303
    assert answer.headers["location"].startswith(f"{fake_stripe.url}/c/pay/cs_")


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"email": "a@example.com", "plan": "gold"}, 400, "unknown_plan"),
        ({"plan": "basic"}, 400, "missing_customer"),
        ({"email": "not-an-email", "plan": "basic"}, 400, "missing_customer"),
        ({"email": "a@example.com", "plan": "tight"}, 400, "plan_not_for_sale"),
    ],
)
def test_checkout_mistakes_are_400(
    stack: Stack, fields: dict[str, str], status: int, code: str
) -> None:
    answer = start_checkout(stack, **fields)
    assert answer.status_code == status and answer.json()["code"] == code


def test_stripe_refusing_a_checkout_is_502_with_its_message(stack: Stack) -> None:
    answer = start_checkout(stack, email="a@example.com", plan="ghost")  # price unknown to Stripe
    assert answer.status_code == 502
    assert answer.json() == {"code": "stripe_error", "message": "No such price: 'price_ghost'"}


def test_unknown_or_malformed_sessions(stack: Stack) -> None:
    json_accept = {"accept": "application/json"}
    bad = httpx.get(f"{stack.companion}/checkout/complete?session_id=x", headers=json_accept)
    assert bad.status_code == 400
    missing = httpx.get(
        f"{stack.companion}/checkout/complete?session_id=cs_test_nope", headers=json_accept
    )
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_session"


def test_the_portal_opens_for_a_valid_key_only(
    stack: Stack, fake_stripe: FakeStripe, issue_key: IssueKey
) -> None:
    sub = subscribe(fake_stripe)
    stack.deliver(sub_event("customer.subscription.created", sub))
    key = issue_key(sub["customer"])
    answer = httpx.post(f"{stack.companion}/portal", headers={"x-api-key": key}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["url"].startswith(f"{fake_stripe.url}/p/session/bps_")
    portal = fake_stripe.calls("POST", "/v1/billing_portal/sessions")[-1]
    assert portal.params["customer"] == sub["customer"]
    assert httpx.post(f"{stack.companion}/portal", timeout=10).status_code == 401
    forged = httpx.post(
        f"{stack.companion}/portal", headers={"authorization": "Bearer tw_test_x"}, timeout=10
    )
    assert forged.status_code == 401


# -- exactly once, in any order ---------------------------------------------------


def lifecycle(fake: FakeStripe) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A subscription's life as Stripe would report it, ending canceled."""
    sub = subscribe(fake, status="incomplete")
    t = int(time.time()) - 600
    events = [sub_event("customer.subscription.created", sub, t)]
    sub = fake.update_subscription(sub["id"], status="active")
    events += [
        sub_event("customer.subscription.updated", sub, t + 1),
        invoice_event("invoice.paid", sub, t + 1),
    ]
    sub = fake.update_subscription(sub["id"], status="past_due")
    events += [
        invoice_event("invoice.payment_failed", sub, t + 100),
        sub_event("customer.subscription.updated", sub, t + 100),
    ]
    sub = fake.update_subscription(sub["id"], status="active", price="price_pro")
    events += [
        invoice_event("invoice.paid", sub, t + 200),
        sub_event("customer.subscription.updated", sub, t + 200),
    ]
    sub = fake.update_subscription(sub["id"], status="canceled")
    events.append(sub_event("customer.subscription.deleted", sub, t + 300))
    return sub, events


def settle(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state[k] for k in ("plan", "status", "subscription_id", "grace_until", "error")}


def test_any_order_with_duplicates_ends_where_in_order_delivery_does(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    rng = random.Random(20261127)  # the seed is part of the test: failures replay
    _, in_order = lifecycle(fake_stripe)
    for event in in_order:
        assert stack.deliver(event).status_code == 200
    expected = settle(read_account(in_order[0]["data"]["object"]["customer"]))
    assert expected["status"] == "canceled" and expected["plan"] == "pro"
    for _ in range(12):
        _, events = lifecycle(fake_stripe)
        shuffled = events + rng.sample(events, k=3)  # duplicates too
        rng.shuffle(shuffled)
        results = [stack.deliver(e).json()["result"] for e in shuffled]
        assert results.count("duplicate") == 3
        customer = events[0]["data"]["object"]["customer"]
        got = settle(read_account(customer))
        assert {**got, "subscription_id": "-"} == {**expected, "subscription_id": "-"}


def test_concurrent_deliveries_for_one_customer_serialize(
    stack: Stack, fake_stripe: FakeStripe, read_account: ReadAccount
) -> None:
    sub, events = lifecycle(fake_stripe)

    async def all_at_once() -> list[int]:
        async with httpx.AsyncClient(timeout=20) as client:
            from tests.fakestripe import sign_payload

            async def send(event: dict[str, Any]) -> int:
                body = json.dumps(event).encode()
                answer = await client.post(
                    f"{stack.companion}/webhooks/stripe",
                    content=body,
                    headers={"stripe-signature": sign_payload(body, WEBHOOK_SECRET)},
                )
                return answer.status_code

            return await asyncio.gather(*(send(e) for e in events + events))

    assert set(asyncio.run(all_at_once())) == {200}
    assert read_account(sub["customer"])["status"] == "canceled"


# -- the whole lifecycle across sidecar and companion ------------------------------

SHORT_GRACE = COMPANION_CONFIG + '\n[billing]\ngrace_period = "2s"\n'


def wait_for(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until check() held; fails after the given time."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "did not happen in time"
        time.sleep(0.05)
    return time.monotonic() - started


def checkout_key(stack: Stack, fake: FakeStripe, plan: str = "basic") -> tuple[str, dict[str, Any]]:
    session_id = start_checkout(stack, email="life@example.com", plan=plan).json()["id"]
    session = fake.complete_checkout(session_id)
    shown = httpx.get(
        f"{stack.companion}/checkout/complete?session_id={session_id}",
        headers={"accept": "application/json"},
        timeout=10,
    )
    assert stack.deliver(make_event("checkout.session.completed", session)).status_code == 200
    return shown.json()["api_key"], fake.subscription(session["subscription"])


def test_lifecycle_grace_recovery_and_cancellation(
    stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe
) -> None:
    stack = stack_factory(SHORT_GRACE)
    key, sub = checkout_key(stack, fake_stripe, plan="pro")  # a burst of 100: polling is free
    assert stack.authorize(key).allowed

    failing = fake_stripe.update_subscription(sub["id"], status="past_due")
    assert stack.deliver(invoice_event("invoice.payment_failed", failing)).status_code == 200
    in_grace = stack.authorize(key)
    assert in_grace.allowed, "a paying customer keeps access during the grace period"

    wait_for(lambda: stack.authorize(key).reason == pb.REASON_SUBSCRIPTION_INACTIVE, 5)
    after = stack.authorize(key)
    assert "payment failed" in after.message and "update the payment method" in after.message

    paid = fake_stripe.update_subscription(sub["id"], status="active")
    assert stack.deliver(invoice_event("invoice.paid", paid)).status_code == 200
    assert stack.authorize(key).allowed

    ended = fake_stripe.update_subscription(sub["id"], status="canceled")
    assert stack.deliver(sub_event("customer.subscription.deleted", ended)).status_code == 200
    denied = stack.authorize(key)
    assert denied.reason == pb.REASON_SUBSCRIPTION_INACTIVE  # at once, not eventually
    assert "subscribe again" in denied.message


def test_a_paid_invoice_restores_access_whichever_event_reports_it(
    stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe
) -> None:
    # An endpoint that was sent invoice.payment_succeeded, but neither invoice.paid
    # nor customer.subscription.updated, once left a paying customer locked out
    # until the next reconcile.
    stack = stack_factory(SHORT_GRACE)
    key, sub = checkout_key(stack, fake_stripe, plan="pro")
    failing = fake_stripe.update_subscription(sub["id"], status="past_due")
    assert stack.deliver(invoice_event("invoice.payment_failed", failing)).status_code == 200
    wait_for(lambda: stack.authorize(key).reason == pb.REASON_SUBSCRIPTION_INACTIVE, 5)
    paid = fake_stripe.update_subscription(sub["id"], status="active")
    assert stack.deliver(invoice_event("invoice.payment_succeeded", paid)).status_code == 200
    assert stack.authorize(key).allowed


def test_after_grace_a_fallback_plan_keeps_the_customer_on_free(
    stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe
) -> None:
    stack = stack_factory(
        SHORT_GRACE.replace('grace_period = "2s"', 'grace_period = "1s"\nfallback_plan = "tight"')
    )
    key, sub = checkout_key(stack, fake_stripe, plan="pro")
    assert stack.authorize(key).plan == "pro"
    failing = fake_stripe.update_subscription(sub["id"], status="past_due")
    stack.deliver(invoice_event("invoice.payment_failed", failing))
    wait_for(lambda: stack.authorize(key).plan == "tight", 5)
    fallback = stack.authorize(key)
    assert fallback.allowed and fallback.rate_limit.limit == 2  # the tight plan's burst


def test_reconcile_repairs_missed_webhooks(
    stack: Stack,
    fake_stripe: FakeStripe,
    read_account: ReadAccount,
    cli: Callable[..., Any],
    tmp_path: Any,
) -> None:
    from tests.conftest import STRIPE_SECRET

    missed = subscribe(fake_stripe, price="price_pro")  # no webhook ever arrives
    config = tmp_path / "tollway.toml"
    config.write_text(COMPANION_CONFIG)
    env = {
        "STRIPE_SECRET_KEY": STRIPE_SECRET,
        "STRIPE_API_BASE": fake_stripe.url,
        "TOLLWAY_ENV_FILE": str(tmp_path / "none.env"),
    }

    dry = cli("reconcile", "--dry-run", "--json", "--config", str(config), extra_env=env)
    assert dry.returncode == 0, dry.stderr
    planned = {c["customer_id"]: c for c in json.loads(dry.stdout)["changes"]}
    assert planned[missed["customer"]]["after"] == "active/pro"
    assert read_account(missed["customer"]) == {}, "a dry run changes nothing"

    real = cli("reconcile", "--json", "--config", str(config), extra_env=env)
    assert real.returncode == 0, real.stderr
    state = read_account(missed["customer"])
    assert (state["status"], state["plan"]) == ("active", "pro")
    again = cli("reconcile", "--json", "--config", str(config), extra_env=env)
    changes = json.loads(again.stdout)["changes"]
    assert missed["customer"] not in {c["customer_id"] for c in changes}
    text = cli("reconcile", "--dry-run", "--config", str(config), extra_env=env)
    assert text.stdout.startswith("checked ") and "subscriptions of" in text.stdout
