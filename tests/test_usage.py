"""Usage over gRPC against real Redis: RecordUsage's contract, idempotency,
metering in the request path, reserve-then-settle, quota alerts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from sidecar.store.admission import admission
from tests.conftest import Customer

Stub = tollway_pb2_grpc.TollwayStub


def record(stub: Stub, customer: Customer, **fields: Any) -> pb.RecordUsageResponse:
    fields.setdefault("meter", "api_calls")
    fields.setdefault("quantity", 1)
    fields.setdefault("idempotency_key", uuid.uuid4().hex)
    response: pb.RecordUsageResponse = stub.RecordUsage(
        pb.RecordUsageRequest(api_key=customer.key, **fields), timeout=5
    )
    return response


def meters(stub: Stub, customer: Customer) -> dict[str, tuple[int, int, int]]:
    answer = stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id), timeout=5)
    return {m.meter: (m.used, m.reported, m.pending) for m in answer.meters}


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"meter": "gpu_hours"}, "unknown meter 'gpu_hours' (meters: api_calls, tokens)"),
        ({"quantity": 0}, "quantity must be positive, got 0"),
        ({"quantity": -5}, "quantity must be positive, got -5"),
        ({"idempotency_key": ""}, "idempotency_key is required"),
        # Seconds from now, turned into a timestamp when the test runs (not when
        # it is collected: a long suite would move "the future" into the past).
        ({"timestamp": -36 * 86400}, "more than 35 days old"),
        ({"timestamp": 600}, "more than 5 minutes in the future"),
    ],
)
def test_bad_usage_is_invalid_argument_with_a_precise_message(
    tollway_stub: Stub, make_customer: Callable[..., Customer], fields: dict[str, Any], message: str
) -> None:
    if "timestamp" in fields:
        fields = {"timestamp": Timestamp(seconds=int(time.time()) + fields["timestamp"])}
    customer = make_customer("basic")
    error = refused(lambda: record(tollway_stub, customer, **fields))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    assert meters(tollway_stub, customer) == {}


def test_who_is_asked_for(
    tollway_stub: Stub, make_customer: Callable[..., Customer], cli: Callable[..., Any]
) -> None:
    customer = make_customer("basic")
    theirs = pb.RecordUsageRequest(
        customer_id=customer.id, meter="tokens", quantity=500, idempotency_key="k1"
    )
    by_id = tollway_stub.RecordUsage(theirs, timeout=5)
    assert by_id.customer_id == customer.id and not by_id.duplicate
    nobody = pb.RecordUsageRequest(
        customer_id="cus_nobody", meter="tokens", quantity=1, idempotency_key="k"
    )
    unknown = refused(lambda: tollway_stub.RecordUsage(nobody, timeout=5))
    assert unknown.code() is grpc.StatusCode.NOT_FOUND
    stranger = Customer("cus_x", "tw_live_" + "0" * 49, "key_x")
    assert refused(lambda: record(tollway_stub, stranger)).code() is grpc.StatusCode.UNAUTHENTICATED
    cli("keys", "revoke", "--customer", customer.id, customer.key_id)
    revoked = refused(lambda: record(tollway_stub, customer))
    assert revoked.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_repeated_idempotency_key_counts_nothing(
    tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    first = record(tollway_stub, customer, quantity=5, idempotency_key="req-1")
    again = record(tollway_stub, customer, quantity=5, idempotency_key="req-1")
    assert not first.duplicate and again.duplicate
    assert again.record_id == first.record_id
    assert meters(tollway_stub, customer) == {"api_calls": (5, 0, 5)}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 50)), min_size=1, max_size=25))
def test_any_sequence_of_calls_counts_each_key_once(
    tollway_stub: Stub, make_customer: Callable[..., Customer], calls: list[tuple[str, int]]
) -> None:
    customer = make_customer("basic")
    first_quantity: dict[str, int] = {}
    for key, quantity in calls:
        answer = record(tollway_stub, customer, quantity=quantity, idempotency_key=key)
        assert answer.duplicate == (key in first_quantity)
        first_quantity.setdefault(key, quantity)
    expected = sum(first_quantity.values())
    assert meters(tollway_stub, customer)["api_calls"][0] == expected


def test_a_batch_answers_each_event(
    tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    events = [
        pb.RecordUsageRequest(
            api_key=customer.key, meter="api_calls", quantity=2, idempotency_key="a"
        ),
        pb.RecordUsageRequest(api_key=customer.key, meter="nope", quantity=2, idempotency_key="b"),
        pb.RecordUsageRequest(
            api_key=customer.key, meter="api_calls", quantity=3, idempotency_key="a"
        ),
        pb.RecordUsageRequest(
            api_key=customer.key, meter="tokens", quantity=9, idempotency_key="c"
        ),
    ]
    answer = tollway_stub.RecordUsageBatch(pb.RecordUsageBatchRequest(events=events), timeout=5)
    codes = [r.code for r in answer.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, 0]
    assert "unknown meter 'nope'" in answer.results[1].message
    assert [r.response.duplicate for r in answer.results] == [False, False, True, False]
    assert meters(tollway_stub, customer) == {"api_calls": (2, 0, 2), "tokens": (9, 0, 9)}


def authorize(stub: Stub, customer: Customer, **fields: Any) -> pb.AuthorizeResponse:
    response: pb.AuthorizeResponse = stub.Authorize(
        pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x", **fields), timeout=5
    )
    return response


def test_a_metered_plan_bills_each_allowed_request_with_no_backend_call(
    tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("metered")
    for _ in range(3):
        assert authorize(tollway_stub, customer).allowed
    assert authorize(tollway_stub, customer, cost=4).allowed
    assert meters(tollway_stub, customer) == {"api_calls": (7, 0, 7)}
    unmetered = make_customer("basic")
    authorize(tollway_stub, unmetered)
    assert meters(tollway_stub, unmetered) == {}


def quota_used(stub: Stub, customer: Customer) -> int:
    answer = stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id), timeout=5)
    return int(answer.quota.used)


@pytest.mark.parametrize(("estimate", "actual"), [(5, 8), (5, 2), (5, 5)])
def test_reserve_then_settle_leaves_quota_and_usage_at_the_real_amount(
    tollway_stub: Stub, make_customer: Callable[..., Customer], estimate: int, actual: int
) -> None:
    customer = make_customer("metered")
    reserved = authorize(tollway_stub, customer, cost=estimate, request_id="req-42")
    assert reserved.allowed and reserved.quota.used == estimate
    assert meters(tollway_stub, customer) == {}  # nothing billed until settled
    settled = record(
        tollway_stub, customer, quantity=actual, request_id="req-42", idempotency_key="settle-42"
    )
    assert not settled.duplicate
    assert quota_used(tollway_stub, customer) == actual
    assert meters(tollway_stub, customer) == {"api_calls": (actual, 0, actual)}
    # A retried settle is a duplicate and moves nothing.
    record(
        tollway_stub, customer, quantity=actual, request_id="req-42", idempotency_key="settle-42"
    )
    assert quota_used(tollway_stub, customer) == actual


def test_an_unsettled_reservation_expires_and_is_billed_at_the_estimate(
    aio: asyncio.Runner, redis_url: str, tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    from sidecar.plans import Meter, Plan, Quota, Rate

    customer = make_customer("metered")
    plan = Plan(
        name="metered",
        rate=Rate(100, 1),
        burst=100,
        quota=Quota(10, "day"),
        overage="bill",
        meter="api_calls",
    )

    async def reserve_and_expire() -> tuple[int, int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            slow = admission(
                plan,
                cost=6,
                feature_ok=True,
                key_expires_at_us=0,
                request_id="slow-1",
                reservation_ttl=1,
            )
            await store.admit(customer.id, slow)
            assert await store.due_reservations(customer.id) == []
            await asyncio.sleep(1.2)
            due = await store.due_reservations(customer.id)
            billed = [await store.expire_reservation(customer.id, r) for r in due]
            again = [await store.expire_reservation(customer.id, r) for r in due]
            return sum(billed), sum(again)
        finally:
            await store.close()

    assert Meter  # the catalog type the plan refers to by name
    assert aio.run(reserve_and_expire()) == (6, 0)
    assert meters(tollway_stub, customer) == {"api_calls": (6, 0, 6)}
    # Settling after expiry bills only what exceeds the estimate.
    record(tollway_stub, customer, quantity=9, request_id="slow-1")
    assert meters(tollway_stub, customer) == {"api_calls": (9, 0, 9)}
    assert quota_used(tollway_stub, customer) == 9
    # Once settled, the request id settles nothing more: a plain record.
    record(tollway_stub, customer, quantity=2, request_id="slow-1")
    assert meters(tollway_stub, customer)["api_calls"][0] == 9 + 2
    assert quota_used(tollway_stub, customer) == 9


def test_quota_thresholds_notify_once_per_period(
    aio: asyncio.Runner, redis_url: str, tollway_stub: Stub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("metered")  # quota 10/day, thresholds 80 and 100

    async def alerts() -> list[int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            found = await store.notifications_after("0-0", count=10_000)
            return [n["percent"] for _, n in found if n.get("customer_id") == customer.id]
        finally:
            await store.close()

    for _ in range(7):
        authorize(tollway_stub, customer)
    assert aio.run(alerts()) == []
    authorize(tollway_stub, customer)  # 8 of 10
    time.sleep(0.2)
    assert aio.run(alerts()) == [80]
    for _ in range(5):  # through 100 % and beyond (overage "bill")
        authorize(tollway_stub, customer)
    time.sleep(0.2)
    assert aio.run(alerts()) == [80, 100]


def test_with_wait_for_aof_usage_is_acknowledged_once_fsynced(
    aio: asyncio.Runner, redis_url: str, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")

    async def durable() -> tuple[bool, int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            recorded = await store.record_usage(
                customer.id,
                meter="api_calls",
                quantity=3,
                at=int(time.time()),
                idempotency="aof-1",
                dedupe_window=86400,
                wait_for_aof=True,
            )
            # The test Valkey runs with appendonly yes: the write reached the AOF.
            info = await store.redis.info("persistence")
            assert info["aof_enabled"] == 1
            return recorded.duplicate, recorded.units
        finally:
            await store.close()

    assert aio.run(durable()) == (False, 3)
