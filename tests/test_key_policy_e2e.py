"""A key's own scope and uses through a real Envoy, on each shipped config: a
scoped key is refused outside its scope (403 key_scope) and served inside it,
a key with uses answers exactly that many requests, and a key rotated with the
CLI (`tollway keys rotate`) keeps its scope and what is left of its uses. The
CLI refuses to rotate an expired key, and says when the old key really stops."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sidecar.key_policy import KeyPolicy, parse_policy
from sidecar.store import Store, connect
from tests.conftest import Customer, new_customer

pytestmark = pytest.mark.servers


@pytest.fixture(
    scope="module", params=["envoy", "envoy_grpc"], ids=["envoy.yaml", "envoy-grpc.yaml"]
)
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    url: str = request.getfixturevalue(request.param)
    with httpx.Client(base_url=url, timeout=5.0) as client:
        yield client


def key_with(redis_url: str, policy: KeyPolicy, plan: str = "pro", **issue: Any) -> Customer:
    """A new account on plan with one key of this policy (issue: more of issue_key's options)."""

    async def go() -> Customer:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            customer = new_customer()
            await store.create_account(customer, plan)
            key, record = await store.issue_key(
                customer, environment="test", policy=policy, **issue
            )
            return Customer(customer, key, record.key_id)
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_scoped_key_is_served_inside_its_scope_and_refused_outside(
    http: httpx.Client, redis_url: str
) -> None:
    key = key_with(redis_url, parse_policy(features=["search"], routes=["GET /v1/search/*"])).key
    inside = http.get("/v1/search/books", headers={"x-api-key": key})
    assert inside.status_code == 200, inside.text
    for method, path in (("GET", "/v1/other"), ("POST", "/v1/search/books")):
        outside = http.request(method, path, headers={"x-api-key": key})
        assert outside.status_code == 403, outside.text
        assert outside.json()["code"] == "key_scope"
    export = http.post("/v1/export/x", headers={"x-api-key": key})  # a feature outside scope
    assert export.status_code == 403 and export.json()["code"] == "key_scope"


def test_a_key_with_three_uses_answers_three_requests(http: httpx.Client, redis_url: str) -> None:
    key = key_with(redis_url, parse_policy(uses=3)).key
    codes = [http.get("/v1/x", headers={"x-api-key": key}).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 403, 403]
    last = http.get("/v1/x", headers={"x-api-key": key})
    assert last.json()["code"] == "key_uses_exhausted"


def test_a_keys_own_rate_tightens_the_plan_with_its_own_headers(
    http: httpx.Client, redis_url: str
) -> None:
    key = key_with(redis_url, parse_policy(rate="1/m", burst=2)).key
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

    key = key_with(redis_url, parse_policy(name="web")).key
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


# -- rotation with the CLI ----------------------------------------------------------------

Cli = Callable[..., Any]


def rotated(cli: Cli, customer: Customer, *options: str) -> dict[str, Any]:
    done = cli("keys", "rotate", "--customer", customer.id, customer.key_id, *options, "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_a_key_rotated_with_the_cli_keeps_its_scope_and_its_uses_left(
    http: httpx.Client, redis_url: str, cli: Cli
) -> None:
    policy = parse_policy(name="ci", features=["search"], routes=["GET /v1/search/*"], uses=3)
    old = key_with(redis_url, policy)
    assert http.get("/v1/search/a", headers={"x-api-key": old.key}).status_code == 200
    new = rotated(cli, old, "--overlap", "1h")
    assert (new["replaces"], new["name"], new["uses"]) == (old.key_id, "ci", 2)
    outside = http.get("/v1/other", headers={"x-api-key": new["key"]})
    assert outside.status_code == 403 and outside.json()["code"] == "key_scope"
    codes = [http.get("/v1/search/a", headers={"x-api-key": new["key"]}) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 403]
    assert codes[2].json()["code"] == "key_uses_exhausted"
    # Within its overlap, the old key answers nothing more: its uses moved.
    spent = http.get("/v1/search/a", headers={"x-api-key": old.key})
    assert spent.status_code == 403 and spent.json()["code"] == "key_uses_exhausted"


def test_the_cli_refuses_to_rotate_an_expired_key(
    make_customer: Callable[..., Customer], cli: Cli, redis_url: str
) -> None:
    expired = make_customer(expires_at_us=(int(time.time()) - 60) * 1_000_000)
    refused = cli("keys", "rotate", "--customer", expired.id, expired.key_id)
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"key {expired.key_id} is expired" in refused.stderr
    listed = cli("keys", "list", "--customer", expired.id, "--json")
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [expired.key_id]  # none made


def test_the_cli_says_the_old_key_stops_at_its_own_expiry_when_that_comes_first(
    redis_url: str, cli: Cli
) -> None:
    old = key_with(redis_url, parse_policy(), expires_in=600)
    new = rotated(cli, old, "--overlap", "1d")
    assert abs(new["old_key_expires_at"] - (time.time() + 600)) < 5  # not a day from now
    assert new["expires_at"] == new["old_key_expires_at"]  # the new key keeps the expiry
    text = cli("keys", "rotate", "--customer", old.id, new["key_id"], "--overlap", "1d")
    stopping = time.ctime(new["old_key_expires_at"])
    assert text.returncode == 0 and f"keeps working until {stopping}" in text.stdout
