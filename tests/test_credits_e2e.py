"""Prepaid credits (issue #15) end to end: a real Envoy running each shipped
config (deploy/envoy.yaml: HTTP ext_authz + access-log settlement, fixture
`envoy`; deploy/envoy-grpc.yaml: gRPC Check + ext_proc, `envoy_grpc`) in front
of the echo upstream, the real sidecar, and balances in the real Valkey.

Each test is a claim a customer or an operator can see: what a balance buys,
the 402 when it runs out, what a grant restores, how a settled cost burns or
refunds, the plans that bill or fall back instead of refusing, two sidecars
burning one balance, the gRPC API's view of it, and low-balance notices (from
admissions and from settlements through either shipped config).

Not covered: a 5xx refund in credits. That needs a credits plan (or route)
with bill_only_success, and tests/conftest.py's TEST_CONFIG has none. Nor a
cost-3 route through Envoy (its one dear route, /v1/heavy, costs 4); the cost-3
402 of the README is asked through Authorize instead.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.periods import month_start
from sidecar.store import Store
from sidecar.store.credits import Balance, LedgerEntry
from sidecar.store.names import NOTIFICATIONS_KEY
from tests import harness
from tests.conftest import Customer, eventually, with_store

pytestmark = pytest.mark.servers  # starts its own servers

MakeCustomer = Callable[..., Customer]
Cli = Callable[..., subprocess.CompletedProcess[str]]
Stub = tollway_pb2_grpc.TollwayStub

TOP_UP_URL = "https://api.example.com/pricing"  # [credits] top_up_url in TEST_CONFIG
SETTLED_WITHIN = 3.0  # s: the access log is flushed every 0.2 s after the response


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


# -- helpers --------------------------------------------------------------------------


def grant(redis_url: str, customer: Customer, credits: int, *, expires_at: int = 0) -> int:
    """Grants credits under a fresh grant id; returns the balance after."""

    async def work(store: Store) -> int:
        result = await store.grant_credits(
            customer.id,
            grant_id=f"test_{uuid.uuid4().hex[:12]}",
            credits=credits,
            expires_at=expires_at,
            reason="test",
        )
        assert result.result == "granted"
        return result.balance

    result: int = with_store(redis_url, work)
    return result


def balance_of(redis_url: str, customer: Customer) -> Balance:
    async def work(store: Store) -> Balance:
        return await store.credit_balance(customer.id)

    result: Balance = with_store(redis_url, work)
    return result


def balance(redis_url: str, customer: Customer) -> int:
    return balance_of(redis_url, customer).balance


def ledger(redis_url: str, customer: Customer) -> list[LedgerEntry]:
    async def work(store: Store) -> list[LedgerEntry]:
        return await store.credit_ledger(customer.id, count=0, newest_first=False)

    result: list[LedgerEntry] = with_store(redis_url, work)
    return result


def quota_used(redis_url: str, customer: Customer) -> int:
    async def work(store: Store) -> int:
        return (await store.usage(customer.id))[1]

    result: int = with_store(redis_url, work)
    return result


def metered(redis_url: str, customer: Customer, meter: str = "api_calls") -> int:
    """Units recorded this month on the meter (what the reporter bills)."""

    async def work(store: Store) -> dict[str, tuple[int, int]]:
        return await store.usage_totals(customer.id, month_start(int(time.time())))

    totals: dict[str, tuple[int, int]] = with_store(redis_url, work)
    return totals.get(meter, (0, 0))[0]


def assert_ledger_adds_up(redis_url: str, customer: Customer) -> Balance:
    """grants - burns - expiries, the open batch counted with the burns, is the balance."""
    state = balance_of(redis_url, customer)
    entries = ledger(redis_url, customer)
    assert sum(e.signed for e in entries) - state.open_burn == state.balance, (entries, state)
    return state


def get(http: httpx.Client, customer: Customer, path: str = "/v1/search") -> httpx.Response:
    return http.get(path, headers={"x-api-key": customer.key})


def upstream_saw(response: httpx.Response) -> dict[str, Any]:
    """The request as the echo upstream received it."""
    assert response.status_code == 200, response.text
    echoed: dict[str, Any] = response.json()
    return echoed


def assert_credits_exhausted(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 402, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == "credits_exhausted"
    assert "top up" in body["message"].lower()
    assert TOP_UP_URL in body["message"]
    assert "headers" not in body  # a denial never reaches the upstream
    return body


def authorize(stub: Stub, customer: Customer, *, cost: int = 0) -> pb.AuthorizeResponse:
    request = pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/search", cost=cost)
    answer: pb.AuthorizeResponse = stub.Authorize(request, timeout=5)
    return answer


# -- what a balance buys, through Envoy -------------------------------------------------


@pytest.mark.parametrize("how", ["store", "cli"])
def test_ten_credits_buy_exactly_ten_requests_then_402_with_where_to_top_up(
    http: httpx.Client,
    make_customer: MakeCustomer,
    redis_url: str,
    cli: Cli,
    tollway_stub: Stub,
    how: str,
) -> None:
    c = make_customer("prepaid")
    if how == "cli":
        done = cli("credits", "grant", "--customer", c.id, "--credits", "10")
        assert done.returncode == 0, done.stderr
    else:
        assert grant(redis_url, c, 10) == 10
    for n in range(10):
        response = get(http, c)
        assert response.status_code == 200, (n, response.text)
        assert upstream_saw(response)["headers"]["x-tollway-plan"] == "prepaid"
    assert_credits_exhausted(get(http, c))
    assert_credits_exhausted(get(http, c))  # and again: a denial consumes nothing
    assert balance(redis_url, c) == 0
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert usage.quota.used == 10  # the allowed ten, not the denials
    assert usage.credits.balance == 0
    state = assert_ledger_adds_up(redis_url, c)
    assert state.debt == 0


def test_a_request_dearer_than_the_balance_is_402_and_consumes_nothing(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 3)
    assert get(http, c).status_code == 200  # 2 left
    assert quota_used(redis_url, c) == 1
    body = assert_credits_exhausted(get(http, c, "/v1/heavy"))  # costs 4
    assert "costs 4" in body["message"] and "balance is 2" in body["message"]
    assert balance(redis_url, c) == 2
    assert quota_used(redis_url, c) == 1  # unchanged by the denial
    # A unit request still fits what is left.
    assert get(http, c).status_code == 200
    assert balance(redis_url, c) == 1
    assert quota_used(redis_url, c) == 2


def test_a_grant_after_a_402_lets_the_next_request_through_at_once(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 1)
    assert get(http, c).status_code == 200
    assert_credits_exhausted(get(http, c))
    assert grant(redis_url, c, 1) == 1
    assert get(http, c).status_code == 200  # no wait, nothing cached from the denial
    assert_credits_exhausted(get(http, c))


# -- settling in credits ------------------------------------------------------------------


def test_a_settled_cost_above_the_estimate_burns_the_difference(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 10)
    response = get(http, c, "/v1/x?cost=3")  # estimate 1; the upstream says 3
    assert response.status_code == 200
    assert "x-tollway-cost" not in response.headers
    eventually(lambda: balance(redis_url, c) == 7, within=SETTLED_WITHIN)
    eventually(lambda: quota_used(redis_url, c) == 3, within=SETTLED_WITHIN)
    assert metered(redis_url, c) == 0  # paid from credits: nothing to bill
    assert_ledger_adds_up(redis_url, c)


def test_a_settled_cost_below_the_estimate_is_refunded_in_credits(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 10)
    assert get(http, c, "/v1/heavy?cost=1").status_code == 200  # estimate 4; the upstream says 1
    eventually(lambda: balance(redis_url, c) == 9, within=SETTLED_WITHIN)
    eventually(lambda: quota_used(redis_url, c) == 1, within=SETTLED_WITHIN)
    assert_ledger_adds_up(redis_url, c)


def test_a_settled_cost_above_the_balance_is_a_debt_the_next_grant_pays_first(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 1)
    assert get(http, c, "/v1/x?cost=3").status_code == 200  # the estimate 1 was covered
    eventually(lambda: balance(redis_url, c) == -2, within=SETTLED_WITHIN)
    assert balance_of(redis_url, c).debt == 2
    assert_credits_exhausted(get(http, c))
    assert grant(redis_url, c, 5) == 3  # 2 of the 5 paid the debt
    assert get(http, c).status_code == 200
    assert balance_of(redis_url, c).debt == 0
    assert_ledger_adds_up(redis_url, c)


# -- plans that do not refuse at zero -----------------------------------------------------


def test_prepaid_bill_meters_what_credits_do_not_cover_and_only_that(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid_bill")
    # No credits: allowed, and its settled cost is metered to bill.
    response = get(http, c, "/v1/x?cost=2")
    assert upstream_saw(response)["headers"]["x-tollway-plan"] == "prepaid_bill"
    eventually(lambda: metered(redis_url, c) == 2, within=SETTLED_WITHIN)
    assert balance(redis_url, c) == 0
    # With credits: they pay, settlement included, and nothing more is metered.
    grant(redis_url, c, 5)
    assert get(http, c, "/v1/x?cost=2").status_code == 200
    eventually(lambda: balance(redis_url, c) == 3, within=SETTLED_WITHIN)  # settled: 2 burned
    assert metered(redis_url, c) == 2
    assert_ledger_adds_up(redis_url, c)


def exhaust_fallback(http: httpx.Client, customer: Customer) -> None:
    """With no credits: plan tight's limits (burst 2, 1/min), as the upstream sees."""
    for _ in range(2):
        assert upstream_saw(get(http, customer))["headers"]["x-tollway-plan"] == "tight"
    limited = get(http, customer)
    assert limited.status_code == 429, limited.text
    assert limited.json()["code"] == "rate_limited"


def test_prepaid_fallback_without_credits_gets_the_fallback_plans_limits(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid_fallback")  # credits_exhausted = "tight"
    exhaust_fallback(http, c)
    assert balance(redis_url, c) == 0


def test_prepaid_fallback_is_back_on_its_plan_at_once_after_a_grant(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid_fallback")
    exhaust_fallback(http, c)
    assert grant(redis_url, c, 10) == 10
    # Back on its own plan's limits and burning credits, at once (authorizer.py:
    # "a top-up restores it at once").
    seen = upstream_saw(get(http, c))
    assert seen["headers"]["x-tollway-plan"] == "prepaid_fallback"
    assert balance(redis_url, c) == 9


def test_prepaid_fallback_is_back_on_its_plan_within_a_second_of_a_grant(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    """The bound the sidecar's shortcuts promise for a top-up (cache.MAX_STALENESS)."""
    c = make_customer("prepaid_fallback")
    exhaust_fallback(http, c)
    grant(redis_url, c, 10)
    answers: list[httpx.Response] = []

    def on_prepaid() -> bool:
        answers.append(get(http, c))
        return answers[-1].status_code == 200

    assert eventually(on_prepaid, within=1.5, every=0.05) <= 1.5
    assert upstream_saw(answers[-1])["headers"]["x-tollway-plan"] == "prepaid_fallback"


def test_a_plan_without_credits_ignores_the_accounts_balance(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str, tollway_stub: Stub
) -> None:
    c = make_customer("basic")  # burst 5
    grant(redis_url, c, 2)
    for _ in range(4):  # more than the balance
        assert upstream_saw(get(http, c))["headers"]["x-tollway-plan"] == "basic"
    time.sleep(0.5)  # settlements, were any due, would land meanwhile
    assert balance(redis_url, c) == 2
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert usage.quota.used == 4
    assert usage.HasField("credits") and usage.credits.balance == 2


def test_credits_burn_soonest_expiring_grant_first(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    now = int(time.time())
    grant(redis_url, c, 5)  # never expires: burned last
    grant(redis_url, c, 3, expires_at=now + 7200)
    grant(redis_url, c, 2, expires_at=now + 3600)  # the soonest: burned first
    for _ in range(4):
        assert authorize(tollway_stub, c).allowed
    left = {g.expires_at: g.remaining for g in balance_of(redis_url, c).grants}
    assert left == {now + 7200: 1, 0: 5}  # the soonest spent and gone, the next one dented
    assert balance(redis_url, c) == 6


# -- two sidecars, one balance --------------------------------------------------------


@pytest.fixture(scope="module")
def second_sidecar(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, config_path: Path
) -> Iterator[str]:
    """Another `tollway serve` process on the same Valkey."""
    port = harness.free_port()
    log = tmp_path_factory.mktemp("logs") / "sidecar-second.log"
    child = harness.start_sidecar(config_path, redis_url=redis_url, port=port, log=log)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        child.stop()


def test_two_sidecars_burning_one_balance_allow_exactly_what_it_holds(
    sidecar: str, second_sidecar: str, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 100)
    channels = [grpc.insecure_channel(address) for address in (sidecar, second_sidecar)]
    try:
        stubs = [tollway_pb2_grpc.TollwayStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
        for stub in stubs:  # warm: connections up, so the burst is concurrent
            assert authorize(stub, make_customer("basic")).allowed

        def one(n: int) -> tuple[bool, int, int]:
            answer = authorize(stubs[n % 2], c)
            return answer.allowed, answer.reason, answer.credits.balance

        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(one, range(300)))
    finally:
        for channel in channels:
            channel.close()
    allowed = [a for a in answers if a[0]]
    denied = [a for a in answers if not a[0]]
    assert len(allowed) == 100
    assert {reason for _, reason, _ in denied} == {pb.REASON_CREDITS_EXHAUSTED}
    assert all(b >= 0 for _, _, b in answers)  # never negative
    assert sorted(b for _, _, b in allowed) == list(range(100))  # each credit burned once
    state = assert_ledger_adds_up(redis_url, c)
    assert state.balance == 0 and state.debt == 0


# -- the gRPC API -----------------------------------------------------------------


def test_a_request_costing_3_with_2_left_is_refused_naming_both(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 2)
    denied = authorize(tollway_stub, c, cost=3)
    assert not denied.allowed and denied.reason == pb.REASON_CREDITS_EXHAUSTED
    assert denied.message == (
        "Prepaid credits exhausted: this request costs 3 and the balance is 2; "
        f"top up at {TOP_UP_URL} to continue"
    )
    assert balance(redis_url, c) == 2


def test_authorize_reports_the_balance_and_credits_exhausted(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 5)
    first = authorize(tollway_stub, c)
    assert first.allowed and first.reason == pb.REASON_OK
    assert first.HasField("credits") and first.credits.balance == 4
    heavy = authorize(tollway_stub, c, cost=4)
    assert heavy.allowed and heavy.credits.balance == 0
    denied = authorize(tollway_stub, c)
    assert not denied.allowed
    assert denied.reason == pb.REASON_CREDITS_EXHAUSTED
    assert denied.HasField("credits") and denied.credits.balance == 0
    assert "top up" in denied.message.lower() and TOP_UP_URL in denied.message
    # A plan without credits reports no balance.
    plain = authorize(tollway_stub, make_customer("basic"))
    assert plain.allowed and not plain.HasField("credits")


def test_get_usage_reports_the_balance_of_an_account_with_credits(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    grant(redis_url, c, 7)
    authorize(tollway_stub, c, cost=2)
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert usage.HasField("credits") and usage.credits.balance == 5
    assert usage.quota.used == 2
    by_key = tollway_stub.GetUsage(pb.GetUsageRequest(api_key=c.key), timeout=5)
    assert by_key.credits.balance == 5
    # Never granted, on a plan without credits: no balance at all.
    plain = make_customer("basic")
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=plain.id), timeout=5)
    assert not usage.HasField("credits")


# -- low-balance notifications ------------------------------------------------------


def notifications_cursor(redis_url: str) -> str:
    """The newest notification's id: what a test reads after."""
    with redis.Redis.from_url(redis_url) as client:
        newest: Any = client.xrevrange(NOTIFICATIONS_KEY, count=1)
    return newest[0][0].decode() if newest else "0-0"


def low_balance_notices(redis_url: str, cursor: str, customer: Customer) -> list[tuple[int, int]]:
    """(mark, balance) of each low_balance notification for customer after cursor."""

    async def work(store: Store) -> list[tuple[int, int]]:
        found = await store.notifications_after(cursor, count=10_000)
        return [
            (n["mark"], n["balance"])
            for _, n in found
            if n.get("customer_id") == customer.id and n.get("type") == "low_balance"
        ]

    result: list[tuple[int, int]] = with_store(redis_url, work)
    return result


def test_low_balance_notifies_once_per_mark_and_again_after_a_grant(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")  # [credits] low_balance = [5, 0]
    cursor = notifications_cursor(redis_url)
    grant(redis_url, c, 8)
    for _ in range(2):
        assert authorize(tollway_stub, c).allowed  # 6 left: no mark reached
    time.sleep(0.3)
    assert low_balance_notices(redis_url, cursor, c) == []
    assert authorize(tollway_stub, c).allowed  # 5: the first mark
    eventually(lambda: low_balance_notices(redis_url, cursor, c) == [(5, 5)], within=2)
    for _ in range(4):
        assert authorize(tollway_stub, c).allowed  # 4 .. 1: below 5 still, no notice
    assert authorize(tollway_stub, c).allowed  # 0: the second mark
    for _ in range(3):
        assert not authorize(tollway_stub, c).allowed  # at zero: denials notify nothing
    eventually(lambda: low_balance_notices(redis_url, cursor, c) == [(5, 5), (0, 0)], within=2)
    time.sleep(0.3)
    assert low_balance_notices(redis_url, cursor, c) == [(5, 5), (0, 0)]
    # A grant lifts the balance above both marks: the next fall notifies again.
    grant(redis_url, c, 7)
    assert authorize(tollway_stub, c, cost=2).allowed  # 5
    eventually(
        lambda: low_balance_notices(redis_url, cursor, c) == [(5, 5), (0, 0), (5, 5)], within=2
    )
    assert authorize(tollway_stub, c, cost=5).allowed  # 0
    eventually(
        lambda: low_balance_notices(redis_url, cursor, c) == [(5, 5), (0, 0), (5, 5), (0, 0)],
        within=2,
    )


def test_one_burn_past_both_marks_notifies_each(
    tollway_stub: Stub, make_customer: MakeCustomer, redis_url: str
) -> None:
    c = make_customer("prepaid")
    cursor = notifications_cursor(redis_url)
    grant(redis_url, c, 6)
    assert authorize(tollway_stub, c, cost=6).allowed
    eventually(
        lambda: sorted(low_balance_notices(redis_url, cursor, c)) == [(0, 0), (5, 0)], within=2
    )


def test_a_settled_cost_past_a_mark_notifies_it_once(
    http: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    """Settled through the access log (envoy.yaml) or ext_proc (envoy-grpc.yaml)."""
    c = make_customer("prepaid")
    cursor = notifications_cursor(redis_url)
    grant(redis_url, c, 8)
    assert get(http, c, "/v1/x?cost=4").status_code == 200  # 7 admitted; settled: 4
    eventually(lambda: balance(redis_url, c) == 4, within=SETTLED_WITHIN)
    eventually(lambda: low_balance_notices(redis_url, cursor, c) == [(5, 4)], within=2)
    assert get(http, c, "/v1/x?cost=4").status_code == 200  # 3 admitted; settled: 0
    eventually(lambda: balance(redis_url, c) == 0, within=SETTLED_WITHIN)
    eventually(lambda: low_balance_notices(redis_url, cursor, c) == [(5, 4), (0, 0)], within=2)
    time.sleep(0.3)
    assert low_balance_notices(redis_url, cursor, c) == [(5, 4), (0, 0)]
