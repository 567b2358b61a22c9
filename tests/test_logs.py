"""Log lines are JSON objects carrying the request id of the request they belong to,
and a line repeated once per bad request cannot flood the log."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc

from sidecar.logs import JsonFormatter, RepeatLimit, bind_request_id, configure
from tests import harness


def test_json_lines_carry_the_request_id_of_their_own_request() -> None:
    formatter = JsonFormatter()
    lines: list[dict[str, str]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    log = logging.getLogger("tollway.test-logs")
    log.addHandler(Capture())
    log.setLevel(logging.INFO)
    log.propagate = False

    async def request(request_id: str) -> None:
        bind_request_id(request_id)
        await asyncio.sleep(0)
        log.info("deciding %s", request_id)

    async def both() -> None:
        await asyncio.gather(request("req-a"), request("req-b"))

    asyncio.run(both())
    log.warning("outside any request")
    assert {(line["msg"], line.get("request_id")) for line in lines} == {
        ("deciding req-a", "req-a"),
        ("deciding req-b", "req-b"),
        ("outside any request", None),
    }
    assert all(line["ts"].endswith("Z") and line["logger"] == "tollway.test-logs" for line in lines)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, name: str = "grpc._cython.cygrpc") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_line_repeated_per_request_is_logged_a_few_times_a_minute_with_a_count() -> None:
    clock = Clock()
    limit = RepeatLimit(burst=5, window=60, clock=clock)
    passed = [limit.filter(_record("Unexpected error from %s", n)) for n in range(1000)]
    assert sum(passed) == 5  # one template, whatever its arguments
    assert limit.filter(_record("another line"))  # other kinds are not held back
    alerts = [_record("quota alert: %s", n, name="tollway.authorizer") for n in range(100)]
    for alert in alerts:
        alert.levelno = logging.WARNING
    assert all(limit.filter(alert) for alert in alerts)  # business events, each one kept
    clock.now += 60
    summary = _record("Unexpected error from %s", "x")
    assert limit.filter(summary)
    assert summary.getMessage() == "Unexpected error from x [and 995 more like this, not logged]"


def test_every_sidecar_log_line_passes_the_repeat_limit() -> None:
    configure()
    try:
        handler = logging.getLogger().handlers[0]
        assert any(isinstance(f, RepeatLimit) for f in handler.filters)
    finally:
        logging.getLogger().handlers.clear()


def test_a_client_sending_undecodable_messages_cannot_flood_the_sidecar_log(
    tmp_path: Path, redis_url: str, config_path: Path
) -> None:
    log_file = tmp_path / "sidecar.log"
    port = harness.free_port()
    child = harness.start_sidecar(config_path, redis_url=redis_url, port=port, log=log_file)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            authorize = channel.unary_unary("/tollway.v1.Tollway/Authorize")
            codes = set()
            for _ in range(300):
                try:
                    authorize(b"\xff\xff\xff\xff", timeout=5)
                except grpc.RpcError as error:
                    codes.add(error.code())
        assert codes and grpc.StatusCode.OK not in codes
    finally:
        child.stop()
    lines = log_file.read_text().splitlines()
    assert len(lines) < 20, f"{len(lines)} log lines for 300 bad messages"
