"""`make bench`: Tollway's cost, as ratios to a floor measured in the same run.

    python -m bench.run                 # full, ~7-9 minutes
    BENCH_QUICK=1 python -m bench.run   # smoke, ~1 minute

Everything runs on loopback: an embedded Valkey holding 10,000 issued keys, the
real sidecar (`python -m sidecar serve`), a no-op gRPC server with the
sidecar's grpcio setup (the floor, bench/noop_server.py), Envoy in three
variants and h2load as the load generator. Every phase is bounded by h2load's
own --duration plus a hard kill; every process is stopped on exit, Ctrl-C and
SIGTERM included. The table goes to bench/results/latest.md and stdout; logs
to bench/results/work.tmp/.
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
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, Final

import grpc
import redis

from bench import envoy_config, h2load
from bench.noop_server import ALLOW_AUTHORIZE
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


def start_noop(port: int) -> harness.Child:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "bench.noop_server", "--listen", f"127.0.0.1:{port}"]
    child = harness.Child("noop", argv, WORK / "noop.log", env)
    harness.wait_until(lambda: harness.tcp_open(port), "noop server", 30, child)
    return child


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
    names = sorted({str(n) for i in ids for n in client.scan_iter(match=f"*{{{i}}}*")})
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


def create_population(
    client: redis.Redis, redis_url: str, count: int, *, prefix: str = "cus_bench"
) -> Population:
    """count accounts on plan "bench" with one key each, plus the hostile one on
    plan "hostile"; customer ids are prefix + a number.

    The first account and the hostile one are written by the Store; the others
    are copies of the first (its Redis keys, fields and values, with the
    customer id, key hash and key id swapped), sent in pipelines of
    POPULATION_BATCH accounts. One round trip per batch instead of several per
    account is what makes 1,000,000 accounts take about a minute (bench/memory.py),
    and the Store stays the one place that knows its layout. (The copies skip the
    Store's invalidation messages: no sidecar runs yet to cache anything.)
    """
    customers = [f"{prefix}{i:07d}" for i in range(count)]
    api_keys = [asyncio.run(_issue(redis_url, customers[0], "bench"))]
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
    hostile_customer = f"{prefix}_hostile"
    hostile = asyncio.run(_issue(redis_url, hostile_customer, "hostile"))
    return Population(customers, api_keys, hostile_customer, hostile)


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


@dataclass
class Target:
    """Something to load: how to build its h2load processes, what to count."""

    name: str
    loads: Callable[[float | None, float, float, Path | None], list[h2load.Load]]
    customers: Sequence[str] = ()  # whose quota to sum (empty: no counting)


def grpc_target(
    name: str, port: int, bodies: Sequence[Path], customers: Sequence[str] = ()
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

    return Target(name, loads, customers)


def envoy_target(name: str, uris: Path, customers: Sequence[str] = ()) -> Target:
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

    return Target(name, loads, customers)


class Bench:
    def __init__(self, mode: Mode, counters: Counters, pids: dict[str, int]) -> None:
        self.mode = mode
        self.counters = counters
        self.pids = pids
        self.measurements: list[Measurement] = []
        self.children: dict[str, harness.Child] = {}  # by role, as pids; checked around every load
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
        h2load.run(target.loads(offered, mode.warmup, 0.0, None), check=False)
        self.check_alive()
        used_before = self.counters.used(target.customers) if target.customers else 0
        commands_before = self.counters.commands()
        with cpu_meter(self.pids) as cpu:
            try:
                result = h2load.run(target.loads(offered, mode.duration, 0.0, log))
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

    def curve(self, target: Target, peak_of: float | None = None) -> float:
        """Saturation, then fixed loads at SHARES of peak_of (default: this peak)."""
        peak = self.measure(target, "peak", None).rps
        base = peak if peak_of is None else peak_of
        for share in SHARES:
            self.measure(target, f"{share:.0%}", share * base)
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
    listen: int, good: str, bad: str, *, authz: bool, authz_denies: bool, ext_proc: bool
) -> None:
    """The good key passes; the bad one is refused only by the real sidecar; the
    response phase runs exactly when ext_proc is in the chain and authz is on."""
    base = f"http://127.0.0.1:{listen}/v1/search?{envoy_config.KEY_QUERY_PARAM}="
    (good_status, headers), (bad_status, _) = http_get(base + good), http_get(base + bad)
    want_bad = 401 if authz_denies else 200
    if (good_status, bad_status) != (200, want_bad):
        raise RuntimeError(
            f"envoy :{listen}: good key → {good_status}, bad key → {bad_status}; "
            f"expected 200, {want_bad}"
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


LABELS: Final = {
    "floor": "floor: no-op gRPC Authorize",
    "sidecar": "sidecar Authorize (gRPC)",
    "envoy-ceiling": "Envoy, Tollway filters off (ceiling)",
    "envoy-noop": "Envoy + no-op authorizer, all Tollway filters",
    "envoy-sidecar": "Envoy + sidecar, all Tollway filters",
    "envoy-noop-authz": "Envoy + no-op authorizer, ext_authz only",
    "envoy-sidecar-authz": "Envoy + sidecar, ext_authz only",
}
# The row each row is divided by: the no-op authorizer behind the same Envoy
# filters (the ceiling: the Envoy + no-op row it was run against).
BASELINE: Final = {
    "floor": "floor",
    "sidecar": "floor",
    "envoy-ceiling": "envoy-noop",
    "envoy-noop": "envoy-noop",
    "envoy-sidecar": "envoy-noop",
    "envoy-noop-authz": "envoy-noop-authz",
    "envoy-sidecar-authz": "envoy-noop-authz",
}


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


def report(
    bench: Bench,
    facts: dict[str, str],
    mode: Mode,
    hostile: dict[str, Any],
    rss: dict[str, dict[str, int]],
) -> str:
    find = bench.find
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
        "## Throughput at saturation",
        "",
        "gRPC rows: ratio to the floor (the better of its two peaks). Envoy rows: ratio to "
        "Envoy + no-op authorizer with the same Tollway filters (the *floor* column names it) "
        "and to the ceiling. †: processes outside the bench used over "
        f"{NOISY:.0f} % of a core during that measurement (see the CPU table): noisy.",
        "",
        "| measurement | req/s | vs floor | floor | vs ceiling | Redis cmds/req | outcome |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    # Noise only ever slows a run down, so the better of the floor's two peaks
    # (start and end of the run) is its best estimate.
    floor = max(
        (m for m in (find("floor", "peak"), find("floor", END_PEAK)) if m is not None),
        key=lambda m: m.rps,
        default=None,
    )
    ceiling = find("envoy-ceiling", "peak")

    def peak(target: str) -> Measurement | None:
        return floor if target == "floor" else find(target, "peak")

    for target in LABELS:
        m = peak(target)
        if m is None:
            continue
        base = peak(BASELINE[target])
        per_request = sum(m.commands.values()) / m.result.requests if m.result.requests else 0.0
        lines.append(
            f"| {LABELS[target]}{' †' if m.noisy else ''} | {m.rps:,.0f} "
            f"| {_ratio(m.rps, base.rps if base else None)} "
            f"| {'itself' if BASELINE[target] == target else LABELS[BASELINE[target]]} "
            f"| {_ratio(m.rps, ceiling.rps) if target.startswith('envoy') and ceiling else '—'} "
            f"| {per_request:.2f} | {_outcome(m)} |"
        )
    sidecar_all, sidecar_authz = peak("envoy-sidecar"), peak("envoy-sidecar-authz")
    noop_all, noop_authz = peak("envoy-noop"), peak("envoy-noop-authz")
    if sidecar_all and sidecar_authz and noop_all and noop_authz:
        lines += [
            "",
            "What ext_proc costs (the same Envoy without deploy/envoy.yaml's other Tollway "
            f"filters): Envoy + sidecar serves {sidecar_authz.rps:,.0f} req/s with ext_authz "
            f"only and {sidecar_all.rps:,.0f} with every filter "
            f"({_ratio(sidecar_all.rps, sidecar_authz.rps)} of it); Envoy + no-op authorizer "
            f"{noop_authz.rps:,.0f} and {noop_all.rps:,.0f} "
            f"({_ratio(noop_all.rps, noop_authz.rps)}).",
        ]
    first, end = find("floor", "peak"), find("floor", END_PEAK)
    if first is not None and end is not None and first.rps:
        lines += [
            "",
            f"The floor's peak was {first.rps:,.0f} req/s at the start of the run and "
            f"{end.rps:,.0f} at the end ({end.rps / first.rps - 1:+.1%}); the ratios use the "
            "better one. That drift is the run's own noise: read ratios closer than it as equal.",
        ]
    lines += [
        "",
        "## Latency at fixed offered loads",
        "",
        "Offered loads are shares of the floor's peak (gRPC rows: the no-op Authorize peak; "
        "Envoy rows: the peak of Envoy + no-op with the same filters, as in the table above). "
        "Latencies in ms; ratios p50 / p99 / p999 against that floor at the same offered load, "
        "and for Envoy rows against the ceiling when it ran at the same offered load (it ran at "
        "shares of the all-filters floor). *overloaded*: achieved under "
        f"{SATURATED:.0%} of offered, so the latency is queueing. †: noisy, as above.",
        "",
        "| measurement | load | offered req/s | achieved req/s | p50 | p99 | p999 "
        "| vs floor | vs ceiling | not allowed |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for target in LABELS:
        for share in SHARES:
            load = f"{share:.0%}"
            m = find(target, load)
            if m is None:
                continue
            r = m.result
            base = find(BASELINE[target], load)
            top = find("envoy-ceiling", load) if target.startswith("envoy") else None

            def ratios(other: Measurement | None, m: Measurement = m, r: h2load.Result = r) -> str:
                if other is None or other is m or other.offered != m.offered:
                    return "—"
                return " / ".join(_ratio(r.p(q), other.result.p(q)) for q in (50, 99, 99.9))

            note = " *overloaded*" if m.saturated else ""
            load = f"{load} †" if m.noisy else load
            lines.append(
                f"| {LABELS[target]} | {load} | {m.offered or 0:,.0f} | {m.rps:,.0f}{note} "
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
    rows = [(LABELS[t], m.cpu) for t in LABELS if (m := find(t, "peak")) is not None]
    end = find("floor", END_PEAK)
    if end is not None:
        rows.append(("floor again, at the end", end.cpu))
    if hostile.get("cpu"):
        rows.append(("hostile attack", hostile["cpu"]))
    for label, c in rows:
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


def sidecar_config(filters: Sequence[str]) -> Path:
    """bench/tollway-bench.toml with `[envoy] ext_proc` set to whether Envoy runs
    ext_proc (as deploy/tollway.toml pairs with deploy/envoy.yaml)."""
    ext_proc = envoy_config.EXT_PROC in filters
    path = WORK / f"{CONFIG.stem}-ext-proc-{str(ext_proc).lower()}.toml"
    path.write_text(CONFIG.read_text() + f"\n[envoy]\next_proc = {str(ext_proc).lower()}\n")
    return path


@dataclass(frozen=True)
class EnvoyVariant:
    name: str  # the target's name in the report (LABELS, BASELINE)
    authorizer: str  # "noop" or "sidecar"
    authz: bool = True  # False: every Tollway filter disabled on the route (the ceiling)
    without: tuple[str, ...] = ()  # Tollway filters of deploy/envoy.yaml cut out of the chain


def envoy_variants(filters: Sequence[str]) -> list[EnvoyVariant]:
    """The Envoy rows: deploy/envoy.yaml's filters behind the no-op server, off, and
    behind the sidecar; then, when it runs more than ext_authz (ext_proc), the same
    pair with ext_authz only, so what the others cost shows."""
    variants = [
        EnvoyVariant("envoy-noop", "noop"),
        EnvoyVariant("envoy-ceiling", "sidecar", authz=False),  # the sidecar must see nothing
        EnvoyVariant("envoy-sidecar", "sidecar"),
    ]
    others = tuple(name for name in filters if name != envoy_config.EXT_AUTHZ)
    if others:
        variants += [
            EnvoyVariant("envoy-noop-authz", "noop", without=others),
            EnvoyVariant("envoy-sidecar-authz", "sidecar", without=others),
        ]
    return variants


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


def main() -> int:
    mode = QUICK if os.environ.get("BENCH_QUICK", "") not in ("", "0") else FULL
    if shutil.which("h2load") is None:
        print("bench: h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    prepare(WORK, mode.budget)
    started = time.monotonic()
    say(f"mode {mode.name}; logs in {WORK.relative_to(REPO_ROOT)}")

    with ExitStack() as stack:
        valkey = start_valkey(stack, WORK)
        client = valkey.client
        facts = machine_facts(valkey.version)
        pids = {"valkey": valkey.pid}

        template = harness.ENVOY_TEMPLATE.read_text()
        filters = envoy_config.tollway_filters(template)
        facts["Tollway filters in deploy/envoy.yaml"] = ", ".join(
            name.rsplit(".", 1)[1] for name in filters
        )
        t0 = time.monotonic()
        population = create_population(client, valkey.url, mode.keys)
        say(f"{mode.keys:,} accounts and keys issued in {time.monotonic() - t0:.1f} s")

        noop_port, sidecar_port = harness.free_port(), harness.free_port()
        noop = start_noop(noop_port)
        stack.callback(noop.stop)
        sidecar = harness.start_sidecar(
            sidecar_config(filters),
            redis_url=valkey.url,
            port=sidecar_port,
            log=WORK / "sidecar.log",
        )
        stack.callback(sidecar.stop)
        pids |= {"noop": pid_of(noop), "sidecar": pid_of(sidecar)}
        check_authorize(noop_port, population.api_keys[0], pb.REASON_OK)
        check_authorize(sidecar_port, population.api_keys[0], pb.REASON_OK)
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
        bench.children |= {"noop": noop, "sidecar": sidecar}
        floor_peak = bench.curve(grpc_target("floor", noop_port, bodies))
        grpc_customers = [population.customers[rank] for rank in ranks]
        bench.curve(grpc_target("sidecar", sidecar_port, bodies, grpc_customers), floor_peak)

        bad_key = keys.generate("test")
        peaks: dict[str, float] = {}  # each Envoy + no-op row's peak: its rows' offered loads
        for variant in envoy_variants(filters):
            name = variant.name
            kept = [f for f in filters if f not in variant.without]
            with ExitStack() as envoy_stack:
                authorizer = noop_port if variant.authorizer == "noop" else sidecar_port
                if variant.authorizer == "sidecar" and variant.without:
                    # A sidecar of its own, configured for the filters this Envoy runs.
                    authorizer = harness.free_port()
                    own = harness.start_sidecar(
                        sidecar_config(kept),
                        redis_url=valkey.url,
                        port=authorizer,
                        log=WORK / f"sidecar-{name}.log",
                    )
                    envoy_stack.callback(own.stop)
                    envoy_stack.enter_context(bench.playing("sidecar", own))
                listen, admin = harness.free_port(), harness.free_port()
                config = envoy_config.render(
                    template,
                    listen=listen,
                    admin=admin,
                    authorizer=authorizer,
                    authz=variant.authz,
                    without=variant.without,
                )
                envoy = start_envoy(name, config, admin)
                envoy_stack.callback(envoy.stop)
                envoy_stack.enter_context(bench.playing("envoy", envoy))
                real_sidecar = variant.authorizer == "sidecar" and variant.authz
                check_envoy(
                    listen,
                    population.api_keys[0],
                    bad_key,
                    authz=variant.authz,
                    authz_denies=real_sidecar,
                    ext_proc=envoy_config.EXT_PROC in kept,
                )
                uris = WORK / f"uris-{name}.txt"
                base = f"http://127.0.0.1:{listen}"
                uris.write_text("\n".join(envoy_uris(base, population.api_keys, order)) + "\n")
                counted = population.customers if real_sidecar else ()
                peak = bench.curve(envoy_target(name, uris, counted), peaks.get(BASELINE[name]))
                peaks.setdefault(name, peak)

        hostile = hostile_attack(bench, sidecar_port, population, mode)
        rss["after load"] = rss_kib(pids["sidecar"])

        # The floor once more: how far did the machine drift during the run?
        bench.measure(grpc_target("floor", noop_port, bodies), END_PEAK, None)

    text = report(bench, facts, mode, hostile, rss)
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
