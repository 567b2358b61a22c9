"""tollway.admin.v1.AdminService over gRPC, on the sidecar's port: each RPC
authenticates its admin token, calls one operation of sidecar/admin/operations.py
and maps the result back (an AdminError to its gRPC status). Mapping only.

The token comes from the metadata ``authorization: Bearer twadm_…`` (or
``x-tollway-admin-token: twadm_…``). Failed authentications are counted per
host (the peer without its port), so reconnecting does not reset them; a valid
token is served whatever its host's failures. No token is ever logged or echoed
in an error.

``presented_token`` and ``peer_host`` live here for every gRPC service that
takes admin tokens: the usage calls' service credentials (sidecar/grpc_api.py)
read them the same way.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from sidecar.admin.operations import (
    ERROR_STATUS,
    AccountView,
    Admin,
    AdminError,
    IssuedKey,
    KeyView,
)
from sidecar.errors import StoreUnavailable
from sidecar.gen.tollway.admin.v1 import admin_pb2 as pb
from sidecar.gen.tollway.admin.v1 import admin_pb2_grpc as pb_grpc
from sidecar.key_policy import KeyPolicy
from sidecar.store import TokenRecord

__all__ = ["AdminService", "peer_host", "presented_token"]

T = TypeVar("T")
_DEFAULT_OVERLAP = 86400  # RotateKey without overlap_seconds: a day, as Admin.rotate_key


def presented_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The admin token a call's metadata carries ("" if none)."""
    fallback = ""
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == "authorization":
            scheme, _, token = value.strip().partition(" ")
            # Not a Bearer: the whole value, which fails as a token that is not valid.
            return token.strip() if scheme.lower() == "bearer" else value.strip()
        if key == "x-tollway-admin-token" and not fallback:
            fallback = value.strip()
    return fallback


def peer_host(peer: str) -> str:
    """context.peer() without the port ("ipv4:127.0.0.1:5123" -> "ipv4:127.0.0.1")."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = address.rpartition(":")
        if sep and port.isdigit():
            return f"{kind}:{host}"
    return peer


def _account(view: AccountView) -> pb.Account:
    return pb.Account(
        customer_id=view.customer_id,
        plan=view.plan,
        status=view.status,
        grace_until=view.grace_until,
        created_at=view.created_at,
        subscription_id=view.subscription_id,
    )


def _key(view: KeyView) -> pb.Key:
    return pb.Key(
        key_id=view.key_id,
        customer_id=view.customer_id,
        state=view.state,
        environment=view.environment,
        created_at=view.created_at,
        expires_at=view.expires_at,
        revoked_reason=view.revoked_reason,
        last_used=view.last_used,
        policy=pb.KeyPolicy(
            name=view.name,
            metadata_json=json.dumps(view.metadata) if view.metadata else "",
            has_scope_features=view.scope_features is not None,
            scope_features=view.scope_features or [],
            scope_routes=view.scope_routes,
            rate=view.rate or "",
            burst=view.burst or 0,
            quota=view.quota or "",
            uses=view.uses or 0,
        ),
    )


def _policy(policy: pb.KeyPolicy) -> KeyPolicy:
    return Admin.policy(
        name=policy.name,
        metadata=policy.metadata_json,
        features=list(policy.scope_features) if policy.has_scope_features else None,
        routes=list(policy.scope_routes),
        rate=policy.rate,
        burst=policy.burst,
        quota=policy.quota,
        uses=policy.uses,
    )


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        operation: Callable[[TokenRecord], Awaitable[T]],
    ) -> T:
        """operation(caller) for the call's token; its AdminError as the call's status."""
        try:
            caller = await self._admin.authenticate(
                presented_token(context.invocation_metadata()), peer=peer_host(context.peer())
            )
            return await operation(caller)
        except AdminError as exc:
            await context.abort(grpc.StatusCode[ERROR_STATUS[exc.kind][1]], exc.message)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("abort raises")

    # -- accounts ----------------------------------------------------------------------

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateAccountResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.create_account(
                caller,
                customer_id=request.customer_id,
                plan=request.plan,
                status=request.status or "active",
                idempotency_key=request.idempotency_key,
            ),
        )
        return pb.CreateAccountResponse(account=_account(view))

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAccountResponse:
        view = await self._call(
            context, lambda caller: self._admin.get_account(caller, request.customer_id)
        )
        return pb.GetAccountResponse(account=_account(view))

    async def ListAccounts(
        self, request: pb.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAccountsResponse:
        views, next_token = await self._call(
            context,
            lambda caller: self._admin.list_accounts(
                caller, page_size=request.page_size, page_token=request.page_token
            ),
        )
        return pb.ListAccountsResponse(
            accounts=[_account(v) for v in views], next_page_token=next_token
        )

    async def SetAccountPlan(
        self, request: pb.SetAccountPlanRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAccountPlanResponse:
        view = await self._call(
            context, lambda caller: self._admin.set_plan(caller, request.customer_id, request.plan)
        )
        return pb.SetAccountPlanResponse(account=_account(view))

    async def SetAccountStatus(
        self, request: pb.SetAccountStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAccountStatusResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.set_status(
                caller, request.customer_id, request.status, grace_seconds=request.grace_seconds
            ),
        )
        return pb.SetAccountStatusResponse(account=_account(view))

    # -- keys --------------------------------------------------------------------------

    async def IssueKey(
        self, request: pb.IssueKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueKeyResponse:
        issued: IssuedKey = await self._call(
            context,
            lambda caller: self._admin.issue_key(
                caller,
                request.customer_id,
                environment=request.environment,
                expires_in=request.expires_in_seconds,
                policy=_policy(request.policy),
                idempotency_key=request.idempotency_key,
            ),
        )
        return pb.IssueKeyResponse(
            api_key=issued.api_key, key=_key(issued.key), replayed=issued.replayed
        )

    async def GetKey(
        self, request: pb.GetKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetKeyResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.get_key(caller, request.customer_id, request.key_id),
        )
        return pb.GetKeyResponse(key=_key(view))

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        views = await self._call(
            context, lambda caller: self._admin.list_keys(caller, request.customer_id)
        )
        return pb.ListKeysResponse(keys=[_key(v) for v in views])

    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeKeyResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.revoke_key(caller, request.customer_id, request.key_id),
        )
        return pb.RevokeKeyResponse(key=_key(view))

    async def UpdateKey(
        self, request: pb.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateKeyResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.update_key(
                caller, request.customer_id, request.key_id, _policy(request.policy)
            ),
        )
        return pb.UpdateKeyResponse(key=_key(view))

    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateKeyResponse:
        overlap = (
            request.overlap_seconds if request.HasField("overlap_seconds") else _DEFAULT_OVERLAP
        )
        issued: IssuedKey = await self._call(
            context,
            lambda caller: self._admin.rotate_key(
                caller,
                request.customer_id,
                request.key_id,
                overlap=overlap,
                idempotency_key=request.idempotency_key,
            ),
        )
        return pb.RotateKeyResponse(
            api_key=issued.api_key,
            key=_key(issued.key),
            replayed=issued.replayed,
            replaces=issued.replaces,
            old_key_expires_at=issued.old_key_expires_at,
        )

    # -- usage and credits -------------------------------------------------------------

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageResponse:
        usage = await self._call(
            context, lambda caller: self._admin.get_usage(caller, request.customer_id)
        )
        response = pb.GetUsageResponse(
            customer_id=usage.customer_id,
            plan=usage.plan,
            period_start=usage.period_start,
            meters=[
                pb.MeterUsage(meter=m.meter, used=m.used, reported=m.reported, pending=m.pending)
                for m in usage.meters
            ],
            quota_limit=usage.quota_limit,
            quota_used=usage.quota_used,
        )
        if usage.credits is not None:
            response.credits = usage.credits
        return response

    async def GetCredits(
        self, request: pb.GetCreditsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCreditsResponse:
        view = await self._call(
            context, lambda caller: self._admin.get_credits(caller, request.customer_id)
        )
        return pb.GetCreditsResponse(customer_id=view.customer_id, balance=view.balance)

    async def GrantCredits(
        self, request: pb.GrantCreditsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GrantCreditsResponse:
        view = await self._call(
            context,
            lambda caller: self._admin.grant_credits(
                caller,
                request.customer_id,
                credits=request.credits,
                expires_in=request.expires_in_seconds,
                reason=request.reason,
                idempotency_key=request.idempotency_key,
            ),
        )
        return pb.GrantCreditsResponse(
            customer_id=view.customer_id,
            balance=view.balance,
            grant_id=view.grant_id,
            result=view.result,
        )
