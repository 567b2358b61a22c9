"""The admin API as JSON over HTTP, on the companion: the operations of
sidecar/admin/operations.py (which the sidecar also serves as gRPC
tollway.admin.v1), under /admin/v1. Only the mapping lives here.

    POST /admin/v1/accounts                                {customer_id, plan, status?}
    GET  /admin/v1/accounts?page_size=&page_token=
    GET  /admin/v1/accounts/{customer_id}
    POST /admin/v1/accounts/{customer_id}/plan             {plan}
    POST /admin/v1/accounts/{customer_id}/status           {status, grace_seconds?}
    POST /admin/v1/accounts/{customer_id}/keys             {environment?, expires_in?, policy…}
    GET  /admin/v1/accounts/{customer_id}/keys
    GET  /admin/v1/accounts/{customer_id}/keys/{key_id}
    POST /admin/v1/accounts/{customer_id}/keys/{key_id}    {policy…}: replaces it
    POST /admin/v1/accounts/{customer_id}/keys/{key_id}/revoke
    POST /admin/v1/accounts/{customer_id}/keys/{key_id}/rotate   {overlap?}
    GET  /admin/v1/accounts/{customer_id}/usage
    GET  /admin/v1/accounts/{customer_id}/credits
    POST /admin/v1/accounts/{customer_id}/credits          {credits, expires_in?, reason?}

A key's policy fields (sidecar/key_policy.py): name, metadata (an object),
features and routes (its scope), rate, burst, quota, uses.

Every call sends ``Authorization: Bearer twadm_…``; creates take an
``Idempotency-Key`` header. Errors are ``{"code", "message"}`` with the status
of operations.ERROR_STATUS (401, 403, 400, 404, 409, 429, 503). Answers are
never cached (an issued key's plaintext is in one).

The host counted for failed authentications is the client's address as
uvicorn gives it (X-Forwarded-For only from FORWARDED_ALLOW_IPS). Behind an
ingress that is one address for every caller, and that is safe: a valid token
is always served; only a failure past the host's budget is 429 instead of 401.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from sidecar.admin.operations import ERROR_STATUS, Admin, AdminError
from sidecar.store import TokenRecord

__all__ = ["admin_routes"]

_MAX_BODY: Final = 64 * 1024
_NO_STORE: Final = {"cache-control": "no-store"}

Operation = Callable[[Request, TokenRecord, dict[str, Any]], Awaitable[Any]]


def _answer(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=_NO_STORE)


def _error(exc: AdminError) -> JSONResponse:
    status = ERROR_STATUS[exc.kind][0]
    headers = dict(_NO_STORE)
    if status == 401:
        headers["www-authenticate"] = 'Bearer realm="tollway-admin"'
    return JSONResponse({"code": exc.kind, "message": exc.message}, status, headers=headers)


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _body(request: Request) -> dict[str, Any]:
    if request.method != "POST":
        return {}
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_BODY:
            raise AdminError("invalid_argument", f"body over {_MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise AdminError("invalid_argument", "body: not JSON") from None
    if not isinstance(data, dict):
        raise AdminError("invalid_argument", "body: a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """data[name] of kind (a bool is never an int), default when absent."""
    value = data.get(name, default)
    if value is None and default is None:
        raise AdminError("invalid_argument", f"{name}: required")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AdminError("invalid_argument", f"{name}: expected {kind.__name__}")
    return value


def _query_int(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name, "")
    if not text:
        return default
    if not text.isdigit():
        raise AdminError("invalid_argument", f"{name}: a whole number")
    return int(text)


def _policy(admin: Admin, d: dict[str, Any]) -> Any:
    features = d.get("features")
    if features is not None and not (
        isinstance(features, list) and all(isinstance(f, str) for f in features)
    ):
        raise AdminError("invalid_argument", "features: a list of feature names")
    routes = _field(d, "routes", list, [])
    if not all(isinstance(r, str) for r in routes):
        raise AdminError("invalid_argument", "routes: a list like ['GET /v1/search/*']")
    metadata = d.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise AdminError("invalid_argument", "metadata: a JSON object")
    return admin.policy(
        name=_field(d, "name", str, ""),
        metadata=metadata,
        features=features,
        routes=routes,
        rate=_field(d, "rate", str, ""),
        burst=_field(d, "burst", int, 0),
        quota=_field(d, "quota", str, ""),
        uses=_field(d, "uses", int, 0),
    )


def admin_routes(admin: Admin) -> list[BaseRoute]:
    def endpoint(operation: Operation, status: int = 200) -> Callable[[Request], Awaitable[Any]]:
        async def handle(request: Request) -> JSONResponse:
            try:
                peer = request.client.host if request.client else "unknown"
                caller = await admin.authenticate(_token(request), peer=peer)
                result = await operation(request, caller, await _body(request))
            except AdminError as exc:
                return _error(exc)
            return _answer(result, status)

        return handle

    def customer(request: Request) -> str:
        return str(request.path_params["customer_id"])

    def key_id(request: Request) -> str:
        return str(request.path_params["key_id"])

    def idempotency(request: Request) -> str:
        return request.headers.get("idempotency-key", "")

    async def create_account(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(
            await admin.create_account(
                c,
                customer_id=_field(d, "customer_id", str),
                plan=_field(d, "plan", str),
                status=_field(d, "status", str, "active"),
                idempotency_key=idempotency(r),
            )
        )

    async def list_accounts(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        page, token = await admin.list_accounts(
            c,
            page_size=_query_int(r, "page_size", 100),
            page_token=r.query_params.get("page_token", ""),
        )
        return {"accounts": [asdict(a) for a in page], "next_page_token": token}

    async def get_account(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.get_account(c, customer(r)))

    async def set_plan(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.set_plan(c, customer(r), _field(d, "plan", str)))

    async def set_status(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        grace = _field(d, "grace_seconds", int, 0)
        account = await admin.set_status(
            c, customer(r), _field(d, "status", str), grace_seconds=grace
        )
        return asdict(account)

    async def issue_key(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        issued = await admin.issue_key(
            c,
            customer(r),
            environment=_field(d, "environment", str, "live"),
            expires_in=_field(d, "expires_in", int, 0),
            policy=_policy(admin, d),
            idempotency_key=idempotency(r),
        )
        return asdict(issued)

    async def update_key(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.update_key(c, customer(r), key_id(r), _policy(admin, d)))

    async def list_keys(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return {"keys": [asdict(k) for k in await admin.list_keys(c, customer(r))]}

    async def get_key(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.get_key(c, customer(r), key_id(r)))

    async def revoke_key(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.revoke_key(c, customer(r), key_id(r)))

    async def rotate_key(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        rotated = await admin.rotate_key(
            c,
            customer(r),
            key_id(r),
            overlap=_field(d, "overlap", int, 86400),
            idempotency_key=idempotency(r),
        )
        return asdict(rotated)

    async def get_usage(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.get_usage(c, customer(r)))

    async def get_credits(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        return asdict(await admin.get_credits(c, customer(r)))

    async def grant_credits(r: Request, c: TokenRecord, d: dict[str, Any]) -> Any:
        granted = await admin.grant_credits(
            c,
            customer(r),
            credits=_field(d, "credits", int),
            expires_in=_field(d, "expires_in", int, 0),
            reason=_field(d, "reason", str, ""),
            idempotency_key=idempotency(r),
        )
        return asdict(granted)

    base = "/admin/v1/accounts"
    one = base + "/{customer_id}"
    key = one + "/keys/{key_id}"
    return [
        Route(base, endpoint(create_account, 201), methods=["POST"]),
        Route(base, endpoint(list_accounts), methods=["GET"]),
        Route(one, endpoint(get_account), methods=["GET"]),
        Route(one + "/plan", endpoint(set_plan), methods=["POST"]),
        Route(one + "/status", endpoint(set_status), methods=["POST"]),
        Route(one + "/keys", endpoint(issue_key, 201), methods=["POST"]),
        Route(one + "/keys", endpoint(list_keys), methods=["GET"]),
        Route(key, endpoint(get_key), methods=["GET"]),
        Route(key, endpoint(update_key), methods=["POST"]),
        Route(key + "/revoke", endpoint(revoke_key), methods=["POST"]),
        Route(key + "/rotate", endpoint(rotate_key, 201), methods=["POST"]),
        Route(one + "/usage", endpoint(get_usage), methods=["GET"]),
        Route(one + "/credits", endpoint(get_credits), methods=["GET"]),
        Route(one + "/credits", endpoint(grant_credits), methods=["POST"]),
    ]
