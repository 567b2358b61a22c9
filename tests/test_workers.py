"""`tollway serve --workers N`: N processes share one port; signals reach all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from tests import harness
from tests.conftest import Customer


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def two_workers(parent: int, seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while len(found := children(parent)) != 2:
        assert time.monotonic() < deadline, f"workers: {found}"
        time.sleep(0.05)
    return found


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise AssertionError("workers never listened")


def test_workers_share_the_port_and_stop_together(
    tmp_path: Path, redis_url: str, config_path: Path, make_customer: Callable[..., Customer]
) -> None:
    port = harness.free_port()
    env = {**os.environ, "TOLLWAY_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "sidecar", "serve", "--workers", "2"]
    argv += ["--config", str(config_path), "--listen", f"127.0.0.1:{port}"]
    with subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL) as parent:
        try:
            wait_for_port(port)
            workers = two_workers(parent.pid)
            customer = make_customer("pro")
            for _ in range(20):  # a fresh connection each time: the kernel picks a worker
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = tollway_pb2_grpc.TollwayStub(channel)
                    answer = stub.Authorize(pb.AuthorizeRequest(api_key=customer.key), timeout=5)
                    assert answer.allowed
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=15) == 0
            assert all(not Path(f"/proc/{w}").exists() for w in workers)
        finally:
            if parent.poll() is None:
                parent.kill()


def test_a_dead_worker_stops_the_rest_with_a_failure_status(
    redis_url: str, config_path: Path
) -> None:
    port = harness.free_port()
    env = {**os.environ, "TOLLWAY_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "sidecar", "serve", "--workers", "2"]
    argv += ["--config", str(config_path), "--listen", f"127.0.0.1:{port}"]
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) as parent:
        try:
            wait_for_port(port)
            first, second = two_workers(parent.pid)
            os.kill(first, signal.SIGKILL)
            assert parent.wait(timeout=15) == 1
            assert "a worker exited" in (parent.stderr.read() if parent.stderr else "")
            assert (
                not Path(f"/proc/{second}").exists()
                or Path(f"/proc/{second}/status").read_text().find("zombie") >= 0
            )
        finally:
            if parent.poll() is None:
                parent.kill()
