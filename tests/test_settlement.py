"""The settlement rules ext_proc and the access log share (sidecar/settlement.py),
and which settlement tollway.toml names ([envoy] settlement): no server."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct

from sidecar.errors import ConfigError
from sidecar.settings import EnvoyOptions, settings_from_document
from sidecar.settlement import Finished, Mismatch, Settled, finished, plain, real_cost

CHECK_WROTE: dict[str, Any] = {  # envoy.settlement_fields of an admitted request
    "customer": "cus_1",
    "plan": "duo",
    "request_id": "rq-1",
    "lease_id": "rq-1",
    "cost": 4,
    "bill_only_success": True,
}


# -- the real cost ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status", "only_success", "cost"),
    [
        ("7", 200, False, 7),  # the upstream's word
        (" 7 ", 200, False, 7),
        ("0", 200, False, 0),
        (None, 200, False, 4),  # no word: the estimate
        ("7", 503, True, 0),  # a 5xx is refunded with bill_only_success…
        ("7", 503, False, 7),  # …and charged without it
        ("7", 499, True, 7),
        (None, 0, True, 4),  # no response at all: the estimate
        ("-1", 200, False, 4),  # malformed: the estimate
        ("1e3", 200, False, 4),
        ("\u00b2", 200, False, 4),  # isdigit() but not a number
        ("7.5", 200, False, 4),
        (str(10**9 + 1), 200, False, 4),  # past any sane cost
    ],
)
def test_the_real_cost(header: str | None, status: int, only_success: bool, cost: int) -> None:
    assert real_cost(header, estimate=4, status=status, bill_only_success=only_success) == cost


# -- reading what Check wrote, warily -------------------------------------------------------


def test_check_metadata_reads_as_the_request_it_admitted() -> None:
    assert finished(CHECK_WROTE) == Finished(
        customer="cus_1",
        plan="duo",
        request_id="rq-1",
        lease_id="rq-1",
        estimate=4,
        bill_only_success=True,
    )


def test_metadata_made_from_http_headers_reads_the_same() -> None:
    """HTTP ext_authz's dynamic_metadata_from_headers gives text, and leaves out
    bill_only_success when false."""
    text = {**CHECK_WROTE, "bill_only_success": "true", "cost": "4"}
    assert finished(text) == finished(CHECK_WROTE)
    absent = {k: v for k, v in CHECK_WROTE.items() if k != "bill_only_success"}
    assert finished(absent) == Finished("cus_1", "duo", "rq-1", "rq-1", 4, False)


def test_a_lease_without_a_reservation_is_a_request_to_release() -> None:
    lease_only = {**CHECK_WROTE, "request_id": ""}
    request = finished(lease_only)
    assert request is not None and request.request_id == "" and request.lease_id == "rq-1"


@pytest.mark.parametrize(
    "changes",
    [
        {"customer": "a b"},  # not an account id: it would sit in a hash tag
        {"customer": ""},
        {"customer": 7},
        {"request_id": "", "lease_id": ""},  # nothing to settle or release
        {"request_id": 1.0, "lease_id": True},
    ],
)
def test_metadata_check_did_not_write_settles_nothing(changes: dict[str, Any]) -> None:
    assert finished({**CHECK_WROTE, **changes}) is None


@pytest.mark.parametrize(
    "estimate", [-5, math.nan, math.inf, True, None, "abc", "-1", 10**9 + 1, [1], {"a": 1}]
)
def test_an_estimate_that_is_no_cost_counts_as_one(estimate: object) -> None:
    request = finished({**CHECK_WROTE, "cost": estimate})
    assert request is not None and request.estimate == 1


@pytest.mark.parametrize("flag", ["yes", "True", 1, 1.0, "1", "false", False])
def test_bill_only_success_is_true_or_the_text_true_only(flag: object) -> None:
    request = finished({**CHECK_WROTE, "bill_only_success": flag})
    assert request is not None and request.bill_only_success is False


def test_a_struct_reads_as_its_scalars_even_a_nan() -> None:
    struct = Struct()
    struct.update({**CHECK_WROTE, "cost": math.nan, "nested": {"a": 1}, "list": [1]})
    fields = plain(struct)
    assert set(fields) == set(CHECK_WROTE)  # nested values dropped
    assert math.isnan(fields["cost"])  # type: ignore[arg-type]
    assert fields["bill_only_success"] is True and fields["cost"] != 4
    request = finished(fields)
    assert request is not None and request.estimate == 1


def test_what_each_settlement_counts_as() -> None:
    assert Settled(charged=7, quota_used=7).result == "settled"
    assert Settled(charged=None).result == "released"
    assert Settled(charged=None, quota_used=7, duplicate=True).result == "duplicate"


def test_a_mismatch_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    mismatch = Mismatch(logging.getLogger("tollway.test-settlement"))
    with caplog.at_level(logging.ERROR, "tollway.test-settlement"):
        for _ in range(3):
            mismatch.say("tollway.toml says %r", "none")
    assert [r.getMessage() for r in caplog.records] == ["tollway.toml says 'none'"]
    assert caplog.records[0].levelno == logging.ERROR


# -- [envoy] settlement in tollway.toml ------------------------------------------------------

PLANS = {"plans": [{"name": "free", "rate": "1/s"}]}


def envoy(section: dict[str, Any] | None) -> EnvoyOptions:
    doc = {**PLANS, **({"envoy": section} if section is not None else {})}
    return settings_from_document(doc, {}).envoy


@pytest.mark.parametrize(
    ("section", "settlement", "reserves"),
    [
        (None, "none", False),
        ({}, "none", False),
        ({"ext_proc": False}, "none", False),
        ({"ext_proc": True}, "ext_proc", True),  # the older spelling still works
        ({"settlement": "none"}, "none", False),
        ({"settlement": "ext_proc"}, "ext_proc", True),
        ({"settlement": "access_log"}, "access_log", True),
        ({"settlement": "ext_proc", "ext_proc": True}, "ext_proc", True),
        ({"settlement": "access_log", "ext_proc": False}, "access_log", True),
        ({"settlement": "none", "ext_proc": False}, "none", False),
    ],
)
def test_which_settlement_check_reserves_for(
    section: dict[str, Any] | None, settlement: str, reserves: bool
) -> None:
    options = envoy(section)
    assert options.settlement == settlement
    assert options.reserves is reserves
    assert options.ext_proc is reserves  # the name the HTTP transport reads


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"settlement": "access_log", "ext_proc": True},
            "[envoy] ext_proc: true contradicts settlement = 'access_log'",
        ),
        (
            {"settlement": "none", "ext_proc": True},
            "[envoy] ext_proc: true contradicts settlement = 'none'",
        ),
        (
            {"settlement": "ext_proc", "ext_proc": False},
            "[envoy] ext_proc: false contradicts settlement = 'ext_proc'",
        ),
        ({"settlement": "accesslog"}, '[envoy] settlement: expected "none", "ext_proc" or'),
        ({"settlement": True}, "[envoy] settlement: expected"),
        ({"ext_proc": "yes"}, "[envoy] ext_proc: expected true or false"),
        ({"settle": "none"}, "[envoy] settle: unknown field"),
    ],
)
def test_a_settlement_config_that_cannot_be_right_is_refused(
    section: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        envoy(section)
    assert str(caught.value).startswith(message), caught.value
