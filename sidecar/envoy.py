"""Envoy ext_authz: reading the key from a CheckRequest, and turning a Decision
into a CheckResponse.

Allowed: status OK; identity headers go upstream (overwriting anything the
client sent under those names), the header that carried the key is removed,
and the rate-limit headers go back to the client.
Denied: a non-OK status with a DeniedHttpResponse: HTTP status, a small JSON
body {"code", "message"}, the rate-limit headers, Retry-After on 429.
The pure pieces (identity_headers, denial, settlement_fields) are shared with
the HTTP transport (http_authz.py), so both answer a decision the same way.
A store outage is not a CheckResponse at all: the servicer aborts with gRPC
UNAVAILABLE, so Envoy's failure_mode_allow / status_on_error decide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Final

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from sidecar.decision import Decision, QuotaState, Reason
from sidecar.settings import HeaderNames

__all__ = [
    "CREDITS_HEADER",
    "HTTP_STATUS",
    "METADATA_NAMESPACE",
    "check_response",
    "client_headers",
    "denial",
    "extract_key",
    "identity_headers",
    "rate_limit_headers",
    "settlement_fields",
    "settlement_metadata",
]

# reason -> (HTTP status, gRPC code in CheckResponse.status)
HTTP_STATUS: Final[Mapping[Reason, tuple[int, int]]] = {
    Reason.OK: (200, code_pb2.OK),
    Reason.MISSING_KEY: (401, code_pb2.UNAUTHENTICATED),
    Reason.INVALID_KEY: (401, code_pb2.UNAUTHENTICATED),
    Reason.KEY_REVOKED: (401, code_pb2.UNAUTHENTICATED),
    Reason.KEY_EXPIRED: (401, code_pb2.UNAUTHENTICATED),
    Reason.SUBSCRIPTION_INACTIVE: (403, code_pb2.PERMISSION_DENIED),
    Reason.FEATURE_NOT_IN_PLAN: (403, code_pb2.PERMISSION_DENIED),
    Reason.RATE_LIMITED: (429, code_pb2.RESOURCE_EXHAUSTED),
    Reason.QUOTA_EXCEEDED: (429, code_pb2.RESOURCE_EXHAUSTED),
    Reason.CONCURRENCY_LIMITED: (429, code_pb2.RESOURCE_EXHAUSTED),
    Reason.CREDITS_EXHAUSTED: (402, code_pb2.RESOURCE_EXHAUSTED),
    Reason.KEY_SCOPE: (403, code_pb2.PERMISSION_DENIED),
    Reason.KEY_USES_EXHAUSTED: (403, code_pb2.PERMISSION_DENIED),
}
# ext_authz's dynamic metadata lands under its filter name, which the ext_proc
# filter forwards to Tollway's ExternalProcessor (metadata_options).
METADATA_NAMESPACE: Final = "envoy.filters.http.ext_authz"
# The prepaid balance after the decision, for plans that burn credits.
CREDITS_HEADER: Final = "x-tollway-credits-remaining"
# On an admission a limit in shadow mode would have denied: the reason it would give.
SHADOW_HEADER: Final = "x-tollway-shadow-denied"
_OVERWRITE: Final = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def extract_key(headers: Mapping[str, str], names: HeaderNames) -> tuple[str, str | None]:
    """(key, header it came from); ("", None) when absent. Envoy lower-cases names.
    The whitespace around a header's value is not part of it (RFC 9110, 5.5)."""
    for name in names.api_key:
        value = headers.get(name)
        if value:
            return value.strip(), name
    if names.bearer:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip(), "authorization"
    return "", None


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """RateLimit-Policy / RateLimit (IETF httpapi draft) and the X-RateLimit-* trio,
    for the limit that decided. Reset values are delta-seconds."""
    limit = decision.deciding_limit
    if limit is None:
        return []
    if isinstance(limit, QuotaState):
        if not limit.limit:
            return []
        name, size, window = "quota", limit.limit, limit.window_seconds
        remaining, reset = limit.remaining, limit.reset_seconds
    else:
        name, size, window = "rate", limit.limit, limit.window_seconds
        remaining, reset = limit.remaining, limit.reset_seconds
    headers = [
        ("ratelimit-policy", f'"{name}";q={size};w={window}'),
        ("ratelimit", f'"{name}";r={remaining};t={reset}'),
        ("x-ratelimit-limit", str(size)),
        ("x-ratelimit-remaining", str(remaining)),
        ("x-ratelimit-reset", str(reset)),
    ]
    if decision.retry_after:
        headers.append(("retry-after", str(decision.retry_after)))
    return headers


def client_headers(decision: Decision) -> list[tuple[str, str]]:
    """What the client sees of its limits: the rate-limit headers, the prepaid
    balance left when the plan burns credits, and what shadow mode would deny."""
    headers = rate_limit_headers(decision)
    if decision.credits is not None:
        headers.append((CREDITS_HEADER, str(decision.credits)))
    if decision.shadow is not None:
        headers.append((SHADOW_HEADER, decision.shadow.value))
    return headers


def _options(pairs: list[tuple[str, str]]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in pairs
    ]


def identity_headers(decision: Decision, names: HeaderNames) -> list[tuple[str, str]]:
    """What an allowed request carries upstream: who it is, on which plan, and
    what a limit in shadow mode would have denied it for."""
    headers = [(names.customer, decision.customer_id), (names.plan, decision.plan)]
    if decision.shadow is not None:
        headers.append((SHADOW_HEADER, decision.shadow.value))
    return headers


def denial(decision: Decision) -> tuple[int, list[tuple[str, str]], str]:
    """A denied decision as the client sees it: (HTTP status, headers, JSON body)."""
    http_status = HTTP_STATUS[decision.reason][0]
    body = json.dumps({"code": decision.reason.value, "message": decision.message})
    headers = [("content-type", "application/json"), *client_headers(decision)]
    if http_status == 401:
        headers.append(("www-authenticate", 'Bearer realm="api"'))
    return http_status, headers, body


def settlement_fields(decision: Decision) -> dict[str, str | int | bool] | None:
    """What the response phase (extproc.py) needs to settle and release, by the
    names it reads; None when there is nothing to do after the response."""
    if not (decision.reserved or decision.lease_id):
        return None
    return {
        "customer": decision.customer_id,
        "plan": decision.plan,
        "request_id": decision.reserved,
        "lease_id": decision.lease_id,
        "cost": decision.cost,
        "bill_only_success": decision.bill_only_success,
    }


def settlement_metadata(decision: Decision) -> Struct | None:
    """settlement_fields as the dynamic metadata of a CheckResponse."""
    fields = settlement_fields(decision)
    if fields is None:
        return None
    metadata = Struct()
    metadata.update(fields)
    return metadata


def check_response(
    decision: Decision,
    *,
    key_header: str | None,
    names: HeaderNames,
    upstream_headers: Sequence[tuple[str, str]] = (),
) -> ext_authz.CheckResponse:
    if decision.allowed:
        identity = identity_headers(decision, names)
        response = ext_authz.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext_authz.OkHttpResponse(
                headers=_options([*identity, *upstream_headers]),
                headers_to_remove=[key_header] if key_header else [],
                response_headers_to_add=_options(client_headers(decision)),
            ),
        )
        metadata = settlement_metadata(decision)
        if metadata is not None:
            response.dynamic_metadata.CopyFrom(metadata)
        return response
    http_status, headers, body = denial(decision)
    return ext_authz.CheckResponse(
        status=status_pb2.Status(code=HTTP_STATUS[decision.reason][1], message=decision.message),
        denied_response=ext_authz.DeniedHttpResponse(
            status=HttpStatus(code=http_status),
            headers=_options(headers),
            body=body,
        ),
    )
