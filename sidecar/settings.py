"""Settings: one frozen object per process, built once from the TOML file and
an environment mapping (passed in, so tests need no patching).

    TOLLWAY_CONFIG            path of tollway.toml (or --config)
    TOLLWAY_REDIS_URL         redis://host:port/db; overrides [redis] url
    TOLLWAY_REDIS_TIMEOUT_MS  per-call Redis timeout; overrides [redis] timeout_ms

    [sidecar]  listen = "127.0.0.1:50051"   metrics_listen = "127.0.0.1:9464" (optional)
               health_follows_redis = true
    [webhook]  listen = "127.0.0.1:8000"
    [redis]    url = "redis://127.0.0.1:6379/0"   timeout_ms = 50
    [headers]  api_key = ["x-api-key"]  bearer = true
               customer = "x-tollway-customer"  plan = "x-tollway-plan"
    [billing]  grace_period = "5d"  fallback_plan = "free"   (optional)
    [usage]    dedupe_window = "24h"  reservation_ttl = "5m"  thresholds = [80, 100]
               wait_for_aof = false  wait_for_replicas = 0
    [envoy]    ext_proc = false  cost_header = "x-tollway-cost"
    [stripe]   read by the companion (webhook/config.py)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError
from sidecar.plans import Catalog, parse_catalog

__all__ = [
    "Billing",
    "EnvoyOptions",
    "HeaderNames",
    "Settings",
    "Usage",
    "load_settings",
    "parse_duration",
    "redact_url",
]

DEFAULT_LISTEN: Final = "127.0.0.1:50051"
DEFAULT_WEBHOOK_LISTEN: Final = "127.0.0.1:8000"
DEFAULT_REDIS_TIMEOUT_MS: Final = 50
_HEADER_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*")
_SECTIONS: Final = frozenset(
    {"sidecar", "webhook", "redis", "headers", "billing", "usage", "stripe", "plans", "routes",
     "meters", "envoy"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """How Tollway works with Envoy's response path (ext_proc)."""

    # Envoy runs Tollway's ext_proc filter: Check reserves each request's cost
    # and takes its lease under x-request-id; the response settles and releases.
    ext_proc: bool = False
    cost_header: str = "x-tollway-cost"  # the upstream's real cost; removed before the client


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
    # gRPC health turns NOT_SERVING while Redis does not answer, so a load balancer
    # routes around this sidecar. Off where health feeds a liveness probe or every
    # sidecar shares one Redis: restarting them, or all leaving the pool, would not
    # bring Redis back; requests still get UNAVAILABLE either way.
    health_follows_redis: bool = True
    webhook_listen: str = DEFAULT_WEBHOOK_LISTEN
    headers: HeaderNames = HeaderNames()
    billing: Billing = Billing()
    usage: Usage = Usage()
    envoy: EnvoyOptions = EnvoyOptions()
    config_path: Path | None = None

    def __repr__(self) -> str:
        url = redact_url(self.redis_url) if self.redis_url else None
        return (
            f"Settings(config_path={self.config_path}, listen={self.listen!r}, "
            f"webhook_listen={self.webhook_listen!r}, redis_url={url!r}, "
            f"plans={sorted(self.catalog.plans)})"
        )


def _section(doc: Mapping[str, Any], name: str, fields: frozenset[str]) -> Mapping[str, Any]:
    section = doc.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}]: expected a table")
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"[{name}] {unknown[0]}: unknown field")
    return section


def _header(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEADER_RE.fullmatch(value.lower()):
        raise ConfigError(f"{where}: expected an HTTP header name, got {value!r}")
    return value.lower()


def _listen(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", value):
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return value


def _parse_usage(section: Mapping[str, Any]) -> Usage:
    try:
        window = parse_duration(section.get("dedupe_window", "24h"))
        ttl = parse_duration(section.get("reservation_ttl", "5m"))
    except ValueError as exc:
        raise ConfigError(f"[usage] {exc}") from None
    if window < 86400:
        raise ConfigError(
            "[usage] dedupe_window: at least 24h, so client retries stay deduplicated"
        )
    thresholds = section.get("thresholds", [80, 100])
    if not isinstance(thresholds, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 1000 for t in thresholds
    ):
        raise ConfigError("[usage] thresholds: expected percentages like [80, 100]")
    wait = section.get("wait_for_aof", False)
    if not isinstance(wait, bool):
        raise ConfigError(f"[usage] wait_for_aof: expected true or false, got {wait!r}")
    replicas = section.get("wait_for_replicas", 0)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= 64:
        raise ConfigError(
            f"[usage] wait_for_replicas: expected a number of replicas, 0 to 64, got {replicas!r}"
        )
    return Usage(
        dedupe_window=window,
        reservation_ttl=ttl,
        thresholds=tuple(sorted(thresholds)),
        wait_for_aof=wait,
        wait_for_replicas=replicas,
    )


def settings_from_document(
    doc: Mapping[str, Any], environ: Mapping[str, str], *, path: Path | None = None
) -> Settings:
    unknown = sorted(set(doc) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section or field")
    catalog = parse_catalog(doc)
    sidecar = _section(
        doc, "sidecar", frozenset({"listen", "metrics_listen", "health_follows_redis"})
    )
    follows = sidecar.get("health_follows_redis", True)
    if not isinstance(follows, bool):
        raise ConfigError(
            f"[sidecar] health_follows_redis: expected true or false, got {follows!r}"
        )
    webhook = _section(doc, "webhook", frozenset({"listen"}))
    redis = _section(doc, "redis", frozenset({"url", "timeout_ms"}))
    headers = _section(doc, "headers", frozenset({"api_key", "bearer", "customer", "plan"}))

    redis_url = environ.get("TOLLWAY_REDIS_URL") or redis.get("url")
    if redis_url is not None and not (
        isinstance(redis_url, str)
        and re.match(
            r"(redis|rediss|unix|redis\+cluster|rediss\+cluster|redis\+sentinel)://", redis_url
        )
    ):
        raise ConfigError(
            "[redis] url: expected redis://, rediss://, unix://, redis+cluster://, "
            "rediss+cluster:// or redis+sentinel:// URL"
        )
    timeout_raw: Any = environ.get("TOLLWAY_REDIS_TIMEOUT_MS") or redis.get(
        "timeout_ms", DEFAULT_REDIS_TIMEOUT_MS
    )
    try:
        timeout_ms = int(timeout_raw)
    except (TypeError, ValueError):
        timeout_ms = -1
    if isinstance(timeout_raw, bool) or not 1 <= timeout_ms <= 10_000:
        raise ConfigError(f"[redis] timeout_ms: expected 1..10000 ms, got {timeout_raw!r}")

    key_headers = headers.get("api_key", ["x-api-key"])
    if isinstance(key_headers, str):
        key_headers = [key_headers]
    if not isinstance(key_headers, list):
        raise ConfigError("[headers] api_key: expected a list of header names")
    bearer = headers.get("bearer", True)
    if not isinstance(bearer, bool):
        raise ConfigError(f"[headers] bearer: expected true or false, got {bearer!r}")
    names = HeaderNames(
        api_key=tuple(_header(h, "[headers] api_key") for h in key_headers),
        bearer=bearer,
        customer=_header(headers.get("customer", "x-tollway-customer"), "[headers] customer"),
        plan=_header(headers.get("plan", "x-tollway-plan"), "[headers] plan"),
    )
    billing = _section(doc, "billing", frozenset({"grace_period", "fallback_plan"}))
    try:
        grace = parse_duration(billing.get("grace_period", "5d"))
    except ValueError as exc:
        raise ConfigError(f"[billing] grace_period: {exc}") from None
    fallback = billing.get("fallback_plan")
    if fallback is not None and fallback not in catalog.plans:
        raise ConfigError(f"[billing] fallback_plan: {fallback!r} is not a plan in this file")
    usage = _parse_usage(
        _section(
            doc,
            "usage",
            frozenset(
                {
                    "dedupe_window",
                    "reservation_ttl",
                    "thresholds",
                    "wait_for_aof",
                    "wait_for_replicas",
                }
            ),
        )
    )
    envoy = _section(doc, "envoy", frozenset({"ext_proc", "cost_header"}))
    ext_proc = envoy.get("ext_proc", False)
    if not isinstance(ext_proc, bool):
        raise ConfigError(f"[envoy] ext_proc: expected true or false, got {ext_proc!r}")
    envoy_options = EnvoyOptions(
        ext_proc=ext_proc,
        cost_header=_header(envoy.get("cost_header", "x-tollway-cost"), "[envoy] cost_header"),
    )
    if not names.api_key and not names.bearer:
        raise ConfigError("[headers]: api_key is empty and bearer is false; no key can be read")
    return Settings(
        catalog=catalog,
        redis_url=redis_url,
        redis_timeout=timeout_ms / 1000,
        listen=_listen(sidecar.get("listen", DEFAULT_LISTEN), "[sidecar] listen"),
        metrics_listen=(
            _listen(sidecar["metrics_listen"], "[sidecar] metrics_listen")
            if "metrics_listen" in sidecar
            else None
        ),
        health_follows_redis=follows,
        webhook_listen=_listen(webhook.get("listen", DEFAULT_WEBHOOK_LISTEN), "[webhook] listen"),
        headers=names,
        billing=Billing(grace_seconds=grace, fallback_plan=fallback),
        usage=usage,
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
