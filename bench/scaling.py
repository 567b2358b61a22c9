"""`make bench-scaling`: how Authorize throughput grows with sidecar worker
processes and with Redis Cluster masters, and what each request costs in CPU.

    python -m bench.scaling                 # full, ~2-4 minutes
    BENCH_QUICK=1 python -m bench.scaling   # smoke, ~1 minute

Five setups, each started fresh and loaded the same way: `tollway serve
--workers 1` and `--workers 2` against one Valkey, then one worker against a
Redis Cluster of 1, 2 and 3 masters (tests.harness.start_valkey_cluster). The
load is h2load at saturation straight at the sidecar's gRPC Authorize: six
h2load processes, each posting one account's request (bench/workload.py), so
that on a cluster the accounts spread evenly over the masters. Every request
takes the full allow path (plan "bench" of bench/tollway-bench.toml; the quota
counters confirm the share allowed). CPU comes from /proc for every process
(bench.run.cpu_meter): sidecar (all its worker processes) and Valkey (all
nodes) per request is what docs/scaling.md extrapolates from.

The table goes to bench/results/scaling.md and stdout; logs to
bench/results/scaling.tmp/. Everything started is stopped on exit, Ctrl-C
and SIGTERM included, and a watchdog bounds the whole run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from bench import h2load
from bench.run import (
    CONFIG,
    NOISY,
    RESULTS,
    Counters,
    CpuUse,
    check_authorize,
    cpu_meter,
    machine_facts,
    prepare,
    run_main,
    say,
)
from bench.workload import AUTHORIZE_PATH, GRPC_HEADERS, authorize_body
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.store import Store, connect
from tests import harness

WORK: Final = RESULTS / "scaling.tmp"  # gitignored (bench/results/*.tmp)
ACCOUNTS: Final = 6  # one per h2load process; 6 spreads evenly over 1, 2 or 3 masters
CONNECTIONS: Final = 2  # per h2load process: 12 in all, so 2 workers get a fair share
STREAMS: Final = 10  # per connection: 120 requests in flight


@dataclass(frozen=True)
class Mode:
    name: str
    duration: float  # seconds measured per setup
    warmup: float  # seconds of the same load before, not measured
    budget: int  # seconds after which the whole run is abandoned
    retries: int  # extra attempts at a measurement taken while the machine was busy


FULL: Final = Mode("full", 15.0, 5.0, budget=12 * 60, retries=1)
QUICK: Final = Mode("quick", 3.0, 1.0, budget=5 * 60, retries=0)
IDLE: Final = 3.0  # seconds of the processes' CPU measured with no load, before it


@dataclass(frozen=True)
class Setup:
    label: str
    workers: int
    masters: int  # 0: one plain Valkey (redis://); N: a Redis Cluster of N masters


SETUPS: Final = (
    Setup("1 worker, 1 Valkey", 1, 0),
    Setup("2 workers, 1 Valkey", 2, 0),
    Setup("1 worker, cluster of 1 master", 1, 1),
    Setup("1 worker, cluster of 2 masters", 1, 2),
    Setup("1 worker, cluster of 3 masters", 1, 3),
)


@dataclass
class Row:
    setup: Setup
    rps: float
    requests: int
    allowed: float  # share of measured requests the quota counters saw allowed
    seconds: float  # wall time of the measured load
    cpu: CpuUse
    idle: CpuUse = dataclasses.field(default_factory=CpuUse)  # the same processes, no load

    def percent(self, prefix: str, *, idle: bool = False) -> float:
        """% of one core used by the processes whose name starts with prefix."""
        use = self.idle if idle else self.cpu
        return sum(v for name, v in use.percent.items() if name.startswith(prefix))

    def micros_per_request(self, prefix: str, *, marginal: bool = False) -> float:
        """CPU µs per request of those processes: (% of a core * seconds) / requests;
        marginal: less what they use idle (timers, health checks, the cluster bus),
        which does not grow with the load."""
        percent = self.percent(prefix) - (self.percent(prefix, idle=True) if marginal else 0)
        return max(percent, 0.0) / 100 * self.seconds / max(self.requests, 1) * 1e6

    @property
    def noisy(self) -> bool:
        return self.cpu.get("other") >= NOISY


def descendants(pid: int) -> list[int]:
    """pid and every process below it (the sidecar's supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


@contextmanager
def valkey(setup: Setup, stack: ExitStack) -> Iterator[tuple[str, list[int], Any]]:
    """The Redis of one setup: (TOLLWAY_REDIS_URL, server pids, a sync client for counters)."""
    workdir = WORK / f"redis-{setup.workers}w-{setup.masters}m"  # fresh data for each setup
    if setup.masters == 0:
        server = harness.start_valkey(workdir, persist=False)
        stack.callback(server.stop)
        client: Any = redis.Redis.from_url(server.connection_url)
        stack.callback(client.close)
        pid = int(client.info("server")["process_id"])
        yield server.connection_url, [pid], client
        return
    # Persistence as start_valkey's: an append-only file, fsynced every second.
    cluster = harness.start_valkey_cluster(workdir, masters=setup.masters, appendfsync="everysec")
    stack.callback(cluster.stop)
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    stack.callback(client.close)
    yield cluster.url, cluster.pids, client


def spread_customers(masters: int) -> list[str]:
    """ACCOUNTS customer ids whose keys go to masters 0, 1, ... in turn, as a
    cluster of `masters` splits its slots evenly (any ids for 0: one server)."""
    chosen: list[str] = []
    n = 0
    while len(chosen) < ACCOUNTS:
        customer = f"cus_scale{n:05d}"
        n += 1
        if masters == 0 or key_slot(customer.encode()) * masters // 16384 == len(chosen) % masters:
            chosen.append(customer)
    return chosen


async def create_accounts(url: str, masters: int) -> list[tuple[str, str]]:
    """The spread_customers accounts on plan "bench", one key each: [(customer, API key)]."""
    store = Store(connect(url, timeout=10.0), timeout=10.0)
    try:
        accounts = []
        for customer in spread_customers(masters):
            await store.create_account(customer, "bench", "active")
            key, _ = await store.issue_key(customer, environment="test")
            accounts.append((customer, key))
        return accounts
    finally:
        await store.close()


def start_sidecar(setup: Setup, url: str, port: int) -> harness.Child:
    """`tollway serve --workers N` (bench/tollway-bench.toml) on 127.0.0.1:port."""
    return harness.start_sidecar(
        CONFIG,
        redis_url=url,
        port=port,
        log=WORK / f"sidecar-{setup.label}.log",
        args=["--workers", str(setup.workers)],
    )


def ready(port: int, api_key: str, within: float = 15.0) -> None:
    """Waits for an allow: a fresh cluster client's first calls (slot map, new
    connections) can outlast the bench config's 50 ms Redis timeout."""
    deadline = time.monotonic() + within
    while True:
        try:
            check_authorize(port, api_key, pb.REASON_OK)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(setup: Setup, mode: Mode) -> Row:
    say(f"{setup.label}: starting")
    with ExitStack() as stack, valkey(setup, stack) as (url, valkey_pids, client):
        created = asyncio.run(create_accounts(url, setup.masters))
        accounts = [customer for customer, _ in created]
        api_keys = [key for _, key in created]
        port = harness.free_port()
        sidecar = start_sidecar(setup, url, port)
        stack.callback(sidecar.stop)
        for key in api_keys:
            ready(port, key)
        loads = []
        for n, key in enumerate(api_keys):
            body = WORK / f"authorize-{n}.bin"
            body.write_bytes(authorize_body(key))
            loads.append(
                h2load.Load(
                    url=f"http://127.0.0.1:{port}{AUTHORIZE_PATH}",
                    body_file=body,
                    headers=GRPC_HEADERS,
                    clients=CONNECTIONS,
                    streams=STREAMS,
                    duration=mode.duration,
                )
            )
        warmup = [dataclasses.replace(load, duration=mode.warmup) for load in loads]
        sidecar_pids = descendants(sidecar.process.pid)
        if len(sidecar_pids) < setup.workers:
            raise RuntimeError(f"{setup.label}: {len(sidecar_pids)} sidecar processes")
        pids = {f"sidecar-{n}": pid for n, pid in enumerate(sidecar_pids)}
        pids |= {f"valkey-{n}": pid for n, pid in enumerate(valkey_pids)}
        counters = Counters(client)
        with cpu_meter(pids) as idle:
            time.sleep(IDLE)
        best: Row | None = None
        for attempt in range(1 + mode.retries):
            h2load.run(warmup, check=False)
            if sidecar.process.poll() is not None:
                raise RuntimeError(f"the sidecar exited; see {sidecar.log}")
            used_before = counters.used(accounts)
            started = time.monotonic()
            with cpu_meter(pids) as cpu:
                result = h2load.run(loads)
            seconds = time.monotonic() - started
            allowed = (counters.used(accounts) - used_before) / max(result.requests, 1)
            row = Row(setup, result.rps, result.requests, allowed, seconds, cpu, idle)
            say(
                f"{setup.label}: {row.rps:,.0f} req/s, {allowed:.1%} allowed, sidecar "
                f"{row.percent('sidecar'):.0f}% Valkey {row.percent('valkey'):.0f}% "
                f"h2load {cpu.get('h2load'):.0f}% other {cpu.get('other'):.0f}%"
            )
            if best is None or row.cpu.get("other") < best.cpu.get("other"):
                best = row
            if not best.noisy:
                break
            if attempt < mode.retries:
                say("  the machine was busy elsewhere: measuring again")
        assert best is not None
        return best


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "—"


def report(rows: list[Row], facts: dict[str, str], mode: Mode) -> str:
    base = rows[0]
    lines = [
        "# Tollway scaling benchmark",
        "",
        f"Mode **{mode.name}**: {mode.duration:g} s measured per setup after {mode.warmup:g} s "
        f"of warm-up; h2load: {ACCOUNTS} processes, {CONNECTIONS} connections each, {STREAMS} "
        f"streams each ({ACCOUNTS * CONNECTIONS * STREAMS} requests in flight), one account per "
        "process, straight at the sidecar's gRPC Authorize. Generated by `make bench-scaling` "
        "(bench/scaling.py); docs/scaling.md explains how to read and extrapolate it.",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts.items()),
        "",
        "## Throughput at saturation",
        "",
        f"Ratio: to the first row ({base.setup.label}). CPU in % of one core over the "
        "measured seconds: sidecar is all its processes, Valkey all its nodes; *other* is "
        f"the rest of the machine (†: over {NOISY:.0f} %, a noisy measurement).",
        "",
        "| setup | req/s | ratio | allowed | sidecar CPU | Valkey CPU | h2load CPU | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setup.label}{' †' if row.noisy else ''} | {row.rps:,.0f} "
            f"| {_ratio(row.rps, base.rps)} | {row.allowed:.1%} | {row.percent('sidecar'):.0f} "
            f"| {row.percent('valkey'):.0f} | {row.cpu.get('h2load'):.0f} "
            f"| {row.cpu.describe_other()} |"
        )
    lines += [
        "",
        "## CPU per request",
        "",
        "CPU seconds each part used during the measurement ÷ requests served, in µs; "
        "req/s per core = 1,000,000 ÷ that: what one fully busy core of it would serve. "
        f"*Idle*: % of a core the same processes used over {IDLE:g} s with no load; "
        "*marginal*: µs per request with that subtracted, the part that grows with load.",
        "",
        "| setup | sidecar µs/req | sidecar req/s per core | sidecar idle "
        "| Valkey µs/req | Valkey marginal µs/req | Valkey req/s per core (marginal) "
        "| Valkey idle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        side, kv = row.micros_per_request("sidecar"), row.micros_per_request("valkey")
        kv_marginal = row.micros_per_request("valkey", marginal=True)
        lines.append(
            f"| {row.setup.label} | {side:,.0f} | {1e6 / side if side else 0:,.0f} "
            f"| {row.percent('sidecar', idle=True):.1f} | {kv:,.1f} | {kv_marginal:,.1f} "
            f"| {1e6 / kv_marginal if kv_marginal else 0:,.0f} "
            f"| {row.percent('valkey', idle=True):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    mode = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    if shutil.which("h2load") is None:
        print("bench: h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    prepare(WORK, mode.budget)
    started = time.monotonic()
    say(f"mode {mode.name}; logs in {WORK.relative_to(RESULTS.parent.parent)}")
    facts = machine_facts(valkey_version())
    rows = [measure(setup, mode) for setup in SETUPS]
    text = report(rows, facts, mode)
    text += f"\nWhole run: {time.monotonic() - started:.0f} s.\n"
    (RESULTS / "scaling.md").write_text(text)
    print(text)
    return 0


def valkey_version() -> str:
    import subprocess

    done = subprocess.run(
        [harness.valkey_binary(), "--version"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return next((w.removeprefix("v=") for w in done.stdout.split() if w.startswith("v=")), "?")


if __name__ == "__main__":
    run_main(main)
