"""The pure Envoy mapping: which header carries the key, which rate-limit headers a
client sees, and what CheckResponse Envoy gets for each decision. No network."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from google.rpc import code_pb2

from sidecar.decision import Decision, QuotaState, RateState, Reason
from sidecar.envoy import check_response, extract_key, rate_limit_headers
from sidecar.settings import HeaderNames

KEY = "tw_test_abc"
DEFAULT = HeaderNames()
OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# basic-like plan: burst 5 at 10/s (a whole burst refills in 1 s); 1000/month quota.
RATE = RateState(limit=5, remaining=3, reset_seconds=1, rate_per_second=10.0, window_seconds=1)
QUOTA = QuotaState(
    limit=1000,
    used=10,
    remaining=990,
    period_end=2_000_000,
    reset_seconds=86_400,
    window_seconds=2_592_000,
)
QUOTA_LOW = QuotaState(
    limit=3, used=2, remaining=1, period_end=2_000_000, reset_seconds=7_200, window_seconds=86_400
)


def allowed(rate: RateState = RATE, quota: QuotaState | None = QUOTA) -> Decision:
    return Decision(True, Reason.OK, "OK", "cus_1", "basic", rate=rate, quota=quota)


def as_dict(pairs: list[tuple[str, str]]) -> dict[str, str]:
    result = dict(pairs)
    assert len(result) == len(pairs), f"duplicate header in {pairs}"
    return result


def options(opts: object) -> dict[str, str]:
    return {o.header.key: o.header.value for o in opts}  # type: ignore[attr-defined]


# -- extract_key -------------------------------------------------------------


def test_key_from_x_api_key() -> None:
    assert extract_key({"x-api-key": KEY}, DEFAULT) == (KEY, "x-api-key")


def test_key_surrounding_whitespace_is_trimmed() -> None:
    assert extract_key({"x-api-key": f"  {KEY} "}, DEFAULT) == (KEY, "x-api-key")


def test_key_from_authorization_bearer() -> None:
    assert extract_key({"authorization": f"Bearer {KEY}"}, DEFAULT) == (KEY, "authorization")


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    assert extract_key({"authorization": f"{scheme} {KEY}"}, DEFAULT) == (KEY, "authorization")


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", f"Token {KEY}", "Bearer", "Bearer    ", KEY, f"Bearer{KEY}"],
)
def test_authorization_without_a_bearer_token_gives_no_key(value: str) -> None:
    assert extract_key({"authorization": value}, DEFAULT) == ("", None)


def test_no_key_headers_gives_no_key() -> None:
    assert extract_key({"x-request-id": "r1", "x-api-key": ""}, DEFAULT) == ("", None)


def test_api_key_header_wins_over_bearer() -> None:
    headers = {"x-api-key": KEY, "authorization": "Bearer other"}
    assert extract_key(headers, DEFAULT) == (KEY, "x-api-key")


def test_configured_key_headers_are_read_in_order() -> None:
    names = HeaderNames(api_key=("x-key", "x-alt-key"))
    assert extract_key({"x-alt-key": KEY}, names) == (KEY, "x-alt-key")
    assert extract_key({"x-key": "first", "x-alt-key": KEY}, names) == ("first", "x-key")


def test_unconfigured_x_api_key_is_ignored() -> None:
    names = HeaderNames(api_key=("x-key",), bearer=False)
    assert extract_key({"x-api-key": KEY}, names) == ("", None)


def test_bearer_disabled_ignores_authorization() -> None:
    names = HeaderNames(bearer=False)
    assert extract_key({"authorization": f"Bearer {KEY}"}, names) == ("", None)
    assert extract_key({"x-api-key": KEY, "authorization": "Bearer x"}, names) == (
        KEY,
        "x-api-key",
    )


# -- rate_limit_headers ------------------------------------------------------


def test_allowed_request_shows_the_rate_limit() -> None:
    headers = as_dict(rate_limit_headers(allowed()))
    assert headers == {
        "ratelimit-policy": '"rate";q=5;w=1',
        "ratelimit": '"rate";r=3;t=1',
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "3",
        "x-ratelimit-reset": "1",
    }


def test_quota_closer_to_denying_is_the_one_shown() -> None:
    headers = as_dict(rate_limit_headers(allowed(quota=QUOTA_LOW)))
    assert headers["ratelimit-policy"] == '"quota";q=3;w=86400'
    assert headers["ratelimit"] == '"quota";r=1;t=7200'
    assert headers["x-ratelimit-limit"] == "3"
    assert headers["x-ratelimit-remaining"] == "1"
    assert headers["x-ratelimit-reset"] == "7200"
    assert "retry-after" not in headers


def test_plan_without_quota_shows_the_rate() -> None:
    no_quota = QuotaState(
        limit=0, used=50, remaining=0, period_end=0, reset_seconds=0, window_seconds=0
    )
    headers = as_dict(rate_limit_headers(allowed(quota=no_quota)))
    assert headers["ratelimit-policy"] == '"rate";q=5;w=1'
    assert headers["x-ratelimit-remaining"] == "3"


def test_rate_limited_shows_the_rate_and_retry_after() -> None:
    empty = RateState(
        limit=2, remaining=0, reset_seconds=120, rate_per_second=1 / 60, window_seconds=120
    )
    decision = Decision(
        False,
        Reason.RATE_LIMITED,
        "slow down",
        "cus_1",
        "tight",
        rate=empty,
        quota=QUOTA_LOW,
        retry_after=60,
    )
    headers = as_dict(rate_limit_headers(decision))
    # the rate decided, even though the quota has less left than the limit's size
    assert headers["ratelimit-policy"] == '"rate";q=2;w=120'
    assert headers["ratelimit"] == '"rate";r=0;t=120'
    assert headers["x-ratelimit-limit"] == "2"
    assert headers["x-ratelimit-remaining"] == "0"
    assert headers["retry-after"] == "60"


def test_cost_above_burst_has_no_retry_after() -> None:
    decision = Decision(
        False,
        Reason.RATE_LIMITED,
        "too big",
        "cus_1",
        "basic",
        rate=RATE,
        quota=QUOTA,
        retry_after=0,
    )
    headers = as_dict(rate_limit_headers(decision))
    assert headers["ratelimit-policy"] == '"rate";q=5;w=1'
    assert "retry-after" not in headers


def test_quota_exceeded_shows_the_quota_and_retry_after() -> None:
    spent = QuotaState(
        limit=3,
        used=3,
        remaining=0,
        period_end=2_000_000,
        reset_seconds=3600,
        window_seconds=86_400,
    )
    decision = Decision(
        False,
        Reason.QUOTA_EXCEEDED,
        "quota",
        "cus_1",
        "quota3",
        rate=RATE,
        quota=spent,
        retry_after=3600,
    )
    headers = as_dict(rate_limit_headers(decision))
    assert headers["ratelimit-policy"].startswith('"quota";q=3;')
    assert headers["ratelimit"] == '"quota";r=0;t=3600'
    assert headers["x-ratelimit-limit"] == "3"
    assert headers["x-ratelimit-remaining"] == "0"
    assert headers["retry-after"] == "3600"


def test_refusal_before_the_limits_has_no_rate_limit_headers() -> None:
    decision = Decision(False, Reason.INVALID_KEY, "bad key")
    assert rate_limit_headers(decision) == []


# -- check_response: allowed -------------------------------------------------


def test_allow_sends_identity_upstream_overwriting_client_values() -> None:
    response = check_response(allowed(), key_header="x-api-key", names=DEFAULT)
    assert response.status.code == code_pb2.OK
    assert response.HasField("ok_response")
    assert not response.HasField("denied_response")
    ok = response.ok_response
    assert options(ok.headers) == {"x-tollway-customer": "cus_1", "x-tollway-plan": "basic"}
    assert all(o.append_action == OVERWRITE for o in ok.headers)
    # the deprecated `append` flag is unset, so Envoy follows append_action
    assert not any(o.HasField("append") for o in ok.headers)


def test_allow_removes_the_header_that_carried_the_key() -> None:
    response = check_response(allowed(), key_header="x-api-key", names=DEFAULT)
    assert list(response.ok_response.headers_to_remove) == ["x-api-key"]
    response = check_response(allowed(), key_header="authorization", names=DEFAULT)
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_allow_returns_rate_limit_headers_to_the_client() -> None:
    response = check_response(allowed(), key_header="x-api-key", names=DEFAULT)
    added = response.ok_response.response_headers_to_add
    assert options(added) == as_dict(rate_limit_headers(allowed()))
    assert all(o.append_action == OVERWRITE for o in added)


def test_allow_uses_configured_identity_header_names() -> None:
    names = HeaderNames(api_key=("x-key",), customer="x-cust", plan="x-tier")
    response = check_response(allowed(), key_header="x-key", names=names)
    assert options(response.ok_response.headers) == {"x-cust": "cus_1", "x-tier": "basic"}
    assert list(response.ok_response.headers_to_remove) == ["x-key"]


# -- check_response: denied --------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "http_status", "grpc_code"),
    [
        (Reason.MISSING_KEY, 401, code_pb2.UNAUTHENTICATED),
        (Reason.INVALID_KEY, 401, code_pb2.UNAUTHENTICATED),
        (Reason.KEY_REVOKED, 401, code_pb2.UNAUTHENTICATED),
        (Reason.KEY_EXPIRED, 401, code_pb2.UNAUTHENTICATED),
        (Reason.SUBSCRIPTION_INACTIVE, 403, code_pb2.PERMISSION_DENIED),
        (Reason.FEATURE_NOT_IN_PLAN, 403, code_pb2.PERMISSION_DENIED),
        (Reason.RATE_LIMITED, 429, code_pb2.RESOURCE_EXHAUSTED),
        (Reason.QUOTA_EXCEEDED, 429, code_pb2.RESOURCE_EXHAUSTED),
    ],
)
def test_denial_status_and_json_body(reason: Reason, http_status: int, grpc_code: int) -> None:
    decision = Decision(False, reason, f"because {reason.value}", "cus_1", "basic")
    response = check_response(decision, key_header="x-api-key", names=DEFAULT)
    assert response.status.code == grpc_code
    assert response.status.code != code_pb2.OK
    assert not response.HasField("ok_response")
    denied = response.denied_response
    assert denied.status.code == http_status
    assert json.loads(denied.body) == {"code": reason.value, "message": f"because {reason.value}"}
    headers = options(denied.headers)
    assert headers["content-type"] == "application/json"
    if http_status == 401:
        assert headers["www-authenticate"].startswith("Bearer")
    else:
        assert "www-authenticate" not in headers


def test_rate_limited_denial_carries_limit_headers_and_retry_after() -> None:
    decision = Decision(
        False,
        Reason.RATE_LIMITED,
        "slow down",
        "cus_1",
        "basic",
        rate=RATE,
        quota=QUOTA,
        retry_after=7,
    )
    response = check_response(decision, key_header="x-api-key", names=DEFAULT)
    headers = options(response.denied_response.headers)
    assert response.denied_response.status.code == 429
    assert headers["retry-after"] == "7"
    assert headers["ratelimit-policy"] == '"rate";q=5;w=1'
    assert headers["x-ratelimit-remaining"] == "3"


def test_denial_for_a_missing_key_has_no_rate_limit_headers() -> None:
    decision = Decision(False, Reason.MISSING_KEY, "API key required")
    response = check_response(decision, key_header=None, names=DEFAULT)
    headers = options(response.denied_response.headers)
    assert set(headers) == {"content-type", "www-authenticate"}
