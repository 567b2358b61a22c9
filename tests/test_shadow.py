"""Shadow mode (issue #18): a plan's limits with `shadow` are decided and counted
as usual but never deny. What they would have denied is said on the answer
(x-tollway-shadow-denied, to the client and the upstream) and counted in
tollway_decisions_total{mode="shadow"}, so a merchant can roll out new limits
and watch what they would do first. Through a real Envoy running each shipped
config, and in-process for the concurrency limit and the metric."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from sidecar.authorizer import Authorizer
from sidecar.decision import Reason
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.metrics import counted_decision
from sidecar.settings import Settings, settings_from_document
from sidecar.store import Store, connect
from tests.conftest import Customer
from tests.test_authorizer import customer_with_key

MakeCustomer = Callable[..., Customer]
SHADOW_HEADER = "x-tollway-shadow-denied"


@pytest.fixture(
    scope="module", params=["envoy", "envoy_grpc"], ids=["envoy.yaml", "envoy-grpc.yaml"]
)
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    url: str = request.getfixturevalue(request.param)
    with httpx.Client(base_url=url, timeout=5.0) as client:
        yield client


def get(http: httpx.Client, customer: Customer) -> httpx.Response:
    return http.get("/v1/search", headers={"x-api-key": customer.key})


def upstream_headers(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    echoed: dict[str, Any] = response.json()
    headers: dict[str, str] = echoed["headers"]
    return headers


@pytest.mark.servers
def test_a_plan_in_shadow_mode_admits_what_its_limits_would_deny_and_says_so(
    http: httpx.Client,
    make_customer: MakeCustomer,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
) -> None:
    c = make_customer("shadowed")  # 1/min, burst 2, 3 a day: all in shadow mode
    answers = [get(http, c) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    # Within the limits: nothing to say.
    assert SHADOW_HEADER not in answers[0].headers
    assert SHADOW_HEADER not in upstream_headers(answers[0])
    # The bucket is empty from the third; the day's quota of 3 is spent from the fourth:
    # the first limit the script checks that would deny is the one named.
    assert answers[2].headers[SHADOW_HEADER] == "rate_limited"
    assert answers[3].headers[SHADOW_HEADER] == "quota_exceeded"
    assert upstream_headers(answers[4])[SHADOW_HEADER] == "quota_exceeded"
    # Counted as usual: the quota past its limit, as it would be once enforced.
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(api_key=c.key), timeout=5)
    assert usage.quota.used == 5


@pytest.mark.servers
def test_only_the_limits_named_in_shadow_are_shadowed(
    http: httpx.Client, make_customer: MakeCustomer
) -> None:
    c = make_customer("shadow_quota")  # burst 2 enforced; a quota of 1 a day in shadow mode
    first, second, third = (get(http, c) for _ in range(3))
    assert first.status_code == 200 and SHADOW_HEADER not in first.headers
    assert second.status_code == 200
    assert second.headers[SHADOW_HEADER] == "quota_exceeded"
    assert third.status_code == 429  # the bucket is enforced
    assert third.json()["code"] == "rate_limited"
    assert SHADOW_HEADER not in third.headers


CONFIG = settings_from_document(
    {
        "plans": [
            {
                "name": "single",
                "rate": "100/s",
                "concurrency": 1,
                "shadow": ["concurrency"],
            },
        ],
    },
    {},
)


def shadow_count(reason: str, plan: str) -> float:
    labels = {"reason": reason, "plan": plan, "mode": "shadow"}
    return REGISTRY.get_sample_value("tollway_decisions_total", labels) or 0.0


def test_a_concurrency_limit_in_shadow_mode_lets_the_second_request_in_and_counts_it(
    redis_url: str,
) -> None:
    async def work() -> None:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        config: Callable[[], Settings] = lambda: CONFIG  # noqa: E731
        sidecar = Authorizer(store, config)
        try:
            _, key = await customer_with_key(store, "single")
            before = shadow_count("concurrency_limited", "single")
            first = await counted_decision(sidecar, key, method="GET", path="/v1/x")
            second = await counted_decision(sidecar, key, method="GET", path="/v1/x")
            assert first.allowed and first.shadow is None
            assert second.allowed and second.shadow is Reason.CONCURRENCY_LIMITED
            assert first.lease_id and second.lease_id  # both hold a lease, as they would
            assert shadow_count("concurrency_limited", "single") == before + 1
        finally:
            await store.close()

    asyncio.run(work())
