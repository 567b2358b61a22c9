"""Settlement through Envoy's gRPC access log (`[envoy] settlement = "access_log"`),
through a real Envoy, sidecar and Valkey, asking each way a shipped config asks:
deploy/envoy.yaml (the default, HTTP ext_authz) and deploy/envoy-accesslog.yaml
(gRPC Check). Real costs, 5xx refunds, leases released within the flush
interval, replayed entries, the cost header kept from the client, Redis down
while settling; and what happens when tollway.toml and the Envoy config disagree."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2 as accesslog
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from google.protobuf.struct_pb2 import Struct

from sidecar.accesslog import COST_KEY, COST_NAMESPACE, entry_parts
from sidecar.envoy import METADATA_NAMESPACE
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from sidecar.store.names import leases_key
from tests import harness
from tests.conftest import TEST_CONFIG, Customer
from tests.conftest import eventually as settled_within
from tests.tcpproxy import TcpProxy

MakeCustomer = Callable[..., Customer]
# The configs that settle through the access log: the default (HTTP ext_authz)
# and the gRPC Check one. tests/test_deploy.py holds their loggers to one another.
TEMPLATES = {
    "envoy.yaml": harness.ENVOY_TEMPLATE,
    "envoy-accesslog.yaml": harness.REPO_ROOT / "deploy" / "envoy-accesslog.yaml",
}


def _flush_interval() -> float:
    doc = yaml.safe_load(harness.ENVOY_TEMPLATE.read_text())
    [listener] = doc["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    [logger] = manager["typed_config"]["access_log"]
    return float(logger["typed_config"]["common_config"]["buffer_flush_interval"].rstrip("s"))


FLUSH = _flush_interval()  # 0.2 s in deploy/envoy.yaml (and deploy/envoy-accesslog.yaml)
# The release bound: the flush interval, plus the entry's trip to the sidecar and
# one Redis script. Measured here (2 cores): 0.08-0.22 s after the client had
# its response, so the margin is headroom for a loaded CI machine.
RELEASE_WITHIN = FLUSH + 0.25
SETTLED_WITHIN = 2.0  # s: how long a test waits for a settlement it expects


def _config(settlement: str, *, metrics: str) -> str:
    text = TEST_CONFIG.replace(
        "[envoy]\next_proc = true\n", f'[envoy]\nsettlement = "{settlement}"\n'
    )
    assert text != TEST_CONFIG, "TEST_CONFIG no longer sets [envoy] ext_proc = true"
    # reservation_ttl 1s: a reservation nobody settles can be billed within the test.
    return text + f'\n[sidecar]\nmetrics_listen = "{metrics}"\n\n[usage]\nreservation_ttl = "1s"\n'


@dataclass
class Stack:
    """A sidecar (its Redis through a proxy) and an Envoy in front of the echo upstream."""

    url: str  # Envoy's listener
    sidecar: str  # host:port of the sidecar's gRPC (the access log's, and the API's)
    metrics: str
    log: Path
    channel: grpc.Channel

    @property
    def stub(self) -> tollway_pb2_grpc.TollwayStub:
        return tollway_pb2_grpc.TollwayStub(self.channel)  # type: ignore[no-untyped-call]

    def settlements(self, result: str, via: str = "access_log") -> float:
        text = httpx.get(self.metrics, timeout=5).text
        for labels, value in re.findall(r"^tollway_settlements_total\{(.*)\} (\S+)$", text, re.M):
            if set(labels.split(",")) == {f'via="{via}"', f'result="{result}"'}:
                return float(value)
        return 0.0

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if needle in line]


def _stack(
    workdir: Path, *, redis_url: str, settlement: str, template: str, upstream: int
) -> Iterator[Stack]:
    metrics = f"127.0.0.1:{harness.free_port()}"
    config = workdir / "tollway.toml"
    config.write_text(_config(settlement, metrics=metrics))
    port, listen, admin = harness.free_port(), harness.free_port(), harness.free_port()
    # A config whose ext_authz asks over HTTP (deploy/envoy.yaml) gets the sidecar's HTTP port.
    http = {"http": harness.free_port()} if "http_service:" in template else {}
    log = workdir / "sidecar.log"
    children: list[harness.Child] = []
    with harness.stopping(children):
        children.append(
            harness.start_sidecar(
                config, redis_url=redis_url, port=port, log=log, http_port=http.get("http")
            )
        )
        envoy_config = workdir / "envoy.yaml"
        envoy_config.write_text(
            harness.render_envoy_config(
                template, listen=listen, admin=admin, sidecar=port, upstream=upstream, **http
            )
        )
        children.append(harness.run_envoy(envoy_config, admin=admin, log=workdir / "envoy.log"))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Stack(
                f"http://127.0.0.1:{listen}",
                f"127.0.0.1:{port}",
                f"http://{metrics}/metrics",
                log,
                channel,
            )


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with harness.EchoUpstream() as echo:
        yield echo.port


@pytest.fixture(scope="module")
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    parts = urllib.parse.urlsplit(redis_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as running:
        yield running


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def logged(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    proxy: TcpProxy,
    upstream: int,
) -> Iterator[Stack]:
    """settlement = "access_log", Envoy running deploy/envoy.yaml (HTTP ext_authz)
    or deploy/envoy-accesslog.yaml (gRPC Check)."""
    parts = urllib.parse.urlsplit(redis_url)
    proxied = urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
    yield from _stack(
        tmp_path_factory.mktemp("accesslog"),
        redis_url=proxied,
        settlement="access_log",
        template=TEMPLATES[request.param].read_text(),
        upstream=upstream,
    )


@pytest.fixture(scope="module")
def mismatched(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, upstream: int
) -> Iterator[Stack]:
    """settlement = "none" in tollway.toml, while Envoy runs deploy/envoy-grpc.yaml
    (ext_proc)."""
    yield from _stack(
        tmp_path_factory.mktemp("mismatch"),
        redis_url=redis_url,
        settlement="none",
        template=harness.ENVOY_GRPC_TEMPLATE.read_text(),
        upstream=upstream,
    )


def usage(stack: Stack, customer: Customer) -> tuple[int, int]:
    """(quota used, api_calls metered) as GetUsage reports them."""
    answer = stack.stub.GetUsage(pb.GetUsageRequest(customer_id=customer.id), timeout=5)
    return int(answer.quota.used), {m.meter: m.used for m in answer.meters}.get("api_calls", 0)


def eventually(check: Callable[[], object], within: float = SETTLED_WITHIN) -> float:
    # Polled finely: the lease release bound is measured with it.
    return settled_within(check, within=within, every=0.005)


@pytest.fixture(scope="module")
def valkey(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis itself (not through the proxy), to look at leases."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


def leases_held(valkey: redis.Redis, customer: Customer) -> int:
    return int(valkey.zcard(leases_key(customer.id)))


# -- through Envoy ------------------------------------------------------------------------


def test_the_upstreams_cost_is_settled_and_the_cost_header_never_reaches_the_client(
    logged: Stack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")
    response = httpx.get(
        f"{logged.url}/v1/generate?cost=7", headers={"x-api-key": customer.key}, timeout=10
    )
    assert response.status_code == 200
    assert "x-tollway-cost" not in response.headers  # header_to_metadata removed it
    assert "x-tollway-charged" not in response.headers  # settled after the response
    eventually(lambda: usage(logged, customer) == (7, 7))  # not the estimate of 1


def test_a_5xx_is_refunded_with_bill_only_success(
    logged: Stack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")  # bill_only_success = true
    headers = {"x-api-key": customer.key}
    failed = httpx.get(f"{logged.url}/v1/x?status=503&cost=4", headers=headers, timeout=10)
    assert failed.status_code == 503
    assert usage(logged, customer) == (1, 0)  # the reservation, until the entry arrives
    eventually(lambda: usage(logged, customer) == (0, 0))
    assert httpx.get(f"{logged.url}/v1/x", headers=headers, timeout=10).status_code == 200
    eventually(lambda: usage(logged, customer) == (1, 1))


def test_a_lease_is_released_within_the_flush_interval(
    logged: Stack, valkey: redis.Redis, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")  # concurrency 2, lease_ttl 2s
    headers = {"x-api-key": customer.key}
    delays = []
    with httpx.Client(base_url=logged.url, headers=headers, timeout=10) as client:
        for _ in range(8):
            assert client.get("/v1/x").status_code == 200
            delays.append(eventually(lambda: leases_held(valkey, customer) == 0, 2.0))
        # What a client sees: two requests hold both leases; once they are answered,
        # a third is admitted within the bound, long before lease_ttl.
        with ThreadPoolExecutor(2) as pool:
            slow = [
                pool.submit(httpx.get, f"{logged.url}/v1/slow?sleep=0.5", headers=headers)
                for _ in range(2)
            ]
            eventually(lambda: leases_held(valkey, customer) == 2)
            assert client.get("/v1/x").status_code == 429
            assert [f.result().status_code for f in slow] == [200, 200]
        answered = time.monotonic()
        while (status := client.get("/v1/x").status_code) == 429:
            time.sleep(0.01)
        admitted = time.monotonic() - answered
    assert status == 200
    print(
        f"lease released {min(delays):.3f}-{max(delays):.3f} s after the response; "
        f"a third request admitted {admitted:.3f} s after two finished"
    )
    assert max(delays) < RELEASE_WITHIN, delays
    assert admitted < RELEASE_WITHIN


def test_redis_down_while_settling_loses_no_usage(
    logged: Stack, proxy: TcpProxy, redis_url: str, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")  # estimate 1, reservation_ttl 1s
    headers = {"x-api-key": customer.key}
    unavailable = logged.settlements("unavailable")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            httpx.get, f"{logged.url}/v1/slow?sleep=0.5&cost=5", headers=headers, timeout=10
        )
        time.sleep(0.25)  # admitted and reserved; the upstream is still answering
        proxy.refuse = True
        proxy.drop()
        try:
            assert slow.result().status_code == 200
            eventually(lambda: logged.settlements("unavailable") > unavailable)
        finally:
            proxy.refuse = False
    assert logged.log_lines("not settled (it bills at its estimate")

    # The stream goes on: the next request settles (once the sidecar has reconnected).
    def admitted() -> bool:
        return httpx.get(f"{logged.url}/v1/x?cost=2", headers=headers, timeout=10).is_success

    eventually(admitted, 5.0)
    eventually(lambda: usage(logged, customer) == (3, 2))  # 1 still reserved, 2 settled
    time.sleep(1.0)  # past reservation_ttl

    async def expire_as_the_reporter_does() -> None:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            for request in await store.due_reservations(customer.id):
                await store.expire_reservation(customer.id, request)
        finally:
            await store.close()

    asyncio.run(expire_as_the_reporter_does())
    assert usage(logged, customer) == (3, 3)  # the lost settlement billed at its estimate


# -- entries sent over a raw stream ---------------------------------------------------


def check(channel: grpc.Channel, customer: Customer, request_id: str) -> ext_authz.CheckResponse:
    http = attrs.AttributeContext.HttpRequest(
        method="GET", path="/v1/x", headers={"x-api-key": customer.key, "x-request-id": request_id}
    )
    request = ext_authz.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )
    answer: ext_authz.CheckResponse = ext_authz_grpc.AuthorizationStub(channel).Check(
        request, timeout=5
    )
    assert answer.status.code == 0, answer
    return answer


def entry(
    metadata: Struct | None,
    *,
    status: int = 200,
    cost: str | None = None,
    kind: int = accesslog.DownstreamEnd,
) -> accesslog.HTTPAccessLogEntry:
    made = accesslog.HTTPAccessLogEntry()
    made.common_properties.access_log_type = kind
    if metadata is not None:
        made.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(metadata)
    if cost is not None:
        made.common_properties.metadata.filter_metadata[COST_NAMESPACE].update({COST_KEY: cost})
    made.response.response_code.value = status
    return made


def stream(channel: grpc.Channel, *batches: list[accesslog.HTTPAccessLogEntry]) -> None:
    """One StreamAccessLogs call, a message per batch; returns once all are settled."""
    messages = [
        als_pb2.StreamAccessLogsMessage(
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=batch)
        )
        for batch in batches
    ]
    messages[0].identifier.log_name = "tollway"
    als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(iter(messages), timeout=10)


def test_a_replayed_or_duplicated_entry_changes_nothing(
    logged: Stack, valkey: redis.Redis, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")
    metadata = check(logged.channel, customer, f"replay-{customer.id}").dynamic_metadata
    assert leases_held(valkey, customer) == 1
    first = entry(metadata, cost="5")
    hostile = Struct()
    hostile.update({"customer": "a b", "request_id": "r"})
    nan = Struct()
    nan.update({**dict(metadata.items()), "cost": float("nan")})
    duplicates = logged.settlements("duplicate")
    # Bad entries first, in the same message: none of them stops the stream.
    junk = [entry(None), entry(hostile), entry(metadata, kind=accesslog.DownstreamPeriodic)]
    stream(logged.channel, [*junk, first], [first, first])
    stream(logged.channel, [entry(metadata, cost="9")])  # replayed later, another cost
    assert usage(logged, customer) == (5, 5)
    assert leases_held(valkey, customer) == 0
    assert logged.settlements("duplicate") == duplicates + 3
    stream(logged.channel, [entry(nan, cost="9")])  # a NaN estimate settles nothing new
    assert usage(logged, customer) == (5, 5)


# -- what Envoy 1.40 logs of a header removed before the client ------------------------

PIN_CONFIG = """
admin: {address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}}
static_resources:
  listeners:
    - address: {socket_address: {address: 127.0.0.1, port_value: %(listen)d}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: pin
                access_log:
                  - name: envoy.access_loggers.http_grpc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
                      common_config:
                        log_name: pin
                        transport_api_version: V3
                        grpc_service: {envoy_grpc: {cluster_name: als}}
                        buffer_flush_interval: 0.05s
                      additional_response_headers_to_log: [x-tollway-cost]
                route_config:
                  virtual_hosts:
                    - name: pin
                      domains: ["*"]
                      routes:
                        - match: {prefix: "/removed"}
                          route: {cluster: upstream}
                          response_headers_to_remove: [x-tollway-cost]
                        - match: {prefix: "/moved"}
                          route: {cluster: upstream}
                http_filters:
                  - name: envoy.filters.http.header_to_metadata
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config
                      response_rules:
                        - header: x-tollway-cost
                          on_header_present: {metadata_namespace: tollway, key: real_cost, type: STRING}
                          remove: true
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: als
      type: STATIC
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {http2_protocol_options: {}}
      load_assignment:
        cluster_name: als
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(als)d}}}}]}]
    - name: upstream
      type: STATIC
      load_assignment:
        cluster_name: upstream
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(upstream)d}}}}]}]
"""  # noqa: E501


class Collector(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.entries: list[accesslog.HTTPAccessLogEntry] = []
        self.lock = threading.Lock()

    def StreamAccessLogs(self, messages: Iterator[Any], context: Any) -> Any:
        for message in messages:
            with self.lock:
                self.entries.extend(message.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()


def test_envoy_logs_a_header_removed_by_the_route_as_missing_so_the_cost_moves_to_metadata(
    tmp_path: Path, upstream: int
) -> None:
    """Why deploy/envoy.yaml (and envoy-accesslog.yaml) uses header_to_metadata: on Envoy 1.40,
    additional_response_headers_to_log does not see a header the route's
    response_headers_to_remove took away (it logs what the client got), while
    header_to_metadata both removes the header and keeps its value for the log."""
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(4))
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(collector, server)
    als = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports = {"admin": harness.free_port(), "listen": harness.free_port()}
    config = tmp_path / "pin.yaml"
    config.write_text(PIN_CONFIG % {**ports, "als": als, "upstream": upstream})
    envoy = harness.run_envoy(config, admin=ports["admin"], log=tmp_path / "envoy.log")
    try:
        base = f"http://127.0.0.1:{ports['listen']}"
        removed = httpx.get(f"{base}/removed?cost=7", timeout=10)
        moved = httpx.get(f"{base}/moved?cost=7", timeout=10)
        eventually(lambda: len(collector.entries) >= 2)
    finally:
        envoy.stop()
        server.stop(0)
    assert "x-tollway-cost" not in removed.headers and "x-tollway-cost" not in moved.headers
    by_path = {e.request.path.split("?")[0]: e for e in collector.entries}
    for path in ("/removed", "/moved"):
        assert dict(by_path[path].response.response_headers) == {}, path  # never logged
    metadata = {p: e.common_properties.metadata.filter_metadata for p, e in by_path.items()}
    assert COST_NAMESPACE not in metadata["/removed"]  # the route took it before the filter
    assert dict(metadata["/moved"][COST_NAMESPACE].items()) == {COST_KEY: "7"}


# -- tollway.toml and the Envoy config disagree -------------------------------------------


def test_ext_proc_states_no_charge_it_did_not_apply(
    mismatched: Stack, valkey: redis.Redis, make_customer: MakeCustomer
) -> None:
    """settlement = "none", while Envoy still runs the ext_proc filter: Check reserved
    nothing (the estimate was metered on admission), so ext_proc says nothing of a
    charge; it still removes the cost header and releases the lease."""
    customer = make_customer("duo")
    headers = {"x-api-key": customer.key}
    priced = httpx.get(f"{mismatched.url}/v1/generate?cost=7", headers=headers, timeout=10)
    failed = httpx.get(f"{mismatched.url}/v1/x?status=503", headers=headers, timeout=10)
    assert (priced.status_code, failed.status_code) == (200, 503)
    for response in (priced, failed):
        assert not [h for h in response.headers if h.startswith("x-tollway-")], response.headers
    assert usage(mismatched, customer) == (2, 2)  # each billed its estimate, as stated nowhere
    assert leases_held(valkey, customer) == 0
    assert len(mismatched.log_lines("Envoy runs Tollway's ext_proc filter")) == 1
    assert mismatched.settlements("mismatch", via="ext_proc") >= 2


def test_access_log_entries_settle_nothing_while_settlement_is_not_access_log(
    mismatched: Stack, valkey: redis.Redis, make_customer: MakeCustomer
) -> None:
    customer = make_customer("duo")
    metadata = check(mismatched.channel, customer, f"stray-{customer.id}").dynamic_metadata
    stream(mismatched.channel, [entry(metadata, cost="5")])
    stream(mismatched.channel, [entry(metadata, cost="5")])
    assert leases_held(valkey, customer) == 1  # not released: the entries were ignored
    assert usage(mismatched, customer) == (1, 1)  # metered on admission, nothing more
    assert len(mismatched.log_lines("Envoy streams access-log entries")) == 1
    assert mismatched.settlements("mismatch") == 2


# -- reading an entry (no server) -------------------------------------------------------


def _metadata(**fields: Any) -> Struct:
    struct = Struct()
    struct.update(
        {
            "customer": "cus_1",
            "plan": "duo",
            "request_id": "r1",
            "lease_id": "r1",
            "cost": 1,
            "bill_only_success": True,
            **fields,
        }
    )
    return struct


def test_an_entry_gives_the_request_its_status_and_the_cost_from_metadata_first() -> None:
    made = entry(_metadata(), status=503, cost="7")
    made.response.response_headers["x-tollway-cost"] = "9"
    parts = entry_parts(made, "x-tollway-cost")
    assert parts is not None
    finished, status, cost = parts
    assert (finished.customer, finished.request_id, status, cost) == ("cus_1", "r1", 503, "7")
    headers_only = entry(_metadata())
    headers_only.response.response_headers["x-tollway-cost"] = "9"
    assert entry_parts(headers_only, "x-tollway-cost") is not None
    assert entry_parts(headers_only, "x-tollway-cost")[2] == "9"  # type: ignore[index]
    assert entry_parts(entry(_metadata()), "x-tollway-cost")[2] is None  # type: ignore[index]


def test_entries_that_do_not_settle() -> None:
    assert entry_parts(entry(None), "x-tollway-cost") is None  # denied: no decision
    assert entry_parts(entry(_metadata(customer="a b")), "x-tollway-cost") is None
    for kind in (accesslog.DownstreamStart, accesslog.DownstreamPeriodic, accesslog.UpstreamEnd):
        assert entry_parts(entry(_metadata(), kind=kind), "x-tollway-cost") is None
    unset = entry(_metadata(), kind=accesslog.NotSet)  # an Envoy that does not say
    assert entry_parts(unset, "x-tollway-cost") is not None
    no_response = accesslog.HTTPAccessLogEntry()
    no_response.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(_metadata())
    assert entry_parts(no_response, "x-tollway-cost")[1] == 0  # type: ignore[index]
