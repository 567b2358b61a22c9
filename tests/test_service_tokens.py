"""Service credentials on the gRPC API: with [sidecar] require_service_token, a
usage call that names a customer by id needs a token with the right scope
(anyone who reached the port could otherwise inflate any customer's bill or
read their usage); calls by API key, and Authorize, need none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from sidecar.admin.scopes import parse_scopes
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from tests import harness
from tests.conftest import TEST_CONFIG, Customer

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[object]:
    work = tmp_path_factory.mktemp("service-tokens")
    config = work / "tollway.toml"
    config.write_text("[sidecar]\nrequire_service_token = true\n" + TEST_CONFIG)
    port = harness.free_port()
    child = harness.start_sidecar(config, redis_url=redis_url, port=port, log=work / "sidecar.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        child.stop()


def issue(redis_url: str, *scopes: str) -> str:
    async def go() -> str:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            token, _ = await store.issue_admin_token("backend", parse_scopes(scopes))
            return token
        finally:
            await store.close()

    return asyncio.run(go())


def record(customer: Customer, key: str, **by: str) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(meter="api_calls", quantity=5, idempotency_key=key, **by)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def usage_of(stub: object, customer: Customer) -> int:
    response = stub.GetUsage(pb.GetUsageRequest(api_key=customer.key))  # type: ignore[attr-defined]
    return sum(m.used for m in response.meters)


def test_record_usage_by_customer_id_without_a_token_is_refused_and_counts_nothing(
    stub: object, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("metered")
    with pytest.raises(grpc.RpcError) as refused:
        stub.RecordUsage(record(customer, "k1", customer_id=customer.id))  # type: ignore[attr-defined]
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "token" in (refused.value.details() or "")
    assert usage_of(stub, customer) == 0


def test_a_token_without_usage_write_is_permission_denied(
    stub: object, make_customer: Callable[..., Customer], redis_url: str
) -> None:
    customer = make_customer("metered")
    reader = issue(redis_url, "usage:read")
    with pytest.raises(grpc.RpcError) as refused:
        stub.RecordUsage(  # type: ignore[attr-defined]
            record(customer, "k1", customer_id=customer.id), metadata=bearer(reader)
        )
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert usage_of(stub, customer) == 0
    # usage:read is what GetUsage by id needs
    got = stub.GetUsage(  # type: ignore[attr-defined]
        pb.GetUsageRequest(customer_id=customer.id), metadata=bearer(reader)
    )
    assert got.customer_id == customer.id


def test_a_backend_with_usage_write_records_by_customer_id(
    stub: object, make_customer: Callable[..., Customer], redis_url: str
) -> None:
    customer = make_customer("metered")
    writer = issue(redis_url, "usage:write")
    stub.RecordUsage(  # type: ignore[attr-defined]
        record(customer, "k1", customer_id=customer.id), metadata=bearer(writer)
    )
    assert usage_of(stub, customer) == 5


def test_get_usage_by_customer_id_without_a_token_is_refused(
    stub: object, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("metered")
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id))  # type: ignore[attr-defined]
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_calls_by_api_key_need_no_token(
    stub: object, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("metered")
    stub.RecordUsage(record(customer, "k1", api_key=customer.key))  # type: ignore[attr-defined]
    assert usage_of(stub, customer) == 5
    allowed = stub.Authorize(  # type: ignore[attr-defined]
        pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x")
    )
    assert allowed.allowed


def test_a_revoked_token_stops_working_within_a_second(
    stub: object, make_customer: Callable[..., Customer], redis_url: str
) -> None:
    customer = make_customer("metered")
    writer = issue(redis_url, "usage:write")
    stub.RecordUsage(  # type: ignore[attr-defined]
        record(customer, "k1", customer_id=customer.id), metadata=bearer(writer)
    )

    async def revoke() -> None:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            record_ = await store.admin_token(writer)
            assert record_ is not None
            await store.revoke_admin_token(record_.token_id)
        finally:
            await store.close()

    asyncio.run(revoke())
    time.sleep(1.1)  # the token cache's second
    with pytest.raises(grpc.RpcError) as refused:
        stub.RecordUsage(  # type: ignore[attr-defined]
            record(customer, "k2", customer_id=customer.id), metadata=bearer(writer)
        )
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert usage_of(stub, customer) == 5
