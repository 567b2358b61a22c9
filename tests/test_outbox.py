"""Notifications are durable: queued in Redis before anyone is told, posted by the
relay with a stable notification_id, retried while notify_url fails, and neither
lost nor doubled by a companion killed at the wrong moment. Real companions on
the test Valkey, the real stripe SDK against tests/fakestripe.py; a small HTTP
server is notify_url."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.store import Store
from tests import harness
from tests.conftest import COMPANION_CONFIG, Stack, companion_env, deliver, with_store
from tests.fakestripe import FakeStripe, invoice_event, make_event

QUIET = 2.5  # seconds without a new POST before counting them (past the longest retry backoff)


class Callback:
    """notify_url: answers 500 to the first `failures` POSTs, then 204; keeps every body."""

    def __init__(self, *, port: int = 0, failures: int = 0) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self.failures = failures
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                with lock:
                    outer.attempts.append(body)
                    failing = outer.failures > 0
                    outer.failures -= failing
                    if not failing:
                        outer.accepted.append(body)
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._lock = lock
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/notify"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def of(self, customer: str, *, within: float = 10.0) -> list[dict[str, Any]]:
        """What was accepted for one customer, once something was and then nothing
        more arrived for QUIET s (or after `within` s of nothing)."""
        began, seen, changed = time.monotonic(), -1, time.monotonic()
        while time.monotonic() - changed < QUIET or (
            seen == 0 and time.monotonic() - began < within
        ):
            with self._lock:
                count = len([n for n in self.attempts if n["customer_id"] == customer])
            if count != seen:
                seen, changed = count, time.monotonic()
            time.sleep(0.05)
        with self._lock:
            return [n for n in self.accepted if n["customer_id"] == customer]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def config_for(url: str) -> str:
    settings = f'[stripe]\nnotify_url = "{url}"\nnotify_reclaim_after = "2s"\n'
    return COMPANION_CONFIG.replace("[stripe]\n", settings, 1)


@pytest.fixture(scope="module")
def flaky() -> Iterator[Callback]:
    box = Callback()
    try:
        yield box
    finally:
        box.close()


@pytest.fixture(scope="module")
def stack(stack_factory: Callable[[str], Stack], flaky: Callback) -> Stack:
    return stack_factory(config_for(flaky.url))


def failing_payment(fake: FakeStripe, stack_or_url: str) -> tuple[str, dict[str, Any]]:
    """A subscribed customer (applied) and the invoice.payment_failed event to come."""
    customer = fake.create_customer("outbox@example.com")
    sub = fake.create_subscription(customer, "price_basic")
    created = deliver(stack_or_url, make_event("customer.subscription.created", sub))
    assert created.json()["result"] == "applied"
    return customer, invoice_event(
        "invoice.payment_failed", fake.update_subscription(sub["id"], status="past_due")
    )


def test_a_failing_callback_is_retried_and_gets_the_notification_once(
    stack: Stack, flaky: Callback, fake_stripe: FakeStripe
) -> None:
    customer, event = failing_payment(fake_stripe, stack.companion)
    flaky.failures = 2
    assert stack.deliver(event).json()["result"] == "applied"
    (told,) = flaky.of(customer)
    assert (told["type"], told["event"], told["status"]) == (
        "payment_failed",
        event["id"],
        "past_due",
    )
    assert told["notification_id"] == f"payment_failed:{event['id']}"
    assert [n["notification_id"] for n in flaky.attempts if n["customer_id"] == customer] == [
        told["notification_id"]
    ] * 3
    assert stack.deliver(event).json()["result"] == "duplicate"
    assert len(flaky.of(customer)) == 1
    log = stack.logs[1].read_text()
    assert re.search(r"notification \{.*payment_failed:" + event["id"], log)


def test_a_sidecars_notification_gets_an_id_too(
    stack: Stack, flaky: Callback, redis_url: str
) -> None:
    customer = "cus_outboxlow" + str(int(time.time() * 1000))

    async def queue(store: Store) -> None:
        low = {"type": "low_balance", "customer_id": customer, "plan": "prepaid", "mark": 5}
        await store.notify({**low, "balance": 4})

    with_store(redis_url, queue)
    (told,) = flaky.of(customer)
    assert told["mark"] == 5 and re.fullmatch(r"tw-\d+-\d+", told["notification_id"])


def test_an_event_applied_by_a_companion_that_died_before_queueing_is_notified_on_redelivery(
    stack: Stack, flaky: Callback, fake_stripe: FakeStripe, redis_url: str
) -> None:
    customer, event = failing_payment(fake_stripe, stack.companion)
    sub_id = event["data"]["object"]["parent"]["subscription_details"]["subscription"]

    async def apply_and_die(store: Store) -> None:  # what that companion got done
        change = await store.apply_subscription(
            customer,
            event_id=event["id"],
            subscription_id=sub_id,
            status="past_due",
            plan="basic",
            error="",
            period_end=int(time.time()) + 86400,
            grace_seconds=5 * 86400,
            trouble_since=event["created"],
        )
        assert change.result == "applied"

    with_store(redis_url, apply_and_die)
    assert stack.deliver(event).json()["result"] == "duplicate"
    assert stack.deliver(event).json()["result"] == "duplicate"
    (told,) = flaky.of(customer)
    assert (told["type"], told["event"], told["status"]) == (
        "payment_failed",
        event["id"],
        "past_due",
    )


def test_a_companion_killed_before_posting_delivers_once_after_a_restart(
    tmp_path: Path, fake_stripe: FakeStripe, redis_url: str
) -> None:
    callback_port = harness.free_port()  # nothing listens there yet: the receiver is down
    config = tmp_path / "tollway.toml"
    config.write_text(config_for(f"http://127.0.0.1:{callback_port}/notify"))
    port = harness.free_port()
    companion = f"http://127.0.0.1:{port}"
    log = tmp_path / "companion.log"
    env = companion_env(tmp_path, fake_stripe.url)

    def start() -> harness.Child:
        return harness.start_companion(config, redis_url=redis_url, port=port, log=log, env=env)

    child = start()
    receiver: Callback | None = None
    try:
        customer, event = failing_payment(fake_stripe, companion)
        assert deliver(companion, event).json()["result"] == "applied"
        deadline = time.monotonic() + 10
        while "to callback failed" not in log.read_text():
            assert time.monotonic() < deadline, "the companion never tried the callback"
            time.sleep(0.02)
        child.process.kill()  # retrying a receiver that is down: killed mid-delivery
        child.process.wait(5)
        child.stop()

        receiver = Callback(port=callback_port)  # the receiver is back
        child = start()
        assert deliver(companion, event).json()["result"] == "duplicate"  # Stripe retries
        (told,) = receiver.of(customer, within=15)
        assert told["notification_id"] == f"payment_failed:{event['id']}"
        assert told["event"] == event["id"]
        assert "took over 1 notifications" in log.read_text()
    finally:
        child.stop()
        if receiver is not None:
            receiver.close()
