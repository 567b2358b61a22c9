"""The gRPC transports: tollway.v1.Tollway (Authorize, RecordUsage, Release,
GetUsage) and Envoy's Authorization/Check. Each turns its request into one
call of the shared decision path (metrics.counted_decision) or of the store,
and the answer back into its reply.

Failure policy, in one place: a StoreUnavailable ends the call with gRPC
UNAVAILABLE (Envoy's failure_mode_allow / status_on_error then decide); any
other error is a bug and ends it with INTERNAL. Neither is ever an allow.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc

from sidecar import envoy
from sidecar.admin.grpc_api import peer_host, presented_token
from sidecar.admin.operations import AdminError
from sidecar.authorizer import Authorizer
from sidecar.decision import Decision, Reason
from sidecar.errors import StoreUnavailable
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.logs import bind_request_id
from sidecar.metrics import USAGE_EVENTS, counted_decision
from sidecar.plans import Plan
from sidecar.quota_alerts import AlertQueue, settlement_alerts
from sidecar.report import usage_report
from sidecar.settings import Settings
from sidecar.store.names import valid_customer_id
from sidecar.usage import UsageError, validate

if TYPE_CHECKING:
    from sidecar.server import Sidecar

__all__ = ["MAX_MESSAGE_BYTES", "CheckService", "TollwayService", "authorize_response"]

# Envoy's CheckRequest carries every request header; 1 MiB bounds a hostile one.
MAX_MESSAGE_BYTES = 1 << 20
_REASONS = {reason: pb.Reason.Value(f"REASON_{reason.name}") for reason in Reason}


def authorize_response(decision: Decision) -> pb.AuthorizeResponse:
    response = pb.AuthorizeResponse(
        allowed=decision.allowed,
        reason=_REASONS[decision.reason],
        customer_id=decision.customer_id,
        plan=decision.plan,
        retry_after_seconds=decision.retry_after,
        message=decision.message,
        lease_id=decision.lease_id,
    )
    if decision.rate:
        response.rate_limit.CopyFrom(
            pb.RateLimitState(
                limit=decision.rate.limit,
                remaining=decision.rate.remaining,
                reset_seconds=decision.rate.reset_seconds,
                rate_per_second=decision.rate.rate_per_second,
            )
        )
    if decision.quota:
        response.quota.CopyFrom(
            pb.QuotaState(
                limit=decision.quota.limit,
                used=decision.quota.used,
                remaining=decision.quota.remaining,
                period_end=decision.quota.period_end,
            )
        )
    if decision.credits is not None:
        response.credits.CopyFrom(pb.CreditState(balance=decision.credits))
    return response


_USAGE_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class TollwayService(pb_grpc.TollwayServicer):
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar
        self._authorizer = sidecar.authorizer
        # What a RecordUsage settling in credits reached (low balance, a top-up
        # due), queued for the companion as an admission's is.
        self._alerts = AlertQueue(sidecar.store.notify)

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeResponse:
        if request.request_id:
            bind_request_id(request.request_id)
        try:
            decision = await counted_decision(
                self._authorizer,
                request.api_key,
                method=request.method,
                path=request.path,
                cost=request.cost,
                feature=request.feature if request.HasField("feature") else None,
                request_id=request.request_id,
            )
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return authorize_response(decision)

    async def _customer(
        self,
        request: pb.RecordUsageRequest | pb.GetUsageRequest,
        context: grpc.aio.ServicerContext,
        scope: str,
    ) -> str:
        """The customer a usage call names, by key or id; UsageError if none.
        By id, with [sidecar] require_service_token, the call must carry a token
        with `scope` (the key is a credential of its own; an id is not)."""
        store = self._sidecar.store
        if request.WhichOneof("customer") == "api_key":
            record = await store.usable_record(request.api_key)
            if record is None:
                raise UsageError("unauthenticated", "API key is not valid")
            return record.customer_id
        customer = request.customer_id
        if not customer:
            raise UsageError("invalid_argument", "api_key or customer_id is required")
        if self._sidecar.settings.require_service_token:
            await self._service_caller(context, scope)
        if not valid_customer_id(customer):
            raise UsageError("not_found", f"no account {customer[:64]!r}")
        # StoreUnavailable passes through: an outage is UNAVAILABLE, never "no such account".
        if await store.get_account(customer) is None:
            raise UsageError("not_found", f"no account {customer[:64]!r}")
        return customer

    async def _service_caller(self, context: grpc.aio.ServicerContext, scope: str) -> None:
        admin = self._sidecar.admin
        try:
            caller = await admin.authenticate(
                presented_token(context.invocation_metadata()), peer=peer_host(context.peer())
            )
            admin.require(caller, scope)
        except AdminError as exc:
            if exc.kind == "unavailable":
                raise StoreUnavailable(exc.message) from None
            kind = exc.kind if exc.kind in _USAGE_CODES else "unauthenticated"
            raise UsageError(kind, exc.message) from None

    async def _record(
        self, request: pb.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordUsageResponse:
        settings = self._sidecar.settings
        now = int(time.time())
        at = request.timestamp.seconds if request.HasField("timestamp") else now
        validate(
            settings.catalog,
            meter=request.meter,
            quantity=request.quantity,
            idempotency_key=request.idempotency_key,
            at=at,
            now=now,
        )
        customer = await self._customer(request, context, "usage:write")
        # A settlement may be paid from credits: it reports the marks of the plan
        # its account is on (one more read, only for a settlement where plans burn
        # credits).
        plan: Plan | None = None
        if request.request_id and any(p.credits for p in settings.catalog.plans.values()):
            account = await self._sidecar.store.get_account(customer)
            plan = settings.catalog.plans.get(account.plan) if account else None
        recorded = await self._sidecar.store.record_usage(
            customer,
            meter=request.meter,
            quantity=request.quantity,
            at=at,
            idempotency=request.idempotency_key,
            dedupe_window=settings.usage.dedupe_window,
            request_id=request.request_id,
            lease_id=request.request_id,  # settling a request ends its lease too
            low_balance=settings.credits.low_balance_for(plan),
            top_up_at=settings.credits.top_up_at_for(plan),
            wait_for_aof=settings.usage.wait_for_aof,
            wait_for_replicas=settings.usage.wait_for_replicas,
        )
        for alert in settlement_alerts(customer, plan.name if plan else "", recorded):
            self._alerts(alert)
        if recorded.units or (recorded.duplicate and recorded.record_id != "-"):
            # A duplicate may be the retry of a call whose answer was lost: make
            # sure the reporter looks, rather than wait for the periodic sweep.
            self._sidecar.dirty.add(customer)
        USAGE_EVENTS.labels("duplicate" if recorded.duplicate else "accepted").inc()
        return pb.RecordUsageResponse(
            duplicate=recorded.duplicate, customer_id=customer, record_id=recorded.record_id
        )

    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordUsageResponse:
        try:
            response = await self._record(request, context)
        except UsageError as exc:
            USAGE_EVENTS.labels("rejected").inc()
            await context.abort(_USAGE_CODES[exc.kind], exc.message)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return response

    async def RecordUsageBatch(
        self, request: pb.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordUsageBatchResponse:
        results = []
        for event in request.events:
            try:
                response = await self._record(event, context)
                results.append(pb.RecordUsageResult(code=0, response=response))
            except UsageError as exc:
                USAGE_EVENTS.labels("rejected").inc()
                code = _USAGE_CODES[exc.kind].value[0]
                results.append(pb.RecordUsageResult(code=code, message=exc.message))
            except StoreUnavailable as exc:
                code = grpc.StatusCode.UNAVAILABLE.value[0]
                results.append(pb.RecordUsageResult(code=code, message=str(exc)))
        return pb.RecordUsageBatchResponse(results=results)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        try:
            record = await self._sidecar.store.usable_record(request.api_key)
            if record is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "API key is not valid")
                raise AssertionError("abort raises")
            released = await self._sidecar.store.release(record.customer_id, request.lease_id)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.ReleaseResponse(released=released)

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageResponse:
        try:
            customer = await self._customer(request, context, "usage:read")
            report = await usage_report(self._sidecar.store, self._sidecar.settings, customer)
        except UsageError as exc:
            await context.abort(_USAGE_CODES[exc.kind], exc.message)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.GetUsageResponse(
            customer_id=customer,
            plan=report.plan,
            period_start=report.period_start,
            meters=[
                pb.MeterUsage(meter=m.meter, used=m.used, reported=m.reported, pending=m.pending)
                for m in report.meters
            ],
            quota=pb.QuotaState(
                limit=report.quota_limit,
                used=report.quota_used,
                remaining=max(0, report.quota_limit - report.quota_used),
            ),
            credits=None if report.credits is None else pb.CreditState(balance=report.credits),
        )


class CheckService(ext_authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer, settings: Callable[[], Settings]) -> None:
        self._authorizer = authorizer
        self._settings = settings

    async def Check(
        self, request: ext_authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> ext_authz.CheckResponse:
        http = request.attributes.request.http
        settings = self._settings()
        names = settings.headers
        key, key_header = envoy.extract_key(http.headers, names)
        # The request's id names its lease (and, with a settlement, its reservation):
        # Envoy's x-request-id, else one made here and sent upstream, so the
        # backend can release or settle it by that id.
        lease_id, extra = http.headers.get("x-request-id", ""), []
        if not lease_id:
            lease_id = uuid.uuid4().hex
            extra = [("x-request-id", lease_id)]
        bind_request_id(lease_id)
        request_id = lease_id if settings.envoy.reserves else ""
        try:
            decision = await counted_decision(
                self._authorizer,
                key,
                method=http.method,
                path=http.path,
                request_id=request_id,
                lease_id=lease_id,
                reservation_optional=True,  # for the upstream's cost header only
            )
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return envoy.check_response(
            decision, key_header=key_header, names=names, upstream_headers=extra
        )
