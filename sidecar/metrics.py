"""The sidecar's Prometheus metrics (served on [sidecar] metrics_listen)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["DECISIONS", "DECISION_SECONDS", "STORE_ERRORS", "USAGE_EVENTS"]

DECISIONS = Counter(
    "tollway_decisions_total", "Authorization decisions by reason and plan", ["reason", "plan"]
)
DECISION_SECONDS = Histogram(
    "tollway_decision_seconds",
    "Time to decide one request, Redis included",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
STORE_ERRORS = Counter(
    "tollway_store_errors_total", "Requests failed because Redis was unavailable"
)
USAGE_EVENTS = Counter(
    "tollway_usage_events_total", "RecordUsage events by result", ["result"]
)  # accepted | duplicate | rejected
