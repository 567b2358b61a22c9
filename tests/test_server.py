"""The sidecar over gRPC: Authorize, Envoy's Check, health, reflection, reloads,
and a dead Redis answered with UNAVAILABLE, fast."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from tests import harness
from tests.conftest import TEST_CONFIG, Customer


def authorize(
    stub: tollway_pb2_grpc.TollwayStub, key: str, **fields: object
) -> pb.AuthorizeResponse:
    request = pb.AuthorizeRequest(api_key=key, method="GET", path="/v1/items", **fields)
    response: pb.AuthorizeResponse = stub.Authorize(request, timeout=5)
    return response


def test_authorize_allows_a_paying_customer_and_reports_limits(
    tollway_stub: tollway_pb2_grpc.TollwayStub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    response = authorize(tollway_stub, customer.key)
    assert response.allowed and response.reason == pb.REASON_OK
    assert response.customer_id == customer.id and response.plan == "basic"
    assert response.rate_limit.limit == 5 and response.rate_limit.remaining == 4
    assert response.rate_limit.rate_per_second == 10
    assert response.quota.limit == 1000 and response.quota.used == 1
    assert response.quota.remaining == 999 and response.quota.period_end > time.time()


def test_cost_zero_means_one_and_explicit_cost_overrides_routes(
    tollway_stub: tollway_pb2_grpc.TollwayStub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    assert authorize(tollway_stub, customer.key, cost=0).quota.used == 1
    assert authorize(tollway_stub, customer.key, cost=3).quota.used == 4
    # /v1/heavy costs 4 by route; an explicit cost of 1 overrides it.
    heavy = pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/heavy", cost=1)
    assert tollway_stub.Authorize(heavy, timeout=5).quota.used == 5


def test_route_cost_applies_when_no_cost_is_given(
    tollway_stub: tollway_pb2_grpc.TollwayStub, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    request = pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/heavy?page=2")
    assert tollway_stub.Authorize(request, timeout=5).quota.used == 4


def test_denials_carry_reason_message_and_retry_after(
    tollway_stub: tollway_pb2_grpc.TollwayStub, make_customer: Callable[..., Customer]
) -> None:
    assert authorize(tollway_stub, "").reason == pb.REASON_MISSING_KEY
    assert authorize(tollway_stub, "tw_live_nope").reason == pb.REASON_INVALID_KEY
    assert authorize(tollway_stub, keys.generate()).reason == pb.REASON_INVALID_KEY
    tight = make_customer("tight")
    assert authorize(tollway_stub, tight.key).allowed
    assert authorize(tollway_stub, tight.key).allowed
    denied = authorize(tollway_stub, tight.key)
    assert not denied.allowed and denied.reason == pb.REASON_RATE_LIMITED
    assert denied.retry_after_seconds >= 1
    assert denied.message == "Rate limit exceeded for plan tight: 1 request/min"
    basic = make_customer("basic")
    feature = authorize(tollway_stub, basic.key, feature="export")
    assert feature.reason == pb.REASON_FEATURE_NOT_IN_PLAN
    assert authorize(tollway_stub, make_customer("pro").key, feature="export").allowed


def test_inactive_subscription_is_denied_until_reactivated(
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    make_customer: Callable[..., Customer],
    cli: Callable[..., object],
) -> None:
    customer = make_customer("basic", status="canceled")
    denied = authorize(tollway_stub, customer.key)
    assert denied.reason == pb.REASON_SUBSCRIPTION_INACTIVE
    assert "canceled" in denied.message
    cli("accounts", "set-status", "--customer", customer.id, "active")
    assert authorize(tollway_stub, customer.key).allowed


def test_a_plan_change_takes_effect_on_the_next_request(
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    make_customer: Callable[..., Customer],
    cli: Callable[..., object],
) -> None:
    customer = make_customer("basic")
    assert authorize(tollway_stub, customer.key, feature="export").reason == (
        pb.REASON_FEATURE_NOT_IN_PLAN
    )
    cli("accounts", "set-plan", "--customer", customer.id, "pro")
    upgraded = authorize(tollway_stub, customer.key, feature="export")
    assert upgraded.allowed and upgraded.plan == "pro"


def check_request(headers: dict[str, str], path: str = "/v1/items") -> ext_authz.CheckRequest:
    http = attrs.AttributeContext.HttpRequest(method="GET", path=path, headers=headers)
    return ext_authz.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )


def test_check_speaks_envoy_ext_authz(
    channel: grpc.Channel, make_customer: Callable[..., Customer]
) -> None:
    stub = ext_authz_grpc.AuthorizationStub(channel)
    customer = make_customer("basic")
    allowed = stub.Check(check_request({"x-api-key": customer.key}), timeout=5)
    assert allowed.status.code == 0
    upstream = {h.header.key: h.header.value for h in allowed.ok_response.headers}
    request_id = upstream.pop("x-request-id")  # Envoy sends one; Check makes one if not
    assert len(request_id) == 32
    assert upstream == {"x-tollway-customer": customer.id, "x-tollway-plan": "basic"}
    assert list(allowed.ok_response.headers_to_remove) == ["x-api-key"]
    denied = stub.Check(check_request({}), timeout=5)
    assert denied.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert denied.denied_response.status.code == 401
    assert '"code": "missing_key"' in denied.denied_response.body


def test_health_and_reflection_are_served(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tollway.v1.Tollway", "envoy.service.auth.v3.Authorization"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"tollway.v1.Tollway", "envoy.service.auth.v3.Authorization"} <= names


@pytest.mark.servers
def test_dead_redis_is_a_fast_unavailable_never_a_decision(
    tmp_path: Path, config_path: Path
) -> None:
    dead_redis = f"redis://127.0.0.1:{harness.free_port()}/0"
    port = harness.free_port()
    child = harness.start_sidecar(
        config_path, redis_url=dead_redis, port=port, log=tmp_path / "sidecar.log"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = tollway_pb2_grpc.TollwayStub(ch)
            check = ext_authz_grpc.AuthorizationStub(ch)
            key = keys.generate()
            for call in (
                lambda: stub.Authorize(pb.AuthorizeRequest(api_key=key), timeout=5),
                lambda: check.Check(check_request({"x-api-key": key}), timeout=5),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 0.5
            usage = pb.RecordUsageRequest(
                customer_id="cus_known", meter="api_calls", quantity=1, idempotency_key="k"
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.RecordUsage(usage, timeout=5)
            # Never NOT_FOUND: a client would drop the event, and the usage is lost.
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            # A malformed key needs no Redis, so it is still refused normally.
            refused = stub.Authorize(pb.AuthorizeRequest(api_key="junk"), timeout=5)
            assert refused.reason == pb.REASON_INVALID_KEY
    finally:
        child.stop()


def test_sighup_reloads_plans_and_a_bad_file_keeps_the_old_ones(
    tmp_path: Path, redis_url: str, make_customer: Callable[..., Customer]
) -> None:
    config = tmp_path / "tollway.toml"
    config.write_text(TEST_CONFIG)
    port = harness.free_port()
    log = tmp_path / "sidecar.log"
    child = harness.start_sidecar(config, redis_url=redis_url, port=port, log=log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = tollway_pb2_grpc.TollwayStub(ch)
            customer = make_customer("basic")
            assert authorize(stub, customer.key).rate_limit.limit == 5

            config.write_text(TEST_CONFIG.replace("burst = 5", "burst = 7"))
            child.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while authorize(stub, customer.key).rate_limit.limit != 7:
                assert time.monotonic() < deadline, "reload did not take effect"
                time.sleep(0.05)

            config.write_text(TEST_CONFIG.replace('rate = "10/s"', 'rate = "ten"'))
            child.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reload failed" not in log.read_text():
                assert time.monotonic() < deadline, "bad reload was not logged"
                time.sleep(0.05)
            assert "plans[0] 'basic': rate" in log.read_text()
            still = authorize(stub, customer.key)
            assert still.allowed and still.rate_limit.limit == 7
    finally:
        child.stop()


def test_a_revoked_key_stops_within_a_second_even_when_cached(
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    make_customer: Callable[..., Customer],
    cli: Callable[..., object],
) -> None:
    customer = make_customer("pro")
    assert authorize(tollway_stub, customer.key).allowed  # now cached by the sidecar
    cli("keys", "revoke", "--customer", customer.id, customer.key_id)
    revoked_at = time.monotonic()
    while authorize(tollway_stub, customer.key).allowed:
        assert time.monotonic() - revoked_at < 1.0, "revocation took longer than a second"
        time.sleep(0.01)
    assert authorize(tollway_stub, customer.key).reason == pb.REASON_KEY_REVOKED


def test_an_upgrade_lifts_a_cached_rate_limit_at_once(
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    make_customer: Callable[..., Customer],
    cli: Callable[..., object],
) -> None:
    customer = make_customer("tight")  # 1/min, burst 2
    for _ in range(2):
        assert authorize(tollway_stub, customer.key).allowed
    assert authorize(tollway_stub, customer.key).reason == pb.REASON_RATE_LIMITED  # cached
    cli("accounts", "set-plan", "--customer", customer.id, "pro")
    upgraded_at = time.monotonic()
    while not authorize(tollway_stub, customer.key).allowed:
        assert time.monotonic() - upgraded_at < 1.0, "the upgrade took longer than a second"
        time.sleep(0.01)
