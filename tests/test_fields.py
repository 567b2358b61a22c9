"""Typed config fields: a wrong value is one line naming the field and what it wants."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sidecar.errors import ConfigError
from sidecar.fields import Table, expect


def refusal(read: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        read()
    message = str(caught.value)
    assert "\n" not in message
    return message


def plan(**fields: Any) -> Table:
    return Table.entry({"name": "pro", **fields}, "plans[0]").named("pro")


def redis(**fields: Any) -> Table:
    return Table({"redis": fields}).section("redis")


def test_an_int_field_given_true_names_the_field_and_says_it_wants_an_integer() -> None:
    message = refusal(lambda: plan(burst=True).integer("burst", 1, what="a positive integer"))
    assert message == "plans[0] 'pro': burst: expected a positive integer, got True"


def test_a_bool_field_given_1_says_it_wants_true_or_false() -> None:
    message = refusal(lambda: redis(tls=1).boolean("tls", False))
    assert message == "[redis] tls: expected true or false, got 1"


def test_a_float_field_takes_an_integer_as_a_float_but_never_true() -> None:
    table = Table({"rate": 100, "flag": True}, "[stripe]")
    assert table.number("rate", 500.0, what="1..1000") == 100.0
    assert isinstance(table.number("rate", 500.0, what="1..1000"), float)
    assert refusal(lambda: table.number("flag", 1.0, what="1..1000")) == (
        "[stripe] flag: expected 1..1000, got True"
    )


def test_a_value_out_of_range_reads_like_one_of_the_wrong_type() -> None:
    def read(value: object) -> int:
        return redis(timeout_ms=value).integer(
            "timeout_ms", 50, what="1..10000 ms", valid=lambda ms: 1 <= ms <= 10_000
        )

    assert refusal(lambda: read(0)) == "[redis] timeout_ms: expected 1..10000 ms, got 0"
    assert refusal(lambda: read("fast")) == "[redis] timeout_ms: expected 1..10000 ms, got 'fast'"


def test_an_absent_field_takes_its_default_unchecked() -> None:
    # concurrency 0 means unlimited; written in the file, 0 is a mistake.
    def read(table: Table) -> int:
        return table.integer("concurrency", 0, what="a positive integer", valid=lambda n: n > 0)

    assert read(plan()) == 0
    assert refusal(lambda: read(plan(concurrency=0))) == (
        "plans[0] 'pro': concurrency: expected a positive integer, got 0"
    )


def test_an_optional_field_left_out_is_none() -> None:
    assert plan().string("meter", None, what="a meter name") is None
    assert plan().boolean("bill_only_success", None) is None
    assert plan(meter="calls").string("meter", None, what="a meter name") == "calls"


def test_a_required_field_left_out_is_refused_by_name() -> None:
    entry = Table.entry({}, "routes[0]")
    assert refusal(lambda: entry.string("path", what="a path like '/v1/search/*'")) == (
        "routes[0]: path: expected a path like '/v1/search/*', got None"
    )


def test_fields_are_named_as_the_document_section_or_entry_holds_them() -> None:
    assert Table({}).path("meters") == "meters"
    assert redis().path("timeout_ms") == "[redis] timeout_ms"
    assert Table.entry({}, "routes[2]").path("cost") == "routes[2]: cost"
    assert plan().path("burst") == "plans[0] 'pro': burst"


def test_an_unknown_field_is_refused_in_the_words_of_its_place() -> None:
    assert refusal(lambda: Table({"plan": []}).only({"plans"})) == (
        "plan: unknown section or field"
    )
    assert refusal(lambda: redis(host="x").only({"url"})) == "[redis] host: unknown field"
    assert refusal(lambda: plan(qouta="1/day").only({"name"})) == (
        "plans[0] 'pro': unknown field 'qouta'"
    )


def test_a_section_that_is_not_a_table_is_refused_without_quoting_it() -> None:
    assert refusal(lambda: Table({"redis": "redis://x"}).section("redis")) == (
        "[redis]: expected a table"
    )
    assert Table({}).section("redis").data == {}


def test_an_entry_that_is_not_a_table_is_refused_and_quoted() -> None:
    assert refusal(lambda: Table.entry(5, "meters[1]")) == "meters[1]: expected a table, got 5"


def test_a_secret_is_left_out_of_the_message() -> None:
    def read() -> str | None:
        return redis(url="http://:hunter2@db").string(
            "url", None, what="a redis:// URL", valid=lambda u: u.startswith("redis://"), echo=False
        )

    assert refusal(read) == "[redis] url: expected a redis:// URL"


def test_the_environment_wins_over_the_file_and_its_errors_quote_its_text() -> None:
    table = redis(timeout_ms=7, url="redis://file")
    assert table.integer("timeout_ms", 50, what="1..10000 ms", env="30") == 30
    assert table.integer("timeout_ms", 50, what="1..10000 ms", env="") == 7
    assert table.string("url", None, what="a URL", env="redis://env") == "redis://env"
    message = refusal(
        lambda: table.integer("timeout_ms", 50, what="1..10000 ms", valid=lambda n: n > 0, env="0")
    )
    assert message == "[redis] timeout_ms: expected 1..10000 ms, got '0'"


def test_a_list_field_quotes_the_wrong_item_not_the_whole_list() -> None:
    def read(value: object) -> tuple[str, ...]:
        return plan(features=value).array("features", str, (), what="a list of names")

    assert read(["search", "export"]) == ("search", "export")
    assert refusal(lambda: read(["search", 5])) == (
        "plans[0] 'pro': features: expected a list of names, got 5"
    )
    assert refusal(lambda: read("export")) == (
        "plans[0] 'pro': features: expected a list of names, got 'export'"
    )


def test_a_list_of_integers_refuses_true_among_them() -> None:
    usage = Table({"thresholds": [80, True]}, "[usage]")
    message = refusal(
        lambda: usage.array("thresholds", int, (80, 100), what="percentages like [80, 100]")
    )
    assert message == "[usage] thresholds: expected percentages like [80, 100], got True"


def test_a_duration_is_seconds_and_a_bad_one_names_its_field() -> None:
    billing = Table({"grace_period": "3d", "typo": "soon"}, "[billing]")
    assert billing.duration("grace_period", 60) == 3 * 86400
    assert billing.duration("absent", 60) == 60
    assert refusal(lambda: billing.duration("typo", 60)) == (
        "[billing] typo: expected a duration like 30s, 15m, 24h or 7d, got 'soon'"
    )


def test_expect_checks_a_lone_value_under_the_name_it_is_given() -> None:
    assert expect("X-Key", str, "[headers] api_key", "an HTTP header name") == "X-Key"
    assert refusal(lambda: expect(5, str, "[headers] api_key", "an HTTP header name")) == (
        "[headers] api_key: expected an HTTP header name, got 5"
    )


def test_a_table_cannot_be_changed_after_it_is_read() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan().where = "plans[1]"  # type: ignore[misc]
