"""Settings: one frozen object per process, built once from the TOML file and
an environment mapping (passed in, so tests need no patching).

    TOLLWAY_CONFIG            path of tollway.toml (or --config)
    TOLLWAY_REDIS_URL         redis://host:port/db; overrides [redis] url
    TOLLWAY_REDIS_TIMEOUT_MS  per-call Redis timeout; overrides [redis] timeout_ms
    TOLLWAY_HTTP_LISTEN       host:port of HTTP ext_authz; overrides [sidecar] http_listen

    [sidecar]  listen = "127.0.0.1:50051"   metrics_listen = "127.0.0.1:9464" (optional)
               health_follows_redis = true   http_listen = "127.0.0.1:50052" (optional)
               require_service_token = false (true: usage calls by customer id need a token)
               tls_cert = "cert.pem"  tls_key = "key.pem"  tls_client_ca = "ca.pem" (optional)
    [webhook]  listen = "127.0.0.1:8000"
    [redis]    url = "redis://127.0.0.1:6379/0"   timeout_ms = 50
    [headers]  api_key = ["x-api-key"]  bearer = true
               customer = "x-tollway-customer"  plan = "x-tollway-plan"
    [billing]  grace_period = "5d"  fallback_plan = "free"   (optional)
    [usage]    dedupe_window = "24h"  reservation_ttl = "5m"  thresholds = [80, 100]
               wait_for_aof = false  wait_for_replicas = 0
    [credits]  low_balance = [100, 0]  top_up_url = "https://…/pricing"   (plans with credits)
               auto_top_up_at = 100  auto_top_up_pack = "10k"   (optional; both or neither;
               a [[plans]] entry may set its own pair for its accounts)
    [envoy]    settlement = "none" | "ext_proc" | "access_log"  cost_header = "x-tollway-cost"
               ext_proc = true (older spelling of settlement = "ext_proc")
    [stripe]   read by the companion (webhook/config.py)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError
from sidecar.fields import Table, expect
from sidecar.plans import Catalog, Plan, parse_catalog
from sidecar.tls import TlsFiles

__all__ = [
    "SETTLEMENTS",
    "Billing",
    "Credits",
    "EnvoyOptions",
    "HeaderNames",
    "Settings",
    "Settlement",
    "Usage",
    "load_settings",
    "parse_duration",
    "redact_url",
]

DEFAULT_LISTEN: Final = "127.0.0.1:50051"
DEFAULT_WEBHOOK_LISTEN: Final = "127.0.0.1:8000"
DEFAULT_REDIS_TIMEOUT_MS: Final = 50
_HEADER_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*")
_HEADER: Final = "an HTTP header name"
_LISTEN_RE: Final = re.compile(r"\[?[\w.:-]+\]?:\d{1,5}")
_HOST_PORT: Final = "host:port"
_REDIS_URL_RE: Final = re.compile(
    r"(redis|rediss|unix|redis\+cluster|rediss\+cluster|redis\+sentinel)://"
)
_SECTIONS: Final = frozenset(
    {
        "sidecar",
        "webhook",
        "redis",
        "headers",
        "billing",
        "usage",
        "stripe",
        "portal",
        "plans",
        "routes",
        "meters",
        "credit_packs",
        "credits",
        "envoy",
    }
)


SETTLEMENTS: Final = ("none", "ext_proc", "access_log")
Settlement = Literal["none", "ext_proc", "access_log"]


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """How Tollway works with Envoy's response path: what settles each request."""

    # none: nothing after the response; usage is metered at the estimate on
    #   admission, leases free at their TTL (or by Release).
    # ext_proc: Envoy's ext_proc filter brings each response back (deploy/envoy-grpc.yaml);
    # access_log: Envoy's gRPC access log does, batched, off the request path
    #   (deploy/envoy.yaml, deploy/envoy-accesslog.yaml). Either way Check reserves each request's
    #   cost under x-request-id, and the settlement moves it to the real cost.
    settlement: Settlement = "none"
    cost_header: str = "x-tollway-cost"  # the upstream's real cost; removed before the client

    @property
    def reserves(self) -> bool:
        """Check reserves the cost under the request id, for a settlement to settle."""
        return self.settlement != "none"

    @property
    def ext_proc(self) -> bool:
        """The older name of `reserves` (read by the HTTP transport)."""
        return self.reserves


@dataclass(frozen=True, slots=True)
class Usage:
    """How usage is recorded."""

    dedupe_window: int = 86400  # an idempotency key is remembered this long (>= 24 h)
    reservation_ttl: int = 300  # an unsettled reservation is billed at its estimate after
    thresholds: tuple[int, ...] = (80, 100)  # quota percentages that notify, once per period
    wait_for_aof: bool = False  # acknowledge usage only once fsynced (WAITAOF, Redis >= 7.2)
    wait_for_replicas: int = 0  # acknowledge usage only once on this many replicas (WAIT)


@dataclass(frozen=True, slots=True)
class Billing:
    """What a failed payment means for access."""

    grace_seconds: int = 5 * 86400
    fallback_plan: str | None = None  # after grace: this plan instead of no access


@dataclass(frozen=True, slots=True)
class Credits:
    """Prepaid balances, for plans with credits = true."""

    low_balance: tuple[int, ...] = ()  # balances that notify when reached, once per fall
    top_up_url: str = ""  # where a denial for want of credits sends the customer
    # Auto top-up: when a burn takes the balance to auto_top_up_at or below, buy
    # auto_top_up_pack off-session, once per fall (None: off). Each account may
    # set its own mark or turn it off (Store.set_auto_top_up).
    auto_top_up_at: int | None = None
    auto_top_up_pack: str | None = None

    def top_up_at_for(self, plan: Plan | None) -> int | None:
        """The auto top-up mark of an account on plan that has no mark of its own:
        the plan's auto_top_up_at, else [credits]'. Pure."""
        if plan is not None and plan.auto_top_up_at is not None:
            return plan.auto_top_up_at
        return self.auto_top_up_at

    def top_up_pack_for(self, plan: Plan | None) -> str | None:
        """The pack an auto top-up buys for an account on plan. Pure."""
        if plan is not None and plan.auto_top_up_pack is not None:
            return plan.auto_top_up_pack
        return self.auto_top_up_pack

    def low_balance_for(self, plan: Plan | None) -> tuple[int, ...]:
        """The low-balance marks that notify for plan's accounts (none without credits)."""
        return self.low_balance if plan is not None and plan.credits else ()


@dataclass(frozen=True, slots=True)
class HeaderNames:
    """Which request headers carry the key, and which carry identity upstream."""

    api_key: tuple[str, ...] = ("x-api-key",)
    bearer: bool = True
    customer: str = "x-tollway-customer"
    plan: str = "x-tollway-plan"


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1****@", url)


@dataclass(frozen=True, slots=True)
class Settings:
    catalog: Catalog
    redis_url: str | None = field(default=None, repr=False)
    redis_timeout: float = DEFAULT_REDIS_TIMEOUT_MS / 1000
    listen: str = DEFAULT_LISTEN
    metrics_listen: str | None = None  # Prometheus /metrics of the sidecar, off by default
    # Envoy's ext_authz in HTTP service mode (http_authz.py), beside the gRPC port;
    # off by default.
    http_listen: str | None = None
    # gRPC health turns NOT_SERVING while Redis does not answer, so a load balancer
    # routes around this sidecar. Off where health feeds a liveness probe or every
    # sidecar shares one Redis: restarting them, or all leaving the pool, would not
    # bring Redis back; requests still get UNAVAILABLE either way.
    health_follows_redis: bool = True
    # Usage calls that name a customer by id (RecordUsage, GetUsage) need a
    # service token with usage:write / usage:read; by API key they need none.
    require_service_token: bool = False
    tls: TlsFiles | None = None  # both listeners serve TLS (mutual, with a client CA)
    webhook_listen: str = DEFAULT_WEBHOOK_LISTEN
    headers: HeaderNames = HeaderNames()
    billing: Billing = Billing()
    usage: Usage = Usage()
    credits: Credits = Credits()
    envoy: EnvoyOptions = EnvoyOptions()
    config_path: Path | None = None

    def __repr__(self) -> str:
        url = redact_url(self.redis_url) if self.redis_url else None
        return (
            f"Settings(config_path={self.config_path}, listen={self.listen!r}, "
            f"webhook_listen={self.webhook_listen!r}, redis_url={url!r}, "
            f"plans={sorted(self.catalog.plans)})"
        )


def _is_header(name: str) -> bool:
    return bool(_HEADER_RE.fullmatch(name.lower()))


def _header(table: Table, name: str, default: str) -> str:
    return table.string(name, default, what=_HEADER, valid=_is_header).lower()


def _parse_usage(usage: Table) -> Usage:
    try:
        window = parse_duration(usage.data.get("dedupe_window", "24h"))
        ttl = parse_duration(usage.data.get("reservation_ttl", "5m"))
    except ValueError as exc:
        raise ConfigError(f"[usage] {exc}") from None
    if window < 86400:
        raise ConfigError(
            "[usage] dedupe_window: at least 24h, so client retries stay deduplicated"
        )
    thresholds = usage.array(
        "thresholds",
        int,
        (80, 100),
        what="percentages like [80, 100]",
        valid=lambda percent: 1 <= percent <= 1000,
        echo=False,
    )
    replicas = usage.integer(
        "wait_for_replicas", 0, what="a number of replicas, 0 to 64", valid=lambda n: 0 <= n <= 64
    )
    return Usage(
        dedupe_window=window,
        reservation_ttl=ttl,
        thresholds=tuple(sorted(thresholds)),
        wait_for_aof=usage.boolean("wait_for_aof", False),
        wait_for_replicas=replicas,
    )


def _parse_tls(sidecar: Table, config_path: Path | None) -> TlsFiles | None:
    """Paths relative to the config file's directory, like a web server's."""
    base = config_path.parent if config_path else Path(".")
    found = {
        name: sidecar.string(name, None, what="a path to a PEM file")
        for name in ("tls_cert", "tls_key", "tls_client_ca")
    }
    if found["tls_cert"] is None and found["tls_key"] is None:
        if found["tls_client_ca"] is not None:
            raise ConfigError("[sidecar] tls_client_ca: needs tls_cert and tls_key")
        return None
    if found["tls_cert"] is None or found["tls_key"] is None:
        raise ConfigError("[sidecar] tls_cert and tls_key: set both (or neither)")
    ca = found["tls_client_ca"]
    tls = TlsFiles(
        cert=base / found["tls_cert"],
        key=base / found["tls_key"],
        client_ca=base / ca if ca else None,
    )
    tls.check()
    return tls


def _parse_credits(credits: Table, catalog: Catalog) -> Credits:
    low = credits.array(
        "low_balance", int, (), what="balances like [100, 0]", valid=lambda n: n >= 0, echo=False
    )
    url = credits.string(
        "top_up_url",
        "",
        what="an http(s) URL",
        valid=lambda u: u.startswith(("https://", "http://")),
    )
    at = credits.integer("auto_top_up_at", -1, what="a balance >= 0", valid=lambda n: n >= 0)
    pack = credits.string("auto_top_up_pack", None, what="a credit pack's name")
    if pack is not None and pack not in catalog.credit_packs:
        raise ConfigError(f"[credits] auto_top_up_pack: {pack!r} is not in [[credit_packs]]")
    if (pack is None) != (at < 0):
        raise ConfigError("[credits] auto_top_up_at and auto_top_up_pack: set both (or neither)")
    return Credits(
        low_balance=tuple(sorted(set(low), reverse=True)),
        top_up_url=url,
        auto_top_up_at=None if at < 0 else at,
        auto_top_up_pack=pack,
    )


def _parse_envoy(envoy: Table) -> EnvoyOptions:
    """settlement, defaulting from the older ext_proc (true: "ext_proc"); both given
    must agree, since each names what Envoy runs."""
    legacy = envoy.boolean("ext_proc", None)
    chosen = envoy.string(
        "settlement",
        None,
        what='"none", "ext_proc" or "access_log"',
        valid=SETTLEMENTS.__contains__,
    )
    if chosen is None:
        chosen = "ext_proc" if legacy else "none"
    elif legacy is not None and legacy is not (chosen == "ext_proc"):
        raise ConfigError(
            f"[envoy] ext_proc: {str(legacy).lower()} contradicts settlement = {chosen!r}; "
            "drop ext_proc (settlement replaces it)"
        )
    return EnvoyOptions(
        settlement=cast(Settlement, chosen),
        cost_header=_header(envoy, "cost_header", "x-tollway-cost"),
    )


def settings_from_document(
    doc: Mapping[str, Any], environ: Mapping[str, str], *, path: Path | None = None
) -> Settings:
    document = Table(doc).only(_SECTIONS)
    catalog = parse_catalog(doc)
    sidecar = document.section("sidecar").only(
        {
            "listen",
            "metrics_listen",
            "health_follows_redis",
            "http_listen",
            "require_service_token",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
        }
    )
    follows = sidecar.boolean("health_follows_redis", True)
    webhook = document.section("webhook").only({"listen"})
    redis = document.section("redis").only({"url", "timeout_ms"})
    headers = document.section("headers").only({"api_key", "bearer", "customer", "plan"})

    redis_url = redis.string(
        "url",
        None,
        what="redis://, rediss://, unix://, redis+cluster://, rediss+cluster:// or "
        "redis+sentinel:// URL",
        valid=_REDIS_URL_RE.match,
        echo=False,  # a URL may carry a password
        env=environ.get("TOLLWAY_REDIS_URL"),
    )
    timeout_ms = redis.integer(
        "timeout_ms",
        DEFAULT_REDIS_TIMEOUT_MS,
        what="1..10000 ms",
        valid=lambda ms: 1 <= ms <= 10_000,
        env=environ.get("TOLLWAY_REDIS_TIMEOUT_MS"),
    )

    lone_key = headers.data.get("api_key")
    if isinstance(lone_key, str):  # api_key = "x-key" is short for a list of one
        key_headers: tuple[object, ...] = (lone_key,)
    else:
        key_headers = headers.array(
            "api_key", object, ("x-api-key",), what="a list of header names", echo=False
        )
    bearer = headers.boolean("bearer", True)
    names = HeaderNames(
        api_key=tuple(
            expect(h, str, headers.path("api_key"), _HEADER, valid=_is_header).lower()
            for h in key_headers
        ),
        bearer=bearer,
        customer=_header(headers, "customer", "x-tollway-customer"),
        plan=_header(headers, "plan", "x-tollway-plan"),
    )
    billing = document.section("billing").only({"grace_period", "fallback_plan"})
    grace = billing.duration("grace_period", 5 * 86400)
    fallback = billing.string("fallback_plan", None, what="a plan name")
    if fallback is not None and fallback not in catalog.plans:
        raise ConfigError(f"[billing] fallback_plan: {fallback!r} is not a plan in this file")
    usage = _parse_usage(
        document.section("usage").only(
            {"dedupe_window", "reservation_ttl", "thresholds", "wait_for_aof", "wait_for_replicas"}
        )
    )
    credits = _parse_credits(
        document.section("credits").only(
            {"low_balance", "top_up_url", "auto_top_up_at", "auto_top_up_pack"}
        ),
        catalog,
    )
    envoy_options = _parse_envoy(
        document.section("envoy").only({"settlement", "ext_proc", "cost_header"})
    )
    if not names.api_key and not names.bearer:
        raise ConfigError("[headers]: api_key is empty and bearer is false; no key can be read")
    return Settings(
        catalog=catalog,
        redis_url=redis_url,
        redis_timeout=timeout_ms / 1000,
        listen=sidecar.string(
            "listen", DEFAULT_LISTEN, what=_HOST_PORT, valid=_LISTEN_RE.fullmatch
        ),
        metrics_listen=sidecar.string(
            "metrics_listen", None, what=_HOST_PORT, valid=_LISTEN_RE.fullmatch
        ),
        health_follows_redis=follows,
        require_service_token=sidecar.boolean("require_service_token", False),
        tls=_parse_tls(sidecar, path),
        http_listen=sidecar.string(
            "http_listen",
            None,
            what=f"{_HOST_PORT}, or empty for off",
            valid=lambda text: not text or _LISTEN_RE.fullmatch(text),
            env=environ.get("TOLLWAY_HTTP_LISTEN"),
        )
        or None,
        webhook_listen=webhook.string(
            "listen", DEFAULT_WEBHOOK_LISTEN, what=_HOST_PORT, valid=_LISTEN_RE.fullmatch
        ),
        headers=names,
        billing=Billing(grace_seconds=grace, fallback_plan=fallback),
        usage=usage,
        credits=credits,
        envoy=envoy_options,
        config_path=path,
    )


def load_settings(path: str | Path | None, environ: Mapping[str, str]) -> Settings:
    """Reads the config file named by path or TOLLWAY_CONFIG (default ./tollway.toml)."""
    chosen = Path(path or environ.get("TOLLWAY_CONFIG") or "tollway.toml")
    try:
        with chosen.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{chosen}: no such config file (use --config or TOLLWAY_CONFIG)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    try:
        return settings_from_document(doc, environ, path=chosen)
    except ConfigError as exc:
        raise ConfigError(f"{chosen}: {exc}") from None
