"""The scaling bench's own pieces (bench/scaling.py): which accounts it loads,
whose CPU it counts, and the table it writes. No load runs here;
`make bench-scaling` is the measurement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from redis.crc import key_slot

from bench import h2load, scaling
from bench.run import CpuUse


def test_loaded_accounts_spread_evenly_over_every_master_count() -> None:
    for masters in (1, 2, 3):
        customers = scaling.spread_customers(masters)
        assert len(customers) == scaling.ACCOUNTS == 6
        shards = [key_slot(c.encode()) * masters // 16384 for c in customers]
        assert sorted(shards) == sorted(list(range(masters)) * (6 // masters))
    assert len(set(scaling.spread_customers(0))) == 6


def test_the_sidecars_cpu_includes_every_worker_process() -> None:
    """`tollway serve --workers 2` is a supervisor and two workers: all are counted."""
    code = (
        "import subprocess, sys, time; [subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(30)']) for _ in range(2)]; time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while len(scaling.descendants(parent.pid)) < 3:
            assert time.monotonic() < deadline, "the child processes never started"
            time.sleep(0.05)
        found = scaling.descendants(parent.pid)
        assert found[0] == parent.pid and len(found) == 3
    finally:
        for pid in scaling.descendants(parent.pid)[1:]:
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def row(label: str, workers: int, masters: int, rps: float, sidecar: float) -> scaling.Row:
    cpu = CpuUse(percent={"sidecar-0": sidecar, "valkey-0": 20.0, "h2load": 10.0, "other": 5.0})
    n = int(rps * 10)
    summary = h2load.Summary(10.0, rps, n, n, n, 0, 0, 0, (n, 0, 0, 0), 0, 0, 0)
    result = h2load.Result([summary])
    idle = CpuUse(percent={"sidecar-0": 1.0, "valkey-0": 5.0})
    return scaling.Row(
        scaling.Setup(label, workers, masters), result.rps, result.requests, 1.0, 10.0, cpu, idle
    )


def test_cpu_per_request_is_cpu_seconds_over_requests() -> None:
    # 2,000 req/s for 10 s with the sidecar at 100 % of a core: 500 µs each.
    measured = row("1 worker, 1 Valkey", 1, 0, 2000.0, 100.0)
    assert measured.micros_per_request("sidecar") == 500.0
    assert measured.micros_per_request("valkey") == 100.0
    # Valkey at 5 % of a core with no load: 15 % of the 20 % grows with the load.
    assert measured.micros_per_request("valkey", marginal=True) == 75.0


def test_the_report_gives_each_setup_its_ratio_to_the_first() -> None:
    rows = [
        row("1 worker, 1 Valkey", 1, 0, 2000.0, 100.0),
        row("2 workers, 1 Valkey", 2, 0, 3000.0, 180.0),
        row("1 worker, cluster of 3 masters", 1, 3, 1500.0, 100.0),
    ]
    text = scaling.report(rows, {"nproc": "2"}, scaling.QUICK)
    assert "| 2 workers, 1 Valkey | 3,000 | 1.50 | 100.0% | 180 | 20 | 10 | 5 |" in text
    assert "| 1 worker, cluster of 3 masters | 1,500 | 0.75 |" in text
    assert "| 1 worker, 1 Valkey | 500 | 2,000 | 1.0 | 100.0 | 75.0 | 13,333 | 5.0 |" in text
    assert "| nproc | 2 |" in text
