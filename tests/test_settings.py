"""Settings come from the file and an environment mapping; secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.settings import load_settings, redact_url, settings_from_document

PLANS = {"plans": [{"name": "free", "rate": "1/s"}]}


def test_defaults_and_environment_overrides() -> None:
    settings = settings_from_document(
        {**PLANS, "redis": {"url": "redis://file:6379/0"}},
        {"TOLLWAY_REDIS_URL": "redis://env:6379/1", "TOLLWAY_REDIS_TIMEOUT_MS": "30"},
    )
    assert settings.redis_url == "redis://env:6379/1"
    assert settings.redis_timeout == 0.03
    assert settings.listen == "127.0.0.1:50051"
    assert settings.webhook_listen == "127.0.0.1:8000"
    assert settings.headers.api_key == ("x-api-key",) and settings.headers.bearer


def test_header_names_are_configurable_and_lower_cased() -> None:
    settings = settings_from_document(
        {**PLANS, "headers": {"api_key": ["X-Key"], "bearer": False, "customer": "X-Cust"}}, {}
    )
    assert settings.headers.api_key == ("x-key",)
    assert settings.headers.customer == "x-cust"
    assert not settings.headers.bearer


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"redis": {"timeout_ms": 0}}, "[redis] timeout_ms: expected 1..10000 ms"),
        ({"redis": {"url": "http://x"}}, "[redis] url: expected redis://"),
        ({"redis": {"host": "x"}}, "[redis] host: unknown field"),
        ({"sidecar": {"listen": "nowhere"}}, "[sidecar] listen: expected host:port"),
        (
            {"sidecar": {"health_follows_redis": "no"}},
            "[sidecar] health_follows_redis: expected true or false, got 'no'",
        ),
        ({"sidecar": {"health_follows": False}}, "[sidecar] health_follows: unknown field"),
        ({"headers": {"customer": "bad header"}}, "[headers] customer: expected an HTTP header"),
        ({"headers": {"api_key": [], "bearer": False}}, "no key can be read"),
        ({"plan": []}, "plan: unknown section"),
    ],
)
def test_each_mistake_names_its_field(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_document({**PLANS, **doc}, {})
    assert message in str(caught.value)


def test_health_follows_redis_unless_turned_off() -> None:
    assert settings_from_document(PLANS, {}).health_follows_redis
    off = settings_from_document({**PLANS, "sidecar": {"health_follows_redis": False}}, {})
    assert not off.health_follows_redis


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        load_settings(missing, {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[[plans]\nname=")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_settings(broken, {})
    bad = tmp_path / "bad.toml"
    bad.write_text('[[plans]]\nname = "free"\nrate = "lots"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: plans\[0\] 'free': rate"):
        load_settings(None, {"TOLLWAY_CONFIG": str(bad)})


def test_redis_password_never_appears_in_repr() -> None:
    settings = settings_from_document(PLANS, {"TOLLWAY_REDIS_URL": "redis://:hunter2@db:6379/0"})
    assert "hunter2" not in repr(settings)
    assert redact_url("rediss://user:hunter2@db:6380") == "rediss://user:****@db:6380"


def test_billing_grace_and_fallback_plan() -> None:
    settings = settings_from_document(
        {**PLANS, "billing": {"grace_period": "3d", "fallback_plan": "free"}}, {}
    )
    assert settings.billing.grace_seconds == 3 * 86400
    assert settings.billing.fallback_plan == "free"
    assert settings_from_document(PLANS, {}).billing.grace_seconds == 5 * 86400
    with pytest.raises(ConfigError, match="fallback_plan: 'gold' is not a plan"):
        settings_from_document({**PLANS, "billing": {"fallback_plan": "gold"}}, {})
    with pytest.raises(ConfigError, match=r"\[billing\] grace_period: expected a duration"):
        settings_from_document({**PLANS, "billing": {"grace_period": "soon"}}, {})
