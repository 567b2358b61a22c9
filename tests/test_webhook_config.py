"""Companion settings: secrets from the environment or .env, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from webhook.config import load_companion_settings, read_env_file, stripe_settings

SECRET = "sk_test_" + "a" * 24
HOOK = "whsec_" + "b" * 32


def test_defaults_derive_from_the_public_url() -> None:
    settings = stripe_settings({"public_url": "https://billing.example.com/"}, {})
    assert settings.success_url == (
        "https://billing.example.com/checkout/complete?session_id={CHECKOUT_SESSION_ID}"
    )
    assert settings.portal_return_url == "https://billing.example.com"
    assert settings.reconcile_interval == 3600 and settings.webhook_tolerance == 300
    assert settings.secret_key is None and settings.webhook_secrets == ()


def test_two_webhook_secrets_during_rotation() -> None:
    old = "whsec_" + "c" * 32
    settings = stripe_settings(
        {},
        {
            "STRIPE_SECRET_KEY": SECRET,
            "STRIPE_WEBHOOK_SECRET": HOOK,
            "STRIPE_WEBHOOK_SECRET_PREVIOUS": old,
        },
    )
    assert settings.webhook_secrets == (HOOK, old)


def test_secrets_never_appear_in_repr_or_errors() -> None:
    settings = stripe_settings({}, {"STRIPE_SECRET_KEY": SECRET, "STRIPE_WEBHOOK_SECRET": HOOK})
    assert SECRET not in repr(settings) and HOOK not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        stripe_settings({}, {"STRIPE_SECRET_KEY": "pk_test_" + "a" * 24})
    assert "pk_test_" not in str(caught.value) and "STRIPE_SECRET_KEY" in str(caught.value)
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET: expected"):
        stripe_settings({}, {"STRIPE_WEBHOOK_SECRET": "nope"})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"succes_url": "x"}, "[stripe] succes_url: unknown field"),
        ({"success_url": "https://x/done"}, "must contain {CHECKOUT_SESSION_ID}"),
        ({"cancel_url": "ftp://x"}, "[stripe] cancel_url: expected an http(s) URL"),
        ({"reconcile_interval": "often"}, "[stripe] reconcile_interval: expected a duration"),
        ({"max_network_retries": 99}, "[stripe] max_network_retries: expected 0..10"),
    ],
)
def test_each_mistake_names_its_field(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        stripe_settings(section, {})
    assert message in str(caught.value)


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "tollway.toml"
    config.write_text(
        '[[plans]]\nname = "free"\nrate = "1/s"\n[stripe]\nreconcile_interval = "0s"\n'
    )
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"# secrets\nexport STRIPE_SECRET_KEY='{SECRET}'\nSTRIPE_WEBHOOK_SECRET={HOOK}\n"
    )
    assert read_env_file(env_file)["STRIPE_SECRET_KEY"] == SECRET
    other = "whsec_" + "d" * 32
    settings = load_companion_settings(
        config, {"TOLLWAY_ENV_FILE": str(env_file), "STRIPE_WEBHOOK_SECRET": other}
    )
    assert settings.stripe.secret_key == SECRET
    assert settings.stripe.webhook_secrets == (other,)
    assert settings.stripe.reconcile_interval == 0
    broken = tmp_path / "broken.env"
    broken.write_text(f"{SECRET}\n")
    with pytest.raises(ConfigError) as caught:
        read_env_file(broken)
    assert SECRET not in str(caught.value) and "broken.env:1" in str(caught.value)


def test_reporter_settings() -> None:
    settings = stripe_settings({"meter_events_per_second": 100, "report_interval": "0s"}, {})
    assert settings.meter_events_per_second == 100.0 and settings.report_interval == 0
    defaults = stripe_settings({}, {})
    assert defaults.meter_events_per_second == 500.0 and defaults.report_interval == 1
    with pytest.raises(ConfigError, match=r"meter_events_per_second: expected 1\.\.1000"):
        stripe_settings({"meter_events_per_second": 5000}, {})
