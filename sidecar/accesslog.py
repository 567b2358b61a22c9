"""Envoy's gRPC access-log service: settling requests after their response, off
the request path (envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs).

Envoy's http_grpc access logger (deploy/envoy.yaml, deploy/envoy-accesslog.yaml) streams the
entries of finished requests in batches, every buffer_flush_interval (or when
its buffer fills), on one long-lived stream per Envoy worker. From each entry
it takes the response code, ext_authz's dynamic metadata (what Check decided)
and the upstream's cost: from dynamic metadata (namespace COST_NAMESPACE, key
COST_KEY, where Envoy's header_to_metadata filter puts the cost header as it
removes it before the client), else from the logged response headers
(additional_response_headers_to_log). Why the metadata: on Envoy 1.40 a
header removed by the route (response_headers_to_remove) is missing from the
logged headers too, so one header cannot be both hidden and logged;
tests/test_accesslog.py pins that.

Rules:
- Only the entry for the end of a downstream request settles it (access_log_type
  DownstreamEnd, or unset by an older Envoy); periodic ones are skipped.
- Each entry settles through settlement.settle (the rules ext_proc shares): a
  replayed or duplicated entry is a duplicate there and changes nothing.
- One entry never stops the stream. StoreUnavailable is logged and counted: the
  reservation bills at its estimate after reservation_ttl, the lease frees
  itself at lease_ttl. Any other failure of one entry is a bug, logged with its
  traceback and counted ("error"), and the stream goes on: a stream that ends
  loses every entry Envoy buffers until it reconnects.
- The entries of one message settle concurrently (CONCURRENCY at a time): a
  stream that falls behind fills Envoy's buffer, and Envoy drops what does not fit.
- Entries arriving while tollway.toml names another settlement settle nothing;
  the disagreement is said once per process.
- Nothing is answered until Envoy ends the stream (the one response is empty).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Final

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as accesslog
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc

from sidecar import settlement
from sidecar.authorizer import Alert
from sidecar.envoy import METADATA_NAMESPACE
from sidecar.errors import StoreUnavailable
from sidecar.logs import bind_request_id
from sidecar.metrics import SETTLEMENTS
from sidecar.quota_alerts import AlertQueue
from sidecar.settings import Settings
from sidecar.store import Store

__all__ = ["CONCURRENCY", "COST_KEY", "COST_NAMESPACE", "AccessLogService", "entry_parts"]

log = logging.getLogger("tollway.accesslog")

# Where the shipped configs' header_to_metadata filter puts the cost header.
COST_NAMESPACE: Final = "tollway"
COST_KEY: Final = "real_cost"
CONCURRENCY: Final = 64
_FINAL: Final = (accesslog.NotSet, accesslog.DownstreamEnd)


def _cost_text(value: object) -> str | None:
    """The cost as the upstream wrote it (a NUMBER-typed rule gives a float)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return None if value is None else repr(value)  # malformed: charged at the estimate


def entry_parts(
    entry: accesslog.HTTPAccessLogEntry, cost_header: str
) -> tuple[settlement.Finished, int, str | None] | None:
    """(the request, its HTTP status (0: none sent), the upstream's cost as sent)
    for an entry that settles; None for one that does not. Pure."""
    common = entry.common_properties
    if common.intermediate_log_entry or common.access_log_type not in _FINAL:
        return None
    struct = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if struct is None:  # denied, or let through without Tollway's decision
        return None
    finished = settlement.finished(settlement.plain(struct))
    if finished is None:
        return None
    response = entry.response
    status = response.response_code.value if response.HasField("response_code") else 0
    cost: str | None = None
    moved = common.metadata.filter_metadata.get(COST_NAMESPACE)
    if moved is not None:
        cost = _cost_text(settlement.plain(moved).get(COST_KEY))
    if cost is None:
        cost = response.response_headers.get(cost_header)
    return finished, status, cost


class AccessLogService(als_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        metered: Callable[[str], None],
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metered = metered
        # What a settlement in credits reached (low balance, a top-up due): queued
        # for the companion off this path, as the Authorizer's are.
        self._on_alert = on_alert or AlertQueue(store.notify)
        self._mismatch = settlement.Mismatch(log)

    async def StreamAccessLogs(
        self,
        requests: AsyncIterator[als.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als.StreamAccessLogsResponse:
        async for message in requests:
            entries = message.http_logs.log_entry
            if not entries:
                continue  # TCP entries, or the identifier alone
            settings = self._settings()
            if settings.envoy.settlement != "access_log":
                SETTLEMENTS.labels("access_log", "mismatch").inc(len(entries))
                self._mismatch.say(
                    "tollway.toml and the Envoy config disagree: Envoy streams access-log "
                    "entries to Tollway, but [envoy] settlement = %r in %s. Set settlement = "
                    '"access_log" (Check then reserves for it), or drop the access logger from '
                    "Envoy; until then its entries settle nothing. (Said once per process.)",
                    settings.envoy.settlement,
                    settings.config_path or "tollway.toml",
                )
                continue
            for start in range(0, len(entries), CONCURRENCY):
                chunk = entries[start : start + CONCURRENCY]
                outcomes = await asyncio.gather(
                    *(self._settle(entry, settings) for entry in chunk), return_exceptions=True
                )
                for outcome in outcomes:
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    if isinstance(outcome, Exception):
                        SETTLEMENTS.labels("access_log", "error").inc()
                        log.error("access-log entry not settled: a bug", exc_info=outcome)
        return als.StreamAccessLogsResponse()

    async def _settle(self, entry: accesslog.HTTPAccessLogEntry, settings: Settings) -> None:
        parts = entry_parts(entry, settings.envoy.cost_header)
        if parts is None:
            SETTLEMENTS.labels("access_log", "skipped").inc()
            return
        finished, status, cost = parts
        bind_request_id(finished.request_id or finished.lease_id)
        try:
            settled = await settlement.settle(
                self._store,
                settings,
                finished,
                status=status,
                cost_header=cost,
                metered=self._metered,
                on_alert=self._on_alert,
            )
        except StoreUnavailable as exc:
            SETTLEMENTS.labels("access_log", "unavailable").inc()
            log.error(
                "response of %s not settled (it bills at its estimate after reservation_ttl; "
                "its lease frees at lease_ttl): %s",
                finished.customer,
                exc,
            )
            return
        SETTLEMENTS.labels("access_log", settled.result).inc()
