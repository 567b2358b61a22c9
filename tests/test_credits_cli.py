"""`tollway credits grant`, `show` and `auto-top-up` (issue #15), run as a user
runs them, against the real Valkey; and the balance in `tollway usage show`."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_CONFIG, Customer, eventually, new_customer

pytestmark = pytest.mark.servers  # the real Valkey

Cli = Callable[..., subprocess.CompletedProcess[str]]
MakeCustomer = Callable[..., Customer]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command: exit 1 and one line on stderr, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tollway: error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def show(cli: Cli, customer: str) -> dict[str, Any]:
    shown: dict[str, Any] = as_json(cli("credits", "show", "--customer", customer, "--json"))
    return shown


def test_grant_then_show_in_text_and_json(cli: Cli, make_customer: MakeCustomer) -> None:
    c = make_customer("prepaid")
    granted = ok(
        cli("credits", "grant", "--customer", c.id, "--credits", "25", "--reason", "promotion")
    )
    assert "granted 25 credits" in granted.stdout and "balance 25" in granted.stdout
    text = ok(cli("credits", "show", "--customer", c.id)).stdout
    assert f"{c.id}: balance 25 credits" in text
    assert "promotion" in text  # the ledger's grant, with its reason

    a_month = 30 * 86400
    before = int(time.time())
    timed = as_json(
        cli(
            "credits",
            "grant",
            "--customer",
            c.id,
            "--credits",
            "5",
            "--expires-in",
            "30d",
            "--json",
        )
    )
    assert timed["result"] == "granted" and timed["balance"] == 30
    assert before + a_month <= timed["expires_at"] <= int(time.time()) + a_month

    shown = show(cli, c.id)
    assert shown["customer_id"] == c.id
    assert shown["balance"] == 30 and shown["debt"] == 0
    grants = {g["grant_id"]: g for g in shown["grants"]}
    assert grants[timed["grant_id"]] == {
        "grant_id": timed["grant_id"],
        "remaining": 5,
        "expires_at": timed["expires_at"],
    }
    [forever] = [g for g in shown["grants"] if g["grant_id"] != timed["grant_id"]]
    assert forever["remaining"] == 25 and forever["expires_at"] is None
    # Soonest-expiring first: the order they burn in.
    assert [g["grant_id"] for g in shown["grants"]] == [timed["grant_id"], forever["grant_id"]]
    kinds = [(e["kind"], e["credits"]) for e in shown["ledger"]]
    assert sorted(kinds) == [("grant", 5), ("grant", 25)]
    assert {e["reason"] for e in shown["ledger"]} == {"promotion", "manual"}


def test_the_same_grant_id_counts_once(cli: Cli, make_customer: MakeCustomer) -> None:
    c = make_customer("prepaid")
    grant_id = f"support_ticket_{uuid.uuid4().hex[:8]}"
    args = ("credits", "grant", "--customer", c.id, "--credits", "10", "--grant-id", grant_id)
    first = as_json(cli(*args, "--json"))
    assert first["result"] == "granted" and first["grant_id"] == grant_id
    assert first["balance"] == 10
    again = ok(cli(*args))
    assert "already applied" in again.stdout and "balance 10" in again.stdout
    assert as_json(cli(*args, "--json"))["result"] == "duplicate"
    shown = show(cli, c.id)
    assert shown["balance"] == 10
    assert [e["kind"] for e in shown["ledger"]] == ["grant"]


def test_an_expired_grant_leaves_the_balance_with_an_expire_entry(
    cli: Cli, make_customer: MakeCustomer
) -> None:
    c = make_customer("prepaid")
    ok(cli("credits", "grant", "--customer", c.id, "--credits", "3"))
    short = as_json(
        cli(
            "credits", "grant", "--customer", c.id, "--credits", "5", "--expires-in", "1s", "--json"
        )
    )
    assert short["balance"] == 8
    time.sleep(1.0)
    found: dict[str, Any] = {}

    def lapsed() -> bool:
        found.update(show(cli, c.id))
        return bool(found["balance"] == 3)

    eventually(lapsed, within=5, every=0.2)
    assert short["grant_id"] not in {g["grant_id"] for g in found["grants"]}
    [expired] = [e for e in found["ledger"] if e["kind"] == "expire"]
    assert expired["credits"] == 5 and expired["grant"] == short["grant_id"]
    assert int(expired["at"]) == short["expires_at"]
    # grants - burns - expiries is the balance
    assert (
        sum(e["credits"] if e["kind"] == "grant" else -e["credits"] for e in found["ledger"]) == 3
    )
    text = ok(cli("credits", "show", "--customer", c.id)).stdout
    assert "balance 3 credits" in text and "expire" in text and "-5" in text


@pytest.mark.parametrize("credits", ["0", "-5"])
def test_a_grant_of_no_credits_is_refused(
    cli: Cli, make_customer: MakeCustomer, credits: str
) -> None:
    c = make_customer("prepaid")
    error = one_line_error(cli("credits", "grant", "--customer", c.id, "--credits", credits))
    assert "--credits" in error
    assert show(cli, c.id)["balance"] == 0


def test_an_unknown_customer_is_refused(cli: Cli) -> None:
    nobody = new_customer()
    one_line_error(cli("credits", "grant", "--customer", nobody, "--credits", "5"))
    one_line_error(cli("credits", "show", "--customer", nobody))


def test_usage_show_mentions_the_balance(cli: Cli, make_customer: MakeCustomer) -> None:
    c = make_customer("prepaid")
    ok(cli("credits", "grant", "--customer", c.id, "--credits", "12"))
    text = ok(cli("usage", "show", "--customer", c.id)).stdout
    assert "credits: balance 12" in text
    assert as_json(cli("usage", "show", "--customer", c.id, "--json"))["credits"] == 12
    # An account never granted credits, on a plan without them: no balance line.
    plain = make_customer("basic")
    assert "credits" not in ok(cli("usage", "show", "--customer", plain.id)).stdout


def auto_top_up(cli: Cli, customer: str, *choice: str, config: Path | None = None) -> Any:
    """`tollway credits auto-top-up` with --json (and another config file, if given):
    the setting it reports."""
    extra = {"TOLLWAY_CONFIG": str(config)} if config else None
    args = ("credits", "auto-top-up", "--customer", customer, *choice, "--json")
    return as_json(cli(*args, extra_env=extra))["auto_top_up"]


def test_auto_top_up_sets_an_accounts_own_mark_turns_it_off_or_back_to_the_default(
    cli: Cli, make_customer: MakeCustomer, tmp_path: Path
) -> None:
    line = 'top_up_url = "https://api.example.com/pricing"\n'
    config = tmp_path / "tollway.toml"  # TEST_CONFIG, topping up at 3 with "starter"
    config.write_text(
        TEST_CONFIG.replace(line, f'{line}auto_top_up_at = 3\nauto_top_up_pack = "starter"\n')
    )
    with_config = {"TOLLWAY_CONFIG": str(config)}
    c = make_customer("prepaid")
    own = {"enabled": True, "at": 50, "pack": "starter"}
    assert auto_top_up(cli, c.id, "--at", "50", config=config) == own
    shown = as_json(cli("credits", "show", "--customer", c.id, "--json", extra_env=with_config))
    assert shown["auto_top_up"] == own
    off = ok(cli("credits", "auto-top-up", "--customer", c.id, "--off", extra_env=with_config))
    assert f"{c.id}: auto top-up off" in off.stdout
    assert auto_top_up(cli, c.id, "--default", config=config) == {
        "enabled": True,
        "at": 3,
        "pack": "starter",
    }
    # Under a config with no pack to buy, no account is topped up, whatever its own mark.
    assert as_json(cli("credits", "show", "--customer", c.id, "--json"))["auto_top_up"] == {
        "enabled": False
    }


def test_auto_top_up_refuses_a_mark_without_a_pack_or_below_zero(
    cli: Cli, make_customer: MakeCustomer
) -> None:
    c = make_customer("prepaid")  # the test config sets no auto_top_up_pack
    error = one_line_error(cli("credits", "auto-top-up", "--customer", c.id, "--at", "50"))
    assert "auto_top_up_pack is not set" in error
    assert "--at" in one_line_error(cli("credits", "auto-top-up", "--customer", c.id, "--at", "-1"))
    assert auto_top_up(cli, c.id, "--off") == {"enabled": False}
    one_line_error(cli("credits", "auto-top-up", "--customer", new_customer(), "--off"))
