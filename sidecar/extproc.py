"""Envoy ext_proc: the response phase of a request Tollway let through.

Envoy runs the ext_proc filter with request headers skipped and response
headers sent, forwarding the ext_authz filter's dynamic metadata (what Check
decided: customer, plan, reserved cost, lease). On the response headers:

- the real cost is the upstream's `x-tollway-cost` header (configurable) when
  present, else the reserved estimate; with bill_only_success a 5xx costs 0;
- the reservation is settled at that cost (quota and metered usage move to
  the real amount) and the concurrency lease is released, in one script;
- the cost header is removed; the client gets x-tollway-charged and, for a
  plan with a quota, the quota's final state.

Anything unexpected (no metadata, Redis down) leaves the response untouched:
the reservation then expires at its estimate and the lease at its TTL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.protobuf.json_format import MessageToDict

from sidecar.envoy import METADATA_NAMESPACE
from sidecar.errors import StoreUnavailable
from sidecar.settings import Settings
from sidecar.store import Store
from sidecar.store.names import valid_customer_id

__all__ = ["ExtProcService", "real_cost"]

log = logging.getLogger("tollway.extproc")

_MAX_COST: Final = 10**9


def real_cost(header: str | None, *, estimate: int, status: int, bill_only_success: bool) -> int:
    """What a finished request costs. Pure."""
    if bill_only_success and status >= 500:
        return 0
    if header is None:
        return estimate
    text = header.strip()
    if text.isascii() and text.isdigit() and int(text) <= _MAX_COST:
        return int(text)
    log.warning("ignoring a malformed cost header %r; charging the estimate", header[:40])
    return estimate


def _headers(message: ext_proc.HttpHeaders) -> dict[str, str]:
    return {
        h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in message.headers.headers
    }


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class ExtProcService(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        metered: Callable[[str], None],
    ) -> None:
        self._store = store
        self._settings = settings
        self._metered = metered

    async def Process(
        self,
        requests: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        async for request in requests:
            phase = request.WhichOneof("request")
            if phase == "response_headers":
                mutation = await self._settle(request)
                yield ext_proc.ProcessingResponse(
                    response_headers=ext_proc.HeadersResponse(
                        response=ext_proc.CommonResponse(header_mutation=mutation)
                    )
                )
            elif phase is None:  # an empty message gets an empty answer
                yield ext_proc.ProcessingResponse()
            elif phase == "request_headers":  # not asked for; pass through unchanged
                yield ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())
            else:  # bodies and trailers are never configured; answer what was sent
                yield ext_proc.ProcessingResponse(**{phase: _empty(phase)})

    async def _settle(self, request: ext_proc.ProcessingRequest) -> ext_proc.HeaderMutation:
        settings = self._settings()
        cost_header = settings.envoy.cost_header
        headers = _headers(request.response_headers)
        mutation = ext_proc.HeaderMutation(remove_headers=[cost_header])
        struct = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        if struct is None:
            return mutation
        try:
            meta: dict[str, Any] = MessageToDict(struct)
        except ValueError:  # e.g. a NaN number: not metadata Check wrote
            return mutation
        customer, request_id = str(meta.get("customer", "")), str(meta.get("request_id", ""))
        lease_id = str(meta.get("lease_id", ""))
        if not valid_customer_id(customer) or not (request_id or lease_id):
            return mutation
        plan = settings.catalog.plans.get(str(meta.get("plan", "")))
        status = headers.get(":status", "200")
        estimate = meta.get("cost", 1)
        cost = real_cost(
            headers.get(cost_header),
            # Metadata is ours (from Check) but arrives through Envoy: read it warily.
            estimate=int(estimate) if isinstance(estimate, int | float) and estimate >= 0 else 1,
            status=int(status) if status.isascii() and status.isdigit() else 200,
            bill_only_success=bool(meta.get("bill_only_success", False)),
        )
        try:
            if request_id:
                recorded = await self._store.record_usage(
                    customer,
                    meter=(plan.meter or "") if plan else "",
                    quantity=cost,
                    at=int(time.time()),
                    idempotency=f"settle:{request_id}",
                    dedupe_window=settings.usage.dedupe_window,
                    request_id=request_id,
                    lease_id=lease_id,
                )
                if recorded.units:
                    self._metered(customer)
                quota_used = recorded.quota_used
            else:
                await self._store.release(customer, lease_id)
                quota_used = -1
        except StoreUnavailable as exc:
            log.error("response of %s not settled (expires at its estimate): %s", customer, exc)
            return mutation
        mutation.set_headers.append(_set("x-tollway-charged", str(cost)))
        if plan is not None and plan.quota is not None and quota_used >= 0:
            left = max(0, plan.quota.limit - quota_used)
            mutation.set_headers.extend(
                [
                    _set("x-tollway-quota-limit", str(plan.quota.limit)),
                    _set("x-tollway-quota-used", str(quota_used)),
                    _set("x-tollway-quota-remaining", str(left)),
                ]
            )
        return mutation


def _empty(phase: str) -> Any:
    if phase.endswith("_body"):
        return ext_proc.BodyResponse()
    if phase.endswith("_trailers"):
        return ext_proc.TrailersResponse()
    return ext_proc.HeadersResponse()
