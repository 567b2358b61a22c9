"""`make bench-memory`: the sidecar's memory while 1,000,000 distinct keys are touched.

    python -m bench.memory        # 1,000,000 keys; 30 s of warm-up, then 600 s measured
    BENCH_MEMORY_KEYS=100000 BENCH_MEMORY_SECONDS=60 python -m bench.memory   # a short try

Issue #5 asks for the sidecar's RSS to stay flat (< 10 % growth) across a
10-minute run with 1,000,000 distinct issued keys touched. An embedded Valkey
gets BENCH_MEMORY_KEYS accounts with one key each (bench.run.create_population,
timed); the real sidecar serves them; bench/grpc_load.py asks Authorize for
every key in a shuffled order, starting over if it gets through them all,
from BENCH_MEMORY_CLIENTS processes (default 1) with STREAMS calls in flight
each. That client is Python (grpc.aio, requests pre-encoded), not h2load,
which sends one body per process: throughput is not what this run measures.
Every SAMPLE_EVERY seconds the sidecar's VmRSS (/proc/<pid>/status), Valkey's
used_memory and what the load processes counted so far are sampled. The report goes to
bench/results/memory.md and stdout, logs to bench/results/memory.tmp/. A
watchdog bounds the run, and everything it starts is stopped on exit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from bench.grpc_load import Tally, read_tally
from bench.run import (
    CONFIG,
    REPO_ROOT,
    RESULTS,
    Counters,
    CpuUse,
    Population,
    check_authorize,
    cpu_meter,
    create_population,
    machine_facts,
    pid_of,
    prepare,
    rss_kib,
    run_main,
    say,
    start_valkey,
)
from bench.workload import authorize_body
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from tests import harness

WORK: Final = RESULTS / "memory.tmp"  # gitignored (bench/results/*.tmp)
REPORT: Final = RESULTS / "memory.md"
WARMUP: Final = 30.0  # seconds of load before the "start" sample
SAMPLE_EVERY: Final = 10.0
STREAMS: Final = 32  # calls in flight per load process: enough to keep the sidecar busy
GRACE: Final = 30.0  # seconds a load process may run past its end before it is stopped
TARGET_GROWTH: Final = 0.10  # issue #5: RSS growth under 10 %
SEED: Final = 5


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the load processes were started
    rss_kib: int  # the sidecar's VmRSS
    hwm_kib: int  # and its VmHWM (peak RSS so far)
    valkey_bytes: int  # Valkey's used_memory
    answered: int  # Authorize calls answered so far (the load processes' counts)
    distinct: int  # distinct keys allowed at least once so far


@dataclass
class MemoryRun:
    keys: int
    seconds: float  # measured, after WARMUP
    clients: int
    population_seconds: float
    valkey_populated: int  # used_memory once every account exists, before any load
    idle_kib: int  # sidecar VmRSS before the load
    samples: list[Sample] = field(default_factory=list)
    tallies: list[Tally] = field(default_factory=list)
    touched_in_valkey: int = 0  # accounts whose quota counter moved
    allowed_in_valkey: int = 0  # the sum of those counters
    cpu: CpuUse = field(default_factory=CpuUse)

    @property
    def start(self) -> Sample:
        """The first sample after the warm-up."""
        return next((s for s in self.samples if s.seconds >= WARMUP), self.samples[-1])

    @property
    def measured(self) -> list[Sample]:
        return [s for s in self.samples if s.seconds >= self.start.seconds]


def _setting(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default


def write_bodies(population: Population, clients: int) -> list[Path]:
    """Every key's request, in one shuffled order dealt out to the load processes,
    so together they touch each key once before any touches one twice."""
    order = list(range(len(population.api_keys)))
    random.Random(SEED).shuffle(order)
    paths = []
    for j in range(clients):
        path = WORK / f"bodies-{j}.bin"
        path.write_bytes(
            b"".join(authorize_body(population.api_keys[i]) for i in order[j::clients])
        )
        paths.append(path)
    return paths


def sample(counters: Counters, pid: int, started: float, results: list[Path]) -> Sample:
    rss = rss_kib(pid)
    memory = counters.client.info("memory")
    # Up to a second old (grpc_load rewrites them every second); absent before the first.
    tallies = [read_tally(path) for path in results if path.exists()]
    return Sample(
        seconds=time.monotonic() - started,
        rss_kib=rss["VmRSS"],
        hwm_kib=rss["VmHWM"],
        valkey_bytes=int(memory["used_memory"]),
        answered=sum(t.requests for t in tallies),
        distinct=sum(t.distinct_allowed for t in tallies),
    )


def drive(
    stack: ExitStack,
    run: MemoryRun,
    bodies: list[Path],
    port: int,
    sidecar: harness.Child,
    counters: Counters,
) -> list[Path]:
    """Starts a load process per bodies file and samples until they end; returns
    their result files."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    results, loads = [], []
    for j, path in enumerate(bodies):
        result = WORK / f"load-{j}.json"
        argv = [sys.executable, "-m", "bench.grpc_load", "--target", f"127.0.0.1:{port}"]
        argv += ["--bodies", str(path), "--seconds", f"{WARMUP + run.seconds:g}"]
        argv += ["--streams", str(STREAMS), "--result", str(result)]
        load = harness.Child(f"load-{j}", argv, WORK / f"load-{j}.log", env)
        stack.callback(load.stop)
        results.append(result)
        loads.append(load)
    started = time.monotonic()
    overdue = started + WARMUP + run.seconds + GRACE
    while True:
        run.samples.append(s := sample(counters, pid_of(sidecar), started, results))
        say(
            f"{s.seconds:4.0f} s: sidecar RSS {s.rss_kib / 1024:.1f} MiB, {s.answered:,} answered, "
            f"{s.distinct:,} keys allowed, Valkey {s.valkey_bytes / 2**20:,.0f} MiB"
        )
        if sidecar.process.poll() is not None:
            raise RuntimeError(
                f"the sidecar exited ({sidecar.process.returncode}); see {sidecar.log}"
            )
        running = [load for load in loads if load.process.poll() is None]
        if not running:
            return results
        if time.monotonic() > overdue:  # stopped, they still write what they counted
            say("load processes still running past their end: stopping them")
            for load in running:
                load.stop()
            continue
        next_at = started + len(run.samples) * SAMPLE_EVERY
        while time.monotonic() < next_at and any(load.process.poll() is None for load in loads):
            time.sleep(0.2)


# -- the report ---------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def report(run: MemoryRun, facts: dict[str, str]) -> str:
    start, end = run.start, run.samples[-1]
    top = max(run.measured, key=lambda s: s.rss_kib)
    growth = end.rss_kib / start.rss_kib - 1
    requests = sum(t.requests for t in run.tallies)
    allowed = sum(t.allowed for t in run.tallies)
    denied = sum(t.denied for t in run.tallies)
    errors: dict[str, int] = {}
    for tally in run.tallies:
        for code, count in tally.errors.items():
            errors[code] = errors.get(code, 0) + count
    distinct = sum(t.distinct_allowed for t in run.tallies)
    load_seconds = max((t.seconds for t in run.tallies), default=end.seconds)
    rate = requests / load_seconds if load_seconds else 0.0
    window = end.seconds - start.seconds
    measured_rate = (end.answered - start.answered) / window if window > 0 else 0.0
    needed = run.keys / (WARMUP + run.seconds)
    verdict = "met" if growth < TARGET_GROWTH else "**not met**"
    # Means over each half of the window: a trend, where single samples catch
    # whatever point of a cycle (a cache emptied when full) they happen to.
    half = max(len(run.measured) // 2, 1)
    early = sum(s.rss_kib for s in run.measured[:half]) / half
    late_samples = run.measured[half:] or run.measured
    late = sum(s.rss_kib for s in late_samples) / len(late_samples)
    trend = late / early - 1
    lines = [
        f"# Tollway sidecar memory: {run.keys:,} keys",
        "",
        f"{run.keys:,} accounts on plan `bench`, one key each; Authorize asked for each key in "
        f"a shuffled order for {WARMUP:g} s of warm-up then {run.seconds:g} s measured, the "
        f"sidecar's VmRSS sampled every {SAMPLE_EVERY:g} s. Generated by `make bench-memory` "
        "(bench/memory.py); see bench/README.md.",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts.items()),
        "",
        "## Result",
        "",
        "| | value |",
        "|---|---:|",
        f"| sidecar RSS at start (after the {WARMUP:g} s warm-up, t = {start.seconds:.0f} s) "
        f"| {_mib(start.rss_kib)} |",
        f"| max (t = {top.seconds:.0f} s) | {_mib(top.rss_kib)} |",
        f"| end (t = {end.seconds:.0f} s) | {_mib(end.rss_kib)} |",
        f"| **growth**, start to end (target < {TARGET_GROWTH:.0%}: {verdict}) "
        f"| **{growth:+.1%}** |",
        f"| growth, start to max | {top.rss_kib / start.rss_kib - 1:+.1%} |",
        f"| mean RSS, first half of the window → second half | {_mib(early)} → {_mib(late)} "
        f"({trend:+.1%}) |",
        f"| VmHWM (peak) at the end | {_mib(end.hwm_kib)} |",
        f"| RSS before the load (idle, every account issued) | {_mib(run.idle_kib)} |",
        f"| distinct keys allowed at least once (load client) | {distinct:,} of {run.keys:,} "
        f"({distinct / run.keys:.1%}) |",
        f"| accounts whose quota counter moved (Valkey) | {run.touched_in_valkey:,} |",
        f"| Authorize calls answered | {requests:,} ({allowed:,} allowed, {denied:,} denied, "
        f"{sum(errors.values()):,} errors{_errors(errors)}) |",
        f"| quota units counted in Valkey | {run.allowed_in_valkey:,} |",
        f"| rate, whole load | {rate:,.0f} req/s over {load_seconds:.0f} s |",
        f"| rate, measured window | {measured_rate:,.0f} req/s |",
        f"| Valkey used_memory: populated, start, end | {run.valkey_populated / 2**20:,.0f} / "
        f"{start.valkey_bytes / 2**20:,.0f} / {end.valkey_bytes / 2**20:,.0f} MiB |",
        f"| population: {run.keys:,} accounts and keys written | {run.population_seconds:.1f} s |",
        "",
        f"Load: bench/grpc_load.py, a Python grpc.aio client ({run.clients} process"
        f"{'es' if run.clients > 1 else ''} x {STREAMS} calls in flight, requests pre-encoded), "
        "not h2load, which sends one body per process. CPU over the load, % of one core: "
        f"sidecar {run.cpu.get('sidecar'):.0f}, load client {run.cpu.get('h2load'):.0f}, "
        f"Valkey {run.cpu.get('valkey'):.0f}, harness {run.cpu.get('harness'):.0f}, "
        f"other {run.cpu.describe_other()} (the machine has {os.cpu_count()} cores).",
        "",
    ]
    if distinct < run.keys:
        lines.append(
            f"Coverage: touching all {run.keys:,} keys in {WARMUP + run.seconds:g} s needs "
            f"{needed:,.0f} req/s; the sidecar answered {rate:,.0f} req/s on this machine, so "
            f"{distinct:,} distinct keys ({distinct / run.keys:.1%}) were touched."
        )
    else:
        lines.append(f"Coverage: every one of the {run.keys:,} keys was touched at least once.")
    lines.append("")
    if growth >= TARGET_GROWTH and trend < TARGET_GROWTH / 4:
        lines += [
            f"RSS grew {growth:+.1%} from the start sample to the end, but its mean moved "
            f"{trend:+.1%} between the two halves of the window: it levelled off, so what grew "
            "is bounded and filled during the first minutes (one sample is a point of whatever "
            "cycle the timeline shows; a sawtooth is something emptied when full), not state "
            "kept for every key.",
            "",
        ]
    elif growth >= TARGET_GROWTH:
        new_keys = max(end.distinct - start.distinct, 1)
        lines += [
            f"RSS grew {_mib(end.rss_kib - start.rss_kib)} while {new_keys:,} keys were touched "
            f"for the first time ({(end.rss_kib - start.rss_kib) * 1024 / new_keys:,.0f} bytes "
            f"per new key), and its mean still moved {trend:+.1%} between the two halves of the "
            "window: something in the sidecar keeps state per key or per account.",
            "",
        ]
    lines += [
        "## Timeline",
        "",
        "Answered and keys allowed: the load processes' counts (up to a second older than the "
        "RSS next to them); keys allowed counts each key once.",
        "",
        "| t (s) | sidecar VmRSS | vs start | Valkey used_memory | answered | keys allowed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in run.samples:
        vs_start = f"{s.rss_kib / start.rss_kib - 1:+.1%}" if s.seconds >= start.seconds else "—"
        lines.append(
            f"| {s.seconds:.0f} | {_mib(s.rss_kib)} | {vs_start} "
            f"| {s.valkey_bytes / 2**20:,.0f} MiB | {s.answered:,} | {s.distinct:,} |"
        )
    return "\n".join(lines) + "\n"


def _errors(errors: dict[str, int]) -> str:
    return ": " + ", ".join(f"{code} {n:,}" for code, n in sorted(errors.items())) if errors else ""


# -- the run ------------------------------------------------------------------------


def _drop_bulk() -> None:
    shutil.rmtree(WORK / "valkey", ignore_errors=True)
    for bodies in WORK.glob("bodies-*.bin"):
        bodies.unlink()


def main() -> int:
    keys_count = int(_setting("BENCH_MEMORY_KEYS", 1_000_000))
    seconds = _setting("BENCH_MEMORY_SECONDS", 600)
    clients = int(_setting("BENCH_MEMORY_CLIENTS", 1))
    # Population (~1 min per million keys on 2 cores), the load, the final count.
    prepare(WORK, int(WARMUP + seconds + GRACE + 300 + keys_count / 5_000))
    began = time.monotonic()
    say(
        f"{keys_count:,} keys, {WARMUP:g} + {seconds:g} s of load; logs in "
        f"{WORK.relative_to(REPO_ROOT)}"
    )

    with ExitStack() as stack:
        # Runs last, once Valkey has stopped: its files and the request bodies are
        # hundreds of MB at a million keys; the logs and samples stay.
        stack.callback(_drop_bulk)
        valkey = start_valkey(stack, WORK)
        facts = machine_facts(valkey.version)
        t0 = time.monotonic()
        population = create_population(valkey.client, valkey.url, keys_count)
        populated = time.monotonic() - t0
        say(f"{keys_count:,} accounts and keys issued in {populated:.1f} s")
        counters = Counters(valkey.client)
        bodies = write_bodies(population, clients)

        port = harness.free_port()
        sidecar = harness.start_sidecar(
            CONFIG, redis_url=valkey.url, port=port, log=WORK / "sidecar.log"
        )
        stack.callback(sidecar.stop)
        # The hostile account answers for the sidecar: the bench keys stay untouched.
        check_authorize(port, population.hostile_key, pb.REASON_OK)
        run = MemoryRun(
            keys=keys_count,
            seconds=seconds,
            clients=clients,
            population_seconds=populated,
            valkey_populated=int(valkey.client.info("memory")["used_memory"]),
            idle_kib=rss_kib(pid_of(sidecar))["VmRSS"],
        )
        with cpu_meter({"sidecar": pid_of(sidecar), "valkey": valkey.pid}) as cpu:
            results = drive(stack, run, bodies, port, sidecar, counters)
        run.cpu = cpu
        for path in results:
            if not path.exists():
                raise RuntimeError(f"no result in {path}: see {path.with_suffix('.log')}")
            run.tallies.append(read_tally(path))
        used = counters.quota_used(population.customers)
        run.touched_in_valkey = sum(1 for units in used if units)
        run.allowed_in_valkey = sum(used)

    (WORK / "samples.json").write_text(json.dumps([asdict(s) for s in run.samples]))
    text = report(run, facts)
    text += f"\nWhole run: {time.monotonic() - began:.0f} s.\n"
    REPORT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
