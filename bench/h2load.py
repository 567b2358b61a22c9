"""Running h2load and reading what it says.

One `Load` is one h2load process. Several run at once when the request body
must differ (h2load posts one file per process). Every run is bounded: h2load's
own --duration, and a hard timeout after which the processes are killed.

Latency percentiles come from --log-file (one line per request: start time in
µs, HTTP status, µs until the end of the response); h2load leaves the warm-up
out of the log, its request counts and req/s (not of its byte counts: the
harness warms up in a separate run instead). h2load only sees HTTP statuses, so a gRPC
error (HTTP 200 with a non-zero grpc-status) counts as "succeeded" here: the
harness checks outcomes separately (see run.py).
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "Load",
    "Result",
    "Summary",
    "parse_log",
    "parse_output",
    "percentile",
    "run",
]

_FINISHED: Final = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.M)
_REQUESTS: Final = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_STATUS: Final = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_TRAFFIC: Final = re.compile(
    r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?\((\d+)\) data", re.M
)


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True)
class Load:
    """One h2load process. rps is per client; None means as fast as it can."""

    url: str = ""  # or uris_file
    uris_file: Path | None = None
    body_file: Path | None = None
    headers: Sequence[str] = ()
    clients: int = 1
    streams: int = 1
    duration: float = 10.0
    warmup: float = 0.0
    rps: float | None = None
    requests: int | None = None  # instead of duration (e.g. draining a bucket)
    log_file: Path | None = None

    def argv(self) -> list[str]:
        argv = ["h2load", "-t", "1", "-c", str(self.clients), "-m", str(self.streams)]
        if self.requests is not None:
            argv += ["-n", str(self.requests)]
        else:
            argv += ["-D", _ms(self.duration)]  # h2load takes "1500ms", not "1.5"
            if self.warmup:
                argv += ["--warm-up-time", _ms(self.warmup)]
        if self.rps is not None:
            argv += ["--rps", f"{self.rps:.3f}"]
        for header in self.headers:
            argv += ["-H", header]
        if self.body_file is not None:
            argv += ["-d", str(self.body_file)]
        if self.log_file is not None:
            argv += ["--log-file", str(self.log_file)]
        if self.uris_file is not None:
            argv += ["-i", str(self.uris_file)]
        else:
            argv.append(self.url)
        return argv

    @property
    def bound(self) -> float:
        """Seconds after which the process is killed."""
        return (self.duration + self.warmup if self.requests is None else 30.0) + 20.0


@dataclass(frozen=True)
class Summary:
    """What one h2load process printed."""

    seconds: float  # wall time, warm-up included
    rps: float  # over the measurement window (warm-up excluded)
    total: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: tuple[int, int, int, int]  # 2xx, 3xx, 4xx, 5xx
    bytes_total: int
    bytes_headers: int
    bytes_data: int


def parse_output(text: str) -> Summary:
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    status = _STATUS.search(text)
    traffic = _TRAFFIC.search(text)
    if not (finished and requests and status and traffic):
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ValueError(f"unexpected h2load output:\n{tail}")
    seconds = float(finished[1]) / {"us": 1e6, "ms": 1e3, "s": 1.0}[finished[2]]
    total, _started, done, succeeded, failed, errored, timeout = map(int, requests.groups())
    s2, s3, s4, s5 = map(int, status.groups())
    return Summary(
        seconds=seconds,
        rps=float(finished[3]),
        total=total,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=(s2, s3, s4, s5),
        bytes_total=int(traffic[1]),
        bytes_headers=int(traffic[2]),
        bytes_data=int(traffic[3]),
    )


def parse_log(lines: Iterable[str]) -> list[int]:
    """Latencies (µs) of the requests in an h2load --log-file that got a response."""
    latencies = []
    for line in lines:
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].strip().isdigit() and int(fields[1]) > 0:
            latencies.append(int(fields[2]))
    return latencies


def percentile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(round(q / 100 * len(ordered), 9)))  # 99.9 % of 1000 is 999
    return float(ordered[min(rank, len(ordered)) - 1])


@dataclass
class Result:
    """Several h2load processes run together, added up."""

    summaries: list[Summary]
    latencies_us: list[int] = field(default_factory=list)  # ascending
    wall: float = 0.0

    @property
    def rps(self) -> float:
        return sum(s.rps for s in self.summaries)

    @property
    def requests(self) -> int:
        return sum(s.done for s in self.summaries)

    @property
    def succeeded(self) -> int:
        return sum(s.succeeded for s in self.summaries)

    @property
    def not_ok(self) -> int:
        """Requests without a 2xx (failed, errored, timed out, or non-2xx status)."""
        return sum(s.total - s.status[0] for s in self.summaries)

    def status(self, klass: int) -> int:
        return sum(s.status[klass - 2] for s in self.summaries)

    @property
    def data_bytes(self) -> int:
        return sum(s.bytes_data for s in self.summaries)

    def p(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies_us, q) / 1000


def run(loads: Sequence[Load], *, check: bool = True) -> Result:
    """Starts every load at once and waits for all of them (killing them past their bound).

    check: a process that got no response at all is an error (say, nothing
    listening: h2load still exits 0). Warm-ups pass False: on a busy machine
    a short one may end before its first answer."""
    processes: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    try:
        for load in loads:
            processes.append(
                subprocess.Popen(
                    load.argv(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            )
        outputs = []
        for process, load in zip(processes, loads, strict=True):
            remaining = load.bound - (time.monotonic() - started)
            out, _ = process.communicate(timeout=max(remaining, 1.0))
            if process.returncode != 0:
                raise RuntimeError(f"h2load exited {process.returncode}: {out[-500:]}")
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    wall = time.monotonic() - started
    latencies: list[int] = []
    for load in loads:
        if load.log_file is not None and load.log_file.exists():
            with load.log_file.open() as log:
                latencies.extend(parse_log(log))
    latencies.sort()
    summaries = [parse_output(out) for out in outputs]
    for load, summary in zip(loads, summaries, strict=True):
        if check and summary.done == 0:  # e.g. nothing listening: h2load still exits 0
            raise RuntimeError(f"h2load got no responses: {' '.join(load.argv())}")
    return Result(summaries, latencies, wall)
