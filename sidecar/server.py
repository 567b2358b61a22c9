"""`tollway serve`: one process serving, on one gRPC port, the transports of
sidecar/grpc_api.py, ext_proc and the access log (settlement), health and
reflection, and Envoy's HTTP ext_authz on [sidecar] http_listen; and the
Sidecar that holds what they share: settings (SIGHUP swaps them), the store,
the authorizer, the caches' invalidations and health following Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
import prometheus_client
import uvicorn
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from sidecar.accesslog import AccessLogService
from sidecar.admin.grpc_api import AdminService
from sidecar.admin.operations import Admin
from sidecar.authorizer import Authorizer
from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.extproc import ExtProcService
from sidecar.gen.tollway.admin.v1 import admin_pb2 as admin_pb
from sidecar.gen.tollway.admin.v1 import admin_pb2_grpc as admin_pb_grpc
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.grpc_api import MAX_MESSAGE_BYTES, CheckService, TollwayService
from sidecar.http_authz import HttpAuthz, http_server, listen_socket
from sidecar.metrics import watch_caches
from sidecar.quota_alerts import AlertQueue
from sidecar.settings import Settings, load_settings
from sidecar.store import Store, connect, subscriber
from sidecar.store.names import INVALIDATE_CHANNEL
from sidecar.tls import grpc_credentials
from sidecar.usage import DirtyIndex

__all__ = ["Sidecar", "serve"]

log = logging.getLogger("tollway.server")


class Sidecar:
    """Holds what SIGHUP may swap (settings and plans) and what it may not (sockets)."""

    def __init__(self, settings: Settings, store: Store, *, record_last_use: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.dirty = DirtyIndex(store)
        self.authorizer = Authorizer(
            store,
            lambda: self.settings,
            metered=self.dirty.add,
            on_alert=AlertQueue(store.notify),  # queued off the request path
            record_last_use=record_last_use,  # serve() does; in-process tests need not
        )
        # The admin API's operations, and the service tokens of usage calls by id.
        self.admin = Admin(store, lambda: self.settings)

    async def watch_redis(
        self, set_health: Callable[[int], Awaitable[None]], *, every: float = 0.5
    ) -> None:
        """gRPC health follows Redis: NOT_SERVING while it does not answer (so a
        load balancer can route around this sidecar), SERVING once it does.
        With [sidecar] health_follows_redis = false health stays SERVING; calls
        are still UNAVAILABLE while Redis is away."""
        if not self.settings.health_follows_redis:
            return
        serving = True
        while True:
            await asyncio.sleep(every)
            up = await self._redis_answers()
            if up != serving:
                serving = up
                log.warning(
                    "Redis %s: health %s",
                    "is back" if up else "unreachable",
                    "SERVING" if up else "NOT_SERVING",
                )
                await set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if up
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )

    async def _redis_answers(self) -> bool:
        """Whether Redis answers a ping, asked twice: a pooled connection the network
        reset (RST) fails its first command though Redis is well, and that failure
        drops the idle connections, so the second ping tells. One reset must not
        take this sidecar out of its load balancer."""
        for _ in range(2):
            try:
                await self.store.ping()
                return True
            except StoreUnavailable:
                pass
        return False

    async def follow_invalidations(self, *, retry: float = 0.5) -> None:
        """Applies the invalidations other processes publish (revocations, plan and
        status changes) to this sidecar's caches, reconnecting as needed (on a
        cluster, to the next node the URL lists)."""
        assert self.settings.redis_url is not None
        attempt = 0
        while True:
            client = subscriber(self.settings.redis_url, attempt=attempt)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(INVALIDATE_CHANNEL)
                    self.authorizer.forget_everything()  # whatever was missed meanwhile
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self.authorizer.forget(data.decode())
            except (RedisError, OSError) as exc:
                # What is cached lives a second at most, allotments included, so it
                # may serve until then (a Redis blip need not fail a hot account's
                # requests); the next subscription clears it, whatever was missed.
                log.warning(
                    "invalidations paused (%s); cached state expires within a second",
                    type(exc).__name__,
                )
                attempt += 1
                await asyncio.sleep(retry)
            finally:
                await client.aclose()

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
    worker: int | None = None,
) -> None:
    """Runs the sidecar until SIGTERM/SIGINT. ready(port) is called once it listens.
    worker: this process's index among `serve --workers N` (they share the port)."""
    if not settings.redis_url:
        raise ConfigError("[redis] url: not set (set TOLLWAY_REDIS_URL or [redis] url)")
    store = Store(
        connect(settings.redis_url, timeout=settings.redis_timeout), timeout=settings.redis_timeout
    )
    sidecar = Sidecar(settings, store, record_last_use=True)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Workers share the port on purpose; otherwise two sidecars on one
            # port by accident would split traffic silently.
            ("grpc.so_reuseport", 1 if worker is not None else 0),
        ]
    )
    pb_grpc.add_TollwayServicer_to_server(  # type: ignore[no-untyped-call]
        TollwayService(sidecar), server
    )
    ext_authz_grpc.add_AuthorizationServicer_to_server(
        CheckService(sidecar.authorizer, lambda: sidecar.settings), server
    )
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(
        ExtProcService(store, lambda: sidecar.settings, metered=sidecar.dirty.add), server
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogService(store, lambda: sidecar.settings, metered=sidecar.dirty.add), server
    )
    admin_pb_grpc.add_AdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AdminService(sidecar.admin), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        pb.DESCRIPTOR.services_by_name["Tollway"].full_name,
        ext_authz.DESCRIPTOR.services_by_name["Authorization"].full_name,
        ext_proc.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name,
        admin_pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
        als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    address = listen or settings.listen
    if settings.tls is not None:
        port = server.add_secure_port(address, grpc_credentials(settings.tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"listen: cannot bind {address}")
    drain = 5  # seconds in-flight requests get on SIGTERM, on either port
    # HTTP ext_authz (http_authz.py) on its own port, in this loop: the same
    # Authorizer, caches and Redis connection as Check.
    http: uvicorn.Server | None = None
    http_task: asyncio.Task[None] | None = None
    if settings.http_listen:
        sock = listen_socket(settings.http_listen, reuse_port=worker is not None)
        http = http_server(
            HttpAuthz(sidecar.authorizer, lambda: sidecar.settings),
            drain_seconds=drain,
            tls=settings.tls,
        )
    await server.start()
    if http is not None:
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
    if settings.metrics_listen and not worker:  # one metrics port: worker 0's
        host, _, metrics_port = settings.metrics_listen.rpartition(":")
        authz = sidecar.authorizer
        watch_caches(
            {
                "key": authz.key_cache,
                "bucket": authz.buckets,
                "denial": authz.denials,
                "allotment": authz.allotments,  # hits: admitted here, without Redis
            }
        )
        prometheus_client.start_http_server(int(metrics_port), addr=host.strip("[]"))
        log.info("metrics on http://%s/metrics", settings.metrics_listen)
    served = ("", *services[:4])  # health: these and the server as a whole

    async def set_health(status: int) -> None:
        for name in served:
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.SERVING)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: sidecar.reload(environ))
    log.info("sidecar listening on %s (plans: %s)", address, ", ".join(settings.catalog.plans))
    if http_task is not None:
        log.info("HTTP ext_authz on http://%s", settings.http_listen)
        # If it ends on its own, it failed: stop all, loudly, rather than serve half.
        http_task.add_done_callback(lambda _: stop.set())
    dirty_task = asyncio.create_task(sidecar.dirty.run())
    last_use = asyncio.create_task(sidecar.authorizer.run_last_use())
    returns = asyncio.create_task(sidecar.authorizer.run_returns())
    invalidations = asyncio.create_task(sidecar.follow_invalidations())
    watch = asyncio.create_task(sidecar.watch_redis(set_health))
    if ready:
        ready(port)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    watch.cancel()
    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    if http is not None:
        http.should_exit = True
    stopped = await asyncio.gather(
        server.stop(grace=drain), *([http_task] if http_task else []), return_exceptions=True
    )
    for task in (invalidations, watch, last_use, returns):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await sidecar.authorizer.close()  # allotments handed back: their usage marked to bill
    dirty_task.cancel()  # which flushes the last marks
    with contextlib.suppress(asyncio.CancelledError):
        await dirty_task
    await store.close()
    for outcome in stopped:
        if isinstance(outcome, BaseException):
            raise outcome
