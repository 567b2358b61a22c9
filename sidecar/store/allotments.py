"""Allotments (leased enforcement): handing back what a sidecar took.

admit.lua grants an allotment with an admission (Admission.allot_*);
return_allotment.lua takes it back: the unused units to the bucket and the
quota (and, on a plan with credits, to the balance that paid for them), the used
ones recorded as usage, each allotment once however often its return is retried.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.periods import month_start
from sidecar.store.base import StoreBase
from sidecar.store.names import (
    allotments_key,
    credit_ledger_key,
    credits_key,
    limits_key,
    totals_key,
    usage_key,
)
from sidecar.store.text import text

__all__ = ["AllotmentReturn", "AllotmentStore", "Returned"]


@dataclass(frozen=True, slots=True)
class AllotmentReturn:
    """What a sidecar reports of one allotment it is done with."""

    customer_id: str
    allotment_id: str
    used: int  # units admitted from it
    rate: float  # the plan's limits it was granted under
    burst: int
    meter: str  # "" when the plan meters nothing
    granted_at: int  # Redis's clock at the grant (Unix s): when its usage happened
    period: str = "month"  # the plan's quota period then (hour | day | month)
    credits: bool = False  # the plan burns credits: paid at the grant, unused refunded


@dataclass(frozen=True, slots=True)
class Returned:
    state: str  # "returned", "lapsed" or "unknown" (see return_allotment.lua)
    given_back: int  # units the bucket took back


class AllotmentStore(StoreBase):
    async def return_allotment(self, done: AllotmentReturn) -> Returned:
        """Runs return_allotment.lua; safe to retry (an allotment returns once)."""
        customer = done.customer_id
        keys = [
            limits_key(customer),
            allotments_key(customer),
            usage_key(customer),
            totals_key(customer),
            credits_key(customer),
            credit_ledger_key(customer),
        ]
        args = [
            "" if self._clock_us is None else self._clock_us(),
            done.allotment_id,
            done.used,
            repr(done.rate),
            done.burst,
            done.meter,
            done.granted_at,
            month_start(done.granted_at),
            done.period,
            "1" if done.credits else "",
        ]
        async with self._guard("allotment return"):
            raw = await self._run("return_allotment.lua", keys, args, fast=True)
        return Returned(state=text(raw[0]), given_back=int(raw[1]))
