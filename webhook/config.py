"""The companion's settings: the [stripe] table of tollway.toml plus secrets.

Secrets come only from the environment or a .env file (TOLLWAY_ENV_FILE, else
./.env); the environment wins. They are never logged and hidden from repr.

    STRIPE_SECRET_KEY                sk_… or rk_… (required for Stripe sync)
    STRIPE_WEBHOOK_SECRET            whsec_… of the webhook endpoint
    STRIPE_WEBHOOK_SECRET_PREVIOUS   the old whsec_… while rotating (optional)
    STRIPE_API_BASE                  e.g. a local Stripe emulator (optional)
    TOLLWAY_GITHUB_TOKEN             a GitHub token with no scopes, sent when fetching
                                     GitHub's secret scanning keys, for a higher rate
                                     limit (optional; webhook/secret_scanning.py)
    TOLLWAY_PORTAL_SECRET            signs the portal's session cookies (32+ characters;
                                     optional: else a secret made once and kept in Redis)

    [stripe]
    public_url = "https://billing.example.com"   # where this companion is reached
    success_url = "…/checkout/complete?session_id={CHECKOUT_SESSION_ID}"  # default
    cancel_url = "https://example.com/pricing"
    portal_return_url = "https://example.com/account"
    notify_url = "https://hooks.example.com/tollway"  # optional callback
    notify_attempts = 5                          # POSTs per notification before it is dropped
    notify_reclaim_after = "60s"                 # a dead companion's deliveries are taken over
    reconcile_interval = "1h"                    # "0s" turns it off
    webhook_tolerance = "5m"
    max_body_bytes = 524288
    timeout = "10s"                               # per Stripe call
    max_network_retries = 2
    meter_events_per_second = 500                 # Stripe's live limit is 1000
    report_interval = "1s"                        # "0s": bill with `tollway report` instead
    # POST /secret-scanning/github (webhook/secret_scanning.py): GitHub's signing keys
    secret_scanning_keys_url = "https://api.github.com/meta/public_keys/secret_scanning"
    secret_scanning_keys_ttl = "1h"               # how long fetched keys are trusted
    secret_scanning_refetch_after = "1m"          # least time between fetches for an
                                                  # unknown key identifier

    [portal]                                      # the developer portal (webhook/portal/)
    enabled = true
    name = "Acme API"                             # shown on every page
    api_base_url = "https://api.example.com"      # the merchant's API, for the snippets
    session_ttl = "1h"                            # a session ends this long after sign-in
    link_ttl = "15m"                              # a `tollway portal link` works this long
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sidecar.errors import ConfigError
from sidecar.fields import Table
from sidecar.settings import Settings, load_settings

__all__ = [
    "API_VERSION",
    "GITHUB_KEYS_URL",
    "CompanionSettings",
    "PortalSettings",
    "StripeSettings",
    "load_companion_settings",
]

# Pinned: payload shapes (e.g. items[].current_period_end) are read for this version.
API_VERSION: Final = "2026-10-28.endive"
_URL: Final = "an http(s) URL"
_FIELDS: Final = frozenset(
    {
        "public_url",
        "success_url",
        "cancel_url",
        "portal_return_url",
        "notify_url",
        "notify_attempts",
        "notify_reclaim_after",
        "reconcile_interval",
        "webhook_tolerance",
        "max_body_bytes",
        "timeout",
        "max_network_retries",
        "meter_events_per_second",
        "report_interval",
        "secret_scanning_keys_url",
        "secret_scanning_keys_ttl",
        "secret_scanning_refetch_after",
    }
)
GITHUB_KEYS_URL: Final = "https://api.github.com/meta/public_keys/secret_scanning"


@dataclass(frozen=True, slots=True)
class StripeSettings:
    secret_key: str | None = field(default=None, repr=False)
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    api_base: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    success_url: str = ""
    cancel_url: str = ""
    portal_return_url: str = ""
    notify_url: str | None = None
    notify_attempts: int = 5  # POSTs of one notification (with backoff) before it is dropped
    # A notification (or auto top-up) taken by a companion that then went quiet
    # this long is taken over by another; longer than one POST plus its backoff.
    notify_reclaim_after: int = 60
    reconcile_interval: int = 3600
    webhook_tolerance: int = 300
    max_body_bytes: int = 512 * 1024
    timeout: float = 10.0
    max_network_retries: int = 2
    meter_events_per_second: float = 500.0  # Stripe allows 1000/s in live mode
    report_interval: int = 1  # idle poll of the usage reporter; 0 turns it off here
    # GitHub secret scanning (webhook/secret_scanning.py): where its signing keys
    # are, how long they are trusted, and the least time between fetches that an
    # unknown key identifier may cause (so forged alerts cannot make us poll).
    secret_scanning_keys_url: str = GITHUB_KEYS_URL
    secret_scanning_keys_ttl: int = 3600
    secret_scanning_refetch_after: int = 60
    github_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PortalSettings:
    enabled: bool = True
    name: str = "Tollway"
    api_base_url: str = "http://127.0.0.1:10000"
    session_ttl: int = 3600
    link_ttl: int = 900
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CompanionSettings:
    core: Settings
    stripe: StripeSettings
    portal: PortalSettings = field(default_factory=PortalSettings)


def portal_settings(section: Mapping[str, Any], environ: Mapping[str, str]) -> PortalSettings:
    portal = Table(section, "[portal]").only(
        {"enabled", "name", "api_base_url", "session_ttl", "link_ttl"}
    )
    secret = environ.get("TOLLWAY_PORTAL_SECRET") or None
    if secret is not None and len(secret) < 32:
        raise ConfigError("TOLLWAY_PORTAL_SECRET: expected at least 32 characters")
    session_ttl = portal.duration("session_ttl", 3600)
    link_ttl = portal.duration("link_ttl", 900)
    if not 60 <= session_ttl <= 7 * 86400:
        raise ConfigError("[portal] session_ttl: expected a duration from 1m to 7d")
    if not 60 <= link_ttl <= 86400:
        raise ConfigError("[portal] link_ttl: expected a duration from 1m to 1d")
    name = portal.string(
        "name", "Tollway", what="1 to 60 characters", valid=lambda n: 0 < len(n) <= 60
    )
    base = portal.string("api_base_url", "http://127.0.0.1:10000", what=_URL, valid=_is_http)
    return PortalSettings(
        enabled=portal.boolean("enabled", True),
        name=name,
        api_base_url=base.rstrip("/"),
        session_ttl=session_ttl,
        link_ttl=link_ttl,
        secret=secret,
    )


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments, blank lines and optional quotes allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")  # the value stays out
        values[name.strip()] = value.strip().strip("'\"")
    return values


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def stripe_settings(section: Mapping[str, Any], environ: Mapping[str, str]) -> StripeSettings:
    stripe = Table(section, "[stripe]").only(_FIELDS)
    secret = environ.get("STRIPE_SECRET_KEY") or None
    if secret is not None and not secret.startswith(("sk_", "rk_")):
        raise ConfigError("STRIPE_SECRET_KEY: expected a Stripe secret key (sk_… or rk_…)")
    hooks = tuple(
        s
        for s in (
            environ.get("STRIPE_WEBHOOK_SECRET"),
            environ.get("STRIPE_WEBHOOK_SECRET_PREVIOUS"),
        )
        if s
    )
    if any(not s.startswith("whsec_") for s in hooks):
        raise ConfigError("STRIPE_WEBHOOK_SECRET: expected a webhook signing secret (whsec_…)")
    public_url = stripe.string("public_url", "http://127.0.0.1:8000", what=_URL, valid=_is_http)
    public = public_url.rstrip("/")
    retries = stripe.integer("max_network_retries", 2, what="0..10", valid=lambda n: 0 <= n <= 10)
    max_body = stripe.integer(
        "max_body_bytes", 512 * 1024, what="an integer >= 1024", valid=lambda n: n >= 1024
    )
    reclaim = stripe.duration("notify_reclaim_after", 60)
    if reclaim < 1:
        raise ConfigError("[stripe] notify_reclaim_after: expected a duration of at least 1s")
    keys_ttl = stripe.duration("secret_scanning_keys_ttl", 3600)
    refetch = stripe.duration("secret_scanning_refetch_after", 60)
    if keys_ttl < 1 or refetch < 1:
        raise ConfigError(
            "[stripe] secret_scanning_keys_ttl and secret_scanning_refetch_after: "
            "expected durations of at least 1s"
        )
    success = f"{public}/checkout/complete?session_id={{CHECKOUT_SESSION_ID}}"
    if "{CHECKOUT_SESSION_ID}" not in str(section.get("success_url", success)):
        raise ConfigError("[stripe] success_url: must contain {CHECKOUT_SESSION_ID}")
    return StripeSettings(
        secret_key=secret,
        webhook_secrets=hooks,
        api_base=environ.get("STRIPE_API_BASE") or None,
        public_url=public,
        success_url=stripe.string("success_url", success, what=_URL, valid=_is_http),
        cancel_url=stripe.string(
            "cancel_url", f"{public}/checkout/cancelled", what=_URL, valid=_is_http
        ),
        portal_return_url=stripe.string("portal_return_url", public, what=_URL, valid=_is_http),
        notify_url=stripe.string("notify_url", None, what=_URL, valid=_is_http),
        notify_attempts=stripe.integer(
            "notify_attempts", 5, what="1..20", valid=lambda n: 1 <= n <= 20
        ),
        notify_reclaim_after=reclaim,
        reconcile_interval=stripe.duration("reconcile_interval", 3600),
        webhook_tolerance=stripe.duration("webhook_tolerance", 300),
        max_body_bytes=max_body,
        timeout=float(stripe.duration("timeout", 10)),
        max_network_retries=retries,
        meter_events_per_second=stripe.number(
            "meter_events_per_second", 500.0, what="1..1000", valid=lambda n: 0 < n <= 1000
        ),
        report_interval=stripe.duration("report_interval", 1),
        secret_scanning_keys_url=stripe.string(
            "secret_scanning_keys_url", GITHUB_KEYS_URL, what=_URL, valid=_is_http
        ),
        secret_scanning_keys_ttl=keys_ttl,
        secret_scanning_refetch_after=refetch,
        github_token=environ.get("TOLLWAY_GITHUB_TOKEN") or None,
    )


def load_companion_settings(
    path: str | Path | None, environ: Mapping[str, str]
) -> CompanionSettings:
    env_file = Path(environ.get("TOLLWAY_ENV_FILE") or ".env")
    merged = {**read_env_file(env_file), **environ}
    core = load_settings(path, merged)
    assert core.config_path is not None  # load_settings always names the file it read
    with core.config_path.open("rb") as fh:
        doc = tomllib.load(fh)
    try:
        document = Table(doc)
        return CompanionSettings(
            core=core,
            stripe=stripe_settings(document.section("stripe").data, merged),
            portal=portal_settings(document.section("portal").data, merged),
        )
    except ConfigError as exc:
        raise ConfigError(f"{core.config_path}: {exc}") from None
