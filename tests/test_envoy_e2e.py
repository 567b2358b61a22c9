"""HTTP through a real Envoy asking the real sidecar, in front of the echo
upstream, with keys and accounts in the real Valkey: every decision through
each shipped way of asking, deploy/envoy.yaml (the default: HTTP ext_authz,
fixture `envoy`) and deploy/envoy-grpc.yaml (gRPC Check, `envoy_grpc`). What
only HTTP ext_authz has is in tests/test_envoy_http_e2e.py."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from sidecar import keys
from tests import harness
from tests.conftest import Customer

pytestmark = pytest.mark.servers  # starts its own servers

MakeCustomer = Callable[..., Customer]
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(
    scope="module", params=["envoy", "envoy_grpc"], ids=["envoy.yaml", "envoy-grpc.yaml"]
)
def through(request: pytest.FixtureRequest) -> str:
    """The URL of a real Envoy running a shipped config: the fixture of that name."""
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture(scope="module")
def http(through: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=through, timeout=5.0) as client:
        yield client


def upstream_saw(response: httpx.Response) -> dict[str, Any]:
    """The request as the echo upstream received it (method, path, headers)."""
    assert response.status_code == 200, response.text
    echoed: dict[str, Any] = response.json()
    return echoed


def assert_denied(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    # a denial never reaches the upstream, so nothing echoed comes back
    assert "headers" not in body
    return body


def remaining(response: httpx.Response) -> int:
    return int(response.headers["x-ratelimit-remaining"])


def send_raw(base: str, method: str, path: str, key: str) -> tuple[int, dict[str, str], bytes]:
    """A request with the path exactly as given (httpx would resolve dot segments)."""
    url = urlsplit(base)
    conn = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=5)
    try:
        conn.request(
            method, path, body=b"{}" if method == "POST" else None, headers={"x-api-key": key}
        )
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


# -- keys and identity ---------------------------------------------------------


def test_valid_key_reaches_upstream_with_identity_and_without_the_key(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    seen = upstream_saw(http.get("/v1/search", headers={"x-api-key": c.key}))
    assert seen["method"] == "GET"
    assert seen["path"] == "/v1/search"
    assert seen["headers"]["x-tollway-customer"] == c.id
    assert seen["headers"]["x-tollway-plan"] == "basic"
    assert "x-api-key" not in seen["headers"]
    assert c.key not in str(seen)


def test_spoofed_identity_headers_are_overwritten(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    spoofed = {"x-api-key": c.key, "X-Tollway-Customer": "cus_victim", "x-tollway-plan": "pro"}
    seen = upstream_saw(http.get("/v1/search", headers=spoofed))
    # a value appended rather than replaced would show as "cus_victim,<id>"
    assert seen["headers"]["x-tollway-customer"] == c.id
    assert seen["headers"]["x-tollway-plan"] == "basic"


def test_bearer_key_is_accepted_and_authorization_not_forwarded(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    seen = upstream_saw(http.get("/v1/search", headers={"Authorization": f"Bearer {c.key}"}))
    assert seen["headers"]["x-tollway-customer"] == c.id
    assert "authorization" not in seen["headers"]


def test_authorization_meant_for_upstream_passes_when_key_is_in_x_api_key(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    headers = {"x-api-key": c.key, "Authorization": "Basic dXNlcjpwYXNz"}
    seen = upstream_saw(http.get("/v1/search", headers=headers))
    assert seen["headers"]["authorization"] == "Basic dXNlcjpwYXNz"
    assert "x-api-key" not in seen["headers"]


def test_missing_key_is_401(http: httpx.Client) -> None:
    response = http.get("/v1/search")
    assert_denied(response, 401, "missing_key")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_basic_auth_alone_is_a_missing_key(http: httpx.Client) -> None:
    response = http.get("/v1/search", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_denied(response, 401, "missing_key")


@pytest.mark.parametrize(
    "bad", ["nope", "tw_live_" + "A" * 49, keys.generate()[:-1] + "!", keys.generate()[:-2]]
)
def test_malformed_key_is_401_invalid_key(http: httpx.Client, bad: str) -> None:
    assert_denied(http.get("/v1/search", headers={"x-api-key": bad}), 401, "invalid_key")


def test_unknown_key_is_401_invalid_key(http: httpx.Client) -> None:
    response = http.get("/v1/search", headers={"x-api-key": keys.generate()})
    assert_denied(response, 401, "invalid_key")
    assert "www-authenticate" in response.headers


def test_revoked_key_is_401_key_revoked(
    http: httpx.Client, make_customer: MakeCustomer, cli: Cli
) -> None:
    c = make_customer("basic")
    assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200
    done = cli("keys", "revoke", "--customer", c.id, c.key_id)
    assert done.returncode == 0, done.stderr
    response = http.get("/v1/search", headers={"x-api-key": c.key})
    assert_denied(response, 401, "key_revoked")


def test_expired_key_is_401_key_expired(http: httpx.Client, make_customer: MakeCustomer) -> None:
    an_hour_ago_us = int((time.time() - 3600) * 1_000_000)
    c = make_customer("basic", expires_at_us=an_hour_ago_us)
    assert_denied(http.get("/v1/search", headers={"x-api-key": c.key}), 401, "key_expired")


def test_key_expiring_later_still_works(http: httpx.Client, make_customer: MakeCustomer) -> None:
    in_an_hour_us = int((time.time() + 3600) * 1_000_000)
    c = make_customer("basic", expires_at_us=in_an_hour_us)
    assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200


# -- subscription status -------------------------------------------------------


def test_canceled_subscription_is_403(
    http: httpx.Client, make_customer: MakeCustomer, cli: Cli
) -> None:
    c = make_customer("basic")
    assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200
    done = cli("accounts", "set-status", "--customer", c.id, "canceled")
    assert done.returncode == 0, done.stderr
    response = http.get("/v1/search", headers={"x-api-key": c.key})
    body = assert_denied(response, 403, "subscription_inactive")
    assert "cancel" in body["message"]


def test_past_due_within_grace_is_still_allowed(
    http: httpx.Client, make_customer: MakeCustomer, cli: Cli
) -> None:
    c = make_customer("basic")
    done = cli("accounts", "set-status", "--customer", c.id, "past_due", "--grace", "1h")
    assert done.returncode == 0, done.stderr
    assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200


def test_past_due_without_grace_is_403(
    http: httpx.Client, make_customer: MakeCustomer, cli: Cli
) -> None:
    c = make_customer("basic")
    done = cli("accounts", "set-status", "--customer", c.id, "past_due")
    assert done.returncode == 0, done.stderr
    response = http.get("/v1/search", headers={"x-api-key": c.key})
    body = assert_denied(response, 403, "subscription_inactive")
    assert "past_due" in body["message"]


# -- features ------------------------------------------------------------------


def test_feature_not_in_plan_is_403(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("basic")
    response = http.post("/v1/export/x", headers={"x-api-key": c.key}, content=b"{}")
    body = assert_denied(response, 403, "feature_not_in_plan")
    assert "export" in body["message"]


def test_feature_in_plan_is_allowed_and_costs_the_route_price(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("pro")
    response = http.post("/v1/export/x", headers={"x-api-key": c.key}, content=b"{}")
    seen = upstream_saw(response)
    assert seen["method"] == "POST"
    assert seen["path"] == "/v1/export/x"
    assert remaining(response) == 100 - 10  # the export route costs 10 of pro's burst of 100


def test_feature_route_is_method_specific(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("basic")
    # the export route is POST only: a GET there is an ordinary request
    response = http.get("/v1/export/x", headers={"x-api-key": c.key})
    assert response.status_code == 200
    assert remaining(response) == 4


# -- rate limit ----------------------------------------------------------------


def test_rate_limit_burst_then_429(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("tight")  # burst 2, refills 1/min
    key = {"x-api-key": c.key}
    first, second = http.get("/v1/search", headers=key), http.get("/v1/search", headers=key)
    assert [first.status_code, second.status_code] == [200, 200]
    for ok in (first, second):
        assert ok.headers["ratelimit-policy"] == '"rate";q=2;w=120'
        assert ok.headers["x-ratelimit-limit"] == "2"
        assert ok.headers["ratelimit"].startswith('"rate";r=')
        assert "retry-after" not in ok.headers
    assert [remaining(first), remaining(second)] == [1, 0]
    assert first.headers["ratelimit"].startswith('"rate";r=1;t=')

    denied = http.get("/v1/search", headers=key)
    body = assert_denied(denied, 429, "rate_limited")
    assert "tight" in body["message"]
    assert 0 < int(denied.headers["retry-after"]) <= 60
    assert denied.headers["ratelimit-policy"] == '"rate";q=2;w=120'
    assert denied.headers["ratelimit"].startswith('"rate";r=0;t=')
    assert denied.headers["x-ratelimit-limit"] == "2"
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert int(denied.headers["x-ratelimit-reset"]) > 0


def test_rate_limit_is_per_customer(http: httpx.Client, make_customer: MakeCustomer) -> None:
    spent, fresh = make_customer("tight"), make_customer("tight")
    for _ in range(2):
        http.get("/v1/search", headers={"x-api-key": spent.key})
    assert http.get("/v1/search", headers={"x-api-key": spent.key}).status_code == 429
    assert http.get("/v1/search", headers={"x-api-key": fresh.key}).status_code == 200


def test_route_cost_is_charged(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("basic")  # burst 5; /v1/heavy costs 4
    first = http.get("/v1/heavy", headers={"x-api-key": c.key})
    assert first.status_code == 200
    assert remaining(first) == 1
    second = http.get("/v1/heavy", headers={"x-api-key": c.key})
    assert_denied(second, 429, "rate_limited")


def test_query_string_does_not_break_route_matching(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    response = http.get("/v1/heavy?x=1&y=/v1/other", headers={"x-api-key": c.key})
    assert upstream_saw(response)["path"] == "/v1/heavy?x=1&y=/v1/other"
    assert remaining(response) == 1


# Tollway prices the path Envoy hands it; the upstream must not resolve a
# different one (each shipped config normalizes paths).
def test_dot_segments_cannot_reach_a_feature_route_unpaid(
    through: str, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")  # basic has no "export" feature
    status, _, body = send_raw(through, "POST", "/v1/x/../export/x", c.key)
    assert status == 403, body
    assert b"feature_not_in_plan" in body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/heavy",
        "/v1/search/../heavy",
        "//v1/heavy",
        "/v1//heavy",
        "/v1/%68eavy",
        "/v1/heavy?x=1&y=/v1/other",
    ],
)
def test_path_spellings_of_a_route_pay_its_cost(
    through: str, make_customer: MakeCustomer, path: str
) -> None:
    c = make_customer("basic")  # burst 5; /v1/heavy costs 4
    status, headers, body = send_raw(through, "GET", path, c.key)
    assert status == 200, body
    assert headers["x-ratelimit-remaining"] == "1", f"upstream saw {body!r}"


# -- quota ---------------------------------------------------------------------


def test_quota_blocks_after_the_limit(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("quota3")  # 3/day, overage block; burst 100
    key = {"x-api-key": c.key}
    allowed = [http.get("/v1/search", headers=key) for _ in range(3)]
    assert [r.status_code for r in allowed] == [200, 200, 200]
    # the quota is closer to denying than the rate, so it is the one shown
    assert [remaining(r) for r in allowed] == [2, 1, 0]
    assert all(r.headers["ratelimit-policy"].startswith('"quota";q=3;') for r in allowed)

    denied = http.get("/v1/search", headers=key)
    body = assert_denied(denied, 429, "quota_exceeded")
    assert "quota3" in body["message"]
    assert denied.headers["ratelimit-policy"].startswith('"quota";q=3;w=')
    assert denied.headers["ratelimit"].startswith('"quota";r=0;t=')
    assert denied.headers["x-ratelimit-limit"] == "3"
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert 0 < int(denied.headers["retry-after"]) <= 86_400
    assert denied.headers["x-ratelimit-reset"] == denied.headers["retry-after"]


def test_quota_policy_window_is_the_quota_period(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("quota3")  # 3/day
    response = http.get("/v1/search", headers={"x-api-key": c.key})
    assert response.status_code == 200
    assert response.headers["ratelimit-policy"] == '"quota";q=3;w=86400'


def test_billed_overage_keeps_serving(http: httpx.Client, make_customer: MakeCustomer) -> None:
    c = make_customer("billed")  # 3/day, overage bill
    statuses = [http.get("/v1/search", headers={"x-api-key": c.key}).status_code for _ in range(5)]
    assert statuses == [200] * 5


# -- Redis down (gRPC Check: UNAVAILABLE; tests/test_envoy_http_e2e.py has HTTP's 503) --


def test_redis_down_fails_closed_with_503(tmp_path: Path, config_path: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{harness.free_port()}"  # nothing listens there
    sidecar_port, listen = harness.free_port(), harness.free_port()
    children: list[harness.Child] = []
    with harness.EchoUpstream() as upstream:
        try:
            sidecar_log = tmp_path / "sidecar.log"
            sidecar = harness.start_sidecar(
                config_path, redis_url=dead_redis, port=sidecar_port, log=sidecar_log
            )
            children.append(sidecar)
            envoy = harness.start_envoy(
                workdir=tmp_path / "envoy",
                log=tmp_path / "envoy.log",
                template=harness.ENVOY_GRPC_TEMPLATE,
                listen=listen,
                admin=harness.free_port(),
                sidecar=sidecar_port,
                upstream=upstream.port,
            )
            children.append(envoy)
            with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=5.0) as client:
                # the sidecar is up and answering: what needs no Redis still works
                assert_denied(client.get("/v1/search"), 401, "missing_key")
                for _ in range(3):
                    started = time.monotonic()
                    response = client.get("/v1/search", headers={"x-api-key": keys.generate()})
                    elapsed = time.monotonic() - started
                    assert response.status_code == 503, response.text
                    assert elapsed < 0.5
        finally:
            for child in reversed(children):
                child.stop()
