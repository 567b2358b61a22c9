"""Concurrency limits and post-response accounting through a real Envoy running
deploy/envoy-grpc.yaml (gRPC Check + ext_proc): leases taken in the decision,
released on the response, real costs from the upstream, 5xx refunds, and the
charge stated to the client. The default's settlement (deploy/envoy.yaml, the
access log, after the response) is tests/test_accesslog.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from tests import harness
from tests.conftest import Customer

Stub = tollway_pb2_grpc.TollwayStub


def usage(stub: Stub, customer: Customer) -> tuple[int, int]:
    """(quota used, api_calls metered) as GetUsage reports them."""
    answer = stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id), timeout=5)
    metered = {m.meter: m.used for m in answer.meters}.get("api_calls", 0)
    return int(answer.quota.used), metered


def test_a_third_concurrent_request_is_refused_until_one_finishes(
    envoy_grpc: str, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")  # concurrency 2
    headers = {"x-api-key": customer.key}

    async def three_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=envoy_grpc, timeout=10) as client:
            slow = [client.get("/v1/slow?sleep=1", headers=headers) for _ in range(2)]
            tasks = [asyncio.create_task(c) for c in slow]
            await asyncio.sleep(0.3)  # both are in flight upstream now
            third = await client.get("/v1/fast", headers=headers)
            return [*(await asyncio.gather(*tasks)), third]

    first, second, third = asyncio.run(three_at_once())
    assert (first.status_code, second.status_code) == (200, 200)
    assert third.status_code == 429
    assert third.json()["code"] == "concurrency_limited"
    assert "at most 2 at once" in third.json()["message"]
    assert int(third.headers["retry-after"]) >= 1
    # Both finished: their leases were released by the response, not the TTL.
    assert httpx.get(f"{envoy_grpc}/v1/fast", headers=headers, timeout=10).status_code == 200


def test_a_lease_whose_response_never_comes_expires_at_its_ttl(
    tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")  # lease_ttl 2s

    def authorize() -> pb.AuthorizeResponse:
        response: pb.AuthorizeResponse = tollway_stub.Authorize(
            pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x"), timeout=5
        )
        return response

    held = [authorize(), authorize()]
    assert all(h.allowed and h.lease_id for h in held)
    assert authorize().reason == pb.REASON_CONCURRENCY_LIMITED
    time.sleep(2.1)
    assert authorize().allowed


def test_release_and_settle_free_a_lease_early(
    tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")
    request = pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x")
    first = tollway_stub.Authorize(request, timeout=5)
    pb_settle = pb.AuthorizeRequest(
        api_key=customer.key, method="GET", path="/v1/x", request_id="job-7"
    )
    second = tollway_stub.Authorize(pb_settle, timeout=5)
    assert second.lease_id == "job-7"
    assert tollway_stub.Authorize(request, timeout=5).reason == pb.REASON_CONCURRENCY_LIMITED
    released = tollway_stub.Release(
        pb.ReleaseRequest(api_key=customer.key, lease_id=first.lease_id), timeout=5
    )
    assert released.released
    again = tollway_stub.Release(
        pb.ReleaseRequest(api_key=customer.key, lease_id=first.lease_id), timeout=5
    )
    assert not again.released
    third = tollway_stub.Authorize(request, timeout=5)
    assert third.allowed
    assert tollway_stub.Authorize(request, timeout=5).reason == pb.REASON_CONCURRENCY_LIMITED
    # Settling job-7 with RecordUsage ends its lease too.
    tollway_stub.RecordUsage(
        pb.RecordUsageRequest(
            api_key=customer.key,
            meter="api_calls",
            quantity=1,
            idempotency_key="job-7-done",
            request_id="job-7",
        ),
        timeout=5,
    )
    assert tollway_stub.Authorize(request, timeout=5).allowed


def test_the_upstream_reports_the_real_cost(
    envoy_grpc: str, tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")
    response = httpx.get(
        f"{envoy_grpc}/v1/generate?cost=7", headers={"x-api-key": customer.key}, timeout=10
    )
    assert response.status_code == 200
    assert "x-tollway-cost" not in response.headers  # removed before the client
    assert response.headers["x-tollway-charged"] == "7"
    assert response.headers["x-tollway-quota-used"] == "7"
    assert response.headers["x-tollway-quota-remaining"] == "993"
    assert usage(tollway_stub, customer) == (7, 7)  # not the reserved estimate of 1


def test_a_5xx_costs_nothing_with_bill_only_success(
    envoy_grpc: str, tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")  # bill_only_success = true
    failed = httpx.get(
        f"{envoy_grpc}/v1/x?status=503", headers={"x-api-key": customer.key}, timeout=10
    )
    assert failed.status_code == 503 and failed.headers["x-tollway-charged"] == "0"
    assert usage(tollway_stub, customer) == (0, 0)
    ok = httpx.get(f"{envoy_grpc}/v1/x", headers={"x-api-key": customer.key}, timeout=10)
    assert ok.status_code == 200
    assert usage(tollway_stub, customer) == (1, 1)


@pytest.fixture
def second_sidecar(tmp_path: Path, redis_url: str, config_path: Path) -> Iterator[Stub]:
    port = harness.free_port()
    child = harness.start_sidecar(
        config_path, redis_url=redis_url, port=port, log=tmp_path / "s2.log"
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tollway_pb2_grpc.TollwayStub(channel)
    child.stop()


def test_two_sidecars_share_one_customers_limit(
    tollway_stub: Stub, second_sidecar: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("duo")
    request = pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x")
    assert tollway_stub.Authorize(request, timeout=5).allowed
    assert second_sidecar.Authorize(request, timeout=5).allowed
    for stub in (tollway_stub, second_sidecar):
        assert stub.Authorize(request, timeout=5).reason == pb.REASON_CONCURRENCY_LIMITED


def test_a_backend_can_release_an_envoy_request_by_its_request_id(
    channel: grpc.Channel, tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    from envoy.service.auth.v3 import attribute_context_pb2 as attrs
    from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
    from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc

    customer = make_customer("duo")
    check = ext_authz_grpc.AuthorizationStub(channel)

    def request(request_id: str) -> ext_authz.CheckRequest:
        headers = {"x-api-key": customer.key, "x-request-id": request_id}
        http = attrs.AttributeContext.HttpRequest(method="GET", path="/v1/x", headers=headers)
        return ext_authz.CheckRequest(
            attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
        )

    assert check.Check(request("rq-1"), timeout=5).status.code == 0
    assert check.Check(request("rq-2"), timeout=5).status.code == 0
    assert check.Check(request("rq-3"), timeout=5).denied_response.status.code == 429
    released = tollway_stub.Release(pb.ReleaseRequest(api_key=customer.key, lease_id="rq-1"))
    assert released.released
    assert check.Check(request("rq-4"), timeout=5).status.code == 0
