"""Helpers shared by the tests that run Tollway on a real Redis Cluster or
Sentinel (tests/test_cluster.py, tests/test_failover.py). The clusters
themselves are started by tests.harness.start_valkey_cluster, which the
scaling bench uses too."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import KeyRecord, Store
from tests import harness

SLOTS = 16384
MASTERS = 3
STARTUP_DEADLINE = 20.0  # seconds for a cluster (or a sentinel) to be ready


def wait_for(check: Any, what: str, deadline: float) -> float:
    """Polls check() until it is truthy; fails the test at the deadline.
    Returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() - started > deadline:
            raise AssertionError(f"{what} not ready within {deadline:.0f}s")
        time.sleep(0.05)


def customer_on(cluster: harness.ValkeyCluster, master: int) -> str:
    """A new customer id whose hash tag lands on the given shard."""
    while True:
        customer = "cus_" + uuid.uuid4().hex[:14]
        if cluster.master_of(customer) == master:
            return customer


async def new_account(store: Store, customer: str, plan: str, *, avoid: int = -1) -> str:
    """Creates the account and one key (whose record is not on shard avoid of
    a three-master cluster)."""
    await store.create_account(customer, plan)
    key = keys.generate("test")
    while key_slot(keys.key_hash(key).encode()) * MASTERS // SLOTS == avoid:
        key = keys.generate("test")
    hashed = keys.key_hash(key)
    await store.add_key(
        hashed, KeyRecord(key_id=keys.key_id(hashed), customer_id=customer, state="active")
    )
    return key


def authorize(stub: tollway_pb2_grpc.TollwayStub, key: str) -> pb.AuthorizeResponse:
    request = pb.AuthorizeRequest(api_key=key, method="GET", path="/v1/search")
    response: pb.AuthorizeResponse = stub.Authorize(request, timeout=5)
    return response


class SentinelGroup:
    """A master, its replicas and one sentinel watching them as "tollway"
    (see start_sentinel_group). Node 0 is the first master, then the replicas."""

    def __init__(self, workdir: Path, ports: list[int], sentinel_port: int) -> None:
        self.workdir = workdir
        self.ports = ports
        self.sentinel_port = sentinel_port
        self.children: list[harness.Child] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/tollway/0"

    def node(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.ports[index], socket_timeout=5)

    def master_port(self) -> int:
        """The master's port, as the sentinel answers clients now."""
        with redis.Redis(port=self.sentinel_port, socket_timeout=5) as sentinel:
            host_port: Any = sentinel.sentinel_get_master_addr_by_name("tollway")
        return int(host_port[1])

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def start_sentinel_group(
    workdir: Path, *, replicas: int = 0, down_after_ms: int = 30000
) -> SentinelGroup:
    """One master, `replicas` replicas of it in sync, and one sentinel (quorum 1)
    that considers the master down after down_after_ms without an answer."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [harness.free_port() for _ in range(1 + replicas)]
    group = SentinelGroup(workdir, ports, harness.free_port())
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {group.sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor tollway 127.0.0.1 {ports[0]} 1\n"
        f"sentinel down-after-milliseconds tollway {down_after_ms}\n"
        "sentinel failover-timeout tollway 5000\n"
    )
    try:
        for index, port in enumerate(ports):
            data = workdir / str(port)
            data.mkdir()
            argv = [harness.valkey_binary(), "--port", str(port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(data)]
            argv += ["--repl-diskless-sync-delay", "0"]
            if index:
                argv += ["--replicaof", "127.0.0.1", str(ports[0])]
            group.children.append(
                harness.Child(f"valkey-{port}", argv, workdir / f"{port}.log", os.environ)
            )
        for index in range(1, len(ports)):
            with group.node(index) as replica:
                wait_for(
                    lambda replica=replica: (
                        replica.info("replication")["master_link_status"] == "up"
                    ),
                    "replica",
                    STARTUP_DEADLINE,
                )
        if replicas:
            # A replica is "up" a moment before it acknowledges writes (see
            # harness.start_valkey_cluster): ready once a write is on them all.
            with group.node(0) as master:
                wait_for(
                    lambda: (
                        master.set("tollway:ready", 1, px=1000)
                        and int(master.execute_command("WAIT", replicas, 100)) >= replicas
                    ),
                    "replicas acknowledging",
                    STARTUP_DEADLINE,
                )
        # The sentinel last: started before the master answers, it would call it
        # down at once, fail to fail it over, and wait 2 x failover-timeout to retry.
        group.children.append(
            harness.Child(
                "valkey-sentinel",
                [harness.valkey_binary(), str(conf), "--sentinel"],
                workdir / "sentinel.log",
                os.environ,
            )
        )
        with redis.Redis(port=group.sentinel_port, socket_timeout=5) as sentinel:

            def ready() -> bool:
                # What a client asks: the master's address; and that it knows the replicas.
                master: Any = sentinel.sentinel_masters()["tollway"]
                return bool(
                    master["port"] == ports[0]
                    and master["num-slaves"] == replicas
                    and master["flags"] == "master"
                )

            wait_for(ready, "sentinel", STARTUP_DEADLINE)
    except BaseException:
        group.stop()
        raise
    return group
