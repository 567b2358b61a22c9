"""The companion process: today it reports its health, Redis included."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import harness


def get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("redis_up", [True, False])
def test_healthz_reports_whether_redis_answers(
    tmp_path: Path, config_path: Path, redis_url: str, redis_up: bool
) -> None:
    url = redis_url if redis_up else f"redis://127.0.0.1:{harness.free_port()}/0"
    port = harness.free_port()
    child = harness.start_companion(config_path, redis_url=url, port=port, log=tmp_path / "c.log")
    try:
        status, body = get(f"http://127.0.0.1:{port}/healthz")
    finally:
        child.stop()
    if redis_up:
        assert (status, body) == (200, {"status": "ok", "redis": "up", "stripe_sync": "off"})
    else:
        assert (status, body) == (
            503,
            {"status": "unavailable", "redis": "down", "stripe_sync": "off"},
        )
