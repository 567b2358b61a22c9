"""The sidecar's Prometheus metrics (served on [sidecar] metrics_listen)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sidecar.errors import StoreUnavailable

if TYPE_CHECKING:
    from sidecar.authorizer import Authorizer
    from sidecar.decision import Decision, Reason

__all__ = [
    "ALLOTMENTS",
    "DECISIONS",
    "DECISION_SECONDS",
    "SETTLEMENTS",
    "STORE_ERRORS",
    "USAGE_EVENTS",
    "Counted",
    "counted_decision",
    "watch_caches",
]

# mode "shadow": allowed, though a limit in shadow mode would have denied it for reason.
DECISIONS = Counter(
    "tollway_decisions_total",
    "Authorization decisions by reason, plan and mode (enforced, or shadow: would deny)",
    ["reason", "plan", "mode"],
)
DECISION_SECONDS = Histogram(
    "tollway_decision_seconds",
    "Time to decide one request, Redis included",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
STORE_ERRORS = Counter(
    "tollway_store_errors_total",
    "Requests failed because Redis was unavailable, by cause",
    ["cause"],
)  # timeout | connection | error
USAGE_EVENTS = Counter(
    "tollway_usage_events_total", "RecordUsage events by result", ["result"]
)  # accepted | duplicate | rejected
ALLOTMENTS = Counter(
    "tollway_allotments_total",
    "Allotments (leased enforcement) by what became of them",
    ["result"],
)  # granted | returned | lapsed | unknown | retried
SETTLEMENTS = Counter(
    "tollway_settlements_total",
    "Finished requests seen by a settlement (ext_proc, access_log), by result",
    ["via", "result"],
)  # settled | duplicate | released | skipped | unavailable | mismatch | error


class Counted(Protocol):
    hits: int
    misses: int


class _CacheLookups(Collector):
    """Hits and misses of the request path's local caches, read when scraped,
    so counting costs a request nothing beyond the cache's own two integers."""

    def __init__(self, caches: Mapping[str, Counted]) -> None:
        self._caches = caches

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tollway_cache_lookups",
            "Local cache lookups by cache (key, bucket, denial, allotment) and result (hit, miss)",
            labels=["cache", "result"],
        )
        for name, cache in self._caches.items():
            family.add_metric([name, "hit"], cache.hits)
            family.add_metric([name, "miss"], cache.misses)
        yield family


def watch_caches(caches: Mapping[str, Counted]) -> None:
    """Exposes the caches' hit and miss counts as tollway_cache_lookups_total."""
    REGISTRY.register(_CacheLookups(caches))


async def counted_decision(authorizer: Authorizer, key: str, **request: Any) -> Decision:
    """One decision through Authorizer.authorize, counted and timed: the one way
    every transport (Check, Authorize, HTTP ext_authz) asks. StoreUnavailable
    passes through, counted."""
    started = time.perf_counter()
    try:
        decision = await authorizer.authorize(key, **request)
    except StoreUnavailable as exc:
        STORE_ERRORS.labels(exc.cause).inc()
        raise
    DECISION_SECONDS.observe(time.perf_counter() - started)
    labels = (decision.shadow or decision.reason, decision.plan, decision.shadow is not None)
    counter = _decision_counters.get(labels)
    if counter is None:  # labels() costs more than the rest of a cached decision
        if len(_decision_counters) > 10_000:
            _decision_counters.clear()  # bounded, whatever the plans: looked up again
        mode = "shadow" if labels[2] else "enforced"
        counter = DECISIONS.labels(labels[0].value, decision.plan or "-", mode)
        _decision_counters[labels] = counter
    counter.inc()
    return decision


_decision_counters: dict[tuple[Reason, str, bool], Counter] = {}
