"""Secrets hygiene, end to end: after driving the whole system the way users do
(keys issued and rotated with the CLI, keys shown by Checkout, signed webhooks,
the billing portal, usage recorded and settled, decisions over gRPC and Check),
no API key plaintext, no Stripe secret key (sk_…) and no webhook signing secret
(whsec_…) is anywhere Redis keeps data: not in a key name, not in a value read
back, not in a DUMP of any key, not in the RDB file Redis saves, not in its
append-only file. Nor in the Prometheus /metrics of the companion or of a
sidecar serving [sidecar] metrics_listen.

Search terms: tests/secretscan.py's patterns, and the exact plaintexts issued
here (plus each key's 43-character secret part, in case a prefix was stripped).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from tests import harness
from tests.conftest import STRIPE_SECRET, TEST_CONFIG, WEBHOOK_SECRET, Stack, new_customer
from tests.fakestripe import FakeStripe, make_event
from tests.secretscan import secrets_in


@dataclass
class Driven:
    """What driving the system produced: the secrets to look for, and the
    traces that must be there (proof that the dumps show plain data)."""

    owners: dict[str, str] = field(default_factory=dict)  # API key -> its customer

    @property
    def keys(self) -> list[str]:
        return list(self.owners)

    @property
    def needles(self) -> list[bytes]:
        found = [STRIPE_SECRET.encode(), WEBHOOK_SECRET.encode()]
        for key in self.owners:
            found += [key.encode(), key[8:51].encode()]
        return found

    def record_name(self, key: str) -> bytes:
        """Where README.md says a key's record lives: under its SHA-256, never the key."""
        return f"tw:k:{{{hashlib.sha256(key.encode()).hexdigest()}}}".encode()


def leaks(blob: bytes, driven: Driven) -> list[str]:
    """What in blob looks like a secret: pattern hits and exact plaintexts, shortened."""
    hits = secrets_in(blob.decode("latin-1"))
    hits += [n.decode() for n in driven.needles if n in blob]
    return [hit[:12] + "…" for hit in hits]  # never echo a whole secret


# -- the system under test: a sidecar with metrics, plus the shared stack ------------


@pytest.fixture(scope="module")
def metrics_sidecar(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[str, str]]:
    """A `tollway serve` with [sidecar] metrics_listen; yields (gRPC target, metrics URL)."""
    workdir = tmp_path_factory.mktemp("metrics-sidecar")
    port, metrics_port = harness.free_port(), harness.free_port()
    config = workdir / "tollway.toml"
    config.write_text(f'[sidecar]\nmetrics_listen = "127.0.0.1:{metrics_port}"\n' + TEST_CONFIG)
    child = harness.start_sidecar(
        config, redis_url=redis_url, port=port, log=workdir / "sidecar.log"
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the sidecar's metrics port never answered"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", url
    finally:
        child.stop()


def tollway(env: dict[str, str], *args: str) -> Any:
    """`tollway ARGS… --json` as a user runs it; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check(stub: ext_authz_grpc.AuthorizationStub, key: str) -> ext_authz.CheckResponse:
    http = attrs.AttributeContext.HttpRequest(
        headers={"x-api-key": key, "x-request-id": "secrets-check"}, method="GET", path="/v1/x"
    )
    request = ext_authz.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )
    return stub.Check(request, timeout=5)


@pytest.fixture(scope="module")
def driven(
    env: dict[str, str],
    stack: Stack,
    fake_stripe: FakeStripe,
    metrics_sidecar: tuple[str, str],
) -> Driven:
    out = Driven()
    json_accept = {"accept": "application/json"}

    # The CLI: an account, a live and a test key, a rotation, a revocation.
    cli_customer = new_customer()
    tollway(env, "accounts", "create", "--customer", cli_customer, "--plan", "pro")
    live = tollway(env, "keys", "issue", "--customer", cli_customer)
    test = tollway(env, "keys", "issue", "--customer", cli_customer, "--test")
    rotated = tollway(
        env, "keys", "rotate", "--customer", cli_customer, live["key_id"], "--overlap", "1h"
    )
    tollway(env, "keys", "revoke", "--customer", cli_customer, test["key_id"])
    listed = tollway(env, "keys", "list", "--customer", cli_customer)
    assert len(listed) == 3 and "key" not in listed[0]  # listings never show a key
    for issued in (live, test, rotated):
        out.owners[issued["key"]] = cli_customer

    # Checkout: the key shown once, as JSON and as the HTML page.
    for accept, email in ((json_accept, "json@example.com"), ({}, "html@example.com")):
        started = httpx.post(
            f"{stack.companion}/checkout", json={"email": email, "plan": "basic"}, timeout=10
        )
        assert started.status_code == 200, started.text
        session = fake_stripe.complete_checkout(started.json()["id"])
        shown = httpx.get(
            f"{stack.companion}/checkout/complete",
            params={"session_id": session["id"]},
            headers=accept,
            timeout=10,
        )
        assert shown.status_code == 200, shown.text
        if accept:
            key = shown.json()["api_key"]
        else:
            found = re.search(r'<code id="api-key">(tw_test_[0-9A-Za-z]{49})</code>', shown.text)
            assert found, shown.text
            key = found.group(1)
        out.owners[key] = session["customer"]
        # The webhooks Stripe sends for it, a failed payment and its recovery.
        sub = fake_stripe.subscription(session["subscription"])
        assert stack.deliver(make_event("checkout.session.completed", session)).status_code == 200
        for status, kind in (("past_due", "invoice.payment_failed"), ("active", "invoice.paid")):
            sub = fake_stripe.update_subscription(sub["id"], status=status)
            invoice = {
                "id": "in_" + sub["id"][4:],
                "object": "invoice",
                "customer": sub["customer"],
                "parent": {"subscription_details": {"subscription": sub["id"]}},
            }
            assert stack.deliver(make_event(kind, invoice)).status_code == 200
            assert (
                stack.deliver(make_event("customer.subscription.updated", sub)).status_code == 200
            )
        # The billing portal, by header and by bearer token.
        for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
            portal = httpx.post(f"{stack.companion}/portal", headers=headers, timeout=10)
            assert portal.status_code == 200, portal.text

    # Decisions and usage, through both sidecars and every gRPC entry point.
    target, _ = metrics_sidecar
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        for name, stub in (("metrics", pb_grpc.TollwayStub(channel)), ("stack", stack.stub)):
            for key in out.keys:
                answer = stub.Authorize(
                    pb.AuthorizeRequest(api_key=key, method="GET", path="/v1/x"), timeout=5
                )
                assert answer.allowed == (key != test["key"])  # the revoked one is refused
            key = out.keys[-1]
            reserved = stub.Authorize(
                pb.AuthorizeRequest(api_key=key, request_id=f"req-{name}"), timeout=5
            )
            assert reserved.allowed
            for idempotency, request_id in (("first", ""), ("settle", f"req-{name}")):
                recorded = stub.RecordUsage(
                    pb.RecordUsageRequest(
                        api_key=key,
                        meter="api_calls",
                        quantity=3,
                        idempotency_key=f"{idempotency}-{name}",
                        request_id=request_id,
                    ),
                    timeout=5,
                )
                assert recorded.record_id
            batch = stub.RecordUsageBatch(
                pb.RecordUsageBatchRequest(
                    events=[
                        pb.RecordUsageRequest(
                            customer_id=cli_customer,
                            meter="tokens",
                            quantity=7,
                            idempotency_key=f"batch-{name}",
                        )
                    ]
                ),
                timeout=5,
            )
            assert batch.results[0].code == 0
            assert stub.GetUsage(pb.GetUsageRequest(api_key=key), timeout=5).meters
            stub.Release(pb.ReleaseRequest(api_key=key, lease_id="none"), timeout=5)
        checker = ext_authz_grpc.AuthorizationStub(channel)
        assert check(checker, out.keys[0]).status.code == 0
        assert check(checker, out.keys[1]).status.code != 0
    return out


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def plain_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test Redis with RDB compression off while the test runs, so
    DUMP payloads and the RDB file hold strings as written (LZF would hide them)."""
    client = redis.Redis.from_url(redis_url)
    before = client.config_get("rdbcompression")["rdbcompression"]
    client.config_set("rdbcompression", "no")
    try:
        yield client
    finally:
        client.config_set("rdbcompression", before)
        client.close()


def contents(client: redis.Redis, name: bytes) -> list[bytes]:
    """Everything a key holds, read back by type."""
    kind = client.type(name)
    if kind == b"string":
        return [client.get(name) or b""]
    if kind == b"hash":
        return [x for pair in client.hgetall(name).items() for x in pair]
    if kind == b"set":
        return list(client.smembers(name))
    if kind == b"zset":
        return [member for member, _ in client.zrange(name, 0, -1, withscores=True)]
    if kind == b"list":
        return list(client.lrange(name, 0, -1))
    if kind == b"stream":
        return [x for _, entry in client.xrange(name) for pair in entry.items() for x in pair]
    return []


def test_no_key_or_value_in_redis_holds_a_secret(plain_redis: redis.Redis, driven: Driven) -> None:
    found: dict[str, list[str]] = {}
    names = list(plain_redis.scan_iter(count=1000))
    pipe = plain_redis.pipeline(transaction=False)
    for name in names:
        pipe.dump(name)
    dumps = pipe.execute()
    for name, dumped in zip(names, dumps, strict=True):
        blob = b"\n".join([name, dumped or b"", *contents(plain_redis, name)])
        hits = leaks(blob, driven)
        if hits:
            found[name.decode("latin-1")] = hits
    assert not found, f"secrets stored in Redis: {found}"
    # The dumps show plain data: each key's record is there, under its SHA-256,
    # and its DUMP names the customer.
    dumped = dict(zip(names, dumps, strict=True))
    for key, customer in driven.owners.items():
        assert customer.encode() in dumped[driven.record_name(key)]
    print(
        f"{len(names)} Redis keys scanned (name, DUMP, contents) for {len(driven.owners)} "
        f"issued keys and the Stripe secrets: no secret"
    )


def saved_files(client: redis.Redis) -> list[Path]:
    """Forces an RDB save and returns it, with the append-only files beside it."""
    directory = Path(client.config_get("dir")["dir"])
    rdb = directory / client.config_get("dbfilename")["dbfilename"]
    before = client.lastsave()
    deadline = time.monotonic() + 20
    while True:
        try:
            client.save()
            break
        except redis.ResponseError as exc:  # a background save or rewrite is running
            assert time.monotonic() < deadline, f"SAVE kept failing: {exc}"
            time.sleep(0.1)
    assert client.lastsave() >= before and rdb.is_file(), f"no RDB at {rdb}"
    appenddir = client.config_get("appenddirname").get("appenddirname") or "appendonlydir"
    aof = sorted(p for p in (directory / appenddir).glob("*") if p.is_file())
    return [rdb, *aof]


def test_the_rdb_and_append_only_files_hold_no_secret(
    plain_redis: redis.Redis, driven: Driven
) -> None:
    files = saved_files(plain_redis)
    found = {str(p): hits for p in files if (hits := leaks(p.read_bytes(), driven))}
    assert not found, f"secrets on disk: {found}"
    rdb = files[0].read_bytes()
    for key, customer in driven.owners.items():  # the saved data is there, in plain form
        assert driven.record_name(key) in rdb and customer.encode() in rdb
    sizes = ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in files)
    print(f"RDB and append-only files scanned ({sizes}): no secret")


# -- metrics ------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include the given ones."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_metrics_hold_no_secret(
    stack: Stack, metrics_sidecar: tuple[str, str], driven: Driven
) -> None:
    companion = httpx.get(f"{stack.companion}/metrics", timeout=10)
    sidecar = httpx.get(metrics_sidecar[1], timeout=10)
    assert companion.status_code == 200 and sidecar.status_code == 200
    # What was driven shows up, so these are the live processes' metrics.
    assert metric(sidecar.text, "tollway_decisions_total", reason="ok") >= 6
    assert metric(sidecar.text, "tollway_decisions_total", reason="key_revoked") >= 1
    assert metric(sidecar.text, "tollway_usage_events_total", result="accepted") >= 3
    assert metric(sidecar.text, "tollway_cache_lookups_total", cache="key", result="miss") >= 1
    assert metric(sidecar.text, "tollway_cache_lookups_total", cache="key") >= 6
    assert metric(companion.text, "tollway_webhook_events_total", result="applied") >= 2
    for name, response in (("companion", companion), ("sidecar", sidecar)):
        hits = leaks(response.content, driven)
        assert not hits, f"secrets in the {name}'s /metrics: {hits}"
    print(
        f"/metrics scanned: companion {len(companion.content)} bytes, sidecar "
        f"{len(sidecar.content)} bytes: no secret"
    )
