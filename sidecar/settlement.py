"""Settling a request after its response: the rules ext_proc (extproc.py) and
the access-log service (accesslog.py) share, written once.

What Check decided comes back through Envoy as ext_authz's dynamic metadata
(envoy.settlement_fields): customer, plan, request_id (the reservation, when
Check made one), lease_id, cost (the estimate) and bill_only_success. It is
ours, but it arrives through a port anyone can reach, so `finished` reads it
warily, and metadata it cannot read settles nothing.

- The real cost (`real_cost`): 0 for a 5xx with bill_only_success; else the
  upstream's cost header, when it is a plain integer; else the estimate.
- A reservation is settled at that cost and the lease released, in one
  script, under the idempotency key settle:<request_id>: a second settlement
  of the same request (a replayed log entry, ext_proc and an access log both
  configured) is a duplicate and changes nothing.
- Without a reservation only the lease is released: nothing is charged now
  (the estimate was metered on admission).
- `Settled.charged` is the cost this call applied, None when it applied none
  (no reservation, a duplicate): a transport states a charge only if it has one.
- A reservation paid from credits settles in credits, with the plan's
  low-balance and auto top-up marks: the marks its burn reaches are handed to
  on_alert (an AlertQueue), exactly as an admission's are.
- StoreUnavailable propagates; the caller logs it. The reservation then bills
  at its estimate after reservation_ttl, and the lease frees itself at lease_ttl.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from google.protobuf.struct_pb2 import Struct

from sidecar.authorizer import Alert
from sidecar.quota_alerts import settlement_alerts
from sidecar.settings import Settings
from sidecar.store import Store
from sidecar.store.names import valid_customer_id

__all__ = ["Finished", "Mismatch", "Settled", "finished", "plain", "real_cost", "settle"]

log = logging.getLogger("tollway.settlement")

MAX_COST: Final = 10**9
_ESTIMATE_OTHERWISE: Final = 1  # an unreadable estimate: Check's smallest cost


@dataclass(frozen=True, slots=True)
class Finished:
    """A request Check let through, as its metadata tells it."""

    customer: str
    plan: str
    request_id: str  # the reservation to settle; "" when Check reserved nothing
    lease_id: str  # the concurrency lease to release; may be ""
    estimate: int
    bill_only_success: bool


@dataclass(frozen=True, slots=True)
class Settled:
    charged: int | None  # the cost this settlement applied; None: it applied none
    quota_used: int = -1  # the quota counter after it (-1: not known)
    duplicate: bool = False  # the request was settled before

    @property
    def result(self) -> str:
        """For tollway_settlements_total: settled, duplicate or released."""
        if self.duplicate:
            return "duplicate"
        return "released" if self.charged is None else "settled"


def real_cost(header: str | None, *, estimate: int, status: int, bill_only_success: bool) -> int:
    """What a finished request costs. Pure."""
    if bill_only_success and status >= 500:
        return 0
    if header is None:
        return estimate
    text = header.strip()
    if text.isascii() and text.isdigit() and int(text) <= MAX_COST:
        return int(text)
    log.warning("ignoring a malformed cost header %r; charging the estimate", header[:40])
    return estimate


def plain(struct: Struct) -> dict[str, str | float | bool]:
    """A Struct's scalar fields (nested values dropped), read without json_format,
    which refuses a NaN."""
    fields: dict[str, str | float | bool] = {}
    for name, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        if kind in ("string_value", "number_value", "bool_value"):
            fields[name] = getattr(value, kind)
    return fields


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _estimate(value: object) -> int:
    """Check writes a number; HTTP ext_authz's metadata from headers may be text."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _ESTIMATE_OTHERWISE
    if not math.isfinite(value) or not 0 <= value <= MAX_COST:
        return _ESTIMATE_OTHERWISE
    return int(value)


def finished(meta: Mapping[str, object]) -> Finished | None:
    """The request the metadata describes; None if it is not metadata Check wrote
    (no valid customer, or neither a reservation nor a lease). Pure."""
    customer, request_id, lease_id = (
        _text(meta.get(k)) for k in ("customer", "request_id", "lease_id")
    )
    if not valid_customer_id(customer) or not (request_id or lease_id):
        return None
    only_success = meta.get("bill_only_success")
    return Finished(
        customer=customer,
        plan=_text(meta.get("plan")),
        request_id=request_id,
        lease_id=lease_id,
        estimate=_estimate(meta.get("cost")),
        # HTTP ext_authz's metadata from headers carries "true" as text
        bill_only_success=only_success is True or only_success == "true",
    )


async def settle(
    store: Store,
    settings: Settings,
    request: Finished,
    *,
    status: int,
    cost_header: str | None,
    metered: Callable[[str], None],
    on_alert: Callable[[Alert], None],
) -> Settled:
    """Settles the request's reservation at its real cost (or only releases its
    lease). status: the response's HTTP status (0 if none was sent); cost_header:
    the upstream's cost, as sent, if it sent one. metered(customer) is told of
    usage to bill, on_alert of each mark a settlement in credits reached (it must
    not block). StoreUnavailable propagates."""
    if not request.request_id:
        await store.release(request.customer, request.lease_id)
        return Settled(charged=None)
    cost = real_cost(
        cost_header,
        estimate=request.estimate,
        status=status,
        bill_only_success=request.bill_only_success,
    )
    plan = settings.catalog.plans.get(request.plan)
    recorded = await store.record_usage(
        request.customer,
        meter=(plan.meter or "") if plan else "",
        quantity=cost,
        at=int(time.time()),
        idempotency=f"settle:{request.request_id}",
        dedupe_window=settings.usage.dedupe_window,
        request_id=request.request_id,
        lease_id=request.lease_id,
        low_balance=settings.credits.low_balance_for(plan),
        top_up_at=settings.credits.top_up_at_for(plan),
    )
    if recorded.units:
        metered(request.customer)
    for alert in settlement_alerts(request.customer, request.plan, recorded):
        on_alert(alert)
    if recorded.duplicate:
        return Settled(charged=None, quota_used=recorded.quota_used, duplicate=True)
    return Settled(charged=cost, quota_used=recorded.quota_used)


class Mismatch:
    """tollway.toml and the Envoy config disagree about what settles requests:
    said once per process, at ERROR, since it mis-settles every request until
    someone fixes one of the two files."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.said = False

    def say(self, message: str, *args: object) -> None:
        if not self.said:
            self.said = True
            self._log.error(message, *args)
