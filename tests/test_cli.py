"""The `tollway` command: every command speaks --json, and errors are one line."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from tests.conftest import new_customer

Cli = Callable[..., subprocess.CompletedProcess[str]]


def ok(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tollway: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def allowed(stub: tollway_pb2_grpc.TollwayStub, key: str) -> pb.AuthorizeResponse:
    response: pb.AuthorizeResponse = stub.Authorize(pb.AuthorizeRequest(api_key=key), timeout=5)
    return response


def test_account_lifecycle_with_json(cli: Cli) -> None:
    customer = new_customer()
    created = ok(cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json"))
    assert isinstance(created, dict)
    assert created["customer_id"] == customer
    assert (created["plan"], created["status"], created["grace_until"]) == ("basic", "active", 0)
    assert created["created_at"] >= time.time() - 60
    ok(cli("accounts", "set-status", "--customer", customer, "past_due", "--grace", "5d", "--json"))
    shown = ok(cli("accounts", "show", "--customer", customer, "--json"))
    assert shown["status"] == "past_due"  # type: ignore[index]
    assert shown["grace_until"] >= time.time() + 5 * 86400 - 60  # type: ignore[index]
    text = cli("accounts", "show", "--customer", customer)
    assert "status: past_due (grace until" in text.stdout


def test_mistakes_are_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    customer = new_customer()
    error = one_line_error(cli("accounts", "create", "--customer", customer, "--plan", "gold"))
    assert "plan 'gold' is not in" in error
    assert "does not exist" in one_line_error(cli("accounts", "show", "--customer", customer))
    assert "does not exist" in one_line_error(cli("keys", "issue", "--customer", customer))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[plans]]\nname = "free"\nrate = "1/s"\nburst = -1\n')
    error = one_line_error(cli("plans", "check", "--config", str(bad)))
    assert "plans[0] 'free': burst: expected a positive integer" in error
    no_redis = {"TOLLWAY_REDIS_URL": "redis://127.0.0.1:1/0"}
    dead = cli("accounts", "show", "--customer", customer, extra_env=no_redis)
    assert "Redis unavailable" in one_line_error(dead)


def test_plans_check_lists_the_catalog(cli: Cli) -> None:
    result = ok(cli("plans", "check", "--json"))
    assert result["ok"] is True  # type: ignore[index]
    names = [p["name"] for p in result["plans"]]  # type: ignore[index]
    assert names == [
        "basic",
        "tight",
        "pro",
        "quota3",
        "billed",
        "metered",
        "duo",
        "prepaid",
        "prepaid_bill",
        "prepaid_fallback",
        "shadowed",
        "shadow_quota",
    ]
    prepaid = result["plans"][7]  # type: ignore[index]
    assert (prepaid["credits"], prepaid["credits_exhausted"]) == (True, "block")
    assert result["plans"][9]["credits_exhausted"] == "tight"  # type: ignore[index]
    packs = {p["name"]: p["credits"] for p in result["credit_packs"]}  # type: ignore[index]
    assert packs == {"starter": 10, "monthly": 1000}


def test_a_key_is_shown_once_and_listed_only_by_id(
    cli: Cli, tollway_stub: tollway_pb2_grpc.TollwayStub
) -> None:
    customer = new_customer()
    ok(cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json"))
    issued = ok(cli("keys", "issue", "--customer", customer, "--json"))
    key = issued["key"]  # type: ignore[index]
    assert key.startswith("tw_live_")
    assert allowed(tollway_stub, key).allowed
    listing = cli("keys", "list", "--customer", customer, "--json")
    assert key not in listing.stdout and key[8:30] not in listing.stdout
    assert [k["key_id"] for k in json.loads(listing.stdout)] == [issued["key_id"]]  # type: ignore[index]
    plain = cli("keys", "issue", "--customer", customer, "--test")
    assert plain.stdout.startswith("tw_test_") and "only time the key is shown" in plain.stdout


def test_revoke_stops_a_key_at_once(cli: Cli, tollway_stub: tollway_pb2_grpc.TollwayStub) -> None:
    customer = new_customer()
    ok(cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json"))
    issued = ok(cli("keys", "issue", "--customer", customer, "--json"))
    ok(cli("keys", "revoke", "--customer", customer, issued["key_id"], "--json"))  # type: ignore[index]
    assert allowed(tollway_stub, issued["key"]).reason == pb.REASON_KEY_REVOKED  # type: ignore[index]
    listing = ok(cli("keys", "list", "--customer", customer, "--json"))
    assert listing[0]["state"] == "revoked"  # type: ignore[index]


def test_rotation_keeps_the_old_key_for_the_overlap_then_stops_it(
    cli: Cli, tollway_stub: tollway_pb2_grpc.TollwayStub
) -> None:
    customer = new_customer()
    ok(cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json"))
    old = ok(cli("keys", "issue", "--customer", customer, "--json"))
    rotated = ok(
        cli("keys", "rotate", "--customer", customer, old["key_id"], "--overlap", "2s", "--json")  # type: ignore[index]
    )
    assert rotated["replaces"] == old["key_id"]  # type: ignore[index]
    assert allowed(tollway_stub, rotated["key"]).allowed  # type: ignore[index]
    assert allowed(tollway_stub, old["key"]).allowed  # type: ignore[index]
    time.sleep(2.2)
    assert allowed(tollway_stub, old["key"]).reason == pb.REASON_KEY_EXPIRED  # type: ignore[index]
    assert allowed(tollway_stub, rotated["key"]).allowed  # type: ignore[index]


def test_keys_can_expire(cli: Cli, tollway_stub: tollway_pb2_grpc.TollwayStub) -> None:
    customer = new_customer()
    ok(cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json"))
    issued = ok(cli("keys", "issue", "--customer", customer, "--expires-in", "1s", "--json"))
    assert allowed(tollway_stub, issued["key"]).allowed  # type: ignore[index]
    time.sleep(1.2)
    assert allowed(tollway_stub, issued["key"]).reason == pb.REASON_KEY_EXPIRED  # type: ignore[index]


@pytest.mark.parametrize("duration", ["5", "1w", "1.5h", "soon"])
def test_bad_durations_are_refused_by_the_parser(cli: Cli, duration: str) -> None:
    result = cli("keys", "issue", "--customer", "cus_x", "--expires-in", duration)
    assert result.returncode == 2 and "expected a duration like" in result.stderr


def test_webhook_help_says_what_it_serves_today(cli: Cli) -> None:
    result = cli("webhook", "--help")
    assert result.returncode == 0 and "/healthz" in result.stdout


def test_health_probe_follows_the_local_sidecar(cli: Cli, sidecar: str, tmp_path: Path) -> None:
    from tests.conftest import TEST_CONFIG
    from tests.harness import free_port

    def config(grpc_port: str) -> str:
        path = tmp_path / f"health-{grpc_port}.toml"
        path.write_text(
            TEST_CONFIG + f'\n[sidecar]\nlisten = "127.0.0.1:{grpc_port}"\n'
            f'[webhook]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        return str(path)

    up = cli("health", "--json", "--config", config(sidecar.rpartition(":")[2]))
    assert up.returncode == 0 and json.loads(up.stdout)["sidecar"] == "SERVING"
    down = cli("health", "--json", "--config", config(str(free_port())))
    assert down.returncode == 1 and json.loads(down.stdout)["healthy"] is False
