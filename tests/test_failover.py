"""Failovers, for real: a master killed with SIGKILL while clients record usage.

With `[usage] wait_for_replicas = 1` a RecordUsage is acknowledged only once a
replica holds the record, so the replica promoted in the master's place has
every acknowledged record; a record whose acknowledgement failed is retried by
its client with the same idempotency key and counts once. Redis Cluster
(3 masters, 3 replicas, cluster-node-timeout 1 s) and Sentinel (a master, a
replica, one sentinel) from the embedded Valkey binary; the sidecar is a real
`tollway serve` process. The seconds each failover took are printed (run with
-s to see them); the tests bound them, generously, rather than time them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio

from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.settings import settings_from_document
from sidecar.store import Store, connect
from tests import harness
from tests.clusters import (
    SentinelGroup,
    authorize,
    customer_on,
    new_account,
    start_sentinel_group,
)

pytestmark = pytest.mark.servers  # starts its own servers

PLANS = {"plans": [{"name": "free", "rate": "1/s"}]}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- the setting --------------------------------------------------------------------


def test_wait_for_replicas_is_off_unless_set() -> None:
    assert settings_from_document(PLANS, {}).usage.wait_for_replicas == 0
    doc = {**PLANS, "usage": {"wait_for_replicas": 2}}
    assert settings_from_document(doc, {}).usage.wait_for_replicas == 2


@pytest.mark.parametrize("value", ["1", True, -1, 65, 1.0])
def test_a_wrong_wait_for_replicas_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_document({**PLANS, "usage": {"wait_for_replicas": value}}, {})
    assert str(caught.value).startswith("[usage] wait_for_replicas: expected a number of replicas")


# -- a connection closed under a call ---------------------------------------------------


def test_a_connection_closed_under_a_call_is_unavailable_and_our_own_bugs_are_not_hidden(
    aio: asyncio.Runner, redis_url: str
) -> None:
    """redis-py's cluster client closes a failed node's idle connections while
    they stay in its free queue; a call that took one writes to a socket that
    is gone (AttributeError on None, seen in the cluster failover test below).
    That call is UNAVAILABLE, like any other failed Redis call; the same error
    raised by Tollway's own code still surfaces as the bug it is."""

    async def work() -> None:
        store = Store(connect(redis_url, timeout=1.0), timeout=1.0)
        closed = redis.asyncio.Connection()  # its writer is None, as after a close
        try:
            with pytest.raises(StoreUnavailable, match="connection closed under the call"):
                async with store._guard("usage record"):
                    await closed._send_packed_command([b"PING"])
            ours: Any = None
            with pytest.raises(AttributeError):
                async with store._guard("usage record"):
                    ours.writelines([b"PING"])
        finally:
            await store.close()

    aio.run(work())


# -- helpers ------------------------------------------------------------------------


def sidecar_config(config_path: Path, workdir: Path, *, replicas: int) -> Path:
    """The suite's plans, a Redis timeout roomy enough for a shared 2-core
    machine (1 s: a WAIT falls short after 0.5 s), and wait_for_replicas."""
    text = config_path.read_text().replace("timeout_ms = 200", "timeout_ms = 1000")
    assert "timeout_ms = 1000" in text
    config = workdir / "tollway.toml"
    config.write_text(text + f"\n[usage]\nwait_for_replicas = {replicas}\n")
    return config


@contextmanager
def sidecars(config: Path, url: str, workdir: Path, count: int = 1) -> Iterator[list[str]]:
    """`tollway serve` processes on the Redis at url; yields their addresses."""
    children: list[harness.Child] = []
    ports = [harness.free_port() for _ in range(count)]
    try:
        for n, port in enumerate(ports):
            children.append(
                harness.start_sidecar(
                    config, redis_url=url, port=port, log=workdir / f"sidecar-{n}.log"
                )
            )
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for child in children:
            child.stop()


def record(stub: tollway_pb2_grpc.TollwayStub, customer: str, key: str, quantity: int) -> Any:
    request = pb.RecordUsageRequest(
        customer_id=customer, meter="tokens", quantity=quantity, idempotency_key=key
    )
    return stub.RecordUsage(request, timeout=10)


def used(stub: tollway_pb2_grpc.TollwayStub, customer: str) -> int:
    usage = stub.GetUsage(pb.GetUsageRequest(customer_id=customer), timeout=10)
    return sum(m.used for m in usage.meters if m.meter == "tokens")


# -- one master and a replica: what an acknowledgement means ---------------------------


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master, one replica, one sentinel declaring the master down after 1 s."""
    group = start_sentinel_group(tmp_path / "redis", replicas=1, down_after_ms=1000)
    try:
        yield group
    finally:
        group.stop()


def test_usage_is_acknowledged_only_once_a_replica_has_it_even_when_retried_elsewhere(
    aio: asyncio.Runner, sentinel_group: SentinelGroup, config_path: Path, tmp_path: Path
) -> None:
    """A stalled replica: the record reaches the master but no replica, so it is
    not acknowledged, through this sidecar or through another one the client
    retries on (where the record is a duplicate and writes nothing itself).
    Once the replica catches up the retry is acknowledged, and it counts once."""
    customer = "cus_" + uuid.uuid4().hex[:14]

    async def setup() -> None:
        store = Store(connect(sentinel_group.url, timeout=2.0), timeout=2.0)
        try:
            await store.create_account(customer, "basic")
        finally:
            await store.close()

    aio.run(setup())
    config = sidecar_config(config_path, tmp_path, replicas=1)
    replica = sentinel_group.children[1].process.pid
    with (
        sidecars(config, sentinel_group.url, tmp_path, count=2) as (first, second),
        grpc.insecure_channel(first) as a,
        grpc.insecure_channel(second) as b,
    ):
        stub_a = tollway_pb2_grpc.TollwayStub(a)  # type: ignore[no-untyped-call]
        stub_b = tollway_pb2_grpc.TollwayStub(b)  # type: ignore[no-untyped-call]
        assert not record(stub_a, customer, "job-1", 5).duplicate
        os.kill(replica, signal.SIGSTOP)
        try:
            for stub in (stub_a, stub_b, stub_a):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    record(stub, customer, "job-2", 7)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "replicas" in str(refused.value.details())
                assert time.monotonic() - started < 3.0  # the Redis deadline, 2 s
        finally:
            os.kill(replica, signal.SIGCONT)
        resumed = time.monotonic()
        while True:  # the client's retry, as before
            try:
                record(stub_b, customer, "job-2", 7)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() - resumed < 10, "the replica never caught up"
        retried = time.monotonic() - resumed
        again = record(stub_a, customer, "job-2", 7)
        assert again.duplicate  # the first attempt's record, acknowledged now
        assert used(stub_b, customer) == 12
    print(f"\nFAILOVER replica caught up: retry acknowledged {retried:.2f} s after SIGCONT")


def test_after_a_sentinel_failover_the_sidecar_decides_again_and_keeps_acknowledged_usage(
    aio: asyncio.Runner, sentinel_group: SentinelGroup, config_path: Path, tmp_path: Path
) -> None:
    customer = "cus_" + uuid.uuid4().hex[:14]

    async def setup() -> str:
        store = Store(connect(sentinel_group.url, timeout=2.0), timeout=2.0)
        try:
            return await new_account(store, customer, "pro")
        finally:
            await store.close()

    key = aio.run(setup())
    config = sidecar_config(config_path, tmp_path, replicas=1)
    with (
        sidecars(config, sentinel_group.url, tmp_path) as (address,),
        grpc.insecure_channel(address) as channel,
    ):
        stub = tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
        for n in range(1, 21):
            assert not record(stub, customer, f"before-{n}", n).duplicate
        assert authorize(stub, key).allowed
        old_master = sentinel_group.ports[0]
        killed = time.monotonic()
        os.kill(sentinel_group.children[0].process.pid, signal.SIGKILL)
        promoted = back = 0.0
        while not (promoted and back):
            assert time.monotonic() - killed < 30, "no failover within 30 s"
            if not promoted and sentinel_group.master_port() != old_master:
                promoted = time.monotonic() - killed
            if not back:
                try:
                    back = (time.monotonic() - killed) if authorize(stub, key).allowed else 0
                except grpc.RpcError as exc:
                    assert exc.code() in RETRYABLE, exc
            time.sleep(0.05)
        assert sentinel_group.master_port() == sentinel_group.ports[1]
        # Every acknowledged record is on the promoted replica.
        assert used(stub, customer) == sum(range(1, 21))
    print(
        f"\nFAILOVER sentinel: replica promoted {promoted:.2f} s after SIGKILL; "
        f"Authorize allowed again {back:.2f} s after SIGKILL"
    )


# -- Redis Cluster: a master killed under load ----------------------------------------


@dataclass
class Ledger:
    """What the clients were told: each acknowledged record, once."""

    acked: dict[str, dict[str, int]] = field(default_factory=dict)  # customer -> key -> units
    acked_at: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, customer)
    failed: dict[str, int] = field(default_factory=dict)  # customer -> attempts retried
    errors: dict[str, int] = field(default_factory=dict)  # what the failed attempts said
    duplicates: int = 0  # acknowledged as a duplicate: an earlier failed attempt had landed

    def acked_since(self, customers: set[str], since: float) -> int:
        return sum(1 for at, customer in self.acked_at if at >= since and customer in customers)


async def record_until_acknowledged(
    stub: tollway_pb2_grpc.TollwayStub,
    customer: str,
    key: str,
    quantity: int,
    ledger: Ledger,
    give_up: float,
) -> None:
    """What a careful client does: the same idempotency key until it is acknowledged."""
    request = pb.RecordUsageRequest(
        customer_id=customer, meter="tokens", quantity=quantity, idempotency_key=key
    )
    while True:
        try:
            answer = await stub.RecordUsage(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in RETRYABLE, exc
            ledger.failed[customer] = ledger.failed.get(customer, 0) + 1
            said = str(exc.details())[:80]
            ledger.errors[said] = ledger.errors.get(said, 0) + 1
            assert time.monotonic() < give_up, f"{key} was never acknowledged"
            await asyncio.sleep(0.05)
            continue
        assert key not in ledger.acked.setdefault(customer, {})
        ledger.acked[customer][key] = quantity
        ledger.acked_at.append((time.monotonic(), customer))
        ledger.duplicates += answer.duplicate
        return


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[harness.ValkeyCluster]:
    """3 masters, a replica each; a master unreachable for 1 s is failed over."""
    cluster = harness.start_valkey_cluster(
        tmp_path / "cluster",
        masters=3,
        replicas=1,
        node_timeout_ms=1000,
        appendfsync=None,
        # The other masters keep serving while one is down (the default, yes, would
        # answer CLUSTERDOWN for every slot until the replica is promoted).
        options=["--cluster-require-full-coverage", "no"],
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_master_killed_under_load_loses_no_acknowledged_usage_and_counts_none_twice(
    aio: asyncio.Runner,
    replicated_cluster: harness.ValkeyCluster,
    config_path: Path,
    tmp_path: Path,
) -> None:
    """Clients record usage for accounts on every master; one master is killed.
    Its replica takes over, the sidecar finds it, the old master comes back as
    its replica (as an orchestrator would restart it), and every customer's
    total is exactly what the clients were told was recorded. Accounts on the
    other masters never notice."""
    cluster = replicated_cluster
    victim, promoted_node = 0, cluster.replica_of(0)
    customers = [customer_on(cluster, shard) for shard in (0, 0, 1, 1, 2, 2)]
    on_victim = {c for c in customers if cluster.master_of(c) == victim}

    async def setup() -> dict[str, str]:
        store = Store(connect(cluster.url, timeout=2.0), timeout=2.0)
        try:
            return {c: await new_account(store, c, "pro") for c in customers}
        finally:
            await store.close()

    api_keys = aio.run(setup())
    config = sidecar_config(config_path, tmp_path, replicas=1)
    ledger = Ledger()
    seconds: dict[str, float] = {}

    async def load(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
            stop = asyncio.Event()
            give_up = time.monotonic() + 60

            async def client(n: int, customer: str) -> None:
                sent = 0
                while not stop.is_set():
                    sent += 1
                    quantity = 1 + (n * 7 + sent) % 9
                    await record_until_acknowledged(
                        stub, customer, f"c{n}-r{sent}", quantity, ledger, give_up
                    )

            async def allowed(key: str) -> bool:
                request = pb.AuthorizeRequest(api_key=key, method="GET", path="/v1/search")
                try:
                    return bool((await stub.Authorize(request, timeout=5)).allowed)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in RETRYABLE, exc
                    return False

            async def until(check: Any, what: str, bound: float) -> float:
                while not await check():
                    assert time.monotonic() - killed < bound, f"{what}: not within {bound} s"
                    await asyncio.sleep(0.05)
                return time.monotonic() - killed

            clients = [
                asyncio.create_task(client(n, customers[n % len(customers)])) for n in range(12)
            ]
            await asyncio.sleep(2.0)  # steady load first
            assert ledger.acked_since(on_victim, 0) > 0
            killed = time.monotonic()
            await asyncio.to_thread(cluster.kill, victim)

            async def replica_is_master() -> bool:
                def role() -> str:
                    with cluster.node(promoted_node) as node:
                        return str(node.info("replication")["role"])

                return await asyncio.to_thread(role) == "master"

            victim_key = api_keys[sorted(on_victim)[0]]
            seconds["promoted"] = await until(replica_is_master, "promotion", 20)
            seconds["authorize"] = await until(lambda: allowed(victim_key), "Authorize", 25)
            # wait_for_replicas = 1 and the promoted master has no replica: its records
            # wait, as they should, until the old master comes back (as its replica).
            await asyncio.to_thread(cluster.restart, victim)
            seconds["rejoined"] = time.monotonic() - killed
            rejoined = time.monotonic()

            async def recording_again() -> bool:
                return ledger.acked_since(on_victim, rejoined) > 0

            seconds["recording"] = await until(recording_again, "RecordUsage", 30)
            await asyncio.sleep(1.0)  # some load on the healed cluster
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*clients)
            # Each customer's total is exactly its acknowledged records, none lost, none twice.
            for customer in customers:
                usage = await stub.GetUsage(pb.GetUsageRequest(customer_id=customer), timeout=10)
                total = sum(m.used for m in usage.meters if m.meter == "tokens")
                assert total == sum(ledger.acked[customer].values()), customer

    with sidecars(config, cluster.url, tmp_path) as (address,):
        aio.run(load(address))
    records = sum(len(keys) for keys in ledger.acked.values())
    failed_victim = sum(n for c, n in ledger.failed.items() if c in on_victim)
    failed_others = sum(n for c, n in ledger.failed.items() if c not in on_victim)
    assert failed_victim > 0, "the failover went unnoticed: did the kill happen?"
    # With cluster-require-full-coverage no, only the dead master's accounts wait;
    # on a starved machine a healthy replica may miss a WAIT's bound now and then
    # (retried like any UNAVAILABLE, so nothing is lost: asserted above).
    assert failed_others <= max(3, records // 100), ledger.errors
    print(
        f"\nFAILOVER cluster: {records} records acknowledged ({ledger.duplicates} as duplicates "
        f"of attempts that failed); attempts failed and retried: {failed_victim} on the "
        f"failed master's accounts, {failed_others} on the others'; after "
        f"SIGKILL: replica promoted {seconds['promoted']:.2f} s, Authorize allowed again "
        f"{seconds['authorize']:.2f} s (bound 25 s), old master restarted "
        f"{seconds['rejoined']:.2f} s, RecordUsage acknowledged again {seconds['recording']:.2f} s"
        f"\n  failed attempts said: {ledger.errors}"
    )
