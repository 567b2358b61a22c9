"""A Python gRPC load client, for a run that needs a different request body each time.

h2load posts one body per process, so it cannot walk 1,000,000 keys; this
client can, at a fraction of h2load's rate (it is Python: use it where
throughput is not the measurement, as bench/memory.py does, or where its floor
is measured with it too, as bench/run.py's leased Zipf row is). grpc.aio, one
channel, `--streams` calls in flight, each request pre-encoded: the bodies file
is gRPC-framed AuthorizeRequests (bench.workload.authorize_body, one after the
other) sent as they are, in file order, wrapping around at the end. It
stops by itself after `--seconds` (or at SIGTERM). What it counted so far is
in `--result` (JSON, a Tally), rewritten every second and once more at the
end, so a harness can follow it; a progress line goes to stdout every 10 s.

    python -m bench.grpc_load --target 127.0.0.1:50051 --bodies keys.bin \\
        --seconds 60 --streams 32 --result result.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import grpc

from bench.workload import AUTHORIZE_PATH, parse_grpc_frames
from sidecar.gen.tollway.v1 import tollway_pb2 as pb

__all__ = ["Tally", "drive", "read_tally"]

CALL_TIMEOUT: Final = 5.0  # seconds; far above any answer the sidecar gives under load
RESULT_EVERY: Final = 1.0  # seconds between rewrites of the result file
PROGRESS_EVERY: Final = 10  # result rewrites between progress lines


@dataclass
class Tally:
    bodies: int  # distinct request bodies (one key each) in the file
    requests: int = 0  # answered, any way
    allowed: int = 0
    denied: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count
    distinct_allowed: int = 0  # bodies that got at least one allow
    seconds: float = 0.0  # since the first call


def read_tally(path: Path) -> Tally:
    return Tally(**json.loads(path.read_text()))


class _Load:
    """What the streams share: the next body to send and what came back."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.position = 0  # one event loop: no lock needed
        self.allowed_once = bytearray(len(messages))  # 1 where that body got an allow
        self.allowed = self.denied = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()

    def tally(self) -> Tally:
        return Tally(
            bodies=len(self.messages),
            requests=self.allowed + self.denied + sum(self.errors.values()),
            allowed=self.allowed,
            denied=self.denied,
            errors=dict(self.errors),
            distinct_allowed=self.allowed_once.count(1),
            seconds=time.monotonic() - self.started,
        )


def _identity(data: bytes) -> bytes:
    return data


def _write(path: Path, tally: Tally) -> None:
    # Replaced whole, so a reader never sees half a file.
    scratch = path.with_suffix(".part")
    scratch.write_text(json.dumps(asdict(tally)))
    os.replace(scratch, path)


async def drive(
    target: str, messages: list[bytes], seconds: float, streams: int, result: Path
) -> Tally:
    """Sends messages in order (wrapping around) with `streams` calls in flight."""
    load = _Load(messages)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    deadline = load.started + seconds

    async with grpc.aio.insecure_channel(target) as channel:
        # Bytes in, bytes out: the requests are encoded already, and a response
        # is parsed only for its `allowed` field.
        authorize = channel.unary_unary(
            AUTHORIZE_PATH, request_serializer=_identity, response_deserializer=_identity
        )

        async def stream() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                index = load.position % len(messages)
                load.position += 1
                try:
                    raw = await authorize(messages[index], timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    load.errors[exc.code().name] += 1
                    continue
                if pb.AuthorizeResponse.FromString(raw).allowed:
                    load.allowed += 1
                    load.allowed_once[index] = 1
                else:
                    load.denied += 1

        async def report() -> None:
            rewrites = 0
            while not stop.is_set():
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESULT_EVERY)
                tally = load.tally()
                _write(result, tally)
                rewrites += 1
                if rewrites % PROGRESS_EVERY == 0:
                    print(
                        f"{tally.seconds:6.0f} s: {tally.requests} answered "
                        f"({tally.requests / tally.seconds:.0f}/s), {tally.allowed} allowed, "
                        f"{tally.distinct_allowed} distinct, {sum(tally.errors.values())} "
                        "errors",
                        flush=True,
                    )

        reporter = asyncio.create_task(report())
        await asyncio.gather(*(stream() for _ in range(streams)))
        stop.set()
        await reporter

    tally = load.tally()
    _write(result, tally)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the Tollway gRPC server")
    parser.add_argument("--bodies", type=Path, required=True, help="gRPC-framed requests")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    messages = parse_grpc_frames(args.bodies.read_bytes())
    if not messages:
        raise SystemExit(f"grpc_load: no requests in {args.bodies}")
    asyncio.run(drive(args.target, messages, args.seconds, args.streams, args.result))


if __name__ == "__main__":
    main()
