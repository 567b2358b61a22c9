"""Alerts (quota thresholds, low prepaid balances, auto top-ups due), queued
for the companion off the request path.

The decision script reports each quota threshold once per period and each
low-balance mark once per fall past it, and the Authorizer hands each to a
callback; AlertQueue is that callback in the sidecar. A settlement in credits
(record_usage.lua) reports the marks its burn reached the same way, and every
settlement path (RecordUsage, the access log, ext_proc) hands them to an
AlertQueue too (settlement_alerts). It logs the alert and queues it in Redis
for the companion, which posts it to [stripe] notify_url (or, for a top-up,
buys the pack). Queueing is a task of its own, so no request waits on it; a
Redis that is away loses the alert (logged), never the request. A lost top-up
is not lost for good: the scripts report a fall still due again a minute
later (shared/credits.lua).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.authorizer import Alert, BalanceAlert, QuotaAlert, TopUpDue
from sidecar.errors import StoreUnavailable
from sidecar.store import Recorded

__all__ = ["AlertQueue", "settlement_alerts"]

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


def settlement_alerts(customer_id: str, plan: str, recorded: Recorded) -> list[Alert]:
    """What a settlement in credits reports, as an admission's burn would: each
    low-balance mark it reached, and the fall past the auto top-up mark it made
    (or a due one reported again). Pure."""
    balance = recorded.credits or 0
    alerts: list[Alert] = [
        BalanceAlert(customer_id, plan, mark, balance) for mark in recorded.low_balance
    ]
    if recorded.top_up:
        alerts.append(TopUpDue(customer_id, plan, recorded.top_up, balance))
    return alerts
