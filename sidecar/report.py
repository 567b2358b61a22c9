"""A customer's usage this period: what GetUsage and `tollway usage show` say."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sidecar.periods import month_start
from sidecar.settings import Settings
from sidecar.store import Store

__all__ = ["MeterReport", "UsageReport", "usage_report"]


@dataclass(frozen=True, slots=True)
class MeterReport:
    meter: str
    used: int  # recorded this month
    reported: int  # accepted by Stripe
    pending: int  # recorded, not yet accepted by Stripe


@dataclass(frozen=True, slots=True)
class UsageReport:
    customer_id: str
    plan: str
    period_start: int
    meters: tuple[MeterReport, ...]
    quota_limit: int
    quota_used: int
    refused: int  # events Stripe refused for good (see `tollway usage show`)
    credits: int | None = None  # the prepaid balance (None: never granted any)


async def usage_report(store: Store, settings: Settings, customer_id: str) -> UsageReport:
    account = await store.require_account(customer_id)
    period = month_start(int(time.time()))
    totals = await store.usage_totals(customer_id, period)
    meters = tuple(
        MeterReport(meter, used, billed, max(0, used - billed))
        for meter, (used, billed) in totals.items()
    )
    plan = settings.catalog.plans.get(account.plan)
    _, quota_used, _ = await store.usage(customer_id)
    return UsageReport(
        customer_id=customer_id,
        plan=account.plan,
        period_start=period,
        meters=meters,
        quota_limit=plan.quota.limit if plan and plan.quota else 0,
        quota_used=quota_used,
        refused=len(await store.refused_events(customer_id)),
        credits=await _balance(store, customer_id, plan is not None and plan.credits),
    )


async def _balance(store: Store, customer_id: str, on_plan: bool) -> int | None:
    if not on_plan and not await store.has_credits(customer_id):
        return None
    return (await store.credit_balance(customer_id)).balance
