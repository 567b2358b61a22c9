"""Two companions, one event: Stripe may deliver an event to two replicas of
the webhook endpoint at once (a retry racing the original, two pods behind a
load balancer). Real companion processes on one Redis, the real stripe SDK
against tests/fakestripe.py; a small HTTP server stands in for notify_url.

An event is applied once: the account ends where one delivery would leave it,
the event is recorded applied once, and its side effects (the notification,
the keys revoked when a subscription ends) happen once, however many
deliveries arrive, together or later.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.store import Store
from sidecar.store.names import events_key
from tests.conftest import COMPANION_CONFIG, WEBHOOK_SECRET, Stack, with_store
from tests.fakestripe import FakeStripe, invoice_event, make_event, sign_payload

DELIVERIES = 8  # at once, alternating between the two companions
QUIET = 1.0  # seconds without a new notification before counting them


class Inbox:
    """The notify_url: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.received = received
        self._lock = lock
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/notify"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def about(self, customer: str, kind: str) -> list[dict[str, Any]]:
        """The notifications of one kind for one customer, once none arrived for QUIET s."""
        seen, changed = -1, time.monotonic()
        while time.monotonic() - changed < QUIET:
            with self._lock:
                count = len(self.received)
            if count != seen:
                seen, changed = count, time.monotonic()
            time.sleep(0.05)
        with self._lock:
            return [n for n in self.received if (n["customer_id"], n["type"]) == (customer, kind)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def inbox() -> Iterator[Inbox]:
    box = Inbox()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def companions(stack_factory: Callable[[str], Stack], inbox: Inbox) -> tuple[Stack, Stack]:
    """Two companion processes (each beside a sidecar) on the suite's Redis and fake Stripe."""
    config = COMPANION_CONFIG.replace("[stripe]\n", f'[stripe]\nnotify_url = "{inbox.url}"\n', 1)
    assert config != COMPANION_CONFIG
    return stack_factory(config), stack_factory(config)


def deliver_at_once(stacks: tuple[Stack, Stack], event: dict[str, Any]) -> list[str]:
    """The same signed event POSTed DELIVERIES times concurrently, to both companions."""
    body = json.dumps(event).encode()

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=20) as client:

            async def send(stack: Stack) -> str:
                answer = await client.post(
                    f"{stack.companion}/webhooks/stripe",
                    content=body,
                    headers={
                        "stripe-signature": sign_payload(body, WEBHOOK_SECRET),
                        "content-type": "application/json",
                    },
                )
                assert answer.status_code == 200, answer.text
                return str(answer.json()["result"])

            return await asyncio.gather(*(send(stacks[n % 2]) for n in range(DELIVERIES)))

    return asyncio.run(all_at_once())


def applied_count(stacks: tuple[Stack, Stack], kind: str) -> dict[str, float]:
    """tollway_webhook_events_total for one event type, by result, over both companions."""
    totals: dict[str, float] = {}
    pattern = re.compile(
        rf'^tollway_webhook_events_total\{{result="(\w+)",type="{re.escape(kind)}"\}} (\S+)$',
        re.MULTILINE,
    )
    for stack in stacks:
        text = httpx.get(f"{stack.companion}/metrics", timeout=10).text
        for result, value in pattern.findall(text):
            totals[result] = totals.get(result, 0.0) + float(value)
    return totals


def test_two_companions_given_one_event_at_once_apply_it_and_notify_once(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    first, _ = companions
    customer = fake_stripe.create_customer("twice@example.com")
    sub = fake_stripe.create_subscription(customer, "price_basic")
    created = make_event("customer.subscription.created", sub)
    assert first.deliver(created).json()["result"] == "applied"

    failing = fake_stripe.update_subscription(sub["id"], status="past_due")
    event = invoice_event("invoice.payment_failed", failing)
    results = deliver_at_once(companions, event)
    assert sorted(results) == ["applied"] + ["duplicate"] * (DELIVERIES - 1)
    # ...and again later, as Stripe retries: nothing more happens.
    assert deliver_at_once(companions, event) == ["duplicate"] * DELIVERIES

    account = with_store(redis_url, lambda store: store.require_account(customer))
    assert (account.plan, account.status) == ("basic", "past_due")
    assert account.grace_until == event["created"] + 5 * 86400  # counted from this event, once
    recorded = with_store(redis_url, lambda store: store.redis.zrange(events_key(customer), 0, -1))
    assert sorted(e.decode() for e in recorded) == sorted([created["id"], event["id"]])
    assert applied_count(companions, "invoice.payment_failed") == {
        "applied": 1.0,
        "duplicate": 2 * DELIVERIES - 1.0,
    }
    notified = inbox.about(customer, "payment_failed")
    assert [n["event"] for n in notified] == [event["id"]]


def test_two_companions_given_a_cancellation_at_once_revoke_and_notify_once(
    companions: tuple[Stack, Stack], fake_stripe: FakeStripe, inbox: Inbox, redis_url: str
) -> None:
    first, second = companions
    customer = fake_stripe.create_customer("ending@example.com")
    sub = fake_stripe.create_subscription(customer, "price_basic")
    assert first.deliver(make_event("customer.subscription.created", sub)).status_code == 200

    async def issue(store: Store) -> list[str]:
        return [(await store.issue_key(customer, environment="test"))[0] for _ in range(2)]

    api_keys = with_store(redis_url, issue)
    assert all(second.authorize(key).allowed for key in api_keys)

    ended = fake_stripe.update_subscription(sub["id"], status="canceled")
    event = make_event("customer.subscription.deleted", ended)
    results = deliver_at_once(companions, event)
    assert sorted(results) == ["applied"] + ["duplicate"] * (DELIVERIES - 1)
    assert deliver_at_once(companions, event) == ["duplicate"] * DELIVERIES

    for stack in companions:  # every sidecar, at once
        for key in api_keys:
            assert stack.authorize(key).reason == pb.REASON_SUBSCRIPTION_INACTIVE

    async def keys_state(store: Store) -> list[tuple[str, str]]:
        return [(r.state, r.revoked_reason) for r in await store.list_keys(customer)]

    assert with_store(redis_url, keys_state) == [("revoked", "subscription_ended")] * 2
    notified = inbox.about(customer, "subscription_canceled")
    assert [n["event"] for n in notified] == [event["id"]]
