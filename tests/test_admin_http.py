"""The admin API as JSON on the companion (/admin/v1): a merchant's signup flow
creates an account and issues a key over HTTP, with an admin token, and the key
works at once; every route answers a token with its scope, and refuses one
without it, a revoked one and none, changing nothing; a host that keeps failing
gets 429 for its failures while a valid token from it still works; every
refusal is a precise status with a JSON body.

Tests that fail authentication on purpose connect from a loopback address of
their own (own_host): the companion counts failures per client address, so
theirs spend no other test's budget."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sidecar.admin.operations import Admin
from sidecar.admin.scopes import SCOPES, parse_scopes
from sidecar.settings import settings_from_document
from sidecar.store import Store, connect
from tests.conftest import Customer, Stack, with_store
from webhook.admin_api import admin_routes

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


# Loopback addresses no other test uses: 127.20.0.1, 127.20.0.2, ...
_HOSTS = (f"127.20.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture
def own_host(stack: Stack) -> Iterator[httpx.Client]:
    """A client of the admin API connecting from an address of this test's own."""
    transport = httpx.HTTPTransport(local_address=next(_HOSTS))
    with httpx.Client(
        base_url=stack.companion + "/admin/v1", transport=transport, timeout=5
    ) as client:
        yield client


@pytest.fixture(scope="module")
def revoked_token(redis_url: str) -> str:
    """A token with every scope, revoked before it was ever used."""

    async def work(store: Store) -> str:
        token, record = await store.issue_admin_token("revoked", parse_scopes(["admin"]))
        await store.revoke_admin_token(record.token_id)
        return token

    token: str = with_store(redis_url, work)
    return token


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
    own_host: httpx.Client,
) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic eA=="}):
        response = own_host.get("/accounts", headers=headers)
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
    own_host: httpx.Client, token_for: Callable[..., str], redis_url: str
) -> None:
    token = token_for("accounts:read")
    assert own_host.get("/accounts?page_size=1", headers=auth(token)).status_code == 200

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
    error_of(own_host.get("/accounts?page_size=1", headers=auth(token)), 401, "unauthenticated")


def test_repeated_failures_from_a_host_are_429_while_a_valid_token_from_it_still_works(
    own_host: httpx.Client, token_for: Callable[..., str], revoked_token: str
) -> None:
    good = auth(token_for("accounts:read"))
    for attempt in range(10):
        bad = auth("twadm_" + f"{attempt:049d}")
        error_of(own_host.get("/accounts?page_size=1", headers=bad), 401, "unauthenticated")
    for headers in (auth("twadm_" + "9" * 49), {}, auth(revoked_token)):
        limited = own_host.get("/accounts?page_size=1", headers=headers)
        assert "retry" in error_of(limited, 429, "rate_limited")["message"]
        assert "www-authenticate" not in limited.headers
    # Behind an ingress this address is every caller: the merchant's backend goes on.
    served = own_host.get("/accounts?page_size=1", headers=good)
    assert served.status_code == 200 and len(served.json()["accounts"]) == 1
    again = own_host.get("/accounts?page_size=1", headers=auth("twadm_x"))
    error_of(again, 429, "rate_limited")  # serving the valid token gave no failure back


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


# -- every route, with each kind of credential ------------------------------------------


@dataclass(frozen=True)
class AdminRoute:
    """A route, the scope it needs, a request for a fresh customer (and its key),
    what a success answers, and whether it changes anything."""

    method: str
    path: str  # under /admin/v1, as webhook/admin_api.py spells it
    # (the path, and the body's strings, name the customer and key as {customer_id}, {key_id})
    scope: str
    body: dict[str, Any] | None
    status: int
    shows: str  # a field of a success's body
    writes: bool

    def url(self, customer: Customer) -> str:
        return self.path.format(customer_id=customer.id, key_id=customer.key_id)

    def send(self, client: httpx.Client, customer: Customer, headers: dict[str, str]) -> Any:
        body = self.body and {
            k: v.format(customer_id=customer.id) if isinstance(v, str) else v
            for k, v in self.body.items()
        }
        return client.request(self.method, self.url(customer), json=body, headers=headers)


ONE = "/accounts/{customer_id}"
KEY = ONE + "/keys/{key_id}"
ROUTES = [
    AdminRoute(
        "POST",
        "/accounts",
        "accounts:write",
        {"customer_id": "{customer_id}_new", "plan": "basic"},
        201,
        "customer_id",
        True,
    ),
    AdminRoute("GET", "/accounts", "accounts:read", None, 200, "accounts", False),
    AdminRoute("GET", ONE, "accounts:read", None, 200, "customer_id", False),
    AdminRoute("POST", ONE + "/plan", "accounts:write", {"plan": "pro"}, 200, "plan", True),
    AdminRoute(
        "POST",
        ONE + "/status",
        "accounts:write",
        {"status": "past_due", "grace_seconds": 60},
        200,
        "grace_until",
        True,
    ),
    AdminRoute("POST", ONE + "/keys", "keys:write", {"environment": "test"}, 201, "api_key", True),
    AdminRoute("GET", ONE + "/keys", "keys:read", None, 200, "keys", False),
    AdminRoute("GET", KEY, "keys:read", None, 200, "key_id", False),
    AdminRoute("POST", KEY, "keys:write", {"name": "ci"}, 200, "name", True),
    AdminRoute("POST", KEY + "/revoke", "keys:write", None, 200, "revoked_reason", True),
    AdminRoute("POST", KEY + "/rotate", "keys:write", {"overlap": 60}, 201, "replaces", True),
    AdminRoute("GET", ONE + "/usage", "usage:read", None, 200, "meters", False),
    AdminRoute("GET", ONE + "/credits", "credits:read", None, 200, "balance", False),
    AdminRoute("POST", ONE + "/credits", "credits:write", {"credits": 5}, 200, "grant_id", True),
]
ROUTE_IDS = [f"{r.method} {r.path}" for r in ROUTES]
CREDENTIALS = ["valid", "without_scope", "revoked", "none"]


def test_every_route_of_the_admin_api_is_covered(store: Store) -> None:
    settings = settings_from_document({"plans": [{"name": "p", "rate": "1/s"}]}, {})
    served = {
        (method, route.path.removeprefix("/admin/v1"))
        for route in admin_routes(Admin(store, lambda: settings))
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    assert served == {(r.method, r.path) for r in ROUTES}


def snapshot(redis_url: str, customer: Customer) -> tuple[Any, ...]:
    """What a write could change about the customer (and the account a create would make)."""

    async def work(store: Store) -> tuple[Any, ...]:
        return (
            await store.get_account(customer.id),
            await store.list_keys(customer.id),
            (await store.credit_balance(customer.id)).balance,
            await store.get_account(customer.id + "_new"),
        )

    result: tuple[Any, ...] = with_store(redis_url, work)
    return result


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("route", ROUTES, ids=ROUTE_IDS)
def test_every_route_answers_its_scope_and_refuses_any_other_credential(
    route: AdminRoute,
    credential: str,
    http: httpx.Client,
    own_host: httpx.Client,
    token_for: Callable[..., str],
    revoked_token: str,
    make_customer: Callable[..., Customer],
    redis_url: str,
) -> None:
    customer = make_customer("prepaid")
    before = snapshot(redis_url, customer)
    resource = route.scope.partition(":")[0]
    # Every scope but admin and those that grant this one (write implies read).
    lacking = sorted(SCOPES - {"admin", route.scope, f"{resource}:write"})
    if credential == "valid":
        answer = route.send(http, customer, auth(token_for(route.scope)))
        assert answer.status_code == route.status, answer.text
        assert route.shows in answer.json() and answer.headers["cache-control"] == "no-store"
        assert (snapshot(redis_url, customer) != before) == route.writes
        return
    if credential == "without_scope":
        body = error_of(
            route.send(http, customer, auth(token_for(*lacking))), 403, "permission_denied"
        )
        assert route.scope in body["message"]
    else:  # a failed authentication: from an address of its own
        headers = auth(revoked_token) if credential == "revoked" else {}
        refused = route.send(own_host, customer, headers)
        body = error_of(refused, 401, "unauthenticated")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert ("revoked" if credential == "revoked" else "token required") in body["message"]
    assert snapshot(redis_url, customer) == before
