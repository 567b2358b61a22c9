"""The usage reporter against a Stripe-compatible server: every recorded unit
reaches Stripe once, through failures, dropped answers and restarts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from sidecar.settings import settings_from_document
from sidecar.store import Store, connect
from tests.conftest import STRIPE_SECRET
from tests.fakestripe import FakeStripe
from webhook.config import CompanionSettings, stripe_settings
from webhook.reporter import Reporter
from webhook.sync import make_client

CONFIG = {
    "plans": [{"name": "basic", "rate": "100/s"}],
    "meters": [{"name": "api_calls"}, {"name": "tokens", "event_name": "llm_tokens"}],
}


def settings_for(fake: FakeStripe, doc: dict[str, Any] = CONFIG) -> CompanionSettings:
    return CompanionSettings(
        core=settings_from_document(doc, {}),
        stripe=stripe_settings(
            {"max_network_retries": 0, "timeout": "2s"},
            {"STRIPE_SECRET_KEY": STRIPE_SECRET, "STRIPE_API_BASE": fake.url},
        ),
    )


Work = Callable[[Store, Reporter], Awaitable[Any]]


def run(redis_url: str, fake: FakeStripe, work: Work, doc: dict[str, Any] = CONFIG) -> Any:
    """Runs work with a fresh Store and Reporter, as one companion process would."""

    async def go() -> Any:
        settings = settings_for(fake, doc)
        client, http = make_client(settings.stripe)
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            return await work(store, Reporter(store, client, settings, backoff=0.01))
        finally:
            await http.close_async()
            await store.close()

    return asyncio.run(go())


async def new_account(store: Store, fake: FakeStripe) -> str:
    customer = fake.create_customer("usage@example.com")
    await store.create_account(customer, "basic")
    return customer


async def use(
    store: Store, customer: str, meter: str, quantity: int, at: int | None = None
) -> None:
    await store.record_usage(
        customer,
        meter=meter,
        quantity=quantity,
        at=at or int(time.time()),
        idempotency=uuid.uuid4().hex,
        dedupe_window=86400,
    )
    await store.mark_dirty([customer])


def billed(fake: FakeStripe, customer: str) -> Counter[str]:
    """What Stripe would bill: meter events deduplicated by identifier, per event name."""
    seen: dict[str, tuple[str, int]] = {}
    for event in fake.meter_events:
        if event["payload"]["stripe_customer_id"] == customer:
            seen.setdefault(
                event["identifier"], (event["event_name"], int(event["payload"]["value"]))
            )
    totals: Counter[str] = Counter()
    for name, value in seen.values():
        totals[name] += value
    return totals


def test_usage_is_billed_once_per_meter_and_minute(redis_url: str, fake_stripe: FakeStripe) -> None:
    async def work(store: Store, reporter: Reporter) -> tuple[str, int, int]:
        customer = await new_account(store, fake_stripe)
        now = int(time.time())
        for quantity in (3, 4, 5):
            await use(store, customer, "api_calls", quantity, now)
        await use(store, customer, "api_calls", 10, now - 120)  # another minute
        await use(store, customer, "tokens", 700, now)
        first = await reporter.round(limit=10_000)
        second = await reporter.round(limit=10_000)
        return customer, first, second

    customer, first, second = run(redis_url, fake_stripe, work)
    assert billed(fake_stripe, customer) == {"api_calls": 22, "llm_tokens": 700}
    assert second == 0
    sent = [e for e in fake_stripe.meter_events if e["payload"]["stripe_customer_id"] == customer]
    assert len(sent) == 3  # (api_calls, now), (api_calls, now-120), (tokens, now)
    assert first >= 3  # other tests' customers may be billed in the same round
    assert all(e["identifier"].startswith("tw_") for e in sent)

    async def report(store: Store, reporter: Reporter) -> dict[str, tuple[int, int]]:
        from sidecar.periods import month_start

        return await store.usage_totals(customer, month_start(int(time.time())))

    totals = run(redis_url, fake_stripe, report)
    assert totals == {"api_calls": (22, 22), "tokens": (700, 700)}


@pytest.mark.parametrize(
    "fault",
    ["500", "429", "drop", "accept_then_drop", "slow"],
)
def test_failures_are_retried_without_double_billing(
    redis_url: str, fake_stripe: FakeStripe, fault: str
) -> None:
    path = "/v1/billing/meter_events"

    async def work(store: Store, reporter: Reporter) -> str:
        customer = await new_account(store, fake_stripe)
        for quantity in (1, 2, 3):
            await use(store, customer, "api_calls", quantity)
        if fault in ("500", "429"):
            fake_stripe.fail_next(2, status=int(fault), path_prefix=path)
        elif fault == "drop":
            fake_stripe.drop_next(2, path_prefix=path)
        elif fault == "accept_then_drop":
            fake_stripe.accept_then_drop_next(2, path_prefix=path)
        else:
            fake_stripe.delay_next(1, 3.0, path_prefix=path)  # longer than the 2 s timeout
        for _ in range(5):
            await reporter.round(limit=10_000)
        return customer

    customer = run(redis_url, fake_stripe, work)
    assert billed(fake_stripe, customer) == {"api_calls": 6}


def test_a_crash_after_stripe_accepted_resends_the_same_events(
    redis_url: str, fake_stripe: FakeStripe
) -> None:
    async def crash(store: Store, reporter: Reporter) -> str:
        customer = await new_account(store, fake_stripe)
        await use(store, customer, "api_calls", 5)
        await use(store, customer, "tokens", 50)
        # Plan and send, then die before acknowledging anything.
        events = await store.plan_batch(customer, 100)
        for event in events:
            await reporter._client.v1.billing.meter_events.create_async(
                {  # type: ignore[arg-type]
                    "event_name": "api_calls" if event["meter"] == "api_calls" else "llm_tokens",
                    "payload": {"stripe_customer_id": customer, "value": str(event["value"])},
                    "identifier": event["identifier"],
                    "timestamp": event["timestamp"],
                }
            )
        return customer

    customer = run(redis_url, fake_stripe, crash)

    async def restart(store: Store, reporter: Reporter) -> int:
        await use(store, customer, "api_calls", 7)  # new usage while we were down
        total = 0
        for _ in range(3):
            total += await reporter.round(limit=10_000)
        return total

    run(redis_url, fake_stripe, restart)
    assert billed(fake_stripe, customer) == {"api_calls": 12, "llm_tokens": 50}


def test_a_meter_dropped_from_the_config_is_set_aside_not_lost(
    redis_url: str, fake_stripe: FakeStripe
) -> None:
    async def work(store: Store, reporter: Reporter) -> str:
        customer = await new_account(store, fake_stripe)
        await use(store, customer, "tokens", 40)
        await use(store, customer, "api_calls", 2)
        return customer

    customer = run(redis_url, fake_stripe, work)
    without_tokens = {**CONFIG, "meters": [{"name": "api_calls"}]}

    async def bill(store: Store, reporter: Reporter) -> list[dict[str, Any]]:
        await reporter.round(limit=10_000)
        return await store.refused_events(customer)

    refused = run(redis_url, fake_stripe, bill, without_tokens)
    assert billed(fake_stripe, customer) == {"api_calls": 2}
    assert [(r["meter"], int(r["value"])) for r in refused] == [("tokens", 40)]
    assert "not configured" in refused[0]["error"]


def test_two_reporters_never_bill_the_same_usage_twice(
    redis_url: str, fake_stripe: FakeStripe
) -> None:
    async def work(store: Store, reporter: Reporter) -> list[str]:
        customers = [await new_account(store, fake_stripe) for _ in range(5)]
        for customer in customers:
            for quantity in range(1, 21):
                await use(store, customer, "api_calls", quantity)
        other = Reporter(store, reporter._client, reporter._settings, backoff=0.01)
        for _ in range(3):
            await asyncio.gather(reporter.round(limit=10_000), other.round(limit=10_000))
        return customers

    for customer in run(redis_url, fake_stripe, work):
        assert billed(fake_stripe, customer) == {"api_calls": 210}
        sent = [
            e for e in fake_stripe.meter_events if e["payload"]["stripe_customer_id"] == customer
        ]
        assert len({e["identifier"] for e in sent}) == len(sent)  # no resend was even needed


def test_huge_sums_are_billed_to_the_unit(redis_url: str, fake_stripe: FakeStripe) -> None:
    async def work(store: Store, reporter: Reporter) -> str:
        customer = await new_account(store, fake_stripe)
        now = int(time.time())
        for _ in range(150):  # 1.5e14 + 150 in one minute: past a double's 14 digits in JSON
            await use(store, customer, "api_calls", 10**12 + 1, now)
        await reporter.round(limit=10_000)
        return customer

    customer = run(redis_url, fake_stripe, work)
    assert billed(fake_stripe, customer) == {"api_calls": 150 * (10**12 + 1)}


def test_backlog_and_lag_show_usage_stripe_has_not_accepted_yet(
    redis_url: str, fake_stripe: FakeStripe
) -> None:
    # What an operator's alert watches: while Stripe refuses, the customer is in
    # the backlog and the lag is the age of its oldest unbilled usage; once
    # Stripe takes it, it leaves the backlog.
    def gauge(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    def gauges() -> tuple[float, float]:
        return gauge("tollway_reporter_backlog_customers"), gauge("tollway_reporter_lag_seconds")

    async def work(store: Store, reporter: Reporter) -> tuple[float, float, float]:
        customer = await new_account(store, fake_stripe)
        await use(store, customer, "api_calls", 5)
        fake_stripe.fail_next(50, status=500, path_prefix="/v1/billing/meter_events")
        try:
            await reporter.round(limit=10_000)
            await asyncio.sleep(1.2)  # the usage ages, still refused
            await reporter.round(limit=10_000)  # the gauges describe a round's start
            during = gauges()
        finally:
            fake_stripe.clear_faults()
        await reporter.round(limit=10_000)
        await reporter.round(limit=10_000)
        assert billed(fake_stripe, customer) == {"api_calls": 5}
        return (*during, gauges()[0])

    backlog, lag, backlog_after = run(redis_url, fake_stripe, work)
    assert backlog >= 1 and lag >= 1.2
    assert backlog_after <= backlog - 1
