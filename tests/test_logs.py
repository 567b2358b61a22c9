"""Log lines are JSON objects carrying the request id of the request they belong to."""

from __future__ import annotations

import asyncio
import json
import logging

from sidecar.logs import JsonFormatter, bind_request_id


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
