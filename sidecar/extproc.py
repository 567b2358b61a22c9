"""Envoy ext_proc: the response phase of a request Tollway let through, for
clients that must see what their request cost in its own response.

Envoy runs the ext_proc filter with request headers skipped and response
headers sent, forwarding the ext_authz filter's dynamic metadata (what Check
decided: customer, plan, reserved cost, lease). On the response headers the
request is settled by the shared rules (settlement.py: the upstream's cost
header, 5xx refunds with bill_only_success, settle:<request_id> once), then:

- the cost header is removed, always;
- the client gets x-tollway-charged and, for a plan with a quota, the quota's
  final state, only when this settlement applied a charge: never for a request
  Check reserved nothing for, or one settled before.

Expected with `[envoy] settlement = "ext_proc"` (or ext_proc = true). Envoy
running the filter while tollway.toml names another settlement is said once
per process, at ERROR; the filter then still removes the cost header and
releases the lease, and states no charge it did not apply.
Anything unexpected (no metadata, Redis down) leaves the response untouched:
the reservation then expires at its estimate and the lease at its TTL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from sidecar import settlement
from sidecar.authorizer import Alert
from sidecar.envoy import METADATA_NAMESPACE
from sidecar.errors import StoreUnavailable
from sidecar.metrics import SETTLEMENTS
from sidecar.quota_alerts import AlertQueue
from sidecar.settings import Settings
from sidecar.settlement import real_cost
from sidecar.store import Store

__all__ = ["ExtProcService", "real_cost"]

log = logging.getLogger("tollway.extproc")


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
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metered = metered
        # What a settlement in credits reached (low balance, a top-up due): queued
        # for the companion off this path, as the Authorizer's are.
        self._on_alert = on_alert or AlertQueue(store.notify)
        self._mismatch = settlement.Mismatch(log)

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
        mutation = ext_proc.HeaderMutation(remove_headers=[cost_header])
        mismatched = settings.envoy.settlement != "ext_proc"

        def count(result: str) -> None:  # one result per response; a mismatch is that
            SETTLEMENTS.labels("ext_proc", "mismatch" if mismatched else result).inc()

        if mismatched:
            self._mismatch.say(
                "tollway.toml and the Envoy config disagree: Envoy runs Tollway's ext_proc "
                'filter, but [envoy] settlement = %r in %s. Set settlement = "ext_proc", or '
                "drop the filter from Envoy; until then ext_proc states no charge it did not "
                "apply. (Said once per process.)",
                settings.envoy.settlement,
                settings.config_path or "tollway.toml",
            )
        struct = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        finished = settlement.finished(settlement.plain(struct)) if struct is not None else None
        if finished is None:
            count("skipped")
            return mutation
        headers = _headers(request.response_headers)
        status = headers.get(":status", "200")
        try:
            settled = await settlement.settle(
                self._store,
                settings,
                finished,
                status=int(status) if status.isascii() and status.isdigit() else 200,
                cost_header=headers.get(cost_header),
                metered=self._metered,
                on_alert=self._on_alert,
            )
        except StoreUnavailable as exc:
            count("unavailable")
            log.error(
                "response of %s not settled (expires at its estimate): %s", finished.customer, exc
            )
            return mutation
        count(settled.result)
        if settled.charged is None:
            return mutation
        mutation.set_headers.append(_set("x-tollway-charged", str(settled.charged)))
        plan = settings.catalog.plans.get(finished.plan)
        if plan is not None and plan.quota is not None and settled.quota_used >= 0:
            left = max(0, plan.quota.limit - settled.quota_used)
            mutation.set_headers.extend(
                [
                    _set("x-tollway-quota-limit", str(plan.quota.limit)),
                    _set("x-tollway-quota-used", str(settled.quota_used)),
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
