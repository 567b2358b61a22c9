"""Redis Cluster and Sentinel, for real: a local cluster of three masters and a
master watched by one sentinel, both from the embedded Valkey binary.

Through the real Store, Reporter and sidecar process: decisions, the bucket
under concurrency, usage recorded once, billing, subscription changes, the
account lock and invalidations all work when an account's keys live on any
master, and failures are StoreUnavailable, fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar import keys
from sidecar.errors import Busy, ConfigError, StoreUnavailable
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.periods import month_start
from sidecar.settings import settings_from_document
from sidecar.store import Store, connect, subscriber
from sidecar.store.admission import admission
from sidecar.store.connection import RedisTarget, parse_redis_url
from sidecar.store.names import (
    INVALIDATE_CHANNEL,
    account_key,
    alerts_key,
    bill_failed_key,
    bill_key,
    checkouts_key,
    events_key,
    idempotency_key,
    key_index_key,
    leases_key,
    legacy_quota_key,
    limits_key,
    lock_key,
    reservation_key,
    reservations_key,
    totals_key,
    usage_key,
)
from tests import harness
from tests.clusters import (
    MASTERS,
    STARTUP_DEADLINE,
    authorize,
    customer_on,
    new_account,
    start_sentinel_group,
    wait_for,
)
from tests.conftest import STRIPE_SECRET
from tests.fakestripe import FakeStripe
from webhook.config import CompanionSettings, stripe_settings
from webhook.reporter import Reporter
from webhook.sync import make_client

LUA = Path(__file__).resolve().parent.parent / "sidecar" / "store"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.ValkeyCluster]:
    """Three masters, slots split evenly; append-only files fsynced on every
    write (for wait_for_aof)."""
    started = harness.start_valkey_cluster(
        tmp_path_factory.mktemp("cluster"), masters=MASTERS, appendfsync="always"
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def cstore(aio: asyncio.Runner, cluster: harness.ValkeyCluster) -> Iterator[Store]:
    """A Store on the cluster (generous timeout: the suite may run on a busy machine)."""
    store = Store(connect(cluster.url, timeout=2.0), timeout=2.0)
    yield store
    aio.run(store.close())


# -- the URL -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisTarget("server")),
        ("unix:///run/redis.sock", RedisTarget("server")),
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,redis-3",
            RedisTarget("cluster", (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("redis-3", 6379))),
        ),
        (
            "rediss+cluster://app:s%40cret@[::1]:7000/0?ssl_cert_reqs=none",
            RedisTarget(
                "cluster",
                (("::1", 7000),),
                options={
                    "username": "app",
                    "password": "s@cret",
                    "ssl": True,
                    "ssl_cert_reqs": "none",
                },
            ),
        ),
        (
            "redis+sentinel://:pw@s1:26379,s2:26380,s3/mymaster/2",
            RedisTarget(
                "sentinel",
                (("s1", 26379), ("s2", 26380), ("s3", 26379)),
                "mymaster",
                {"password": "pw", "db": 2},
            ),
        ),
        (
            "redis+sentinel://s1/mymaster/",
            RedisTarget("sentinel", (("s1", 26379),), "mymaster", {"db": 0}),
        ),
    ],
)
def test_redis_urls_name_a_server_a_cluster_or_a_sentinel_master(
    url: str, expected: RedisTarget
) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "name the master"),
        ("redis+sentinel://s1:26379/", "name the master"),
        ("redis+cluster://h1:7000/3", "only database 0"),
        ("redis+cluster://h1:7000,/", "'' is not host:port"),
        ("redis+cluster://h1:70000", "out of range"),
        ("redis+cluster://h1:port", "is not host:port"),
        ("redis+sentinel://s1/master/zero", "database number"),
        ("redis+cluster://:hunter2@h1:7000?socket_timeout=soon", "socket_timeout"),
    ],
)
def test_a_wrong_url_says_what_is_wrong_without_repeating_a_password(
    url: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_redis_url(url)
    assert "hunter2" not in str(caught.value)


# -- one slot per account ------------------------------------------------------

_REDIS_CALL = re.compile(r"redis\.p?call\(\s*\"(\w+)\"\s*(?:,\s*([^,)]+))?")
_KEYLESS = {"TIME"}


def test_every_script_touches_only_the_keys_it_is_given() -> None:
    """Scripts never build key names: on a cluster every key they touch must be
    declared (KEYS[n]), or the script fails on some accounts and not others."""
    scripts = sorted(LUA.glob("*.lua"))
    assert len(scripts) >= 7
    for script in scripts:
        text = script.read_text()
        calls = _REDIS_CALL.findall(text)
        assert calls and len(calls) == len(re.findall(r"redis\.p?call\(", text)), script.name
        for command, first in calls:
            if command not in _KEYLESS:
                assert re.fullmatch(r"KEYS\[\d+\]", first.strip()), (script.name, command, first)
        used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", text)}
        declared = {int(n) for n in re.findall(r"^-- KEYS\[(\d+)\]", text, re.MULTILINE)}
        assert used == declared, script.name


def test_an_accounts_keys_share_one_slot_and_accounts_spread_over_the_masters(
    cluster: harness.ValkeyCluster,
) -> None:
    customers = [customer_on(cluster, master) for master in range(MASTERS)]
    node = cluster.node(0)
    try:
        for master, customer in enumerate(customers):
            names = [
                account_key(customer),
                limits_key(customer),
                legacy_quota_key(customer),
                key_index_key(customer),
                events_key(customer),
                lock_key(customer),
                lock_key(customer) + ":bill",
                checkouts_key(customer),
                usage_key(customer),
                totals_key(customer),
                idempotency_key(customer, "any key"),
                reservation_key(customer, "-"),
                reservation_key(customer, "f" * 32),
                reservations_key(customer),
                alerts_key(customer),
                leases_key(customer),
                bill_key(customer),
                bill_failed_key(customer),
            ]
            slots = {node.execute_command("CLUSTER KEYSLOT", name) for name in names}
            assert len(slots) == 1, customer
            # ...and that slot is served by the master we expect: accounts really spread.
            slot = slots.pop()
            ranges = node.execute_command("CLUSTER SLOTS")  # [[first, last, [host, port, id]]]
            owners = [int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1])]
            assert owners == [cluster.ports[master]]
    finally:
        node.close()


# -- the request path, through a real sidecar -----------------------------------


@pytest.fixture(scope="module")
def cluster_sidecar(
    tmp_path_factory: pytest.TempPathFactory, cluster: harness.ValkeyCluster, config_path: Path
) -> Iterator[tollway_pb2_grpc.TollwayStub]:
    port = harness.free_port()
    workdir = tmp_path_factory.mktemp("cluster-sidecar")
    log = workdir / "sidecar.log"
    # A roomier Redis timeout than the suite's 200 ms: 90 concurrent first calls
    # on a fresh cluster client, on a shared 2-core CI machine.
    config = workdir / "tollway.toml"
    config.write_text(config_path.read_text().replace("timeout_ms = 200", "timeout_ms = 1000"))
    assert config.read_text() != config_path.read_text()
    child = harness.start_sidecar(config, redis_url=cluster.url, port=port, log=log)
    nodes = [cluster.node(i) for i in range(MASTERS)]

    def subscribed() -> bool:
        counts = (dict(n.pubsub_numsub(INVALIDATE_CHANNEL)) for n in nodes)
        return sum(int(count[INVALIDATE_CHANNEL.encode()]) for count in counts) >= 1

    try:
        # Ready once its invalidation subscription is up, on whichever node it chose.
        wait_for(subscribed, "the sidecar's subscription", STARTUP_DEADLINE)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield tollway_pb2_grpc.TollwayStub(channel)
    finally:
        for node in nodes:
            node.close()
        child.stop()


def test_authorize_on_every_master_and_the_bucket_stays_exact_under_concurrency(
    aio: asyncio.Runner,
    cluster: harness.ValkeyCluster,
    cstore: Store,
    cluster_sidecar: tollway_pb2_grpc.TollwayStub,
) -> None:
    # "tight": burst 2, then 1 a minute. 30 concurrent calls per account.
    accounts = [customer_on(cluster, master) for master in range(MASTERS)]
    keys_ = [aio.run(new_account(cstore, customer, "tight")) for customer in accounts]
    request = pb.AuthorizeRequest(method="GET", path="/v1/search")
    calls: list[tuple[str, Future[pb.AuthorizeResponse]]] = []
    for _ in range(30):
        for customer, key in zip(accounts, keys_, strict=True):
            request.api_key = key
            calls.append((customer, cluster_sidecar.Authorize.future(request, timeout=10)))
    allowed = {customer: 0 for customer in accounts}
    for customer, call in calls:
        response = call.result()
        assert response.customer_id == customer
        if response.allowed:
            allowed[customer] += 1
        else:
            assert response.reason == pb.REASON_RATE_LIMITED
    assert allowed == {customer: 2 for customer in accounts}

    unknown = authorize(cluster_sidecar, keys.generate("test"))
    assert not unknown.allowed and unknown.reason == pb.REASON_INVALID_KEY
    suspended = customer_on(cluster, 1)
    key = aio.run(new_account(cstore, suspended, "pro"))
    aio.run(cstore.set_status(suspended, "canceled"))
    assert authorize(cluster_sidecar, key).reason == pb.REASON_SUBSCRIPTION_INACTIVE


def test_a_revocation_published_on_any_master_reaches_the_sidecar_at_once(
    aio: asyncio.Runner,
    cluster: harness.ValkeyCluster,
    cstore: Store,
    cluster_sidecar: tollway_pb2_grpc.TollwayStub,
) -> None:
    """A key record is cached for up to a second; the invalidation must beat that
    from every master (classic PUBLISH crosses the cluster bus), and through the
    Store's own revoke."""

    def revoked_within(key: str, revoke: Any) -> float:
        assert authorize(cluster_sidecar, key).allowed  # cached now
        started = time.monotonic()
        revoke()
        while authorize(cluster_sidecar, key).allowed:
            assert time.monotonic() - started < 1.0, "revocation took a second or more"
            time.sleep(0.005)
        assert authorize(cluster_sidecar, key).reason == pb.REASON_KEY_REVOKED
        return time.monotonic() - started

    for master in range(MASTERS):
        customer = customer_on(cluster, master)
        key = aio.run(new_account(cstore, customer, "pro"))
        hashed = keys.key_hash(key)

        def silently_revoke_then_publish(hashed: str = hashed, master: int = master) -> None:
            # The record is written through the cluster, the message sent from this master.
            aio.run(cstore.redis.hset(f"tw:k:{{{hashed}}}", "state", "revoked"))
            with cluster.node(master) as node:
                node.publish(INVALIDATE_CHANNEL, f"k:{hashed}")

        assert revoked_within(key, silently_revoke_then_publish) < 0.5

        customer = customer_on(cluster, master)
        key = aio.run(new_account(cstore, customer, "pro"))
        key_id = keys.key_id(keys.key_hash(key))

        def revoke(customer: str = customer, key_id: str = key_id) -> None:
            aio.run(cstore.revoke_key(customer, key_id))

        assert revoked_within(key, revoke) < 0.5


def test_record_usage_counts_once_on_every_master(
    aio: asyncio.Runner,
    cluster: harness.ValkeyCluster,
    cstore: Store,
    cluster_sidecar: tollway_pb2_grpc.TollwayStub,
) -> None:
    for master in range(MASTERS):
        customer = customer_on(cluster, master)
        aio.run(new_account(cstore, customer, "basic"))
        request = pb.RecordUsageRequest(
            customer_id=customer, meter="tokens", quantity=1500, idempotency_key=f"job-{master}"
        )
        first = cluster_sidecar.RecordUsage(request, timeout=5)
        again = cluster_sidecar.RecordUsage(request, timeout=5)
        assert not first.duplicate and again.duplicate
        assert again.record_id == first.record_id
        # wait_for_aof: acknowledged once on disk, as asked of the account's own master.
        durable = aio.run(
            cstore.record_usage(
                customer,
                meter="tokens",
                quantity=25,
                at=int(time.time()),
                idempotency=f"aof-{master}",
                dedupe_window=86400,
                wait_for_aof=True,
            )
        )
        assert not durable.duplicate and durable.units == 25
        usage = cluster_sidecar.GetUsage(pb.GetUsageRequest(customer_id=customer), timeout=5)
        assert [(m.meter, m.used) for m in usage.meters] == [("tokens", 1525)]


def test_a_stalled_master_makes_only_its_own_accounts_unavailable(
    aio: asyncio.Runner,
    cluster: harness.ValkeyCluster,
    cstore: Store,
    cluster_sidecar: tollway_pb2_grpc.TollwayStub,
) -> None:
    stalled_master = 2
    healthy = aio.run(new_account(cstore, customer_on(cluster, 0), "pro", avoid=stalled_master))
    stalled = aio.run(new_account(cstore, customer_on(cluster, stalled_master), "pro"))
    assert (
        authorize(cluster_sidecar, healthy).allowed and authorize(cluster_sidecar, stalled).allowed
    )
    os.kill(cluster.pids[stalled_master], signal.SIGSTOP)
    try:
        for _ in range(3):
            assert authorize(cluster_sidecar, healthy).allowed
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                authorize(cluster_sidecar, stalled)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            # timeout_ms 1000 here (see cluster_sidecar): the store gives up after twice that.
            assert time.monotonic() - started < 2.5
    finally:
        os.kill(cluster.pids[stalled_master], signal.SIGCONT)

    def back() -> bool:
        try:
            return authorize(cluster_sidecar, stalled).allowed
        except grpc.RpcError:
            return False

    wait_for(back, "the stalled master", 5)


# -- billing, subscriptions and the lock, through the Store -----------------------


def companion_settings(fake: FakeStripe) -> CompanionSettings:
    doc = {
        "plans": [{"name": "metered", "rate": "100/s", "burst": 100, "meter": "api_calls"}],
        "meters": [{"name": "api_calls"}, {"name": "tokens", "event_name": "llm_tokens"}],
    }
    return CompanionSettings(
        core=settings_from_document(doc, {}),
        stripe=stripe_settings(
            {"max_network_retries": 0, "timeout": "2s"},
            {"STRIPE_SECRET_KEY": STRIPE_SECRET, "STRIPE_API_BASE": fake.url},
        ),
    )


def test_the_reporter_bills_usage_on_every_master_exactly_once(
    aio: asyncio.Runner, cluster: harness.ValkeyCluster, fake_stripe: FakeStripe
) -> None:
    settings = companion_settings(fake_stripe)
    plan = settings.core.catalog.plans["metered"]
    customers = [customer_on(cluster, master) for master in range(MASTERS)]

    async def work() -> tuple[list[int], list[int], set[str]]:
        client, http = make_client(settings.stripe)
        store = Store(connect(cluster.url, timeout=2.0), timeout=2.0)
        reporter = Reporter(store, client, settings, backoff=0.01)
        try:
            now = int(time.time())
            for n, customer in enumerate(customers):
                await store.create_account(customer, "metered")
                for quantity in (5, 7):
                    await store.record_usage(
                        customer,
                        meter="tokens",
                        quantity=quantity,
                        at=now,
                        idempotency=uuid.uuid4().hex,
                        dedupe_window=86400,
                    )
                # A reservation nobody settles: billed at its estimate (expire_reservation.lua).
                outcome = await store.admit(
                    customer,
                    admission(
                        plan,
                        cost=n + 1,
                        feature_ok=True,
                        key_expires_at_us=0,
                        request_id=f"req-{n}",
                        reservation_ttl=0,
                    ),
                )
                assert outcome.code == 0
            # The reporter's safety net scans every master for usage streams.
            found = set(await store.find_usage_streams())
            await asyncio.sleep(1.1)  # the reservations fall due (whole seconds)
            first = [await reporter.bill(customer) for customer in customers]
            again = [await reporter.bill(customer) for customer in customers]
            return first, again, found
        finally:
            await http.close_async()
            await store.close()

    first, again, found = aio.run(work())
    assert set(customers) <= found
    assert first == [2] * MASTERS  # one event per meter and minute
    assert again == [0] * MASTERS
    for n, customer in enumerate(customers):
        sent = [
            e for e in fake_stripe.meter_events if e["payload"]["stripe_customer_id"] == customer
        ]
        values = sorted((e["event_name"], int(e["payload"]["value"])) for e in sent)
        assert values == [("api_calls", n + 1), ("llm_tokens", 12)]

    async def totals() -> list[dict[str, tuple[int, int]]]:
        store = Store(connect(cluster.url, timeout=2.0), timeout=2.0)
        try:
            month = month_start(int(time.time()))
            return [await store.usage_totals(customer, month) for customer in customers]
        finally:
            await store.close()

    assert aio.run(totals()) == [
        {"api_calls": (n + 1, n + 1), "tokens": (12, 12)} for n in range(MASTERS)
    ]


def test_subscription_changes_apply_once_under_the_account_lock(
    aio: asyncio.Runner, cluster: harness.ValkeyCluster, cstore: Store
) -> None:
    async def work(customer: str) -> None:
        await cstore.create_account(customer, "basic")
        async with cstore.account_lock(customer):
            with pytest.raises(Busy):
                async with cstore.account_lock(customer, wait=0.1):
                    pass
            change = await cstore.apply_subscription(
                customer,
                event_id="evt_1",
                subscription_id="sub_1",
                status="past_due",
                plan="pro",
                error="",
                period_end=0,
                grace_seconds=3600,
                trouble_since=int(time.time()),
            )
            applied = (change.result, change.new_plan, change.new_status)
            assert applied == ("applied", "pro", "past_due")
            repeat = await cstore.apply_subscription(
                customer,
                event_id="evt_1",
                subscription_id="sub_1",
                status="canceled",
                plan=None,
                error="",
                period_end=0,
                grace_seconds=3600,
                trouble_since=0,
            )
            assert repeat.result == "duplicate"
        async with cstore.account_lock(customer, wait=0.1):  # released
            pass
        account = await cstore.require_account(customer)
        final = (account.plan, account.status, account.subscription_id)
        assert final == ("pro", "past_due", "sub_1")
        assert account.grace_until > time.time()

    for master in range(MASTERS):
        aio.run(work(customer_on(cluster, master)))


# -- failures -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis+cluster", "redis+sentinel"])
def test_an_unreachable_cluster_or_sentinel_is_unavailable_at_once(
    aio: asyncio.Runner, scheme: str
) -> None:
    dead = f"127.0.0.1:{harness.free_port()},127.0.0.1:{harness.free_port()}"
    url = f"{scheme}://{dead}" + ("/mymaster" if scheme == "redis+sentinel" else "")

    async def attempt() -> float:
        store = Store(connect(url, timeout=0.05), timeout=0.05)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable):
                await store.lookup_key("0" * 64)
            with pytest.raises(StoreUnavailable):
                await store.ping()
            return time.monotonic() - started
        finally:
            await store.close()

    assert aio.run(attempt()) < 0.5


# -- Sentinel ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One master and one sentinel watching it as "tollway"."""
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel"))
    try:
        yield group.url
    finally:
        group.stop()


@pytest.mark.servers
def test_sentinel_decides_records_and_invalidates_through_the_master(
    aio: asyncio.Runner, sentinel_url: str, tmp_path: Path, config_path: Path
) -> None:
    port = harness.free_port()
    child = harness.start_sidecar(
        config_path, redis_url=sentinel_url, port=port, log=tmp_path / "sidecar.log"
    )
    try:
        customer = "cus_" + uuid.uuid4().hex[:14]

        async def setup() -> str:
            store = Store(connect(sentinel_url, timeout=2.0), timeout=2.0)
            try:
                return await new_account(store, customer, "tight")
            finally:
                await store.close()

        key = aio.run(setup())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tollway_pb2_grpc.TollwayStub(channel)
            decisions = [authorize(stub, key) for _ in range(3)]
            assert [d.allowed for d in decisions] == [True, True, False]
            request = pb.RecordUsageRequest(
                customer_id=customer, meter="tokens", quantity=9, idempotency_key="once"
            )
            assert not stub.RecordUsage(request, timeout=5).duplicate
            assert stub.RecordUsage(request, timeout=5).duplicate

        async def listen() -> str:
            # subscriber() follows Sentinel to the master, as the sidecar's does.
            client = subscriber(sentinel_url)
            store = Store(connect(sentinel_url, timeout=2.0), timeout=2.0)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(INVALIDATE_CHANNEL)
                    await store.invalidate(customer=customer)
                    async with asyncio.timeout(5):
                        async for message in pubsub.listen():
                            return str(message["data"].decode())
                raise AssertionError("no message")
            finally:
                await store.close()
                await client.aclose()

        assert aio.run(listen()) == f"c:{customer}"
    finally:
        child.stop()
