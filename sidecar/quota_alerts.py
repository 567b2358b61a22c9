"""Alerts (quota thresholds, low prepaid balances), queued for the companion
off the request path.

The decision script reports each quota threshold once per period and each
low-balance mark once per fall past it, and the Authorizer hands each to a
callback; AlertQueue is that callback in
the sidecar. It logs the alert and queues it in Redis for the companion, which
posts it to [stripe] notify_url. Queueing is a task of its own, so no request
waits on it; a Redis that is away loses the alert (logged), never the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.authorizer import Alert, BalanceAlert, QuotaAlert
from sidecar.errors import StoreUnavailable

__all__ = ["AlertQueue"]

# The logger these lines have always come from: alert rules match its name.
log = logging.getLogger("tollway.authorizer")


class AlertQueue:
    def __init__(self, notify: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._notify = notify  # Store.notify: queues a notification for the companion
        # The loop holds tasks weakly: kept here until they finish, or they may vanish.
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, alert: Alert) -> None:
        if isinstance(alert, QuotaAlert):
            log.warning(
                "quota alert: %s reached %d%% of plan %s's quota",
                alert.customer_id,
                alert.percent,
                alert.plan,
            )
        elif isinstance(alert, BalanceAlert):
            log.warning(
                "low balance: %s has %d credits left (mark %d)",
                alert.customer_id,
                alert.balance,
                alert.mark,
            )
        else:
            log.info("auto top-up due for %s at balance %d", alert.customer_id, alert.balance)
        task = asyncio.get_running_loop().create_task(self._send(alert))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, alert: Alert) -> None:
        payload: dict[str, Any]
        if isinstance(alert, QuotaAlert):
            payload = {
                "type": "quota_threshold",
                "customer_id": alert.customer_id,
                "plan": alert.plan,
                "percent": alert.percent,
                "used": alert.used,
            }
        elif isinstance(alert, BalanceAlert):
            payload = {
                "type": "low_balance",
                "customer_id": alert.customer_id,
                "plan": alert.plan,
                "mark": alert.mark,
                "balance": alert.balance,
            }
        else:  # the companion buys the pack: webhook/top_up.py
            payload = {
                "type": "auto_top_up_due",
                "customer_id": alert.customer_id,
                "plan": alert.plan,
                "crossing": alert.crossing,
                "balance": alert.balance,
            }
        try:
            await self._notify(payload)
        except StoreUnavailable:
            log.error("alert for %s not queued: Redis unavailable", alert.customer_id)
