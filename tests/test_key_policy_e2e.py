"""A key's own scope and uses through a real Envoy, on each shipped config: a
scoped key is refused outside its scope (403 key_scope) and served inside it,
and a key with uses answers exactly that many requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from sidecar.key_policy import KeyPolicy, parse_policy
from sidecar.store import Store, connect
from tests.conftest import new_customer

pytestmark = pytest.mark.servers


@pytest.fixture(
    scope="module", params=["envoy", "envoy_grpc"], ids=["envoy.yaml", "envoy-grpc.yaml"]
)
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    url: str = request.getfixturevalue(request.param)
    with httpx.Client(base_url=url, timeout=5.0) as client:
        yield client


def key_with(redis_url: str, policy: KeyPolicy, plan: str = "pro") -> str:
    async def go() -> str:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            customer = new_customer()
            await store.create_account(customer, plan)
            key, _ = await store.issue_key(customer, environment="test", policy=policy)
            return key
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_scoped_key_is_served_inside_its_scope_and_refused_outside(
    http: httpx.Client, redis_url: str
) -> None:
    key = key_with(redis_url, parse_policy(features=["search"], routes=["GET /v1/search/*"]))
    inside = http.get("/v1/search/books", headers={"x-api-key": key})
    assert inside.status_code == 200, inside.text
    for method, path in (("GET", "/v1/other"), ("POST", "/v1/search/books")):
        outside = http.request(method, path, headers={"x-api-key": key})
        assert outside.status_code == 403, outside.text
        assert outside.json()["code"] == "key_scope"
    export = http.post("/v1/export/x", headers={"x-api-key": key})  # a feature outside scope
    assert export.status_code == 403 and export.json()["code"] == "key_scope"


def test_a_key_with_three_uses_answers_three_requests(http: httpx.Client, redis_url: str) -> None:
    key = key_with(redis_url, parse_policy(uses=3))
    codes = [http.get("/v1/x", headers={"x-api-key": key}).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 403, 403]
    last = http.get("/v1/x", headers={"x-api-key": key})
    assert last.json()["code"] == "key_uses_exhausted"


def test_a_keys_own_rate_tightens_the_plan_with_its_own_headers(
    http: httpx.Client, redis_url: str
) -> None:
    key = key_with(redis_url, parse_policy(rate="1/m", burst=2))
    answers = [http.get("/v1/x", headers={"x-api-key": key}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["code"] == "rate_limited"
    assert answers[2].headers["x-ratelimit-limit"] == "2"
    assert int(answers[2].headers["retry-after"]) >= 1


def test_a_request_through_envoy_records_when_the_key_was_last_used(
    http: httpx.Client, redis_url: str
) -> None:
    import time

    from sidecar import keys

    key = key_with(redis_url, parse_policy(name="web"))
    before = int(time.time())
    assert http.get("/v1/x", headers={"x-api-key": key}).status_code == 200

    async def last_used() -> int:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            record = await store.lookup_key(keys.key_hash(key))
            assert record is not None
            return record.last_used
        finally:
            await store.close()

    deadline = time.monotonic() + 7  # the sidecar writes last_used in batches, every 5 s
    while (seen := asyncio.run(last_used())) == 0:
        assert time.monotonic() < deadline, "last_used was never written"
        time.sleep(0.25)
    assert before <= seen <= int(time.time())
