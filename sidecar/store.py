"""Redis state: every key name and every Lua script Tollway uses lives here.

Key layout. Everything of one account sits under one hash tag, ``{customer}``,
so in Redis Cluster one script can touch it all atomically:

    tw:{cus_1}:a      account hash: plan, status, grace_until, created_at
    tw:{cus_1}:rl     token bucket: tokens, ts (microseconds)
    tw:{cus_1}:q      quota counter for the current period: p (start), used
    tw:{cus_1}:keys   key index: key id -> key hash (for list / revoke)
    tw:{cus_1}:events Stripe event ids applied (sorted by when), kept 30 days
    tw:{cus_1}:lock   the companion's per-account lock around fetch + apply
    tw:{cus_1}:checkouts  checkout session id -> key id whose plaintext was shown
    tw:{cus_1}:usage  usage stream: m (meter), q, t (used at), ms (month), k (idempotency key)
    tw:{cus_1}:totals "<meter>|<month>" -> units recorded; "r|<meter>|<month>" -> billed
    tw:{cus_1}:idem:<sha>     idempotency claim -> record id (dedupe window)
    tw:{cus_1}:rsv:<sha>      a reservation: estimate, meter, state (open|settled|expired)
    tw:{cus_1}:rsvs           open reservations -> settle-by time
    tw:{cus_1}:alerts         quota thresholds already notified this period
    tw:{cus_1}:leases         concurrency leases held: lease id -> expiry
    tw:{cus_1}:bill           reporter: cursor (last planned entry), pending events (JSON)
    tw:{cus_1}:bill:failed    events Stripe refused for good, for people to look at
    tw:k:{<sha256>}   key record: customer, key id, state, expires_at (us)

Global keys (single-key commands only, so any slot will do):

    tw:usage:dirty    customers with usage the reporter has not planned yet
    tw:notifications  notifications for the companion to deliver (capped stream)
    tw:invalidate     the pub/sub channel (classic PUBLISH reaches every node)

The key record lives in its own slot (its hash is what a request carries);
reading it is the one extra round trip before the decision script.

Time: decide.lua reads Redis TIME, so every sidecar shares one clock. Tests
may pass a clock in (microseconds); nothing else does.

Every Redis failure (refused, reset, timed out, busy loading) surfaces as
StoreUnavailable; callers turn that into gRPC UNAVAILABLE, never a decision.

Deployments (parse_redis_url): one server (redis://, rediss://, unix://), a
Redis Cluster (redis+cluster://, rediss+cluster://) or Sentinel's current
master (redis+sentinel://). connect() and subscriber() are the only places
that know which.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from importlib import resources
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

from sidecar import keys
from sidecar.decide import STATUSES, Outcome, OutcomeCode
from sidecar.errors import Busy, ConfigError, NotFound, StoreUnavailable, TollwayError
from sidecar.pipelining import PipelinedConnection
from sidecar.plans import Plan

__all__ = [
    "SUBSCRIPTION_ENDED",
    "Account",
    "Client",
    "KeyRecord",
    "Recorded",
    "RedisTarget",
    "Store",
    "SubscriptionChange",
    "account_key",
    "bucket_key",
    "checkouts_key",
    "connect",
    "events_key",
    "key_index_key",
    "key_record_key",
    "lock_key",
    "parse_outcome",
    "parse_redis_url",
    "quota_key",
    "subscriber",
]

_REDIS_PY: Final = Path(redis.__file__).parent
# Why the companion revoked an account's keys: its subscription was deleted.
SUBSCRIPTION_ENDED: Final = "subscription_ended"
_CUSTOMER_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")


def valid_customer_id(customer_id: str) -> bool:
    """Whether an id can name an account (and so sit inside a hash tag)."""
    return bool(_CUSTOMER_RE.fullmatch(customer_id))


@functools.lru_cache(maxsize=4096)  # the request path names ~9 keys of one account each time
def _tag(customer_id: str) -> str:
    # Braces in an id would move the hash tag; ids are checked at the edges.
    if not _CUSTOMER_RE.fullmatch(customer_id):
        raise TollwayError(f"customer id {customer_id!r}: use letters, digits, '_' or '-'")
    return "{" + customer_id + "}"


def account_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:a"


def bucket_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:rl"


def quota_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:q"


def key_index_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:keys"


def events_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:events"


def lock_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:lock"


def checkouts_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:checkouts"


def usage_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:usage"


def totals_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:totals"


def idempotency_key(customer_id: str, key: str) -> str:
    return f"tw:{_tag(customer_id)}:idem:{_digest(key)}"


def reservation_key(customer_id: str, request_hash: str) -> str:
    return f"tw:{_tag(customer_id)}:rsv:{request_hash}"


def reservations_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:rsvs"


def alerts_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:alerts"


def leases_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:leases"


def bill_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:bill"


def bill_failed_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:bill:failed"


DIRTY_KEY: Final = "tw:usage:dirty"
# Pub/sub channel: "k:<key hash>" or "c:<customer>" changed; sidecars drop
# what they cached about it (see sidecar/cache.py for the staleness bound).
INVALIDATE_CHANNEL: Final = "tw:invalidate"
NOTIFICATIONS_KEY: Final = "tw:notifications"


def _digest(text: str) -> str:
    """A fixed-length, key-safe name for client-chosen strings."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def request_hash(request_id: str) -> str:
    return _digest(request_id)


def key_record_key(hashed: str) -> str:
    return f"tw:k:{{{hashed}}}"


def _script(name: str) -> str:
    return resources.files("sidecar").joinpath("lua", name).read_text()


@dataclass(frozen=True, slots=True)
class Account:
    customer_id: str
    plan: str
    status: str
    grace_until: int = 0
    created_at: int = 0
    subscription_id: str = ""
    period_end: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Recorded:
    """record_usage.lua's answer."""

    duplicate: bool
    record_id: str
    units: int  # units recorded now (0 for a duplicate or a pure refund)
    quota_used: int  # the quota counter after any settlement


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """apply_subscription.lua's answer."""

    result: str  # applied | duplicate | kept
    old_status: str
    new_status: str
    old_plan: str
    new_plan: str
    grace_until: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    customer_id: str
    state: str  # active | revoked
    expires_at_us: int = 0  # 0: never
    created_at: int = 0
    environment: str = "live"
    revoked_reason: str = ""  # "subscription_ended" when the companion revoked it

    @property
    def revoked(self) -> bool:
        return self.state == "revoked"

    def usable(self, now_us: int | None = None) -> bool:
        """Neither revoked nor expired (by the wall clock, or now_us): what any
        call naming a customer by this key requires, not just Authorize."""
        now = time.time_ns() // 1000 if now_us is None else now_us
        return not self.revoked and (self.expires_at_us == 0 or now < self.expires_at_us)


def parse_outcome(raw: list[Any]) -> Outcome:
    """Reads decide.lua's reply (see the script's header for the contract)."""

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return Outcome(
        code=OutcomeCode(int(raw[0])),
        plan=text(raw[1]),
        status=text(raw[2]),
        tokens=int(raw[3]) / 1000,
        reset_ms=int(raw[4]),
        retry_ms=int(raw[5]),
        quota_used=int(raw[6]),
        period_end=int(raw[7]),
        now=int(raw[8]),
        thresholds=tuple(int(p) for p in text(raw[9]).split(",") if p),
    )


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


class Store:
    """Tollway's state in Redis. One instance per process, shared by all requests."""

    def __init__(
        self,
        client: Client,
        *,
        timeout: float = 0.05,
        clock_us: Callable[[], int] | None = None,
        pipelined: bool = True,
    ) -> None:
        self._redis = client
        # Covers what socket timeouts do not: waiting for a pooled connection
        # and a reconnect storm. Twice the socket timeout leaves room for one
        # connect plus one call.
        self._deadline = timeout * 2
        self._clock_us = clock_us
        # The request path's two commands share one pipelined connection where
        # the deployment allows it (sidecar/pipelining.py says why).
        self._fast = _pipelined(client, timeout) if pipelined else None
        self._decide_source = _script("decide.lua")
        self._decide = client.register_script(self._decide_source)
        self._apply = client.register_script(_script("apply_subscription.lua"))
        self._release = client.register_script(_script("release_lock.lua"))
        self._record = client.register_script(_script("record_usage.lua"))
        self._expire_rsv = client.register_script(_script("expire_reservation.lua"))
        self._plan_batch = client.register_script(_script("plan_batch.lua"))
        self._ack_batch = client.register_script(_script("ack_batch.lua"))

    @property
    def redis(self) -> Client:
        return self._redis

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            if isinstance(exc, RedisConnectionError | OSError) and isinstance(
                self._redis, aioredis.Redis
            ):
                # A restarted Redis leaves every pooled connection dead; drop the
                # idle ones now rather than fail one request per connection. (A
                # cluster client does this itself, for the node that failed.)
                await self._redis.connection_pool.disconnect(inuse_connections=False)
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

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._redis.ping()

    async def now_us(self) -> int:
        """The store's clock: the injected one, else Redis TIME."""
        if self._clock_us is not None:
            return self._clock_us()
        async with self._guard("time"):
            seconds, micros = await self._redis.time()
        return int(seconds) * 1_000_000 + int(micros)

    # -- the request path -------------------------------------------------

    async def lookup_key(self, hashed: str) -> KeyRecord | None:
        async with self._guard("key lookup"):
            if self._fast is None:
                raw = await self._redis.hgetall(key_record_key(hashed))
            else:
                flat = await self._fast.execute("HGETALL", key_record_key(hashed))
                raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return _key_record(raw) if raw else None

    async def decide(
        self,
        customer_id: str,
        plan: Plan | None,
        *,
        cost: int,
        feature_ok: bool,
        key_expires_at_us: int,
        fallback_plan: str | None = None,
        request_id: str = "",
        reservation_ttl: int = 300,
        thresholds: tuple[int, ...] = (),
        lease_id: str = "",
    ) -> Outcome:
        """Runs decide.lua for one request. plan None asks only for the real plan.
        With request_id, a metered cost is reserved (settled later) instead.
        A plan with a concurrency limit takes the lease lease_id."""
        reserve = request_hash(request_id) if request_id else ""
        args: list[Any] = [
            "" if self._clock_us is None else self._clock_us(),
            plan.name if plan else "",
            repr(plan.rate.per_second) if plan else "1",
            plan.burst if plan else 1,
            cost,
            plan.quota.limit if plan and plan.quota else 0,
            plan.quota.period if plan and plan.quota else "month",
            plan.overage if plan else "block",
            key_expires_at_us,
            1 if feature_ok else 0,
            fallback_plan or "",
            (plan.meter or "") if plan else "",
            reserve,
            reservation_ttl,
            ",".join(map(str, thresholds)),
            plan.concurrency if plan else 0,
            lease_id,
            plan.lease_ttl if plan else 60,
        ]
        keys = [
            account_key(customer_id),
            bucket_key(customer_id),
            quota_key(customer_id),
            usage_key(customer_id),
            totals_key(customer_id),
            reservation_key(customer_id, reserve or "-"),
            reservations_key(customer_id),
            alerts_key(customer_id),
            leases_key(customer_id),
        ]
        async with self._guard("decision"):
            if self._fast is None:
                raw = await self._decide(keys=keys, args=args)
            else:
                sha = self._decide.sha
                raw = await self._fast.evalsha(sha, self._decide_source, keys, args)
        return parse_outcome(raw)

    # -- administration (CLI, companion) ---------------------------------

    async def create_account(self, customer_id: str, plan: str, status: str = "active") -> Account:
        _check_status(status)
        now = int(time.time())
        async with self._guard("account create"):
            created = await self._redis.hsetnx(account_key(customer_id), "plan", plan)
            if not created:
                raise TollwayError(f"account {customer_id} already exists")
            await self._redis.hset(
                account_key(customer_id),
                mapping={"status": status, "grace_until": 0, "created_at": now},
            )
        return Account(customer_id, plan, status, 0, now)

    async def get_account(self, customer_id: str) -> Account | None:
        async with self._guard("account read"):
            raw = await self._redis.hgetall(account_key(customer_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return Account(
            customer_id=customer_id,
            plan=fields.get("plan", ""),
            status=fields.get("status", ""),
            grace_until=int(fields.get("grace_until") or 0),
            created_at=int(fields.get("created_at") or 0),
            subscription_id=fields.get("subscription_id", ""),
            period_end=int(fields.get("period_end") or 0),
            error=fields.get("error", ""),
        )

    async def require_account(self, customer_id: str) -> Account:
        account = await self.get_account(customer_id)
        if account is None:
            raise NotFound(f"account {customer_id} does not exist")
        return account

    async def set_status(self, customer_id: str, status: str, *, grace_until: int = 0) -> Account:
        _check_status(status)
        await self.require_account(customer_id)
        async with self._guard("account update"):
            await self._redis.hset(
                account_key(customer_id), mapping={"status": status, "grace_until": grace_until}
            )
        await self.invalidate(customer=customer_id)
        return await self.require_account(customer_id)

    async def set_plan(self, customer_id: str, plan: str) -> Account:
        await self.require_account(customer_id)
        async with self._guard("account update"):
            await self._redis.hset(account_key(customer_id), "plan", plan)
        await self.invalidate(customer=customer_id)
        return await self.require_account(customer_id)

    async def invalidate(self, *, key_hash: str = "", customer: str = "") -> None:
        """Tells every sidecar to drop what it cached about a key or an account."""
        async with self._guard("invalidation"):
            if key_hash:
                await self._redis.publish(INVALIDATE_CHANNEL, f"k:{key_hash}")
            if customer:
                await self._redis.publish(INVALIDATE_CHANNEL, f"c:{customer}")

    async def usage(self, customer_id: str) -> tuple[float | None, int, int]:
        """(tokens as last written or None, quota used, period start) for display."""
        async with self._guard("usage read"):
            bucket = await self._redis.hget(bucket_key(customer_id), "tokens")
            period, used = await self._redis.hmget(quota_key(customer_id), "p", "used")
        return (
            float(bucket) if bucket is not None else None,
            int(used or 0),
            int(period or 0),
        )

    async def issue_key(
        self, customer_id: str, *, environment: keys.Environment, expires_in: int | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for an existing account: (plaintext to show once, stored record)."""
        await self.require_account(customer_id)
        key = keys.generate(environment)
        hashed = keys.key_hash(key)
        now_us = await self.now_us()
        record = KeyRecord(
            key_id=keys.key_id(hashed),
            customer_id=customer_id,
            state="active",
            expires_at_us=now_us + expires_in * 1_000_000 if expires_in else 0,
            created_at=now_us // 1_000_000,
            environment=environment,
        )
        await self.add_key(hashed, record)
        return key, record

    async def add_key(self, hashed: str, record: KeyRecord) -> None:
        # Two slots, so two writes: the record first, so an index entry never
        # points at nothing.
        async with self._guard("key create"):
            await self._redis.hset(
                key_record_key(hashed),
                mapping={
                    "customer": record.customer_id,
                    "key_id": record.key_id,
                    "state": record.state,
                    "expires_at": record.expires_at_us,
                    "created_at": record.created_at,
                    "env": record.environment,
                },
            )
            await self._redis.hset(key_index_key(record.customer_id), record.key_id, hashed)
        await self.invalidate(key_hash=hashed)  # a sidecar may remember it as unknown

    async def list_keys(self, customer_id: str) -> list[KeyRecord]:
        async with self._guard("key list"):
            index = await self._redis.hgetall(key_index_key(customer_id))
            records = []
            for hashed in index.values():
                raw = await self._redis.hgetall(key_record_key(_text(hashed)))
                if raw:
                    records.append(_key_record(raw))
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def _key_hash(self, customer_id: str, key_id: str) -> str:
        async with self._guard("key read"):
            hashed = await self._redis.hget(key_index_key(customer_id), key_id)
        if hashed is None:
            raise NotFound(f"key {key_id} of {customer_id} does not exist")
        return _text(hashed)

    async def revoke_key(self, customer_id: str, key_id: str, *, reason: str = "") -> None:
        hashed = await self._key_hash(customer_id, key_id)
        async with self._guard("key revoke"):
            await self._redis.hset(
                key_record_key(hashed),
                mapping={
                    "state": "revoked",
                    "revoked_at": int(time.time()),
                    "revoked_reason": reason,
                },
            )
        await self.invalidate(key_hash=hashed)

    async def expire_key(self, customer_id: str, key_id: str, at_us: int) -> None:
        """Sets the key's expiry to at_us, unless it already expires sooner."""
        hashed = await self._key_hash(customer_id, key_id)
        async with self._guard("key expiry"):
            current = await self._redis.hget(key_record_key(hashed), "expires_at")
            current_us = int(current or 0)
            if current_us == 0 or at_us < current_us:
                await self._redis.hset(key_record_key(hashed), "expires_at", at_us)
        await self.invalidate(key_hash=hashed)

    async def revoke_all_keys(self, customer_id: str, *, reason: str = "") -> int:
        """Marks every active key of the account revoked (records stay, for audit)."""
        revoked = 0
        for record in await self.list_keys(customer_id):
            if not record.revoked:
                await self.revoke_key(customer_id, record.key_id, reason=reason)
                revoked += 1
        return revoked

    # -- Stripe sync (the companion) --------------------------------------

    async def event_seen(self, customer_id: str, event_id: str) -> bool:
        async with self._guard("event lookup"):
            return await self._redis.zscore(events_key(customer_id), event_id) is not None

    async def apply_subscription(
        self,
        customer_id: str,
        *,
        event_id: str,
        subscription_id: str,
        status: str,
        plan: str | None,
        error: str,
        period_end: int,
        grace_seconds: int,
        trouble_since: int,
        remember_events_for: int = 30 * 86400,
    ) -> SubscriptionChange:
        """Runs apply_subscription.lua (see its header for the contract)."""
        _check_status(status)
        async with self._guard("subscription update"):
            raw = await self._apply(
                keys=[account_key(customer_id), events_key(customer_id)],
                args=[event_id, subscription_id, status, plan or "", error, period_end,
                      grace_seconds, trouble_since, remember_events_for],
            )  # fmt: skip
        return SubscriptionChange(
            result=_text(raw[0]),
            old_status=_text(raw[1]),
            new_status=_text(raw[2]),
            old_plan=_text(raw[3]),
            new_plan=_text(raw[4]),
            grace_until=int(raw[5]),
        )

    @contextlib.asynccontextmanager
    async def account_lock(
        self, customer_id: str, *, ttl: float = 30.0, wait: float = 10.0, purpose: str = "sync"
    ) -> AsyncIterator[None]:
        """Serializes the companion's read-from-Stripe-then-write per account
        (purpose "sync") or its billing (purpose "bill"), across companion
        instances. The TTL frees a lock whose holder died."""
        name = lock_key(customer_id) + ("" if purpose == "sync" else f":{purpose}")
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait
        while True:
            async with self._guard("lock"):
                acquired = await self._redis.set(name, token, nx=True, px=int(ttl * 1000))
            if acquired:
                break
            if time.monotonic() > deadline:
                raise Busy(f"account {customer_id} stayed locked for {wait:.0f}s")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            # If Redis is gone, so is our chance to unlock: the TTL frees it.
            with contextlib.suppress(StoreUnavailable):
                async with self._guard("unlock"):
                    await self._release(keys=[name], args=[token])

    async def claim_checkout(self, customer_id: str, session_id: str, key_id: str) -> bool:
        """Records that session_id's key was shown; False if one already was."""
        async with self._guard("checkout claim"):
            return bool(await self._redis.hsetnx(checkouts_key(customer_id), session_id, key_id))

    # -- usage -------------------------------------------------------------

    async def record_usage(
        self,
        customer_id: str,
        *,
        meter: str,
        quantity: int,
        at: int,
        idempotency: str,
        dedupe_window: int,
        request_id: str = "",
        lease_id: str = "",
        wait_for_aof: bool = False,
        wait_for_replicas: int = 0,
    ) -> Recorded:
        """record_usage.lua (see its header). With wait_for_aof, returns only
        once the record is fsynced to Redis's append-only file (WAITAOF); with
        wait_for_replicas, once that many replicas have it (WAIT): a failover
        then cannot lose it. Else raises StoreUnavailable, and the client's
        retry with the same idempotency key waits again (the record counts once)."""
        settle = request_hash(request_id) if request_id else ""
        keys = [
            idempotency_key(customer_id, idempotency),
            usage_key(customer_id),
            totals_key(customer_id),
            reservation_key(customer_id, settle or "-"),
            reservations_key(customer_id),
            quota_key(customer_id),
            leases_key(customer_id),
        ]
        args: list[Any] = [
            meter, quantity, at, month_start(at), idempotency, dedupe_window, settle, lease_id
        ]  # fmt: skip
        async with self._guard("usage record"):
            raw = await self._record(keys=keys, args=args)
            if wait_for_aof or wait_for_replicas:
                await self._confirm(keys[0], _text(raw[1]), wait_for_aof, wait_for_replicas)
        return Recorded(_text(raw[0]) == "duplicate", _text(raw[1]), int(raw[2]), int(raw[3]))

    async def _confirm(self, claim: str, record_id: str, aof: bool, replicas: int) -> None:
        """Waits until the usage claim (and so its record) is fsynced or replicated.

        WAIT and WAITAOF count the writes of the connection they are sent on,
        and the script may have run on another pooled connection, or on another
        sidecar (a duplicate writes nothing). So this connection first rewrites
        the claim unchanged: a write after the record on the same master, which
        the waits then cover. A claim that is gone (a failover lost it before a
        replica had it) is not confirmed: the client's retry records it anew.
        On a cluster all of it goes to the node that holds the account, with no
        redirect followed (that would leave the waits on another connection)."""
        # Bounded like every call here, and under the socket timeout (half the
        # deadline), so a wait that falls short answers before the socket gives up.
        wait_ms = max(1, int(self._deadline * 1000) // 4)
        if isinstance(self._redis, RedisCluster):
            node = self._redis.get_node_from_key(claim)
            pipe: Any = self._redis.pipeline()
            pipe.execute_command("SET", claim, record_id, "XX", "KEEPTTL", target_nodes=node)
            if replicas:
                pipe.execute_command("WAIT", replicas, wait_ms, target_nodes=node)
            if aof:
                pipe.execute_command("WAITAOF", 1, 0, wait_ms, target_nodes=node)
            replies = await pipe.execute(allow_redirections=False)
        else:
            async with self._redis.pipeline(transaction=False) as plain:
                plain.set(claim, record_id, xx=True, keepttl=True)
                if replicas:
                    plain.execute_command("WAIT", replicas, wait_ms)
                if aof:
                    plain.execute_command("WAITAOF", 1, 0, wait_ms)
                replies = await plain.execute()
        if not replies[0]:
            raise StoreUnavailable("usage record lost in a failover; retry to record it")
        if replicas and int(replies[1]) < replicas:
            raise StoreUnavailable(
                f"usage record on {int(replies[1])} of {replicas} replicas (WAIT)"
            )
        if aof and int(replies[-1][0]) < 1:
            raise StoreUnavailable("usage record not yet on disk (WAITAOF)")

    async def release(self, customer_id: str, lease_id: str) -> bool:
        """Frees a concurrency lease; False if it was not held (expired, released)."""
        async with self._guard("lease release"):
            return bool(await self._redis.zrem(leases_key(customer_id), lease_id))

    async def mark_dirty(self, customers: Iterable[str]) -> None:
        """Tells the reporter these customers have usage to bill."""
        batch = list(customers)
        if batch:
            async with self._guard("usage index"):
                await self._redis.sadd(DIRTY_KEY, *batch)

    async def dirty_customers(self, limit: int) -> list[str]:
        async with self._guard("usage index"):
            members: Any = await self._redis.srandmember(DIRTY_KEY, limit)
        return sorted(_text(m) for m in members or [])

    async def clear_dirty(self, customer_id: str) -> None:
        """Drops the customer from the index, then puts it back if usage arrived
        meanwhile (the check comes after the removal, so nothing slips through)."""
        async with self._guard("usage index"):
            await self._redis.srem(DIRTY_KEY, customer_id)
            open_reservations = await self._redis.zcard(reservations_key(customer_id))
        if open_reservations or await self.unbilled_since(customer_id) is not None:
            await self.mark_dirty([customer_id])

    async def find_usage_streams(self, count: int = 1000) -> list[str]:
        """Customers with a usage stream, found by scanning (the index's safety net)."""
        found = []
        async with self._guard("usage scan"):
            async for name in self._redis.scan_iter(match="tw:{*}:usage", count=count):
                text = _text(name)
                found.append(text[text.index("{") + 1 : text.index("}")])
        return found

    async def plan_batch(self, customer_id: str, max_entries: int) -> list[dict[str, Any]]:
        async with self._guard("billing plan"):
            raw = await self._plan_batch(
                keys=[usage_key(customer_id), bill_key(customer_id)],
                args=[customer_id, max_entries],
            )
        events: list[dict[str, Any]] = json.loads(_text(raw))
        return events

    async def ack_batch(self, customer_id: str, identifier: str, *, refused: str = "") -> int:
        async with self._guard("billing ack"):
            left = await self._ack_batch(
                keys=[bill_key(customer_id), totals_key(customer_id), usage_key(customer_id),
                      bill_failed_key(customer_id)],
                args=[identifier, refused],
            )  # fmt: skip
        return int(left)

    async def unbilled_since(self, customer_id: str) -> int | None:
        """Unix ms of the oldest usage not yet planned for billing, or of the pending
        plan's cursor; None when everything recorded is billed."""
        async with self._guard("usage read"):
            state: Any = await self._redis.hmget(bill_key(customer_id), "cursor", "pending")
            cursor, pending = state
            after = "(" + _text(cursor) if cursor else "-"
            entries: Any = await self._redis.xrange(usage_key(customer_id), after, "+", count=1)
        if pending and _text(pending) != "[]":
            return int(_text(cursor).split("-")[0]) if cursor else 0
        if entries:
            return int(_text(entries[0][0]).split("-")[0])
        return None

    async def due_reservations(self, customer_id: str, limit: int = 1000) -> list[str]:
        async with self._guard("reservations"):
            now = int(time.time())
            members: Any = await self._redis.zrangebyscore(
                reservations_key(customer_id), "-inf", now, start=0, num=limit
            )
        return [_text(m) for m in members]

    async def expire_reservation(self, customer_id: str, request_hash: str) -> int:
        async with self._guard("reservation expiry"):
            billed = await self._expire_rsv(
                keys=[reservation_key(customer_id, request_hash), reservations_key(customer_id),
                      usage_key(customer_id), totals_key(customer_id)],
                args=[request_hash],
            )  # fmt: skip
        return int(billed)

    async def usage_totals(self, customer_id: str, month: int) -> dict[str, tuple[int, int]]:
        """{meter: (units recorded, units Stripe accepted)} for the month starting at month."""
        async with self._guard("usage read"):
            raw = await self._redis.hgetall(totals_key(customer_id))
        used: dict[str, int] = {}
        billed: dict[str, int] = {}
        for field, value in raw.items():
            parts = _text(field).split("|")
            if parts[0] == "r" and len(parts) == 3 and parts[2] == str(month):
                billed[parts[1]] = int(value)
            elif len(parts) == 2 and parts[1] == str(month):
                used[parts[0]] = int(value)
        return {m: (used.get(m, 0), billed.get(m, 0)) for m in sorted(used.keys() | billed.keys())}

    async def refused_events(self, customer_id: str) -> list[dict[str, Any]]:
        async with self._guard("billing read"):
            raw = await self._redis.lrange(bill_failed_key(customer_id), 0, -1)
        return [json.loads(_text(item)) for item in raw]

    async def notify(self, payload: dict[str, Any]) -> None:
        """Queues a notification for the companion to deliver (log + callback)."""
        async with self._guard("notification"):
            await self._redis.xadd(
                NOTIFICATIONS_KEY, {"json": json.dumps(payload)}, maxlen=10_000, approximate=True
            )

    async def notifications_after(
        self, last_id: str, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        async with self._guard("notification read"):
            raw: Any = await self._redis.xrange(NOTIFICATIONS_KEY, "(" + last_id, "+", count=count)
        found = []
        for entry_id, fields in raw or []:
            body = {_text(k): _text(v) for k, v in fields.items()}
            found.append((_text(entry_id), json.loads(body["json"])))
        return found

    async def notification_cursor(self) -> str:
        async with self._guard("notification cursor"):
            raw = await self._redis.get(NOTIFICATIONS_KEY + ":cursor")
        return _text(raw) if raw else "0-0"

    async def set_notification_cursor(self, entry_id: str) -> None:
        async with self._guard("notification cursor"):
            await self._redis.set(NOTIFICATIONS_KEY + ":cursor", entry_id)

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._redis.aclose()


def _pipelined(client: Client, timeout: float) -> PipelinedConnection | None:
    """A pipelined connection to the server client talks to, if that is one
    server over plain TCP (see sidecar/pipelining.py); else None."""
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


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether the innermost frame of exc's traceback is redis-py's code."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    return Path(frame.tb_frame.f_code.co_filename).is_relative_to(_REDIS_PY)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise TollwayError(f"status {status!r}: expected one of {', '.join(STATUSES)}")


def month_start(at: int) -> int:
    """Unix seconds of the first instant of at's calendar month (UTC)."""
    moment = datetime.fromtimestamp(at, UTC)
    return int(moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key_record(raw: Mapping[bytes | str, bytes | str]) -> KeyRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return KeyRecord(
        key_id=fields["key_id"],
        customer_id=fields["customer"],
        state=fields.get("state", "active"),
        expires_at_us=int(fields.get("expires_at", "0")),
        created_at=int(fields.get("created_at", "0")),
        environment=fields.get("env", "live"),
        revoked_reason=fields.get("revoked_reason", ""),
    )
