"""The admin API as JSON on the companion (/admin/v1): a merchant's signup flow
creates an account and issues a key over HTTP, with an admin token, and the key
works at once; every refusal is a precise status with a JSON body."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sidecar.admin.scopes import parse_scopes
from sidecar.store import Store, connect
from tests.conftest import Stack

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def token_for(redis_url: str) -> Callable[..., str]:
    def issue(*scopes: str) -> str:
        async def go() -> str:
            store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
            try:
                token, _ = await store.issue_admin_token("signup", parse_scopes(scopes))
                return token
            finally:
                await store.close()

        return asyncio.run(go())

    return issue


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.companion + "/admin/v1", timeout=5) as client:
        yield client


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


def new_id() -> str:
    return "cus_adm" + uuid.uuid4().hex[:12]


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["message"]
    return body


def test_a_signup_flow_creates_an_account_and_a_key_that_works_at_once(
    http: httpx.Client, stack: Stack, token_for: Callable[..., str]
) -> None:
    token = token_for("accounts:write", "keys:write")
    customer = new_id()
    created = http.post(
        "/accounts", json={"customer_id": customer, "plan": "basic"}, headers=auth(token)
    )
    assert created.status_code == 201, created.text
    assert created.json()["plan"] == "basic" and created.json()["status"] == "active"
    issued = http.post(
        f"/accounts/{customer}/keys",
        json={"environment": "test"},
        headers=auth(token, **{"idempotency-key": "signup-1"}),
    )
    assert issued.status_code == 201, issued.text
    assert issued.headers["cache-control"] == "no-store"
    body = issued.json()
    assert body["api_key"].startswith("tw_test_") and body["replayed"] is False
    assert stack.authorize(body["api_key"]).allowed

    again = http.post(
        f"/accounts/{customer}/keys",
        json={"environment": "test"},
        headers=auth(token, **{"idempotency-key": "signup-1"}),
    )
    assert again.json()["key"]["key_id"] == body["key"]["key_id"]
    assert again.json()["api_key"] == "" and again.json()["replayed"] is True
    listed = http.get(f"/accounts/{customer}/keys", headers=auth(token))
    assert [k["key_id"] for k in listed.json()["keys"]] == [body["key"]["key_id"]]


def test_without_a_token_or_with_a_bad_one_it_is_401_with_a_challenge(
    http: httpx.Client,
) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic eA=="}):
        response = http.get("/accounts", headers=headers)
        error_of(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_token_without_the_scope_is_403_and_changes_nothing(
    http: httpx.Client, token_for: Callable[..., str]
) -> None:
    reader = token_for("accounts:read")
    customer = new_id()
    refused = http.post(
        "/accounts", json={"customer_id": customer, "plan": "basic"}, headers=auth(reader)
    )
    error_of(refused, 403, "permission_denied")
    error_of(http.get(f"/accounts/{customer}", headers=auth(reader)), 404, "not_found")


def test_a_revoked_token_is_refused_within_a_second(
    http: httpx.Client, token_for: Callable[..., str], redis_url: str
) -> None:
    token = token_for("accounts:read")
    assert http.get("/accounts?page_size=1", headers=auth(token)).status_code == 200

    async def revoke() -> None:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            record = await store.admin_token(token)
            assert record is not None
            await store.revoke_admin_token(record.token_id)
        finally:
            await store.close()

    asyncio.run(revoke())
    time.sleep(1.1)  # the token cache's second
    error_of(http.get("/accounts?page_size=1", headers=auth(token)), 401, "unauthenticated")


def test_bad_input_names_the_field(http: httpx.Client, token_for: Callable[..., str]) -> None:
    token = token_for("admin")
    error_of(http.post("/accounts", content=b"{", headers=auth(token)), 400, "invalid_argument")
    missing = http.post("/accounts", json={"plan": "basic"}, headers=auth(token))
    assert "customer_id" in error_of(missing, 400, "invalid_argument")["message"]
    wrong = http.post(
        "/accounts", json={"customer_id": new_id(), "plan": "gold"}, headers=auth(token)
    )
    assert "plan" in error_of(wrong, 400, "invalid_argument")["message"]
    paged = http.get("/accounts?page_size=abc", headers=auth(token))
    assert "page_size" in error_of(paged, 400, "invalid_argument")["message"]
    kind = http.post(
        "/accounts",
        json={"customer_id": new_id(), "plan": "basic", "status": 3},
        headers=auth(token),
    )
    assert "status" in error_of(kind, 400, "invalid_argument")["message"]


def test_plan_status_usage_and_credits_through_http(
    http: httpx.Client, stack: Stack, token_for: Callable[..., str]
) -> None:
    token = token_for("admin")
    customer = new_id()
    http.post("/accounts", json={"customer_id": customer, "plan": "basic"}, headers=auth(token))
    moved = http.post(f"/accounts/{customer}/plan", json={"plan": "prepaid"}, headers=auth(token))
    assert moved.json()["plan"] == "prepaid"
    granted = http.post(
        f"/accounts/{customer}/credits",
        json={"credits": 3, "reason": "welcome"},
        headers=auth(token, **{"idempotency-key": "welcome"}),
    )
    assert granted.json()["balance"] == 3 and granted.json()["result"] == "granted"
    replay = http.post(
        f"/accounts/{customer}/credits",
        json={"credits": 3, "reason": "welcome"},
        headers=auth(token, **{"idempotency-key": "welcome"}),
    )
    assert replay.json()["result"] == "duplicate" and replay.json()["balance"] == 3
    key = http.post(f"/accounts/{customer}/keys", json={}, headers=auth(token)).json()["api_key"]
    assert [stack.authorize(key).allowed for _ in range(4)] == [True, True, True, False]
    assert http.get(f"/accounts/{customer}/credits", headers=auth(token)).json()["balance"] == 0
    usage = http.get(f"/accounts/{customer}/usage", headers=auth(token)).json()
    assert usage["plan"] == "prepaid" and usage["credits"] == 0
    paused = http.post(
        f"/accounts/{customer}/status", json={"status": "paused"}, headers=auth(token)
    )
    assert paused.json()["status"] == "paused"


def test_revoke_and_rotate_through_http(
    http: httpx.Client, stack: Stack, token_for: Callable[..., str]
) -> None:
    token = token_for("accounts:write", "keys:write")
    customer = new_id()
    http.post("/accounts", json={"customer_id": customer, "plan": "basic"}, headers=auth(token))
    first = http.post(f"/accounts/{customer}/keys", json={}, headers=auth(token)).json()
    rotated = http.post(
        f"/accounts/{customer}/keys/{first['key']['key_id']}/rotate",
        json={"overlap": 60},
        headers=auth(token),
    ).json()
    assert rotated["replaces"] == first["key"]["key_id"]
    assert rotated["old_key_expires_at"] > time.time() + 30
    assert stack.authorize(rotated["api_key"]).allowed
    revoked = http.post(
        f"/accounts/{customer}/keys/{rotated['key']['key_id']}/revoke", headers=auth(token)
    )
    assert revoked.json()["state"] == "revoked"
    deadline = time.monotonic() + 2
    while stack.authorize(rotated["api_key"]).allowed:
        assert time.monotonic() < deadline, "a revoked key still worked after 2 s"
        time.sleep(0.05)
    missing = http.get(f"/accounts/{customer}/keys/key_0000000000000000", headers=auth(token))
    error_of(missing, 404, "not_found")


def test_a_key_issued_with_a_policy_over_http_keeps_it_and_can_be_updated(
    http: httpx.Client, stack: Stack, token_for: Callable[..., str]
) -> None:
    token = token_for("accounts:write", "keys:write")
    customer = new_id()
    http.post("/accounts", json={"customer_id": customer, "plan": "basic"}, headers=auth(token))
    issued = http.post(
        f"/accounts/{customer}/keys",
        json={"name": "ci", "metadata": {"team": "data"}, "features": ["search"], "uses": 2},
        headers=auth(token),
    ).json()
    view = issued["key"]
    assert (view["name"], view["metadata"], view["scope_features"], view["uses"]) == (
        "ci",
        {"team": "data"},
        ["search"],
        2,
    )
    assert [stack.authorize(issued["api_key"]).allowed for _ in range(3)] == [True, True, False]
    updated = http.post(
        f"/accounts/{customer}/keys/{view['key_id']}", json={"uses": 5}, headers=auth(token)
    )
    assert updated.status_code == 200 and updated.json()["uses"] == 5
    assert updated.json()["name"] == ""  # a policy is replaced whole
    deadline = time.monotonic() + 2
    while not stack.authorize(issued["api_key"]).allowed:
        assert time.monotonic() < deadline, "the update did not reach the sidecar"
        time.sleep(0.05)
    bad = http.post(f"/accounts/{customer}/keys", json={"rate": "fast"}, headers=auth(token))
    assert "rate" in error_of(bad, 400, "invalid_argument")["message"]
