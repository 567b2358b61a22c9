"""Connecting to Redis: the URL forms, the clients, and what a failure becomes.

Deployments (parse_redis_url): one server (redis://, rediss://, unix://), a
Redis Cluster (redis+cluster://, rediss+cluster://) or Sentinel's current
master (redis+sentinel://). connect() and subscriber() are the only places
that know which.

Every Redis failure (refused, reset, timed out, busy loading) surfaces as
StoreUnavailable, through translate_errors, the one place that decides it;
callers turn that into gRPC UNAVAILABLE (or a 5xx), never a decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Final, TypeAlias
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.store.pipelining import PipelinedConnection

__all__ = [
    "Client",
    "RedisTarget",
    "connect",
    "parse_redis_url",
    "pipelined_to",
    "subscriber",
    "translate_errors",
]

_REDIS_PY: Final = Path(redis.__file__).parent

# A client for one server (or Sentinel's current master), or for a cluster.
Client: TypeAlias = aioredis.Redis | RedisCluster

_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SENTINEL_SCHEME: Final = "redis+sentinel"
_NODE_RE: Final = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?"  # [::1]:7000
    r"|(?P<host>[^:/\[\]]+)(?::(?P<port>\d+))?"  # host:7000
)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What TOLLWAY_REDIS_URL names (see parse_redis_url)."""

    kind: str  # server | cluster | sentinel
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seed nodes, or the sentinels
    service: str = ""  # the master's name in Sentinel
    # Connection options for the Redis servers: credentials, db, TLS, ?options.
    options: dict[str, Any] = dataclass_field(default_factory=dict)


def parse_redis_url(url: str) -> RedisTarget:
    """Reads a Redis URL. Beside redis://, rediss:// and unix:// (one server):

        redis+cluster://[user:password@]host:port[,host:port...]      (rediss+cluster: TLS)
        redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]

    The hosts are cluster nodes to discover the cluster from, or sentinels to
    ask for the service's master (default ports 6379 and 26379). Credentials
    and ?options (as in a redis:// URL) apply to the Redis servers; sentinels
    are asked without them. Raises ConfigError, whose message never repeats
    the URL (it may hold a password)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    sentinel = scheme == _SENTINEL_SCHEME
    if not sep or not (sentinel or scheme in _CLUSTER_SCHEMES):
        return RedisTarget("server")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = tuple(_node(text, 26379 if sentinel else 6379, scheme) for text in hosts.split(","))
    segments = [unquote(part) for part in path.split("/")] if path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    service = ""
    if sentinel:
        if not segments or not segments[0]:
            raise ConfigError(
                f"{scheme}:// URL: name the master after the hosts: "
                f"{scheme}://host:port[,host:port]/<service_name>[/db]"
            )
        service = segments.pop(0)
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ConfigError(f"{scheme}:// URL: expected at most a database number after the hosts")
    db = int(segments[0]) if segments else 0
    if db and not sentinel:
        raise ConfigError(f"{scheme}:// URL: Redis Cluster has only database 0")
    # Credentials, TLS and ?options are read exactly as redis-py reads a redis:// URL.
    plain = _CLUSTER_SCHEMES.get(scheme, "redis")
    try:
        options: dict[str, Any] = dict(
            parse_url(f"{plain}://{userinfo}{at}nodes/{db}" + (f"?{query}" if query else ""))
        )
    except ValueError as exc:
        raise ConfigError(f"{scheme}:// URL: {exc}") from None
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is not None:
        options["ssl"] = True
    if not sentinel:
        options.pop("db", None)
    return RedisTarget("sentinel" if sentinel else "cluster", nodes, service, options)


def _node(text: str, default_port: int, scheme: str) -> tuple[str, int]:
    match = _NODE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{scheme}:// URL: {text!r} is not host:port")
    host = match["v6"] or match["host"]
    port = int(match["p6"] or match["port"] or default_port)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{scheme}:// URL: port {port} is out of range")
    return host, port


def connect(url: str, *, timeout: float, max_connections: int = 512) -> Client:
    """A client that fails fast: short timeouts, no retries, bounded pool wait.

    A retry would double the time a dead Redis holds a request; Envoy's
    failure mode is the place to decide what happens then. The same holds on
    a cluster (redirects, MOVED and ASK, are followed: they are not failures)
    and with Sentinel (the master is asked for on each new connection).
    """
    fail_fast: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    target = parse_redis_url(url)
    if target.kind == "cluster":
        # max_connections is per node here. reinitialize_steps=0: a MOVED reply
        # updates that slot only; redis-py's default, a full refresh every fifth
        # MOVED, closes the connections of requests in flight (and the first
        # requests of a fresh client, sent before it knows the slots, are MOVED).
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            reinitialize_steps=0,
            **{**target.options, "max_connections": max_connections, **fail_fast},
        )
    if target.kind == "sentinel":
        return _sentinel_master(
            target, timeout, **{**target.options, "max_connections": max_connections, **fail_fast}
        )
    # A plain pool: measured ~8 % less CPU per decision than the blocking pool's
    # condition variable. Past max_connections a call fails at once
    # (StoreUnavailable), which is the right answer to that much concurrency.
    pool = aioredis.ConnectionPool.from_url(url, max_connections=max_connections, **fail_fast)
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool


def subscriber(url: str, *, attempt: int = 0, connect_timeout: float = 1.0) -> aioredis.Redis:
    """A client for SUBSCRIBE: quick to connect, no read timeout (it waits for
    messages). On a cluster, a connection to one of the URL's nodes (classic
    PUBLISH reaches every node), the next one on each attempt; with Sentinel,
    to the current master."""
    waits: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": connect_timeout}
    target = parse_redis_url(url)
    if target.kind == "cluster":
        host, port = target.nodes[attempt % len(target.nodes)]
        return aioredis.Redis(host=host, port=port, **{**target.options, **waits})
    if target.kind == "sentinel":
        return _sentinel_master(target, connect_timeout, **{**target.options, **waits})
    return aioredis.Redis.from_url(url, **waits)


class _SentinelMaster(aioredis.Redis):
    """Sentinel's current master; closing it closes the sentinel connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def _sentinel_master(target: RedisTarget, timeout: float, **options: Any) -> aioredis.Redis:
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    master: aioredis.Redis = sentinels.master_for(
        target.service, redis_class=_SentinelMaster, **options
    )
    return master


def pipelined_to(client: Client, timeout: float) -> PipelinedConnection | None:
    """A pipelined connection to the server client talks to, if that is one
    server over plain TCP (see store/pipelining.py); else None."""
    if not isinstance(client, aioredis.Redis):
        return None
    pool = client.connection_pool
    if pool.connection_class is not aioredis.Connection:  # TLS, unix socket, Sentinel
        return None
    options = pool.connection_kwargs
    return PipelinedConnection(
        options.get("host", "localhost"),
        int(options.get("port", 6379)),
        db=int(options.get("db", 0)),
        username=options.get("username"),
        password=options.get("password"),
        connect_timeout=timeout,
        # Long past any call's deadline: only a server that stopped answering
        # (paused, or gone without a reset) is given up on this way.
        stale_after=max(1.0, 10 * timeout),
    )


@contextlib.asynccontextmanager
async def translate_errors(client: Client, what: str, *, deadline: float) -> AsyncIterator[None]:
    """Runs a Redis call under a deadline; any failure becomes StoreUnavailable.

    The deadline covers what socket timeouts do not: waiting for a pooled
    connection and a reconnect storm."""
    try:
        async with asyncio.timeout(deadline):
            yield
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        if isinstance(exc, RedisConnectionError | OSError) and isinstance(client, aioredis.Redis):
            # A restarted Redis leaves every pooled connection dead; drop the
            # idle ones now rather than fail one request per connection. (A
            # cluster client does this itself, for the node that failed.)
            await client.connection_pool.disconnect(inuse_connections=False)
        cause = "timeout" if isinstance(exc, TimeoutError) else "error"
        if isinstance(exc, RedisConnectionError | OSError):
            cause = "connection"
        raise StoreUnavailable(
            f"Redis unavailable during {what}: {type(exc).__name__}", cause=cause
        ) from exc
    except AttributeError as exc:
        # redis-py closes the idle connections of a node that just failed while
        # they stay in its free queue; a call that takes one meanwhile finds its
        # socket gone mid-write (AttributeError on None). Seen in
        # tests/test_failover.py: that call met a failed Redis, not a bug of ours.
        if not _raised_in_redis_py(exc):
            raise
        raise StoreUnavailable(
            f"Redis unavailable during {what}: connection closed under the call",
            cause="connection",
        ) from exc


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether the innermost frame of exc's traceback is redis-py's code."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    return Path(frame.tb_frame.f_code.co_filename).is_relative_to(_REDIS_PY)
