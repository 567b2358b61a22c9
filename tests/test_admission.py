"""admit.lua's contract is the Admission record: a new input cannot be added to
one without the other, or in another order (no Redis needed)."""

from __future__ import annotations

import re
from dataclasses import fields
from importlib import resources

from sidecar.decision import OutcomeCode
from sidecar.plans import Plan, Quota, Rate
from sidecar.store.admission import ADMIT_KEYS, Admission, admission
from sidecar.store.base import lua_source

SCRIPT = resources.files("sidecar.store").joinpath("admit.lua").read_text()
PRO = Plan("pro", Rate(10, 1), burst=20, quota=Quota(1000, "day"), meter="requests")


def _header(kind: str) -> list[tuple[int, str]]:
    return [(int(n), name) for n, name in re.findall(rf"^-- {kind}\[(\d+)\]\s+(\w+)", SCRIPT, re.M)]


def test_the_scripts_argv_header_names_the_records_fields_in_order() -> None:
    header = _header("ARGV")
    assert [n for n, _ in header] == list(range(1, len(header) + 1))
    assert [name for _, name in header] == [field.name for field in fields(Admission)]


def test_the_script_unpacks_argv_into_the_records_field_names_in_order() -> None:
    unpack = re.search(r"^local (.*?) = unpack\(ARGV\)", SCRIPT, re.M | re.S)
    assert unpack is not None
    names = [name.strip() for name in unpack[1].replace("\n", " ").split(",")]
    assert names == [field.name for field in fields(Admission)]


def test_the_scripts_keys_header_is_the_key_list_the_store_sends() -> None:
    header = _header("KEYS")
    assert [n for n, _ in header] == list(range(1, len(ADMIT_KEYS) + 1))
    assert tuple(name for _, name in header) == ADMIT_KEYS


def test_the_header_reads_keys_then_argv_then_return_codes_in_order() -> None:
    first_argv = SCRIPT.index("-- ARGV[1]")
    assert SCRIPT.rindex("-- KEYS[") < first_argv < SCRIPT.index("-- Returns")
    codes = [int(code) for code in re.findall(r"^--\s+(?:code)?\s+(\d+) \w", SCRIPT, re.M)]
    assert codes == [code.value for code in OutcomeCode]


def test_a_plan_and_a_request_become_one_argv_slot_per_field() -> None:
    args = admission(
        PRO,
        cost=3,
        feature_ok=True,
        key_expires_at_us=7,
        request_id="req-1",
        thresholds=(80, 100),
        lease_id="lease-1",
    )
    argv = args.argv()
    by_name = dict(zip((field.name for field in fields(Admission)), argv, strict=True))
    for field in fields(Admission):  # each slot holds its own field, as the script reads it
        value = getattr(args, field.name)
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = repr(value)
        elif isinstance(value, tuple):
            value = ",".join(map(str, value))
        assert by_name[field.name] == ("" if value is None else value), field.name
    assert by_name["now_us"] == ""  # Redis TIME
    assert by_name["rate"] == "10.0" and by_name["burst"] == 20
    assert by_name["quota_limit"] == 1000 and by_name["quota_period"] == "day"
    assert by_name["feature_ok"] == 1 and by_name["thresholds"] == "80,100"
    assert by_name["reservation"] != "req-1" and len(str(by_name["reservation"])) == 32


def test_without_a_plan_the_script_is_asked_only_which_plan_to_enforce() -> None:
    argv = admission(None, cost=1, feature_ok=False, key_expires_at_us=0).argv()
    assert argv[1] == ""  # plan: never a plan name, so the script answers "plan changed"


def test_shared_chunks_are_inlined_so_each_script_runs_as_one_source() -> None:
    source = lua_source("admit.lua")
    assert "-- #include" not in source
    assert "local function usage_entry" in source
