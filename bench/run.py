"""`make bench`: Tollway's cost, as ratios to floors measured in the same run.

    python -m bench.run                 # full, ~13-14 minutes
    BENCH_QUICK=1 python -m bench.run   # smoke, ~2 minutes

Everything runs on loopback: an embedded Valkey holding 10,000 issued keys (and
as many on a leased plan, with a hot one), the real sidecar (`python -m sidecar
serve`, gRPC and HTTP ext_authz ports), a no-op server with the sidecar's grpcio
and uvicorn setup (the floors, bench/noop_server.py), Envoy running each config
of bench/envoy_config.py's table (PAIRS: each behind the no-op, its floor, and
behind the sidecar) and h2load as the load generator (bench/grpc_load.py for
the one row that needs a key per request over gRPC). Every phase is bounded by
h2load's own --duration plus a hard kill; every process is stopped on exit,
Ctrl-C and SIGTERM included. The table goes to bench/results/latest.md and
stdout, opening with issue #13's targets and issue #14's (leased enforcement:
the same sidecar, asked for accounts on a leased plan; and exact mode against
the committed run's figures), met or not; logs to bench/results/work.tmp/.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, Final

import grpc
import redis

from bench import envoy_config, grpc_load, h2load
from bench.envoy_config import (
    CEILING_PAIR,
    EXT_PROC,
    FIXED_RATE,
    HEADLINE_FLOOR,
    SHIPPED,
    Planned,
    Shape,
)
from bench.noop_server import ACCESS_LOG_LINE, ALLOW_AUTHORIZE
from bench.workload import (
    AUTHORIZE_PATH,
    GRPC_HEADERS,
    ZipfSampler,
    authorize_body,
    envoy_uris,
    grpc_frame,
)
from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.settings import load_settings
from sidecar.store import KeyRecord, Store, connect
from sidecar.store.names import limits_key
from tests import harness

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
CONFIG: Final = REPO_ROOT / "bench" / "tollway-bench.toml"
RESULTS: Final = REPO_ROOT / "bench" / "results"
WORK: Final = RESULTS / "work.tmp"  # gitignored (bench/results/*.tmp)

SHARES: Final = (0.25, 0.50, 0.90)  # fixed offered loads, as shares of the floor's peak
ZIPF_S: Final = 1.1
GRPC_PROCESSES: Final = 4  # h2load processes (one connection, one key each) for gRPC
ENVOY_CLIENTS: Final = 4  # HTTP/2 connections of the one h2load process for Envoy
PEAK_STREAMS: Final = 16  # concurrent streams per connection at saturation
FIXED_STREAMS: Final = 64  # room for queueing at fixed offered loads
ENVOY_CONCURRENCY: Final = 1  # worker threads: 2 cores are shared by everything
URIS_PER_FILE: Final = 20_000
END_PEAK: Final = "peak, again at the end"
SATURATED: Final = 0.99  # achieved below this share of the offered rate: overloaded
NOISY: Final = 30.0  # % of one core used outside the bench: worth measuring again
LEASED_PLAN: Final = "bench-leased"  # plan "bench"'s limits, enforcement = "leased"
ZIPF_STREAMS: Final = GRPC_PROCESSES * PEAK_STREAMS  # bench/grpc_load.py's calls in flight
# Seconds without load before a leased hot-key row, so that what the sidecar does
# after the rows before it lands first: its batch of last_used writes (every 5 s,
# one HSET per key used: hundreds after a Zipf row, where a leased hot key costs
# about a tenth of a command per request) and the returns of their allotments.
QUIET: Final = 6.0


@dataclass(frozen=True)
class Mode:
    name: str
    keys: int
    duration: float  # seconds measured per load
    warmup: float  # seconds of the same load before it, not measured
    hostile: float  # seconds of attack
    budget: int  # seconds after which the whole run is abandoned
    retries: int  # extra attempts at a load measured while the machine was busy


FULL: Final = Mode("full", 10_000, 12.0, 3.0, 15.0, budget=20 * 60, retries=1)
QUICK: Final = Mode("quick", 10_000, 2.0, 0.5, 3.0, budget=5 * 60, retries=0)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass(frozen=True)
class Authorizer:
    """A running authorizer (the no-op server or a sidecar): its gRPC and HTTP ports."""

    child: harness.Child
    grpc: int
    http: int


def start_noop(
    port: int, *, http_port: int | None = None, settles: bool = False, name: str = "noop"
) -> harness.Child:
    """bench/noop_server.py on 127.0.0.1:port (gRPC) and, if given, http_port (HTTP
    ext_authz); settles: its allows carry what a settlement needs."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "bench.noop_server", "--listen", f"127.0.0.1:{port}"]
    argv += ["--http-listen", f"127.0.0.1:{http_port}"] if http_port is not None else []
    argv += ["--settles"] if settles else []
    child = harness.Child(name, argv, WORK / f"{name}.log", env)
    for each in (port, http_port):
        if each is not None:
            harness.wait_until(partial(harness.tcp_open, each), "noop server", 30, child)
    return child


def access_log_entries(log: Path) -> int:
    """The access-log entries a stopped no-op server says it received."""
    pattern = re.escape(ACCESS_LOG_LINE).replace(r"\{entries\}", r"(\d+)")
    return sum(int(n) for n in re.findall(pattern, log.read_text(errors="replace")))


def start_envoy(name: str, config: str, admin: int) -> harness.Child:
    """Runs one bench Envoy config; returns once its admin says ready."""
    path = WORK / f"envoy-{name}.yaml"
    path.write_text(config)
    return harness.run_envoy(
        path,
        admin=admin,
        log=WORK / f"envoy-{name}.log",
        name=f"envoy-{name}",
        args=["--concurrency", str(ENVOY_CONCURRENCY)],
    )


def pid_of(child: harness.Child) -> int:
    return int(child.process.pid)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# -- CPU accounting -------------------------------------------------------------

_TICK: Final = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _system_busy() -> float:
    """CPU seconds all cores spent busy so far (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _processes() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds so far) of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.find("(") + 1 : stat.rfind(")")]
            fields = stat.rsplit(")", 1)[1].split()
            table[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return table


@dataclass
class CpuUse:
    """% of one core per process over a measurement (see cpu_meter)."""

    percent: dict[str, float] = field(default_factory=dict)
    others: list[tuple[str, float]] = field(default_factory=list)  # busiest outsiders
    wall: float = 0.0  # seconds measured

    def seconds(self, name: str) -> float:
        """CPU seconds name used over the measurement."""
        return self.get(name) / 100 * self.wall

    def get(self, name: str) -> float:
        return self.percent.get(name, 0.0)

    def describe_other(self) -> str:
        named = ", ".join(f"{name} {value:.0f}" for name, value in self.others)
        return f"{self.get('other'):.0f}" + (f" ({named})" if named else "")


@contextmanager
def cpu_meter(pids: dict[str, int]) -> Iterator[CpuUse]:
    """Measures each process's CPU use over the block, in % of one core.

    "h2load" is every child reaped during the block (the h2load processes),
    "other" is whatever else kept the machine's cores busy (other users of
    this machine included), with the busiest of those processes by name: a
    large "other" means a noisy measurement.
    """
    use = CpuUse()
    ours = {*pids.values(), os.getpid()}
    start = {name: _proc_cpu(pid) for name, pid in pids.items()}
    start_all = _processes()
    start_children = _rusage_seconds(resource.RUSAGE_CHILDREN)
    start_self = _rusage_seconds(resource.RUSAGE_SELF)
    start_busy = _system_busy()
    started = time.monotonic()
    yield use
    wall = max(time.monotonic() - started, 1e-6)
    busy = _system_busy() - start_busy
    used = {name: _proc_cpu(pid) - start[name] for name, pid in pids.items()}
    used["h2load"] = _rusage_seconds(resource.RUSAGE_CHILDREN) - start_children
    used["harness"] = _rusage_seconds(resource.RUSAGE_SELF) - start_self
    used["other"] = max(0.0, busy - sum(used.values()))
    use.percent.update({name: 100 * seconds / wall for name, seconds in used.items()})
    use.wall = wall
    outsiders: dict[str, float] = {}
    for pid, (name, seconds) in _processes().items():
        if pid not in ours:
            spent = seconds - start_all.get(pid, (name, 0.0))[1]
            outsiders[name] = outsiders.get(name, 0.0) + 100 * spent / wall
    use.others = sorted(
        ((name, value) for name, value in outsiders.items() if value >= 2), key=lambda kv: -kv[1]
    )[:3]


# -- Redis: the population and the counters --------------------------------------


@dataclass
class Population:
    customers: list[str]
    api_keys: list[str]  # api_keys[i] belongs to customers[i]; index = Zipf rank
    hostile_customer: str
    hostile_key: str


POPULATION_BATCH: Final = 5_000  # accounts per pipeline: ~15,000 commands, ~2 MB each way


async def _issue(redis_url: str, customer: str, plan: str) -> str:
    """One account on plan with one active key, through the Store itself."""
    store = Store(connect(redis_url, timeout=10.0, max_connections=4), timeout=10.0)
    try:
        await store.create_account(customer, plan, "active")
        api_key = keys.generate("test")
        hashed = keys.key_hash(api_key)
        record = KeyRecord(key_id=keys.key_id(hashed), customer_id=customer, state="active")
        await store.add_key(hashed, record)
    finally:
        await store.close()
    return api_key


Hashes = list[tuple[str, dict[str, str]]]  # Redis key -> its hash's fields


def _written_for(client: redis.Redis, ids: Sequence[str]) -> Hashes:
    """Every Redis key named after one of ids (in a hash tag, as the Store names an
    account's keys and a key's record), with its fields: what the Store wrote."""
    found: Hashes = []
    names = sorted({str(n) for i in ids for n in client.scan_iter(match=f"*{{{i}}}*", count=1000)})
    for name in names:
        if client.type(name) != "hash":
            raise RuntimeError(f"bench population: {name} is not a hash; teach _clone its type")
        fields: dict[str, str] = client.hgetall(name)  # type: ignore[assignment]
        for text in (name, *fields, *fields.values()):
            inside = [i for i in ids if i in text and text != i and f"{{{i}}}" not in text]
            if inside:
                raise RuntimeError(
                    f"bench population: {text!r} embeds {inside[0]!r}; "
                    "cannot copy it for other accounts"
                )
        found.append((name, fields))
    return found


def _clone(template: Hashes, swap: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """template with its ids replaced (swap: old id -> new) in names, fields and
    values: each hash's name and its fields and values, flat, as HSET takes them."""
    for name, fields in template:
        for old, new in swap.items():
            name = name.replace(f"{{{old}}}", f"{{{new}}}")
        yield name, [swap.get(text, text) for pair in fields.items() for text in pair]


def issue_accounts(
    client: redis.Redis, redis_url: str, count: int, *, plan: str, prefix: str
) -> tuple[list[str], list[str]]:
    """count accounts on plan with one key each: their customer ids (prefix + a
    number) and keys, in the same order.

    The first account is written by the Store; the others are copies of it (its
    Redis keys, fields and values, with the customer id, key hash and key id
    swapped), sent in pipelines of POPULATION_BATCH accounts. One round trip per
    batch instead of several per account is what makes 1,000,000 accounts take
    about a minute (bench/memory.py), and the Store stays the one place that
    knows its layout. (The copies skip the Store's invalidation messages: no
    sidecar runs yet to cache anything.)
    """
    customers = [f"{prefix}{i:07d}" for i in range(count)]
    api_keys = [asyncio.run(_issue(redis_url, customers[0], plan))]
    first_hash = keys.key_hash(api_keys[0])
    first = (customers[0], first_hash, keys.key_id(first_hash))
    template = _written_for(client, first)
    for start in range(1, count, POPULATION_BATCH):
        pipe = client.pipeline(transaction=False)
        for customer in customers[start : start + POPULATION_BATCH]:
            api_key = keys.generate("test")
            hashed = keys.key_hash(api_key)
            swap = dict(zip(first, (customer, hashed, keys.key_id(hashed)), strict=True))
            for name, items in _clone(template, swap):
                pipe.hset(name, items=items)
            api_keys.append(api_key)
        pipe.execute()
    return customers, api_keys


def create_population(
    client: redis.Redis, redis_url: str, count: int, *, prefix: str = "cus_bench"
) -> Population:
    """count accounts on plan "bench" with one key each (issue_accounts), plus the
    hostile one on plan "hostile", written by the Store."""
    customers, api_keys = issue_accounts(client, redis_url, count, plan="bench", prefix=prefix)
    hostile_customer = f"{prefix}_hostile"
    hostile = asyncio.run(_issue(redis_url, hostile_customer, "hostile"))
    return Population(customers, api_keys, hostile_customer, hostile)


@dataclass
class Leased:
    """The leased rows' accounts, on plan LEASED_PLAN: the hot key's, and the Zipf set."""

    customers: list[str]  # one key each, as the exact population: index = Zipf rank
    api_keys: list[str]
    hot_customer: str
    hot_key: str


def create_leased(
    client: redis.Redis, redis_url: str, count: int, *, prefix: str = "cus_leased"
) -> Leased:
    """count accounts on LEASED_PLAN with one key each, as create_population makes
    its own, plus the hot key's account, written by the Store."""
    customers, api_keys = issue_accounts(client, redis_url, count, plan=LEASED_PLAN, prefix=prefix)
    hot_customer = f"{prefix}_hot"
    hot_key = asyncio.run(_issue(redis_url, hot_customer, LEASED_PLAN))
    return Leased(customers, api_keys, hot_customer, hot_key)


class Counters:
    """What Redis says happened: allowed units (quota `used`) and commands run."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def quota_used(self, customers: Sequence[str]) -> list[int]:
        """Each customer's quota `used`, read in pipelines of POPULATION_BATCH."""
        used = []
        for start in range(0, len(customers), POPULATION_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for customer in customers[start : start + POPULATION_BATCH]:
                pipe.hget(limits_key(customer), "used")
            used += [int(value or 0) for value in pipe.execute()]
        return used

    def used(self, customers: Sequence[str]) -> int:
        return sum(self.quota_used(customers))

    def commands(self) -> dict[str, int]:
        stats: dict[str, Any] = self.client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name != "cmdstat_info"
        }


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in delta.items() if calls > 0}


# -- measurements ------------------------------------------------------------------


@dataclass
class Measurement:
    target: str
    load: str  # "peak" or "25%", "50%", "90%"
    offered: float | None  # requests/s asked for; None: as fast as possible
    result: h2load.Result
    cpu: CpuUse = field(default_factory=CpuUse)
    allowed: int | None = None  # quota units added during the run (sidecar only)
    commands: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.result.rps

    @property
    def noisy(self) -> bool:
        return self.cpu.get("other") >= NOISY

    @property
    def saturated(self) -> bool:
        return self.offered is not None and self.rps < SATURATED * self.offered

    @property
    def valkey_us(self) -> float:
        """Valkey's CPU µs per allowed decision (NaN when nothing was counted)."""
        if not self.allowed:
            return math.nan
        return 1e6 * self.cpu.seconds("valkey") / self.allowed

    def per_decision(self) -> dict[str, float]:
        """Redis commands per allowed decision, by command, busiest first; the
        sidecars' health pings left out (empty when nothing was counted)."""
        if not self.allowed:
            return {}
        calls = {name: n / self.allowed for name, n in self.commands.items() if name != "ping"}
        return dict(sorted(calls.items(), key=lambda kv: -kv[1]))

    @property
    def commands_per_decision(self) -> float:
        """Redis commands per allowed decision, pings left out (NaN: nothing counted)."""
        return sum(self.per_decision().values()) if self.allowed else math.nan

    @property
    def commands_per_request(self) -> float:
        """Redis commands per request answered, the health pings left out (NaN: none
        answered). Issue #14's figure: requests are counted by the load generator,
        not from the quota, which a leased plan charges an allotment at a time."""
        if not self.result.requests:
            return math.nan
        calls = sum(n for name, n in self.commands.items() if name != "ping")
        return calls / self.result.requests

    def breakdown(self) -> str:
        """Redis commands per request, by command, busiest first, pings left out."""
        if not self.result.requests:
            return ""
        calls = sorted(
            ((name, n) for name, n in self.commands.items() if name != "ping"),
            key=lambda kv: -kv[1],
        )
        return ", ".join(f"{name} {n / self.result.requests:.3f}" for name, n in calls)


Loads = Callable[[float | None, float, float, Path | None], list[h2load.Load]]
# (offered req/s or None, seconds, log file or None, check) -> what the load saw
Drive = Callable[[float | None, float, Path | None, bool], h2load.Result]


@dataclass
class Target:
    """Something to load: how to build its h2load processes (or, with drive, how to
    run another load generator), what to count."""

    name: str
    loads: Loads | None = None
    customers: Sequence[str] = ()  # whose quota to sum (empty: no counting)
    drive: Drive | None = None
    quiet: float = 0.0  # seconds without load before it (see QUIET)

    def run(
        self, rps: float | None, duration: float, log: Path | None, *, check: bool
    ) -> h2load.Result:
        if self.drive is not None:
            return self.drive(rps, duration, log, check)
        assert self.loads is not None
        return h2load.run(self.loads(rps, duration, 0.0, log), check=check)


def grpc_target(
    name: str,
    port: int,
    bodies: Sequence[Path],
    customers: Sequence[str] = (),
    *,
    quiet: float = 0.0,
) -> Target:
    url = f"http://127.0.0.1:{port}{AUTHORIZE_PATH}"

    def loads(
        rps: float | None, duration: float, warmup: float, log: Path | None
    ) -> list[h2load.Load]:
        return [
            h2load.Load(
                url=url,
                body_file=body,
                headers=GRPC_HEADERS,
                clients=1,
                streams=PEAK_STREAMS if rps is None else FIXED_STREAMS,
                duration=duration,
                warmup=warmup,
                rps=None if rps is None else rps / len(bodies),
                log_file=None if log is None else log.with_suffix(f".{i}.log"),
            )
            for i, body in enumerate(bodies)
        ]

    return Target(name, loads, customers, quiet=quiet)


def tally_result(tally: grpc_load.Tally) -> h2load.Result:
    """bench/grpc_load.py's tally as an h2load result (no latencies): its errors are
    failed requests, and each allow it parsed counts as the floor's allow bytes do."""
    errors = sum(tally.errors.values())
    seconds = max(tally.seconds, 1e-9)
    allow = len(grpc_frame(ALLOW_AUTHORIZE.SerializeToString()))
    summary = h2load.Summary(
        seconds=tally.seconds,
        rps=tally.requests / seconds,
        total=tally.requests,
        done=tally.requests,
        succeeded=tally.requests - errors,
        failed=errors,
        errored=errors,
        timeout=0,
        status=(tally.requests - errors, 0, 0, 0),
        bytes_total=0,
        bytes_headers=0,
        bytes_data=tally.allowed * allow,
    )
    return h2load.Result([summary], [], tally.seconds)


def grpc_load_target(name: str, port: int, bodies: Path, customers: Sequence[str] = ()) -> Target:
    """Authorize at saturation with a different key per request: bench/grpc_load.py
    (h2load posts one body per process) walking bodies, ZIPF_STREAMS calls in flight."""

    def drive(rps: float | None, duration: float, log: Path | None, check: bool) -> h2load.Result:
        if rps is not None:
            raise ValueError("bench/grpc_load.py runs at saturation only")
        result = (log or WORK / f"grpc-load-{name}-warmup.log").with_suffix(".json")
        argv = [sys.executable, "-m", "bench.grpc_load", "--target", f"127.0.0.1:{port}"]
        argv += ["--bodies", str(bodies), "--seconds", f"{duration:g}"]
        argv += ["--streams", str(ZIPF_STREAMS), "--result", str(result)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 30, check=False, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"grpc_load exited {done.returncode}: {done.stderr[-500:]}")
        answered = tally_result(grpc_load.read_tally(result))
        if check and answered.requests == 0:
            raise RuntimeError(f"grpc_load got no answers from :{port}")
        return answered

    return Target(name, customers=customers, drive=drive)


def envoy_target(
    name: str, uris: Path, customers: Sequence[str] = (), *, quiet: float = 0.0
) -> Target:
    def loads(
        rps: float | None, duration: float, warmup: float, log: Path | None
    ) -> list[h2load.Load]:
        return [
            h2load.Load(
                uris_file=uris,
                clients=ENVOY_CLIENTS,
                streams=PEAK_STREAMS if rps is None else FIXED_STREAMS,
                duration=duration,
                warmup=warmup,
                rps=None if rps is None else rps / ENVOY_CLIENTS,
                log_file=log,
            )
        ]

    return Target(name, loads, customers, quiet=quiet)


class Bench:
    def __init__(self, mode: Mode, counters: Counters, pids: dict[str, int]) -> None:
        self.mode = mode
        self.counters = counters
        self.pids = pids
        self.measurements: list[Measurement] = []
        self.children: dict[str, harness.Child] = {}  # by role, as pids; checked around every load
        self.entries: dict[str, int] = {}  # access-log entries a no-op row's server received
        self._runs = 0

    @contextmanager
    def playing(self, role: str, child: harness.Child) -> Iterator[None]:
        """child is role (its CPU column, its liveness check) during the block;
        whoever was before is role again after it."""
        saved = self.pids.get(role), self.children.get(role)
        self.pids[role], self.children[role] = pid_of(child), child
        try:
            yield
        finally:
            pid, previous = saved
            if pid is None or previous is None:
                self.pids.pop(role, None)
                self.children.pop(role, None)
            else:
                self.pids[role], self.children[role] = pid, previous

    def check_alive(self) -> None:
        for name, child in self.children.items():
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({child.process.returncode}) in the middle of the run, "
                    f"stopped by something outside the bench? See {child.log}"
                )

    def measure(self, target: Target, load: str, offered: float | None) -> Measurement:
        """One load, repeated (up to mode.retries times) while the machine is busy elsewhere."""
        if target.quiet and self.find(target.name, "peak") is None:
            time.sleep(target.quiet)  # before its first load only
        best: Measurement | None = None
        for attempt in range(1 + self.mode.retries):
            measurement = self._measure_once(target, load, offered)
            if best is None or measurement.cpu.get("other") < best.cpu.get("other"):
                best = measurement
            if best.cpu.get("other") < NOISY:
                break
            if attempt < self.mode.retries:
                say("  the machine was busy elsewhere: measuring again")
        assert best is not None
        self.measurements.append(best)
        return best

    def _measure_once(self, target: Target, load: str, offered: float | None) -> Measurement:
        mode = self.mode
        self._runs += 1
        label = re.sub(r"\W+", "-", load).strip("-")
        log = WORK / f"h2load-{self._runs:02d}-{target.name}-{label}.log"
        self.check_alive()
        # Warm up in a run of its own, so the counters below see only measured requests.
        target.run(offered, mode.warmup, None, check=False)
        self.check_alive()
        used_before = self.counters.used(target.customers) if target.customers else 0
        commands_before = self.counters.commands()
        with cpu_meter(self.pids) as cpu:
            try:
                result = target.run(offered, mode.duration, log, check=True)
            except RuntimeError:
                self.check_alive()  # the better explanation, when it is one
                raise
        commands = command_delta(commands_before, self.counters.commands())
        allowed = self.counters.used(target.customers) - used_before if target.customers else None
        say(
            f"{target.name:14} {load:>4}: {result.rps:8.0f} req/s"
            + (f" (offered {offered:.0f})" if offered else "")
            + f"  p50 {result.p(50):.2f} ms  p99 {result.p(99):.2f} ms"
            + f"  p999 {result.p(99.9):.2f} ms  other CPU {cpu.get('other'):.0f}%"
        )
        return Measurement(target.name, load, offered, result, cpu, allowed, commands)

    def curve(
        self,
        target: Target,
        peak_of: float | None = None,
        *,
        shares: bool = True,
        rates: Sequence[float] = (),
    ) -> float:
        """Saturation, then fixed loads at SHARES of peak_of (default: this peak)
        and at rates (req/s)."""
        peak = self.measure(target, "peak", None).rps
        base = peak if peak_of is None else peak_of
        for share in SHARES if shares else ():
            self.measure(target, f"{share:.0%}", share * base)
        for rate in rates:
            self.measure(target, rate_load(rate), rate)
        return peak

    def find(self, target: str, load: str) -> Measurement | None:
        for measurement in self.measurements:
            if measurement.target == target and measurement.load == load:
                return measurement
        return None


# -- sanity checks: each target answers what the bench assumes ---------------------


def check_authorize(port: int, api_key: str, want: int) -> pb.AuthorizeResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
        response: pb.AuthorizeResponse = stub.Authorize(
            pb.AuthorizeRequest(api_key=api_key, method="GET", path="/v1/search"), timeout=5
        )
    if response.reason != want:
        raise RuntimeError(
            f"Authorize on :{port} answered {pb.Reason.Name(response.reason)}, "
            f"expected {pb.Reason.Name(want)}: {response.message}"
        )
    return response


def http_get(url: str) -> tuple[int, dict[str, str]]:
    """Status and (lower-cased) headers of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return int(response.status), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return int(exc.code), {k.lower(): v for k, v in exc.headers.items()}


def check_envoy(
    listen: int,
    good: str,
    bad: str,
    *,
    authz: bool,
    authz_denies: bool,
    ext_proc: bool,
    admin: int = 0,
) -> None:
    """The good key passes; the bad one is refused only by the real sidecar; the
    response phase runs exactly when ext_proc is in the chain and authz is on."""
    base = f"http://127.0.0.1:{listen}/v1/search?{envoy_config.KEY_QUERY_PARAM}="
    want_bad = 401 if authz_denies else 200
    for attempt in range(3):
        # A fresh sidecar's first answer makes its Redis connections within the
        # 50 ms budget and may miss it once on a busy machine: that is warm-up,
        # not a wrong config, so the check looks again before it fails.
        (good_status, headers), (bad_status, _) = http_get(base + good), http_get(base + bad)
        if (good_status, bad_status) == (200, want_bad):
            break
        say(f"envoy :{listen} check {attempt + 1}: good key → {good_status}, bad → {bad_status}")
        time.sleep(0.5)
    if (good_status, bad_status) != (200, want_bad):
        stats = ""
        if admin:  # what Envoy saw: ext_authz errors, timeouts, denials
            with (
                suppress(OSError),
                urllib.request.urlopen(
                    f"http://127.0.0.1:{admin}/stats?filter=ext_authz|ext_proc", timeout=5
                ) as answer,
            ):
                stats = "; envoy stats: " + " ".join(
                    line
                    for line in answer.read().decode().split("\n")
                    if line and ": 0" not in line
                )
        raise RuntimeError(
            f"envoy :{listen}: good key → {good_status}, bad key → {bad_status}; "
            f"expected 200, {want_bad}{stats}"
        )
    charged = "x-tollway-charged" in headers  # what the sidecar's response phase adds
    if charged is not (ext_proc and authz):
        raise RuntimeError(f"envoy :{listen}: ext_proc {'ran' if charged else 'did not run'}")


# -- facts and the report ---------------------------------------------------------


def _run_text(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip()


def machine_facts(valkey_version: str) -> dict[str, str]:
    cpu_model = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    envoy = _run_text([harness.envoy_binary(), "--version"]).split("version:")[-1].strip()
    commit = _run_text(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "sidecar"])
    load1, load5, _ = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "CPU": cpu_model,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": metadata.version("protobuf"),
        "redis-py": redis.__version__,
        "Valkey": valkey_version,
        "Envoy": envoy.split("/")[1] if envoy.count("/") >= 2 else envoy,
        "h2load": _run_text(["h2load", "--version"]).removeprefix("h2load "),
        "commit": commit + (" (sidecar/ has uncommitted changes)" if dirty else ""),
        "load average at start": f"{load1:.2f} (1 min), {load5:.2f} (5 min)",
    }


def _ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(value) or math.isnan(base):
        return "—"
    return f"{value / base:.2f}"


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


@dataclass(frozen=True)
class Row:
    """One row of the report: what it says, and the row it is divided by."""

    label: str
    floor: str  # the row it is divided by: the no-op with the same filters (itself: a floor)
    pairs: tuple[str, ...] = ()  # the envoy_config.PAIRS it stands for (Envoy rows)
    authorizer: str = ""  # "noop" or "sidecar" (Envoy pair rows)
    shape: Shape | None = None  # what its Envoy runs (Envoy pair rows)
    leased: bool = False  # asks about accounts on LEASED_PLAN (issue #14's rows)


GRPC_ROWS: Final = {
    "floor": Row("floor: no-op gRPC Authorize", "floor"),
    "sidecar": Row("sidecar Authorize (gRPC)", "floor"),
}
CEILING: Final = "envoy-ceiling"
# Issue #14's rows: leased enforcement (see with_leased).
LEASED_HOT: Final = "leased-hot"
ZIPF_FLOOR: Final = "floor-zipf"
LEASED_ZIPF: Final = "leased-zipf"
LEASED_ENVOY: Final = "envoy-leased-hot"  # "envoy…": an Envoy row, as the report reads it


def with_leased(rows: dict[str, Row], keys_count: int) -> dict[str, Row]:
    """rows with issue #14's leased rows, each after the exact row it repeats: the
    gRPC ones (the hot key's, and the Zipf mix's behind its own floor, since that
    load needs another load generator) after sidecar Authorize; the shipped
    config's after its exact sidecar row, divided by the same no-op row (none when
    the shipped config is not run)."""
    shipped = find_row(rows, SHIPPED, "sidecar")
    out: dict[str, Row] = {}
    for name, row in rows.items():
        out[name] = row
        if name == "sidecar":
            zipf = f"Zipf {keys_count:,} keys"
            out[LEASED_HOT] = Row(f"{row.label}, leased, hot key", row.floor, leased=True)
            out[ZIPF_FLOOR] = Row(
                f"floor: no-op gRPC Authorize, {zipf} (bench/grpc_load.py)", ZIPF_FLOOR
            )
            out[LEASED_ZIPF] = Row(f"{row.label}, leased, {zipf}", ZIPF_FLOOR, leased=True)
        if name == shipped:
            out[LEASED_ENVOY] = Row(
                f"{row.label}, leased, hot key",
                row.floor,
                authorizer="sidecar",
                shape=row.shape,
                leased=True,
            )
    return out


def pair_row(pair: str, authorizer: str) -> str:
    """The target name of one Envoy row of a pair."""
    return f"envoy-{authorizer}-{pair}"


def _short(filter_name: str) -> str:
    return filter_name.rsplit(".", 1)[-1]


def envoy_rows(planned: Sequence[Planned]) -> dict[str, Row]:
    """The Envoy rows of the run, by target name: each pair's no-op row (its own
    floor) and sidecar row, and the ceiling beside the pair it runs with."""
    rows: dict[str, Row] = {}
    for p in planned:
        where = p.config.file
        if p.cut:
            where += " without " + ", ".join(_short(name) for name in p.cut)
        if p.is_(SHIPPED):
            where += ", **as shipped**"
        floor = pair_row(p.name, "noop")
        names = (p.name, *p.also)
        rows[floor] = Row(
            f"Envoy + no-op: {p.shape.describe()} ({where})", floor, names, "noop", p.shape
        )
        if p.name == CEILING_PAIR:
            rows[CEILING] = Row(f"Envoy, Tollway filters off (ceiling; {p.config.file})", floor)
        rows[pair_row(p.name, "sidecar")] = Row(
            f"Envoy + sidecar: {p.shape.describe()} ({where})", floor, names, "sidecar", p.shape
        )
    return rows


def find_row(rows: dict[str, Row], pair: str, authorizer: str) -> str | None:
    """The target name of the row of pair (or of the pair it joined) behind authorizer."""
    for name, row in rows.items():
        if pair in row.pairs and row.authorizer == authorizer:
            return name
    return None


def rate_load(rate: float) -> str:
    """The load label of a fixed offered rate."""
    return f"{rate:,.0f}/s"


def _outcome(m: Measurement) -> str:
    """What the responses said: allow share, denials, errors."""
    r = m.result
    total = max(r.requests, 1)
    parts = []
    if m.target.startswith("envoy"):
        parts.append(f"{r.status(2) / total:.1%} 2xx, {r.status(4)} 4xx, {r.status(5)} 5xx")
    if m.allowed is not None:  # quota units the sidecar granted during the run
        parts.append(f"{min(m.allowed / total, 1.0):.1%} allowed")
    elif not m.target.startswith("envoy"):  # the floor: every response is the constant allow
        expected = len(grpc_frame(ALLOW_AUTHORIZE.SerializeToString())) * total
        parts.append(f"{min(r.data_bytes / expected, 1.0):.1%} answered allow")
    failed = sum(s.failed + s.timeout for s in r.summaries)
    return ", ".join([*parts, f"{failed} failed"])


def _refused(m: Measurement) -> str:
    """The requests that did not get an allow, in short ("—": none)."""
    r = m.result
    total = max(r.requests, 1)
    if m.target.startswith("envoy"):
        parts = [f"{r.status(k)} {k}xx" for k in (4, 5) if r.status(k)]
        failed = r.not_ok - r.status(4) - r.status(5)
        parts += [f"{failed} failed"] if failed else []
        return ", ".join(parts) or "—"
    if m.allowed is not None:
        allowed = m.allowed
    else:
        allowed = r.data_bytes // len(grpc_frame(ALLOW_AUTHORIZE.SerializeToString()))
    refused = max(total - allowed, 0) + r.not_ok
    return f"{refused / total:.1%}" if refused else "—"


# Issue #13's targets, read off the table by the summary.
SHIPPED_VS_GRPC_NOOP: Final = 1.5  # the shipped config ≥ this x Envoy + no-op gRPC Check only
AUTHORIZE_VS_FLOOR: Final = 0.6  # sidecar Authorize ≥ this x its floor
VALKEY_US: Final = 40.0  # Valkey CPU µs per plain allowed decision, at most
COMMANDS: Final = 5.0  # Redis commands per plain allowed decision, at most
P99_ADDED_MS: Final = 2.0  # p99 added through Envoy at FIXED_RATE offered, at most


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _dagger(*ms: Measurement | None) -> str:
    return " †" if any(m is not None and m.noisy for m in ms) else ""


def _targets(bench: Bench, rows: dict[str, Row], floor: Measurement | None) -> list[str]:
    """The summary: each of issue #13's targets, the figure measured, met or not."""
    find = bench.find
    lines = [
        "## Issue #13's targets",
        "",
        "Each read off the tables below (†: noisy, as there). Ratios are to floors "
        "measured in this run.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    shipped, head = find_row(rows, SHIPPED, "sidecar"), find_row(rows, HEADLINE_FLOOR, "noop")
    top = find(shipped, "peak") if shipped else None
    base = find(head, "peak") if head else None
    what = rows[shipped].label if shipped else "deploy/envoy.yaml as shipped: not run"
    if top and base and base.rps:
        ratio = top.rps / base.rps
        figure = f"{top.rps:,.0f} ÷ {base.rps:,.0f} req/s = **{ratio:.2f}x**{_dagger(top, base)}"
        ok: bool | None = ratio >= SHIPPED_VS_GRPC_NOOP
    else:
        figure, ok = "—", None
    lines.append(
        f"| {what}: ≥ {SHIPPED_VS_GRPC_NOOP:g}x Envoy + no-op grpc.aio ext_authz "
        f"(ext_authz only) | {figure} | {_verdict(ok)} |"
    )
    authorize = find("sidecar", "peak")
    if authorize and floor and floor.rps:
        ratio = authorize.rps / floor.rps
        figure = f"{authorize.rps:,.0f} ÷ {floor.rps:,.0f} req/s = **{ratio:.2f}**"
        figure += _dagger(authorize, floor)
        ok = ratio >= AUTHORIZE_VS_FLOOR
    else:
        figure, ok = "—", None
    lines.append(
        f"| sidecar Authorize (gRPC): ≥ {AUTHORIZE_VS_FLOOR:g}x its floor (no-op grpc.aio "
        f"Authorize) | {figure} | {_verdict(ok)} |"
    )
    plain = [("sidecar Authorize (gRPC)", find("sidecar", "peak"))]
    http = find_row(rows, "http-authz", "sidecar")
    if http:
        plain.append(("Envoy + sidecar, HTTP ext_authz only", find(http, "peak")))
    for label, m in plain:
        us = m.valkey_us if m else math.nan
        ok = None if math.isnan(us) else us <= VALKEY_US
        lines.append(
            f"| Valkey CPU per plain allowed decision ≤ {VALKEY_US:g} µs, {label} at saturation "
            f"| **{_num(us, 1)} µs**{_dagger(m)} | {_verdict(ok)} |"
        )
    for label, m in plain:
        calls = m.commands_per_decision if m else math.nan
        each = ", ".join(f"{name} {n:.2f}" for name, n in m.per_decision().items()) if m else ""
        lines.append(
            f"| Redis commands per plain allowed decision ≤ {COMMANDS:g}, {label} "
            f"(health pings left out) | **{_num(calls, 2)}**{_dagger(m)}"
            f"{f' ({each})' if each else ''} "
            f"| {_verdict(None if math.isnan(calls) else round(calls, 2) <= COMMANDS)} |"
        )
    load = rate_load(FIXED_RATE)
    noop = find_row(rows, SHIPPED, "noop")
    at, under = (find(shipped, load) if shipped else None), (find(noop, load) if noop else None)
    if at and under and not math.isnan(at.result.p(99)) and not math.isnan(under.result.p(99)):
        added = at.result.p(99) - under.result.p(99)
        figure = (
            f"p99 {_ms(at.result.p(99))} against {_ms(under.result.p(99))} ms: "
            f"**{added:+.2f} ms**; p50 {_ms(at.result.p(50))} against "
            f"{_ms(under.result.p(50))} ms{_dagger(at, under)}"
        )
        if at.saturated or under.saturated:
            figure += (
                " (*overloaded*: "
                + ", ".join(f"{m.rps:,.0f} req/s achieved" for m in (at, under) if m.saturated)
                + ")"
            )
        ok = None if under.saturated else (added <= P99_ADDED_MS and not at.saturated)
    else:
        figure, ok = "—", None
    lines.append(
        f"| p99 added at {FIXED_RATE:,.0f} req/s offered through Envoy ≤ {P99_ADDED_MS:g} ms: "
        f"the shipped config behind the sidecar against it behind the no-op | {figure} "
        f"| {_verdict(ok)} |"
    )
    return lines


# Issue #14's targets (leased enforcement), read off the table as #13's are.
LEASED_HOT_COMMANDS: Final = 0.05  # Redis commands per request, hot key at saturation, at most
LEASED_VS_FLOOR: Final = 0.8  # sidecar Authorize, leased hot key ≥ this x its floor
LEASED_SHIPPED_VS_GRPC_NOOP: Final = 2.5  # shipped config, leased hot key ≥ this x HEADLINE_FLOOR
LEASED_ZIPF_COMMANDS: Final = 1.0  # Redis commands per request, leased Zipf mix, at most
# "No figure worse than before": a ratio or Valkey µs/decision moved by less than
# the run's noise (the floor's drift, this run's or the committed one's, at least
# this) is the same figure; Redis commands per request are a count, read closer.
EXACT_NOISE: Final = 0.10
EXACT_COMMANDS_NOISE: Final = 0.05


def _leased_targets(
    bench: Bench, rows: dict[str, Row], floor: Measurement | None, exact: Exact | None
) -> list[str]:
    """The summary of issue #14: each target, the figure measured, met or not."""
    find = bench.find
    lines = [
        "## Issue #14's targets",
        "",
        f"Leased enforcement (plan `{LEASED_PLAN}`: plan `bench`'s limits, "
        '`enforcement = "leased"`), read off the tables below as #13\'s are. Redis commands '
        "per request: INFO commandstats (commands inside Lua included, the sidecars' health "
        "pings left out) ÷ the requests the load generator had answered.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    counts = [
        (LEASED_HOT, "Hot key", LEASED_HOT_COMMANDS, "sidecar Authorize (gRPC)"),
        (LEASED_ENVOY, "Hot key", LEASED_HOT_COMMANDS, "Envoy + sidecar, as shipped"),
        (LEASED_ZIPF, _zipf_mix(rows), LEASED_ZIPF_COMMANDS, "sidecar Authorize (gRPC)"),
    ]
    for target, what, most, where in counts:
        if target not in rows:
            continue
        m = find(target, "peak")
        calls = m.commands_per_request if m else math.nan
        each = m.breakdown() if m else ""
        verdict = _verdict(None if math.isnan(calls) else round(calls, 3) <= most)
        lines.append(
            f"| {what} at saturation, leased: Redis commands per request ≤ {most:g}, {where} "
            f"| **{_num(calls, 3)}**{_dagger(m)}{f' ({each})' if each else ''} | {verdict} |"
        )
    authorize = find(LEASED_HOT, "peak")
    if authorize and floor and floor.rps:
        ratio = authorize.rps / floor.rps
        figure = f"{authorize.rps:,.0f} ÷ {floor.rps:,.0f} req/s = **{ratio:.2f}**"
        figure += _dagger(authorize, floor)
        ok: bool | None = ratio >= LEASED_VS_FLOOR
    else:
        figure, ok = "—", None
    lines.append(
        f"| {rows[LEASED_HOT].label}: ≥ {LEASED_VS_FLOOR:g}x its floor (no-op grpc.aio "
        f"Authorize) | {figure} | {_verdict(ok)} |"
    )
    head = find_row(rows, HEADLINE_FLOOR, "noop")
    top = find(LEASED_ENVOY, "peak")
    base = find(head, "peak") if head else None
    what = rows[LEASED_ENVOY].label if LEASED_ENVOY in rows else "deploy/envoy.yaml: not run"
    if top and base and base.rps:
        ratio = top.rps / base.rps
        figure = f"{top.rps:,.0f} ÷ {base.rps:,.0f} req/s = **{ratio:.2f}x**{_dagger(top, base)}"
        ok = ratio >= LEASED_SHIPPED_VS_GRPC_NOOP
    else:
        figure, ok = "—", None
    lines.append(
        f"| {what}: ≥ {LEASED_SHIPPED_VS_GRPC_NOOP:g}x Envoy + no-op grpc.aio ext_authz "
        f"(ext_authz only) | {figure} | {_verdict(ok)} |"
    )
    lines.append(
        "| Exact mode: no figure worse than before (each exact sidecar row's vs floor, "
        "Redis cmds/req and Valkey µs/decision against the last committed run's) "
        f"| {exact.summary() if exact else 'no committed run to compare with'} "
        f"| {_verdict(exact.ok if exact else None)} |"
    )
    return lines


def _zipf_mix(rows: dict[str, Row]) -> str:
    found = re.search(r"Zipf ([\d,]+) keys", rows[LEASED_ZIPF].label)
    return f"{found[1]}-key Zipf mix" if found else "Zipf mix"


# -- exact mode against the last committed run ----------------------------------------


@dataclass(frozen=True)
class Figures:
    """A row's figures in the saturation table (NaN: —)."""

    vs_floor: float
    commands: float  # Redis cmds/req
    valkey_us: float
    noisy: bool = False  # marked †


FIGURES: Final = {
    "vs floor": ("vs_floor", True),  # (Figures field, whether higher is better)
    "Redis cmds/req": ("commands", False),
    "Valkey µs/decision": ("valkey_us", False),
}


def _number(text: str) -> float:
    text = text.replace(",", "").replace("*", "").strip()
    try:
        return float(text)
    except ValueError:
        return math.nan


def saturation_figures(text: str) -> dict[str, Figures]:
    """A report's saturation table: each row's label (its † dropped) -> its figures."""
    heading = "## Throughput at saturation"
    if heading not in text:
        return {}
    table = text.split(heading, 1)[1].split("\n## ", 1)[0]
    figures = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) != 8 or cells[0] == "measurement":
            continue
        label = cells[0].removesuffix(" †")
        figures[label] = Figures(
            _number(cells[2]), _number(cells[5]), _number(cells[6]), label != cells[0]
        )
    return figures


def floor_drift(text: str) -> float:
    """The floor's drift a report states (start to end of its run), as a fraction; NaN."""
    found = re.search(r"at the end \(([+-][\d.]+)%\)", text)
    return float(found[1]) / 100 if found else math.nan


def _fact(text: str, name: str) -> str:
    found = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", text, re.M)
    return found[1] if found else "?"


def report_mode(text: str) -> str:
    found = re.search(r"^Mode \*\*(\w+)\*\*", text, re.M)
    return found[1] if found else "?"


@dataclass(frozen=True)
class Change:
    label: str
    figure: str  # a key of FIGURES
    before: float
    now: float
    noise: float  # the relative change within which it is the same figure
    noisy: bool = False  # either measurement was marked † (noisy)

    @property
    def change(self) -> float:
        return self.now / self.before - 1 if self.before else math.nan

    @property
    def worse(self) -> bool:
        higher_is_better = FIGURES[self.figure][1]
        change = -self.change if higher_is_better else self.change
        return change > self.noise


@dataclass
class Exact:
    """This run's exact rows against the committed run's (bench/results/latest.md at HEAD)."""

    changes: list[Change]
    baseline: str  # which run: its commit, date and mode
    noise: float  # for ratios and µs/decision
    same_mode: bool = True  # both runs full (or both quick)

    @property
    def worse(self) -> list[Change]:
        return [c for c in self.changes if c.worse]

    @property
    def ok(self) -> bool | None:
        """Met when nothing is worse; not met when a quiet measurement is; — when the
        runs cannot tell (nothing compared, modes differ, only noisy ones worse)."""
        if not self.changes or not self.same_mode:
            return None
        if any(not c.noisy for c in self.worse):
            return False
        return None if self.worse else True

    def summary(self) -> str:
        if not self.changes:
            return f"no row in common with the committed run ({self.baseline})"
        head = (
            f"{len(self.changes)} figures against the committed run ({self.baseline}), "
            f"noise ±{self.noise:.0%} (commands ±{EXACT_COMMANDS_NOISE:.0%})"
            + ("" if self.same_mode else "; modes differ, so a hint only")
            + ": "
        )
        if not self.worse:
            return head + "**none worse**"
        worst = sorted(self.worse, key=lambda c: -abs(c.change))
        named = "; ".join(
            f"{c.label}: {c.figure} {c.before:,.2f} → {c.now:,.2f} ({c.change:+.0%})"
            + (" †" if c.noisy else "")
            for c in worst[:3]
        )
        more = "; …" if len(worst) > 3 else ""
        quiet = sum(not c.noisy for c in worst)
        noisy = f", {len(worst) - quiet} of them noisy (†)" if quiet < len(worst) else ""
        return head + f"**{len(worst)} worse**{noisy}: {named}{more}"


def compare_exact(
    now: dict[str, Figures],
    before_text: str,
    *,
    drift: float,
    labels: Sequence[str],
    mode: str,
) -> Exact:
    """The figures of the rows labelled labels against the same rows of before_text (a
    report; mode: this run's); ratios and µs/decision are read as equal within the
    larger floor drift of the two runs (at least EXACT_NOISE), commands per request
    within EXACT_COMMANDS_NOISE."""
    before = saturation_figures(before_text)
    drifts = [abs(d) for d in (drift, floor_drift(before_text)) if not math.isnan(d)]
    noise = max([EXACT_NOISE, *drifts])
    then = report_mode(before_text)
    baseline = f"commit {_fact(before_text, 'commit')}, {_fact(before_text, 'date')}, {then} mode"
    changes = []
    for label in labels:
        if label not in now or label not in before:
            continue
        for figure, (name, _) in FIGURES.items():
            a, b = getattr(before[label], name), getattr(now[label], name)
            if math.isnan(a) or math.isnan(b) or not a:
                continue
            tolerance = EXACT_COMMANDS_NOISE if name == "commands" else noise
            noisy = before[label].noisy or now[label].noisy
            changes.append(Change(label, figure, a, b, tolerance, noisy))
    return Exact(changes, baseline, noise, same_mode=then == mode)


def _exact_section(exact: Exact | None) -> list[str]:
    if exact is None or not exact.changes:
        return []
    lines = [
        "",
        "## Exact mode against the last committed run",
        "",
        f"Issue #14: no exact-mode figure worse than before. The committed run: "
        f"{exact.baseline}. A change within the noise (±{exact.noise:.0%}: the larger floor "
        f"drift of the two runs, at least {EXACT_NOISE:.0%}; ±{EXACT_COMMANDS_NOISE:.0%} for "
        "Redis commands per request) is no change; †: either measurement was noisy.",
        "",
        "| row | figure | before | now | change | |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in exact.changes:
        verdict = ("**worse**" if c.worse else "—") + (" †" if c.noisy else "")
        lines.append(
            f"| {c.label} | {c.figure} | {c.before:,.2f} | {c.now:,.2f} | {c.change:+.1%} "
            f"| {verdict} |"
        )
    return lines


def exact_labels(rows: dict[str, Row]) -> list[str]:
    """The exact rows' labels whose figures are the sidecar's: not the floors, the
    ceiling or the leased rows."""
    return [
        row.label
        for target, row in rows.items()
        if row.floor != target and target != CEILING and not row.leased
    ]


def _num(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _comparisons(bench: Bench, rows: dict[str, Row]) -> list[str]:
    """What settlement and the transport cost: each pair against the ext_authz-only
    pair of the same transport, and HTTP against gRPC, both with ext_authz only."""

    def peaks(row: str) -> tuple[Measurement | None, Measurement | None]:
        sidecar = row.replace("envoy-noop-", "envoy-sidecar-", 1)
        return bench.find(sidecar, "peak"), bench.find(row, "peak")

    def against(a: str, b: str) -> str | None:
        (sa, na), (sb, nb) = peaks(a), peaks(b)
        if not (sa and na and sb and nb):
            return None
        return (
            f"sidecar {sa.rps:,.0f} req/s against {sb.rps:,.0f} ({_ratio(sa.rps, sb.rps)}), "
            f"no-op {na.rps:,.0f} against {nb.rps:,.0f} ({_ratio(na.rps, nb.rps)})"
        )

    floors = {name: row for name, row in rows.items() if row.authorizer == "noop" and row.shape}
    alone = {
        row.shape.transport: name
        for name, row in floors.items()
        if row.shape is not None and row.shape.settlement == "none"
    }
    lines = []
    for name, row in floors.items():
        assert row.shape is not None
        plain = alone.get(row.shape.transport)
        if row.shape.settlement != "none" and plain:
            text = against(name, plain)
            if text:
                lines.append(f"- {row.shape.describe()} against ext_authz only: {text}.")
    if "http" in alone and "grpc" in alone:
        text = against(alone["http"], alone["grpc"])
        if text:
            lines.append(f"- HTTP ext_authz against gRPC Check, both ext_authz only: {text}.")
    if lines:
        lines = ["", "What settlement and the transport cost (peaks, same run):", "", *lines]
    return lines


def report(
    bench: Bench,
    rows: dict[str, Row],
    facts: dict[str, str],
    mode: Mode,
    hostile: dict[str, Any],
    rss: dict[str, dict[str, int]],
    baseline: str | None = None,
) -> str:
    """The report; baseline: the committed run's report, for issue #14's "no
    exact-mode figure worse than before"."""
    find = bench.find
    # Noise only ever slows a run down, so the better of the floor's two peaks
    # (start and end of the run) is its best estimate.
    floor = max(
        (m for m in (find("floor", "peak"), find("floor", END_PEAK)) if m is not None),
        key=lambda m: m.rps,
        default=None,
    )
    ceiling = find(CEILING, "peak")

    def peak(target: str) -> Measurement | None:
        return floor if target == "floor" else find(target, "peak")

    table, figures = [], {}
    for target, row in rows.items():
        m = peak(target)
        if m is None:
            continue
        base = peak(row.floor)
        per_request = sum(m.commands.values()) / m.result.requests if m.result.requests else 0.0
        ratio = m.rps / base.rps if base and base.rps else math.nan
        digits = 3 if row.leased else 2  # a leased row's commands per request: hundredths
        noisy = m.noisy or (base is not None and base.noisy)
        # As printed, so that a run compares with a committed one figure for figure.
        figures[row.label] = Figures(
            round(ratio, 2), round(per_request, digits), round(m.valkey_us, 1), noisy
        )
        envoy = target.startswith("envoy")
        table.append(
            f"| {row.label}{' †' if m.noisy else ''} | {m.rps:,.0f} "
            f"| {_ratio(m.rps, base.rps if base else None)} "
            f"| {'itself' if row.floor == target else rows[row.floor].label} "
            f"| {_ratio(m.rps, ceiling.rps) if envoy and ceiling else '—'} "
            f"| {per_request:.{digits}f} | {_num(m.valkey_us, 1)} | {_outcome(m)} |"
        )
    first, end = find("floor", "peak"), find("floor", END_PEAK)
    drift = end.rps / first.rps - 1 if first and end and first.rps else math.nan
    exact = None
    if baseline is not None:
        labels = exact_labels(rows)
        exact = compare_exact(figures, baseline, drift=drift, labels=labels, mode=mode.name)
    leased = [*_leased_targets(bench, rows, floor, exact), ""] if LEASED_HOT in rows else []
    lines = [
        "# Tollway benchmark",
        "",
        f"Mode **{mode.name}**: {mode.keys:,} issued keys, Zipf s={ZIPF_S} key mix; "
        f"{mode.duration:g} s measured per load after {mode.warmup:g} s of warm-up. "
        "Generated by `make bench` (bench/run.py); see bench/README.md for how to read it.",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts.items()),
        "",
        *_targets(bench, rows, floor),
        "",
        *leased,
        "## Throughput at saturation",
        "",
        "gRPC rows: ratio to the floor (the better of its two peaks). Envoy rows: ratio to "
        "Envoy + no-op authorizer with the same filters (the *floor* column names it) "
        "and to the ceiling. Valkey µs/decision: Valkey's CPU (/proc) over the allowed "
        "decisions (quota units), settlement included where the row settles. †: processes "
        f"outside the bench used over {NOISY:.0f} % of a core during that measurement (see the "
        "CPU table): noisy.",
        "",
        "| measurement | req/s | vs floor | floor | vs ceiling | Redis cmds/req "
        "| Valkey µs/decision | outcome |",
        "|---|---:|---:|---|---:|---:|---:|---|",
        *table,
    ]
    lines += _comparisons(bench, rows)
    for target, entries in bench.entries.items():
        lines += [
            "",
            f"The no-op's access-log service received {entries:,} entries from "
            f"{rows[target].label} (warm-ups included): its floor sends what the sidecar's "
            "row settles.",
        ]
    if first is not None and end is not None and first.rps:
        lines += [
            "",
            f"The floor's peak was {first.rps:,.0f} req/s at the start of the run and "
            f"{end.rps:,.0f} at the end ({end.rps / first.rps - 1:+.1%}); the ratios use the "
            "better one. That drift is the run's own noise: read ratios closer than it as equal.",
        ]
    lines += _exact_section(exact)
    lines += [
        "",
        "## Latency at fixed offered loads",
        "",
        "Offered loads are shares of the floor's peak (gRPC rows: the no-op Authorize peak; "
        "Envoy rows: the peak of Envoy + no-op with the same filters, as in the table above), "
        f"and {FIXED_RATE:,.0f} req/s for the shipped config and its floor. "
        "Latencies in ms; ratios p50 / p99 / p999 against that floor at the same offered load, "
        "and for Envoy rows against the ceiling when it ran at the same offered load (it ran at "
        f"shares of its own pair's floor). *overloaded*: achieved under {SATURATED:.0%} of "
        "offered, so the latency is queueing. †: noisy, as above.",
        "",
        "| measurement | load | offered req/s | achieved req/s | p50 | p99 | p999 "
        "| vs floor | vs ceiling | not allowed |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for target, row in rows.items():
        for m in bench.measurements:
            if m.target != target or m.offered is None:
                continue
            r = m.result
            base = find(row.floor, m.load)
            top = find(CEILING, m.load) if target.startswith("envoy") else None

            def ratios(other: Measurement | None, m: Measurement = m, r: h2load.Result = r) -> str:
                if other is None or other is m or other.offered != m.offered:
                    return "—"
                return " / ".join(_ratio(r.p(q), other.result.p(q)) for q in (50, 99, 99.9))

            note = " *overloaded*" if m.saturated else ""
            load = f"{m.load} †" if m.noisy else m.load
            lines.append(
                f"| {row.label} | {load} | {m.offered:,.0f} | {m.rps:,.0f}{note} "
                f"| {_ms(r.p(50))} | {_ms(r.p(99))} | {_ms(r.p(99.9))} "
                f"| {ratios(base)} | {ratios(top)} | {_refused(m)} |"
            )
    lines += [
        "",
        "## Hostile client",
        "",
        f"One key on plan `hostile` ({hostile['rate']:g} req/s, burst {hostile['burst']}), "
        f"drained first, then hammered at {hostile['offered']:.0f} req/s "
        f"(~{hostile['offered'] / hostile['rate']:.0f}x its limit) for {mode.hostile:g} s "
        "straight at the sidecar. Ratio: Redis commands/s (INFO commandstats delta ÷ "
        "duration, scripts' inner calls included) ÷ attack req/s.",
        "",
        "| attack req/s | allowed req/s | Redis cmds/s | cmds/s ÷ attack req/s "
        "| same ratio for allowed traffic | commands per attack request |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {hostile['rps']:,.0f} | {hostile['allowed_rps']:,.1f} | {hostile['cmds_rps']:,.0f} "
        f"| **{hostile['ratio']:.2f}** | {hostile['normal_ratio']:.2f} | {hostile['breakdown']} |",
        "",
        "## Sidecar memory",
        "",
        "| when | VmRSS | VmHWM (peak) |",
        "|---|---:|---:|",
        *(
            f"| {when} | {v['VmRSS'] / 1024:.1f} MiB | {v['VmHWM'] / 1024:.1f} MiB |"
            for when, v in rss.items()
        ),
    ]
    before, after = rss.get("before load"), rss.get("after load")
    if before and after:
        growth = (after["VmRSS"] - before["VmRSS"]) / 1024
        lines += ["", f"RSS growth over the run: {growth:+.1f} MiB."]
    lines += [
        "",
        "## CPU during the saturation runs",
        "",
        "% of one core, averaged over the measured seconds (the machine has "
        f"{os.cpu_count()} cores, so 100 x nproc is everything). *other*: processes outside "
        "the bench; a large value means the run shared the machine.",
        "",
        "| measurement | h2load | no-op server | sidecar | Envoy | Valkey | harness | other |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    used = [(row.label, m.cpu) for t, row in rows.items() if (m := find(t, "peak")) is not None]
    end = find("floor", END_PEAK)
    if end is not None:
        used.append(("floor again, at the end", end.cpu))
    if hostile.get("cpu"):
        used.append(("hostile attack", hostile["cpu"]))
    for label, c in used:
        cells = " | ".join(
            f"{c.get(name):.0f}" for name in ("h2load", "noop", "sidecar", "envoy", "valkey")
        )
        lines.append(f"| {label} | {cells} | {c.get('harness'):.0f} | {c.describe_other()} |")
    return "\n".join(lines) + "\n"


# -- the run ------------------------------------------------------------------------


def hostile_attack(bench: Bench, port: int, population: Population, mode: Mode) -> dict[str, Any]:
    bench.check_alive()
    settings = load_settings(CONFIG, {})
    plan = settings.catalog.plans["hostile"]
    rate, burst = float(plan.rate.per_second), int(plan.burst)
    offered = 10 * rate
    body = WORK / "hostile.bin"
    body.write_bytes(authorize_body(population.hostile_key))
    url = f"http://127.0.0.1:{port}{AUTHORIZE_PATH}"
    # Drain its bucket first; the attack then finds it refilling at `rate` only.
    h2load.run(
        [h2load.Load(url=url, body_file=body, headers=GRPC_HEADERS, streams=8, requests=4 * burst)]
    )
    counters = bench.counters
    used_before = counters.used([population.hostile_customer])
    commands_before = counters.commands()
    with cpu_meter(bench.pids) as cpu:
        result = h2load.run(
            [
                h2load.Load(
                    url=url,
                    body_file=body,
                    headers=GRPC_HEADERS,
                    streams=FIXED_STREAMS,
                    duration=mode.hostile,
                    rps=offered,
                    log_file=WORK / "h2load-hostile.log",
                )
            ]
        )
    commands = command_delta(commands_before, counters.commands())
    allowed = counters.used([population.hostile_customer]) - used_before
    seconds = mode.hostile
    if allowed > 1.5 * rate * seconds + burst:
        raise RuntimeError(f"hostile key was not limited: {allowed} allowed in {seconds:g} s")
    total = sum(commands.values())
    requests = max(result.requests, 1)
    normal = bench.find("sidecar", "peak")
    normal_ratio = (
        sum(normal.commands.values()) / normal.result.requests
        if normal and normal.result.requests
        else math.nan
    )
    top = sorted(commands.items(), key=lambda kv: -kv[1])[:6]
    say(f"hostile: {result.rps:.0f} req/s, {total / seconds:.0f} Redis cmds/s, {allowed} allowed")
    return {
        "rate": rate,
        "burst": burst,
        "offered": offered,
        "rps": result.rps,
        "allowed_rps": allowed / seconds,
        "cmds_rps": total / seconds,
        "ratio": (total / seconds) / max(result.rps, 1e-9),
        "normal_ratio": normal_ratio,
        "breakdown": ", ".join(f"{name} {calls / requests:.2f}" for name, calls in top) or "none",
        "cpu": cpu,
    }


def sidecar_config(settlement: str) -> Path:
    """bench/tollway-bench.toml with `[envoy] settlement` set to what the Envoy config
    it answers settles with (as deploy/tollway.toml pairs with deploy/envoy.yaml)."""
    path = WORK / f"{CONFIG.stem}-settlement-{settlement}.toml"
    path.write_text(CONFIG.read_text() + f'\n[envoy]\nsettlement = "{settlement}"\n')
    return path


def start_sidecar(settlement: str, redis_url: str, name: str = "sidecar") -> Authorizer:
    """A sidecar settling with settlement, with its gRPC port and HTTP ext_authz port."""
    grpc_port, http_port = harness.free_port(), harness.free_port()
    child = harness.start_sidecar(
        sidecar_config(settlement),
        redis_url=redis_url,
        port=grpc_port,
        log=WORK / f"{name}.log",
        http_port=http_port,
    )
    return Authorizer(child, grpc_port, http_port)


def start_noop_authorizer(*, settles: bool, name: str = "noop") -> Authorizer:
    grpc_port, http_port = harness.free_port(), harness.free_port()
    child = start_noop(grpc_port, http_port=http_port, settles=settles, name=name)
    return Authorizer(child, grpc_port, http_port)


# An Envoy row's keys, the order they are sent in (indexes into the keys), and
# the accounts whose quota counts its allowed decisions.
Workload = tuple[Sequence[str], Sequence[int], Sequence[str]]
HOT_URIS: Final = 1_000  # lines of the hot key's URI file (all the same)


@dataclass
class EnvoyRun:
    """What every Envoy row needs: the keys, and the authorizers started for the run."""

    bench: Bench
    population: Population
    order: list[int]  # the key of each request through Envoy (Zipf ranks)
    bad_key: str
    redis_url: str
    noop: Authorizer  # answers with no settlement fields
    sidecar: Authorizer  # settles with `settlement`
    settlement: str

    def row(
        self,
        name: str,
        p: Planned,
        authorizer: Authorizer,
        *,
        real: bool,
        peak_of: float | None,
        authz: bool = True,
        workload: Workload | None = None,
        shares: bool | None = None,
        quiet: float = 0.0,
    ) -> float:
        """One Envoy row: p's config asking authorizer (real: the sidecar), checked,
        then loaded; returns its peak. workload: the keys, the order they are sent in
        and the accounts counted (default: the exact population's Zipf mix); shares:
        latency at shares of peak_of (default: as p says); quiet: seconds without load
        before it."""
        api_keys, order, customers = workload or (
            self.population.api_keys,
            self.order,
            self.population.customers,
        )
        listen, admin = harness.free_port(), harness.free_port()
        config = envoy_config.render(
            p.config.text,
            listen=listen,
            admin=admin,
            grpc=authorizer.grpc,
            http=authorizer.http,
            authz=authz,
            authz_only=p.pair.authz_only,
        )
        envoy = start_envoy(name, config, admin)
        try:
            with self.bench.playing("envoy", envoy):
                check_envoy(
                    listen,
                    api_keys[0],
                    self.bad_key,
                    authz=authz,
                    authz_denies=real and authz,
                    ext_proc=EXT_PROC in p.shape.filters,
                    admin=admin,
                )
                uris = WORK / f"uris-{name}.txt"
                base = f"http://127.0.0.1:{listen}"
                uris.write_text("\n".join(envoy_uris(base, api_keys, order)) + "\n")
                counted = customers if real and authz else ()
                return self.bench.curve(
                    envoy_target(name, uris, counted, quiet=quiet),
                    peak_of,
                    shares=p.shares if shares is None else shares,
                    rates=p.rates if authz else (),
                )
        finally:
            envoy.stop()

    def pair(self, p: Planned) -> None:
        """p's rows: behind a no-op answering as p's settlement needs (its floor), the
        ceiling when p is its pair, and behind a sidecar settling as p's config does."""
        bench = self.bench
        own_noop: Authorizer | None = None
        with ExitStack() as stack:
            noop, sidecar = self.noop, self.sidecar
            if p.shape.settlement != "none":
                noop = own_noop = start_noop_authorizer(settles=True, name=f"noop-{p.name}")
                stack.callback(own_noop.child.stop)
                stack.enter_context(bench.playing("noop", own_noop.child))
            if p.shape.settlement != self.settlement:
                sidecar = start_sidecar(p.shape.settlement, self.redis_url, f"sidecar-{p.name}")
                stack.callback(sidecar.child.stop)
                stack.enter_context(bench.playing("sidecar", sidecar.child))
            floor = pair_row(p.name, "noop")
            peak = self.row(floor, p, noop, real=False, peak_of=None)
            if p.name == CEILING_PAIR:  # the sidecar asked, and must see nothing
                self.row(CEILING, p, sidecar, real=False, peak_of=peak, authz=False)
            self.row(pair_row(p.name, "sidecar"), p, sidecar, real=True, peak_of=peak)
        if own_noop is not None and p.shape.settlement == "access_log":
            bench.entries[floor] = access_log_entries(own_noop.child.log)

    def leased_hot(self, p: Planned, leased: Leased) -> None:
        """Issue #14's Envoy row: p's config (the shipped one) behind a sidecar settling
        as it does, every request the leased hot key's; peak and p's fixed rates."""
        with ExitStack() as stack:
            sidecar = self.sidecar
            if p.shape.settlement != self.settlement:
                sidecar = start_sidecar(p.shape.settlement, self.redis_url, "sidecar-leased")
                stack.callback(sidecar.child.stop)
                stack.enter_context(self.bench.playing("sidecar", sidecar.child))
            floor = self.bench.find(pair_row(p.name, "noop"), "peak")
            hot = ([leased.hot_key], [0] * HOT_URIS, [leased.hot_customer])
            self.row(
                LEASED_ENVOY,
                p,
                sidecar,
                real=True,
                peak_of=floor.rps if floor else None,
                workload=hot,
                shares=False,
                quiet=QUIET,
            )


def leased_rows(envoy: EnvoyRun, planned: Sequence[Planned], leased: Leased) -> None:
    """Issue #14's rows, at saturation, asking the run's no-op and sidecar: Authorize
    with the hot key (the exact row's h2load processes, each posting it), the Zipf
    mix through bench/grpc_load.py behind the no-op (its floor) and the sidecar,
    then the shipped Envoy config with the hot key."""
    bench, noop, sidecar = envoy.bench, envoy.noop, envoy.sidecar
    hot = WORK / "authorize-leased-hot.bin"
    hot.write_bytes(authorize_body(leased.hot_key))
    bodies = [hot] * GRPC_PROCESSES
    hot_target = grpc_target(LEASED_HOT, sidecar.grpc, bodies, [leased.hot_customer], quiet=QUIET)
    bench.measure(hot_target, "peak", None)
    mix = WORK / "authorize-leased-zipf.bin"
    mix.write_bytes(b"".join(authorize_body(leased.api_keys[rank]) for rank in envoy.order))
    bench.measure(grpc_load_target(ZIPF_FLOOR, noop.grpc, mix), "peak", None)
    bench.measure(grpc_load_target(LEASED_ZIPF, sidecar.grpc, mix, leased.customers), "peak", None)
    for p in planned:
        if p.is_(SHIPPED):
            envoy.leased_hot(p, leased)


def prepare(work: Path, budget: int) -> None:
    """Signals and a watchdog (budget seconds) end the run cleanly; work starts empty."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, _interrupt)
    signal.alarm(budget)  # a watchdog over the whole run: stop, clean up, exit
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)


@dataclass(frozen=True)
class Valkey:
    url: str
    client: redis.Redis  # decode_responses
    pid: int
    version: str


def start_valkey(stack: ExitStack, work: Path) -> Valkey:
    """The run's embedded Valkey (stopped with stack), in memory only."""
    server = harness.start_valkey(work / "valkey", persist=False)
    stack.callback(server.stop)
    client = redis.Redis.from_url(server.connection_url, decode_responses=True)
    stack.callback(client.close)
    info: dict[str, Any] = client.info("server")
    version = str(info.get("valkey_version") or info.get("redis_version"))
    return Valkey(server.connection_url, client, int(info["process_id"]), version)


def config_facts(configs: dict[str, envoy_config.Config], missing: Sequence[str]) -> str:
    """What each Envoy config of the run is and runs."""
    parts = []
    for role, c in configs.items():
        filters = ", ".join(_short(name) for name in c.shape.filters)
        parts.append(f"{role}: {c.file} ({c.shape.describe()}; filters {filters})")
    parts += [f"{name}: missing, its rows skipped" for name in missing]
    return "; ".join(parts)


def committed_report() -> str | None:
    """bench/results/latest.md as committed (HEAD): the run before this one's changes."""
    path = (RESULTS / "latest.md").relative_to(REPO_ROOT)
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"HEAD:{path}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and done.stdout else None


def main() -> int:
    mode = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    if shutil.which("h2load") is None:
        print("bench: h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    prepare(WORK, mode.budget)
    started = time.monotonic()
    baseline = committed_report()  # read now: the run overwrites the working copy
    say(f"mode {mode.name}; logs in {WORK.relative_to(REPO_ROOT)}")

    with ExitStack() as stack:
        valkey = start_valkey(stack, WORK)
        client = valkey.client
        facts = machine_facts(valkey.version)
        pids = {"valkey": valkey.pid}

        configs, missing = envoy_config.load_configs()
        planned = envoy_config.plan(configs)
        rows = with_leased({**GRPC_ROWS, **envoy_rows(planned)}, mode.keys)
        facts["Envoy configs"] = config_facts(configs, missing)
        # The sidecar of the gRPC rows settles as the shipped config needs.
        settlement = configs[SHIPPED].shape.settlement if SHIPPED in configs else "none"
        t0 = time.monotonic()
        population = create_population(client, valkey.url, mode.keys)
        leased = create_leased(client, valkey.url, mode.keys)
        say(
            f"{mode.keys:,} accounts and keys issued on each of plans bench and {LEASED_PLAN} "
            f"in {time.monotonic() - t0:.1f} s"
        )

        noop = start_noop_authorizer(settles=False)
        stack.callback(noop.child.stop)
        sidecar = start_sidecar(settlement, valkey.url)
        stack.callback(sidecar.child.stop)
        pids |= {"noop": pid_of(noop.child), "sidecar": pid_of(sidecar.child)}
        check_authorize(noop.grpc, population.api_keys[0], pb.REASON_OK)
        check_authorize(sidecar.grpc, population.api_keys[0], pb.REASON_OK)
        check_authorize(sidecar.grpc, leased.hot_key, pb.REASON_OK)
        rss = {"before load": rss_kib(pids["sidecar"])}

        zipf = ZipfSampler(len(population.api_keys), ZIPF_S, seed=5)
        ranks = zipf.distinct(GRPC_PROCESSES)  # one key per h2load process
        bodies = []
        for i, rank in enumerate(ranks):
            body = WORK / f"authorize-{i}.bin"
            body.write_bytes(authorize_body(population.api_keys[rank]))
            bodies.append(body)
        order = zipf.sample(URIS_PER_FILE)  # the key of each request through Envoy

        bench = Bench(mode, Counters(client), pids)
        bench.children |= {"noop": noop.child, "sidecar": sidecar.child}
        floor_peak = bench.curve(grpc_target("floor", noop.grpc, bodies))
        grpc_customers = [population.customers[rank] for rank in ranks]
        bench.curve(grpc_target("sidecar", sidecar.grpc, bodies, grpc_customers), floor_peak)

        envoy = EnvoyRun(
            bench, population, order, keys.generate("test"), valkey.url, noop, sidecar, settlement
        )
        for p in planned:
            envoy.pair(p)
        # Issue #14's rows, after every exact one: those ran as they did before.
        leased_rows(envoy, planned, leased)

        hostile = hostile_attack(bench, sidecar.grpc, population, mode)
        rss["after load"] = rss_kib(pids["sidecar"])

        # The floor once more: how far did the machine drift during the run?
        bench.measure(grpc_target("floor", noop.grpc, bodies), END_PEAK, None)

    text = report(bench, rows, facts, mode, hostile, rss, baseline)
    text += f"\nWhole run: {time.monotonic() - started:.0f} s.\n"
    (RESULTS / "latest.md").write_text(text)
    print(text)
    return 0


def run_main(main: Callable[[], int]) -> None:
    """Exits with main()'s status; Ctrl-C (everything started is stopped by then) is 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
