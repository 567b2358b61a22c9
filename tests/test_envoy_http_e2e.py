"""HTTP through a real Envoy running deploy/envoy.yaml, the default (ext_authz in
HTTP service mode, settlement through the gRPC access log), asking the real
sidecar's HTTP port, in front of the echo upstream, with keys and accounts in
the real Valkey. What a client and the upstream see must be what they see with
deploy/envoy-grpc.yaml (gRPC Check); tests/test_envoy_e2e.py runs every
decision through both, tests/test_accesslog.py the settlement's edge cases."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from tests import harness
from tests.conftest import Customer, HttpSidecar, running_http_sidecar, start_envoy_default
from tests.conftest import eventually as settled_within
from tests.test_accesslog import RELEASE_WITHIN, SETTLED_WITHIN
from tests.test_envoy_e2e import assert_denied, remaining, upstream_saw

MakeCustomer = Callable[..., Customer]
Stub = tollway_pb2_grpc.TollwayStub


@pytest.fixture(scope="module")
def http(envoy: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=envoy, timeout=5.0) as client:
        yield client


@pytest.fixture(scope="module")
def stub(http_sidecar: HttpSidecar) -> Iterator[Stub]:
    """The gRPC API of the sidecar behind `envoy`."""
    with grpc.insecure_channel(f"127.0.0.1:{http_sidecar.grpc_port}") as channel:
        yield tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]


def usage(stub: Stub, customer: Customer) -> tuple[int, int]:
    """(quota used, api_calls metered): a reservation is on the quota from the
    decision on, on the meter only once the access log has settled it."""
    answer = stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id), timeout=5)
    return int(answer.quota.used), {m.meter: m.used for m in answer.meters}.get("api_calls", 0)


def eventually(check: Callable[[], object], within: float = SETTLED_WITHIN) -> float:
    return settled_within(check, within=within)


# -- allowed ----------------------------------------------------------------------------


def test_a_valid_key_reaches_upstream_with_identity_and_without_the_key(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    seen = upstream_saw(http.get("/v1/search", headers={"x-api-key": c.key}))
    assert (seen["method"], seen["path"]) == ("GET", "/v1/search")
    assert seen["headers"]["x-tollway-customer"] == c.id
    assert seen["headers"]["x-tollway-plan"] == "basic"
    assert "x-api-key" not in seen["headers"]
    assert c.key not in str(seen)
    # what the access log settles with stays in Envoy
    for name in ("customer", "plan", "request_id", "lease_id", "x-tollway-estimate"):
        assert name not in seen["headers"], name


def test_an_allowed_answer_carries_the_rate_limit_headers(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("tight")  # burst 2, 1/min
    first, second = (http.get("/v1/search", headers={"x-api-key": c.key}) for _ in range(2))
    assert [first.status_code, second.status_code] == [200, 200]
    for ok in (first, second):
        assert ok.headers["ratelimit-policy"] == '"rate";q=2;w=120'
        assert ok.headers["x-ratelimit-limit"] == "2"
        assert "retry-after" not in ok.headers
    assert [remaining(first), remaining(second)] == [1, 0]
    assert first.headers["ratelimit"].startswith('"rate";r=1;t=')


# -- denied -----------------------------------------------------------------------------


def test_an_empty_bucket_is_429_with_json_retry_after_and_ratelimit(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("tight")
    for _ in range(2):
        assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200
    denied = http.get("/v1/search", headers={"x-api-key": c.key})
    body = assert_denied(denied, 429, "rate_limited")
    assert "tight" in body["message"]
    assert 0 < int(denied.headers["retry-after"]) <= 60
    assert denied.headers["ratelimit-policy"] == '"rate";q=2;w=120'
    assert denied.headers["ratelimit"].startswith('"rate";r=0;t=')
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert int(denied.headers["x-ratelimit-reset"]) > 0


# -- after the response, the access log settles ------------------------------------------


def test_the_response_settles_at_the_routes_cost(
    http: httpx.Client, stub: Stub, make_customer: MakeCustomer
) -> None:
    c = make_customer("metered")  # quota 10/day, metered; /v1/heavy costs 4
    headers = {"x-api-key": c.key, "x-tollway-estimate": "0"}  # a client's try is ignored
    response = http.get("/v1/heavy", headers=headers)
    assert "x-tollway-estimate" not in upstream_saw(response)["headers"]
    assert "x-tollway-charged" not in response.headers  # settled after the response
    eventually(lambda: usage(stub, c) == (4, 4))  # the route's cost, not the client's 0
    reported = http.get("/v1/heavy?cost=3", headers=headers)
    assert reported.status_code == 200 and "x-tollway-cost" not in reported.headers
    eventually(lambda: usage(stub, c) == (7, 7))  # the upstream's word wins


def test_concurrency_leases_are_freed_after_each_response(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("duo")  # 2 in flight, leases of 2 s
    began = time.monotonic()
    for _ in range(5):
        # Two finished requests hold both leases until the access log's flush:
        # each next one is admitted within that bound, never after lease_ttl.
        eventually(
            lambda: http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200,
            RELEASE_WITHIN,
        )
    assert time.monotonic() - began < 2.0  # no request waited for a lease to expire


def test_bill_only_success_refunds_a_5xx(
    http: httpx.Client, stub: Stub, make_customer: MakeCustomer
) -> None:
    c = make_customer("duo")  # bill_only_success
    failed = http.get("/v1/search?status=503", headers={"x-api-key": c.key})
    assert failed.status_code == 503
    assert "x-tollway-charged" not in failed.headers
    eventually(lambda: usage(stub, c) == (0, 0))  # the reservation of 1, refunded
    assert http.get("/v1/search", headers={"x-api-key": c.key}).status_code == 200
    eventually(lambda: usage(stub, c) == (1, 1))


# -- Redis unreachable: Envoy's failure_mode_allow decides --------------------------------


@pytest.fixture(scope="module")
def dead_redis_sidecar(
    tmp_path_factory: pytest.TempPathFactory, access_log_config_path: Path
) -> Iterator[HttpSidecar]:
    dead_redis = f"redis://127.0.0.1:{harness.free_port()}"  # nothing listens there
    log = tmp_path_factory.mktemp("dead-redis") / "sidecar.log"
    with running_http_sidecar(access_log_config_path, redis_url=dead_redis, log=log) as ports:
        yield ports


def through_envoy(
    tmp_path: Path, sidecar: HttpSidecar, *, fail_open: bool
) -> list[tuple[httpx.Response, float]]:
    """Three requests with an unknown (well-formed) key and one without a key,
    through an Envoy whose ext_authz fails open or closed; (response, seconds)."""
    with harness.EchoUpstream() as upstream:
        child, url = start_envoy_default(
            tmp_path / "envoy", sidecar=sidecar, upstream=upstream.port, fail_open=fail_open
        )
        try:
            answers = []
            with httpx.Client(base_url=url, timeout=5.0) as client:
                for headers in [{"x-api-key": keys.generate()}] * 3 + [{}]:
                    started = time.monotonic()
                    response = client.get("/v1/search", headers=headers)
                    answers.append((response, time.monotonic() - started))
            return answers
        finally:
            child.stop()


def test_redis_down_fails_closed_with_503(tmp_path: Path, dead_redis_sidecar: HttpSidecar) -> None:
    *outage, (no_key, _) = through_envoy(tmp_path, dead_redis_sidecar, fail_open=False)
    for response, seconds in outage:
        assert response.status_code == 503, response.text
        assert "headers" not in response.text  # never reached the upstream
        assert seconds < 0.5
    assert_denied(no_key, 401, "missing_key")  # what needs no Redis still works


def test_redis_down_passes_with_failure_mode_allow(
    tmp_path: Path, dead_redis_sidecar: HttpSidecar
) -> None:
    *outage, (no_key, _) = through_envoy(tmp_path, dead_redis_sidecar, fail_open=True)
    for response, _ in outage:
        seen: dict[str, Any] = upstream_saw(response)
        assert "x-tollway-customer" not in seen["headers"]  # no identity was vouched for
    assert_denied(no_key, 401, "missing_key")  # a denial is still a denial
