"""The sidecar's gRPC server: Tollway/Authorize, Envoy's Authorization/Check,
health and reflection on one port.

Failure policy, in one place: a StoreUnavailable ends the call with gRPC
UNAVAILABLE (Envoy's failure_mode_allow / status_on_error then decide); any
other error is a bug and ends it with INTERNAL. Neither is ever an allow.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import replace

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar import envoy
from sidecar.authorizer import Authorizer
from sidecar.decide import Decision, Reason
from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.settings import Settings, load_settings
from sidecar.store import Store, connect

__all__ = ["authorize_response", "serve"]

log = logging.getLogger("tollway.server")

# Envoy's CheckRequest carries every request header; 1 MiB bounds a hostile one.
MAX_MESSAGE_BYTES = 1 << 20
_REASONS = {reason: pb.Reason.Value(f"REASON_{reason.name}") for reason in Reason}


def authorize_response(decision: Decision) -> pb.AuthorizeResponse:
    response = pb.AuthorizeResponse(
        allowed=decision.allowed,
        reason=_REASONS[decision.reason],
        customer_id=decision.customer_id,
        plan=decision.plan,
        retry_after_seconds=decision.retry_after,
        message=decision.message,
    )
    if decision.rate:
        response.rate_limit.CopyFrom(
            pb.RateLimitState(
                limit=decision.rate.limit,
                remaining=decision.rate.remaining,
                reset_seconds=decision.rate.reset_seconds,
                rate_per_second=decision.rate.rate_per_second,
            )
        )
    if decision.quota:
        response.quota.CopyFrom(
            pb.QuotaState(
                limit=decision.quota.limit,
                used=decision.quota.used,
                remaining=decision.quota.remaining,
                period_end=decision.quota.period_end,
            )
        )
    return response


class TollwayService(pb_grpc.TollwayServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeResponse:
        try:
            decision = await self._authorizer.authorize(
                request.api_key,
                method=request.method,
                path=request.path,
                cost=request.cost,
                feature=request.feature if request.HasField("feature") else None,
            )
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return authorize_response(decision)


class CheckService(ext_authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer, settings: Callable[[], Settings]) -> None:
        self._authorizer = authorizer
        self._settings = settings

    async def Check(
        self, request: ext_authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> ext_authz.CheckResponse:
        http = request.attributes.request.http
        names = self._settings().headers
        key, key_header = envoy.extract_key(http.headers, names)
        try:
            decision = await self._authorizer.authorize(key, method=http.method, path=http.path)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return envoy.check_response(decision, key_header=key_header, names=names)


class Sidecar:
    """Holds what SIGHUP may swap (settings and plans) and what it may not (sockets)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.authorizer = Authorizer(store, lambda: self.settings)

    def reload(self, environ: dict[str, str]) -> bool:
        """Re-reads the config file; a bad file keeps the running plans."""
        try:
            fresh = load_settings(self.settings.config_path, environ)
        except ConfigError as exc:
            log.error("reload failed, keeping the current plans: %s", exc)
            return False
        # Plans, routes, header names and billing rules reload; addresses need a restart.
        self.settings = replace(
            self.settings, catalog=fresh.catalog, headers=fresh.headers, billing=fresh.billing
        )
        log.info("reloaded %s: plans %s", fresh.config_path, ", ".join(fresh.catalog.plans))
        return True


async def serve(
    settings: Settings,
    *,
    environ: dict[str, str],
    listen: str | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Runs the sidecar until SIGTERM/SIGINT. ready(port) is called once it listens."""
    if not settings.redis_url:
        raise ConfigError("[redis] url: not set (set TOLLWAY_REDIS_URL or [redis] url)")
    store = Store(
        connect(settings.redis_url, timeout=settings.redis_timeout), timeout=settings.redis_timeout
    )
    sidecar = Sidecar(settings, store)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Two sidecars on one port by accident would split traffic silently.
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_TollwayServicer_to_server(  # type: ignore[no-untyped-call]
        TollwayService(sidecar.authorizer), server
    )
    ext_authz_grpc.add_AuthorizationServicer_to_server(
        CheckService(sidecar.authorizer, lambda: sidecar.settings), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        pb.DESCRIPTOR.services_by_name["Tollway"].full_name,
        ext_authz.DESCRIPTOR.services_by_name["Authorization"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    address = listen or settings.listen
    port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"listen: cannot bind {address}")
    await server.start()
    for name in ("", *services[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: sidecar.reload(environ))
    log.info("sidecar listening on %s (plans: %s)", address, ", ".join(settings.catalog.plans))
    if ready:
        ready(port)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    for name in ("", *services[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    await store.close()
