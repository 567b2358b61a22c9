"""The companion's Prometheus metrics, served at GET /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["BACKLOG", "BILLED", "LAG", "STRIPE_ERRORS", "WEBHOOK_EVENTS"]

WEBHOOK_EVENTS = Counter(
    "tollway_webhook_events_total", "Stripe webhook events by type and result", ["type", "result"]
)
BACKLOG = Gauge("tollway_reporter_backlog_customers", "Customers with usage not yet billed")
LAG = Gauge("tollway_reporter_lag_seconds", "Age of the oldest usage not yet accepted by Stripe")
BILLED = Counter("tollway_reporter_billed_units_total", "Units Stripe accepted", ["meter"])
STRIPE_ERRORS = Counter(
    "tollway_stripe_errors_total", "Stripe API errors by kind", ["kind"]
)  # rate_limited | server | network | refused | auth
