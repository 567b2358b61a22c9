"""The request path's one script: admit.lua, its inputs and its answer.

``Admission`` is the script's ARGV as one typed record: its fields, in order,
are the script's ARGV (tests/test_store_admission.py holds the header of
admit.lua to it), so a new input is a new field and a new header line, never
a count of positions. ``admission()`` builds it from a plan and a request;
``Store.admit`` runs it; ``parse_outcome`` reads the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Final

from sidecar.decision import Outcome, OutcomeCode
from sidecar.key_policy import NO_POLICY, KeyPolicy
from sidecar.periods import period_at
from sidecar.plans import Plan
from sidecar.store.base import StoreBase
from sidecar.store.names import (
    account_key,
    alerts_key,
    allotments_key,
    credit_ledger_key,
    credits_key,
    key_limits_key,
    leases_key,
    legacy_quota_key,
    limits_key,
    request_hash,
    reservation_key,
    reservations_key,
    totals_key,
    usage_key,
)
from sidecar.store.text import text

__all__ = ["ADMIT_KEYS", "Admission", "AdmissionStore", "admission", "parse_outcome"]

# admit.lua's KEYS, in order, by the names its header gives them.
ADMIT_KEYS: Final = (
    "account",
    "limits",
    "legacy_quota",
    "usage",
    "totals",
    "reservation",
    "reservations",
    "alerts",
    "leases",
    "credits",
    "ledger",
    "key_limits",
    "allotments",
)


@dataclass(frozen=True, slots=True)
class Admission:
    """admit.lua's ARGV, in order (see the script's header for each)."""

    now_us: int | None  # None: Redis TIME, the production clock
    expected_plan: str  # "" asks only which plan to enforce
    rate: float
    burst: int
    quota_limit: int
    quota_period: str
    period_start: int  # the current period by the caller's clock (the script checks it)
    period_end: int
    month_start: int
    overage: str
    meter: str
    concurrency: int
    lease_ttl: int
    fallback_plan: str
    cost: int
    feature_ok: bool
    key_expires_us: int
    reservation: str  # a request hash, or "" to meter now
    reservation_ttl: int
    thresholds: tuple[int, ...]
    lease_id: str
    credits: str  # "" (no credits), or what an uncovered request gets: block | bill | plan
    credits_fallback: str  # the plan enforced while the balance is short (mode plan)
    credits_parent: str  # the plan whose credits fallback expected_plan is, or ""
    low_balance: tuple[int, ...]  # balances that notify when reached
    top_up_at: int | None  # the auto top-up mark for accounts without their own
    key_rate: float  # the key's own limits (sidecar/key_policy.py); 0: none
    key_burst: int
    key_quota: int
    key_period: str
    key_uses: int
    allot_id: str = ""  # an allotment to take on admission (leased enforcement), or ""
    allot_units: int = 0  # units wanted in it beyond this request's cost
    allot_ttl: int = 0  # seconds they are held for this sidecar before they lapse
    shadow: str = ""  # the plan's limits in shadow mode, comma separated ("" = none)

    def argv(self) -> list[str | int]:
        """The fields in order, as the script reads them (tests/test_admission.py
        holds this to the field order; written out, as it runs on every request)."""
        return [
            "" if self.now_us is None else self.now_us,
            self.expected_plan,
            repr(self.rate),  # exact: the script reads it with tonumber
            self.burst,
            self.quota_limit,
            self.quota_period,
            self.period_start,
            self.period_end,
            self.month_start,
            self.overage,
            self.meter,
            self.concurrency,
            self.lease_ttl,
            self.fallback_plan,
            self.cost,
            1 if self.feature_ok else 0,
            self.key_expires_us,
            self.reservation,
            self.reservation_ttl,
            ",".join(map(str, self.thresholds)) if self.thresholds else "",
            self.lease_id,
            self.credits,
            self.credits_fallback,
            self.credits_parent,
            ",".join(map(str, self.low_balance)) if self.low_balance else "",
            "" if self.top_up_at is None else self.top_up_at,
            repr(self.key_rate),
            self.key_burst,
            self.key_quota,
            self.key_period,
            self.key_uses,
            self.allot_id,
            self.allot_units,
            self.allot_ttl,
            self.shadow,
        ]


def admission(
    plan: Plan | None,
    *,
    cost: int,
    feature_ok: bool,
    key_expires_at_us: int,
    fallback_plan: str | None = None,
    request_id: str = "",
    reservation_ttl: int = 300,
    thresholds: tuple[int, ...] = (),
    lease_id: str = "",
    credits_parent: str = "",
    low_balance: tuple[int, ...] = (),
    top_up_at: int | None = None,
    key_policy: KeyPolicy = NO_POLICY,
    allotment: tuple[str, int, int] = ("", 0, 0),
) -> Admission:
    """The script's inputs for one request under plan's limits (None: no plan
    known yet; the script then only names the plan). With request_id, a metered
    cost is reserved (settled later) instead of metered now. A plan with a
    concurrency limit takes the lease lease_id. credits_parent: plan is that
    plan's credits fallback, enforced only while its balance is short.
    top_up_at: [credits] auto_top_up_at; a plan's own auto_top_up_at wins over it.
    allotment: (id, units wanted, seconds held) to take on admission, or none."""
    quota = plan.quota if plan else None
    kind = quota.period if quota else "month"
    start, end, month = period_at(kind, int(time.time()))
    return Admission(
        now_us=None,
        expected_plan=plan.name if plan else "",
        rate=plan.rate.per_second if plan else 1.0,
        burst=plan.burst if plan else 1,
        quota_limit=quota.limit if quota else 0,
        quota_period=kind,
        period_start=start,
        period_end=end,
        month_start=month,
        overage=plan.overage if plan else "block",
        meter=(plan.meter or "") if plan else "",
        concurrency=plan.concurrency if plan else 0,
        lease_ttl=plan.lease_ttl if plan else 60,
        fallback_plan=fallback_plan or "",
        cost=cost,
        feature_ok=feature_ok,
        key_expires_us=key_expires_at_us,
        reservation=request_hash(request_id) if request_id else "",
        reservation_ttl=reservation_ttl,
        thresholds=thresholds,
        lease_id=lease_id,
        credits=_credit_mode(plan),
        credits_fallback=plan.credits_fallback if plan else "",
        credits_parent=credits_parent,
        low_balance=low_balance if plan and plan.credits else (),
        top_up_at=plan.auto_top_up_at
        if plan is not None and plan.auto_top_up_at is not None
        else top_up_at,
        key_rate=key_policy.rate.per_second if key_policy.rate else 0.0,
        key_burst=key_policy.burst,
        key_quota=key_policy.quota.limit if key_policy.quota else 0,
        key_period=key_policy.quota.period if key_policy.quota else "month",
        key_uses=key_policy.uses,
        allot_id=allotment[0],
        allot_units=allotment[1],
        allot_ttl=allotment[2],
        shadow=",".join(sorted(plan.shadow)) if plan and plan.shadow else "",
    )


def _credit_mode(plan: Plan | None) -> str:
    if plan is None or not plan.credits:
        return ""
    return "plan" if plan.credits_fallback else plan.credits_exhausted


def parse_outcome(raw: list[Any]) -> Outcome:
    """Reads admit.lua's reply (see the script's header for the contract)."""
    return Outcome(
        code=OutcomeCode(int(raw[0])),
        plan=text(raw[1]),
        status=text(raw[2]),
        tokens=int(raw[3]) / 1000,
        reset_ms=int(raw[4]),
        retry_ms=int(raw[5]),
        quota_used=int(raw[6]),
        period_end=int(raw[7]),
        now=int(raw[8]),
        thresholds=tuple(int(p) for p in text(raw[9]).split(",") if p),
        credits=None if raw[10] in (b"", "") else int(raw[10]),
        low_balance=tuple(int(n) for n in text(raw[11]).split(",") if n),
        top_up=text(raw[12]),
        allotted=int(raw[13]),
        held=int(raw[14]),
        shadow=OutcomeCode(int(raw[15])) if int(raw[15]) else None,
    )


def _keys(customer_id: str, reservation: str, key_id: str) -> list[str]:
    return [
        account_key(customer_id),
        limits_key(customer_id),
        legacy_quota_key(customer_id),
        usage_key(customer_id),
        totals_key(customer_id),
        reservation_key(customer_id, reservation or "-"),
        reservations_key(customer_id),
        alerts_key(customer_id),
        leases_key(customer_id),
        credits_key(customer_id),
        credit_ledger_key(customer_id),
        key_limits_key(customer_id, key_id or "-"),
        allotments_key(customer_id),
    ]


class AdmissionStore(StoreBase):
    async def admit(self, customer_id: str, request: Admission, *, key_id: str = "") -> Outcome:
        """Runs admit.lua for one request: every limit checked, consumed only if all pass.
        key_id names the key's own counters, for a key with limits of its own."""
        if self._clock_us is not None:
            now_us = self._clock_us()
            start, end, month = period_at(request.quota_period, now_us // 1_000_000)
            request = replace(
                request, now_us=now_us, period_start=start, period_end=end, month_start=month
            )
        keys = _keys(customer_id, request.reservation, key_id)
        async with self._guard("decision"):
            raw = await self._run("admit.lua", keys, request.argv(), fast=True)
        return parse_outcome(raw)
