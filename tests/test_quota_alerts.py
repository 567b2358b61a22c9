"""Quota alerts leave the request path at once, as the payload the companion
delivers, and a Redis that is away costs the alert (logged), not the request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from sidecar.authorizer import QuotaAlert
from sidecar.errors import StoreUnavailable
from sidecar.quota_alerts import AlertQueue


def test_an_alert_is_logged_at_once_and_queued_for_the_companion(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queued: list[dict[str, Any]] = []

    async def notify(payload: dict[str, Any]) -> None:
        queued.append(payload)

    async def run() -> None:
        alerts = AlertQueue(notify)
        alerts(QuotaAlert("cus_1", "pro", 80, 8))
        assert queued == []  # the request does not wait for Redis
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="tollway.authorizer"):
        asyncio.run(run())
    assert queued == [
        {"type": "quota_threshold", "customer_id": "cus_1", "plan": "pro", "percent": 80, "used": 8}
    ]
    assert caplog.messages == ["quota alert: cus_1 reached 80% of plan pro's quota"]


def test_an_alert_redis_cannot_take_is_logged_as_lost(caplog: pytest.LogCaptureFixture) -> None:
    async def notify(payload: dict[str, Any]) -> None:
        raise StoreUnavailable("Redis timed out")

    async def run() -> None:
        AlertQueue(notify)(QuotaAlert("cus_1", "pro", 100, 10))
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="tollway.authorizer"):
        asyncio.run(run())
    assert caplog.messages[-1] == "alert for cus_1 not queued: Redis unavailable"
