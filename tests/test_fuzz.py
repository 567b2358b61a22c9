"""Hostile input against the real processes, by bounded, derandomized fuzzing.

Every test here talks to a running sidecar, Envoy or companion (no mocks) and
holds them to what a client would notice: the server keeps answering (health
SERVING afterwards), every answer is a well-formed response or an expected
gRPC code (never UNKNOWN or INTERNAL), HTTP answers are never 5xx, and nothing
is ever allowed without a valid key. Hypothesis runs derandomized with no
example database, so a run is the same run every time and stops on its own.

Tests marked "BUG:" pinned a defect found while writing them (at commit 071b06b):
they fail until the code is fixed, and stay as regression tests after. The
comment on each says what was wrong, where, and the fix proposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import string
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.client import HTTPConnection
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import httpx
import pytest
import redis
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.store import KeyRecord, Store, connect
from tests.conftest import WEBHOOK_SECRET, Customer, HttpSidecar, Stack, new_customer
from tests.fakestripe import FakeStripe, make_event, sign_payload

MakeCustomer = Callable[..., Customer]
Cli = Callable[..., subprocess.CompletedProcess[str]]
Code = grpc.StatusCode

MiB = 1 << 20
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_BODY = 65536  # COMPANION_CONFIG's [stripe] max_body_bytes
TOLERANCE = 300  # the companion's default webhook_tolerance
BASIC_BURST, BASIC_RATE, BASIC_QUOTA = 5, 10, 1000  # plan "basic" in tests/conftest.py
METERS = frozenset({"api_calls", "tokens"})
B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def fuzz(examples: int) -> settings:
    """Bounded and reproducible: fixed examples, no deadline, no saved database."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# -- keys, built the way README.md describes them ------------------------------------


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(B62[digit])
    return "".join(reversed(digits))


def checksummed(body: str) -> str:
    """tw_<env>_ + 43 secret characters, then 6 base62 characters of CRC32 over them."""
    return body + _base62(zlib.crc32(body.encode()), 6)


def mutants(key: str) -> st.SearchStrategy[str]:
    """Keys one small step away from a real one; none of them is that key."""

    def flip(pos: int, delta: int, fix: bool) -> str:
        changed = key[:pos] + B62[(B62.index(key[pos]) + delta) % 62] + key[pos + 1 :]
        # Re-checksummed: well-formed, so it reaches the lookup, and is unknown there.
        return checksummed(changed[:51]) if fix else changed

    other_env = "tw_live_" if key.startswith("tw_test_") else "tw_test_"
    return st.one_of(
        st.builds(flip, st.integers(8, 50), st.integers(1, 61), st.booleans()),  # secret
        st.builds(flip, st.integers(51, 56), st.integers(1, 61), st.just(False)),  # checksum
        st.builds(lambda n: key[:n], st.integers(0, 56)),
        st.builds(lambda tail: key + tail, st.text(min_size=1, max_size=8)),
        st.builds(lambda pad: pad + key, st.sampled_from([" ", "\t", "\x00", "\u200b"])),
        st.builds(lambda pad: key + pad, st.sampled_from([" ", "\n", "\x00", "\u00a0"])),
        st.sampled_from([key.swapcase(), key.upper(), checksummed(other_env + key[8:51])]),
    )


# -- hostile strings ------------------------------------------------------------------

ODD = [
    "",
    " ",
    "\x00",
    "\x7f",
    "\r\n",
    "\t\t",
    "tw_live_",
    "tw_test_",
    "Bearer",
    "Bearer ",
    "\u202e\u0000",
    "\U0001f511" * 8,
    "%00",
    "../" * 20,
    "\ufeff",
    "\u017fearch",
    "null",
    "{}",
    "-1",
    "18446744073709551615",
]


def repeated(max_chars: int) -> st.SearchStrategy[str]:
    """Big strings, cheaply: a short drawn piece repeated up to max_chars characters."""
    return st.builds(
        lambda piece, n: (piece * n)[:max_chars],
        st.text(min_size=1, max_size=4),
        st.integers(1, max_chars),
    )


HOSTILE = st.one_of(
    st.sampled_from(ODD),
    st.text(max_size=40),  # any unicode but surrogates: control characters included
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    repeated(10_240),  # 10 KB keys, paths, meters...
)
RANDOM_KEYS = st.one_of(
    HOSTILE,
    st.builds(
        lambda env, s: f"tw_{env}_{s}",
        st.sampled_from(["live", "test"]),
        st.text(alphabet=B62, min_size=49, max_size=49),
    ),
    st.builds(
        lambda env, s: checksummed(f"tw_{env}_{s}"),
        st.sampled_from(["live", "test"]),
        st.text(alphabet=B62, min_size=43, max_size=43),
    ),
)
# No "\n": route globs do not match it (pinned by its own BUG test below).
PATHS = st.one_of(
    st.sampled_from(
        [
            "",
            "/",
            "/v1/heavy",
            "/v1/heavy?x=1",
            "/v1/heavyx",
            "/V1/HEAVY",
            "/v1/export/",
            "/v1/export/x",
            "/v1/export/a/b?c",
            "/v1/x/../export/y",
            "*",
            "/v1/search",
        ]
    ),
    st.text(max_size=30).filter(lambda p: "\n" not in p),
    st.builds(lambda tail: "/v1/export/" + tail, st.text(max_size=20)).filter(
        lambda p: "\n" not in p
    ),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "post", "PoSt", "PUT", "DELETE", "", "P\u00d6ST", "p\u017fst"]),
    st.text(max_size=10),
)
COSTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 10, 999, 1000, 1001, UINT32_MAX]),
    st.integers(0, UINT32_MAX),
)


# -- calls ------------------------------------------------------------------------------


def rpc(method: Callable[..., Any], request: Any) -> tuple[Any, grpc.StatusCode]:
    try:
        return method(request, timeout=10), Code.OK
    except grpc.RpcError as exc:
        return None, exc.code()


def serving(channel: grpc.Channel) -> bool:
    answer = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def route_of(method: str, path: str) -> tuple[int, str | None]:
    """(cost, feature) of conftest's [[routes]], as README.md defines them:
    first match wins, ** is anything, the query string is ignored."""
    path, method = path.split("?", 1)[0], method.upper()
    if method == "POST" and re.fullmatch(r"/v1/export/.*", path, re.DOTALL):
        return 10, "export"
    if path == "/v1/heavy":
        return 4, None
    return 1, None


@pytest.fixture(scope="module")
def check_stub(channel: grpc.Channel) -> ext_authz_grpc.AuthorizationStub:
    return ext_authz_grpc.AuthorizationStub(channel)


def check_request(
    headers: dict[str, str], method: str = "GET", path: str = "/"
) -> ext_authz.CheckRequest:
    http = attrs.AttributeContext.HttpRequest(headers=headers, method=method, path=path)
    return ext_authz.CheckRequest(
        attributes=attrs.AttributeContext(request=attrs.AttributeContext.Request(http=http))
    )


def denial(answer: ext_authz.CheckResponse) -> tuple[int, str]:
    """(HTTP status, body code) of a denied CheckResponse."""
    assert answer.WhichOneof("http_response") == "denied_response", answer
    return answer.denied_response.status.code, json.loads(answer.denied_response.body)["code"]


def upstream_headers(answer: ext_authz.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in answer.ok_response.headers}


# == gRPC: Authorize =====================================================================


def test_authorize_never_allows_a_random_or_mutated_key(
    tollway_stub: pb_grpc.TollwayStub, channel: grpc.Channel, make_customer: MakeCustomer
) -> None:
    real = make_customer("pro")

    @fuzz(250)
    @given(
        key=st.one_of(RANDOM_KEYS, mutants(real.key)),
        method=METHODS,
        path=st.one_of(PATHS, HOSTILE),
        cost=COSTS,
        feature=st.none() | HOSTILE,
        request_id=HOSTILE,
    )
    def run(
        key: str, method: str, path: str, cost: int, feature: str | None, request_id: str
    ) -> None:
        assert key != real.key
        request = pb.AuthorizeRequest(
            api_key=key, method=method, path=path, cost=cost, request_id=request_id
        )
        if feature is not None:
            request.feature = feature
        answer, code = rpc(tollway_stub.Authorize, request)
        assert code is Code.OK, code
        assert not answer.allowed
        assert answer.reason == (pb.REASON_MISSING_KEY if key == "" else pb.REASON_INVALID_KEY)
        assert (answer.customer_id, answer.plan, answer.lease_id) == ("", "", "")
        assert answer.message

    run()
    # The oracle is live: the key every mutant came from is allowed.
    assert tollway_stub.Authorize(pb.AuthorizeRequest(api_key=real.key), timeout=5).allowed
    assert serving(channel)


def test_a_valid_basic_key_is_allowed_unless_limited(
    tollway_stub: pb_grpc.TollwayStub, channel: grpc.Channel, make_customer: MakeCustomer
) -> None:
    """Plan basic (burst 5, 10/s, quota 1000/month, features [search]) against a
    model: never more than the bucket admits, always what a full-enough bucket
    admits, the quota counting exactly the allowed costs."""
    request = st.tuples(
        METHODS,
        PATHS,
        COSTS,
        st.none()
        | st.sampled_from(["", "search", "export", "SEARCH", "\u017fearch", "nope"])
        | st.text(max_size=8),
    )

    @fuzz(60)
    @given(st.lists(request, min_size=1, max_size=14))
    def run(requests: list[tuple[str, str, int, str | None]]) -> None:
        c = make_customer("basic")
        spent, started = 0, time.monotonic()
        for method, path, cost, feature in requests:
            message = pb.AuthorizeRequest(api_key=c.key, method=method, path=path, cost=cost)
            if feature is not None:
                message.feature = feature
            answer, code = rpc(tollway_stub.Authorize, message)
            assert code is Code.OK, code
            assert (answer.customer_id, answer.plan) == (c.id, "basic")
            route_cost, route_feature = route_of(method, path)
            units = cost or route_cost
            needs = feature or route_feature
            if needs is not None and needs != "search":
                assert answer.reason == pb.REASON_FEATURE_NOT_IN_PLAN, answer
            elif units > BASIC_BURST or spent + units > BASIC_QUOTA:
                assert answer.reason in (pb.REASON_RATE_LIMITED, pb.REASON_QUOTA_EXCEEDED)
            elif units <= BASIC_BURST - spent:  # the bucket surely holds that much
                assert answer.allowed, answer
            else:
                assert answer.allowed or answer.reason == pb.REASON_RATE_LIMITED, answer
            if answer.allowed:
                spent += units
                assert answer.quota.used == spent and answer.quota.limit == BASIC_QUOTA
                assert answer.rate_limit.limit == BASIC_BURST
            else:
                assert not answer.allowed and answer.message
            refilled = BASIC_RATE * (time.monotonic() - started)
            assert spent <= BASIC_BURST + refilled + 0.5, "more admitted than the bucket holds"

    run()
    assert serving(channel)


# BUG (regression test): sidecar/plans.py _compile_path (~L150) compiled "**" to
# ".*" without re.DOTALL, so "**" did not match a newline: POST /v1/export/a<LF>b
# matched no route, cost 1 instead of 10 and skipped the "export" feature check.
# A backend passing a percent-decoded path to Authorize (Starlette's
# request.url.path decodes %0A) let a basic customer reach the export endpoint.
# Envoy's own paths never hold a raw LF, so Check through Envoy was not affected.
# Fix: re.compile(regex, re.DOTALL).
def test_route_globs_match_any_character_even_a_newline(
    tollway_stub: pb_grpc.TollwayStub, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")  # no "export" feature
    for path in ("/v1/export/a\rb", "/v1/export/a\u2028b", "/v1/export/a\nb", "/v1/export/\n"):
        request = pb.AuthorizeRequest(api_key=c.key, method="POST", path=path)
        answer = tollway_stub.Authorize(request, timeout=5)
        assert answer.reason == pb.REASON_FEATURE_NOT_IN_PLAN, (path, answer)


# BUG (regression test): sidecar/usage.py validate (~L47) echoed the whole meter,
# repr()-escaped, into the gRPC status message, a trailer (grpc-message,
# percent-encoded UTF-8): past the client's metadata limits (8 KiB soft, where
# gRPC drops the call at random; 16 KiB hard) the caller got RESOURCE_EXHAUSTED
# "Stream removed" instead of INVALID_ARGUMENT. The RecordUsage fuzzing below found
# it with 1000 characters of U+0AFF (about 9 KB escaped: failing only sometimes);
# 20 KB always failed. Fix: quote at most 64 characters (meter[:64]).
def test_an_unknown_huge_meter_is_invalid_argument(
    tollway_stub: pb_grpc.TollwayStub, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    for meter in ("m" * 20_000, "\u0aff" * 3000, "\x01" * 10_000):
        request = pb.RecordUsageRequest(api_key=c.key, meter=meter, quantity=1, idempotency_key="i")
        _, code = rpc(tollway_stub.RecordUsage, request)
        assert code is Code.INVALID_ARGUMENT


# BUG (regression test): sidecar/decision.py decision_from_outcome (~L207) echoed
# the whole feature, repr()-escaped, into the answer's message (f"Feature
# {feature!r} is not in plan ..."). A 300 KB feature of control characters became
# a 1.2 MB answer, over the server's 1 MiB send limit: the caller got
# RESOURCE_EXHAUSTED ("Sent message larger than max") for a request well under
# the limit, not FEATURE_NOT_IN_PLAN. Fixed in 8fa6ae1 (at most 64 characters).
def test_an_unknown_huge_feature_is_feature_not_in_plan(
    tollway_stub: pb_grpc.TollwayStub, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    for feature in ("\x01" * 300_000, "f" * 900_000):
        request = pb.AuthorizeRequest(api_key=c.key, method="GET", path="/", feature=feature)
        assert request.ByteSize() < MiB
        answer, code = rpc(tollway_stub.Authorize, request)
        assert code is Code.OK and answer.reason == pb.REASON_FEATURE_NOT_IN_PLAN
        assert len(answer.message) < 10_000


# == gRPC: usage ========================================================================

TIMESTAMPS = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, -62135596800, 253402300799]),
        st.just(True),
    ),
    st.tuples(st.integers(-40 * 86400, 3600), st.just(False)),  # relative to now
)
QUANTITIES = st.one_of(
    st.sampled_from([INT64_MIN, -1, 0, 1, 10**12, 10**12 + 1, INT64_MAX]),
    st.integers(INT64_MIN, INT64_MAX),
    st.integers(1, 1000),
)
IDEMPOTENCY = st.one_of(
    st.text(max_size=300), st.text(min_size=250, max_size=260), repeated(1000), st.just("")
)
WHO = st.sampled_from(["key", "id", "random key", "random id", "empty key", "empty id", "none"])
EVENT = st.fixed_dictionaries(
    {
        "who": WHO,
        "random": RANDOM_KEYS,
        # Meters under 200 characters here; huge ones have their own test above.
        "meter": st.one_of(
            st.sampled_from(sorted(METERS)),
            st.sampled_from(["", "API_CALLS"]),
            HOSTILE.map(lambda m: m[:200]),
        ),
        "quantity": QUANTITIES,
        "idempotency": IDEMPOTENCY,
        "timestamp": TIMESTAMPS,
        "nanos": st.integers(-(2**31), 2**31 - 1),
        "request_id": st.one_of(st.just(""), HOSTILE),
    }
)


def usage_request(event: dict[str, Any], c: Customer, now: int) -> pb.RecordUsageRequest:
    request = pb.RecordUsageRequest(
        meter=event["meter"],
        quantity=event["quantity"],
        idempotency_key=event["idempotency"],
        request_id=event["request_id"],
    )
    who, random = event["who"], event["random"]
    if who == "key":
        request.api_key = c.key
    elif who == "id":
        request.customer_id = c.id
    elif who == "random key":
        request.api_key = random
    elif who == "random id":
        request.customer_id = random
    elif who == "empty key":
        request.api_key = ""
    elif who == "empty id":
        request.customer_id = ""
    if event["timestamp"] is not None:
        seconds, absolute = event["timestamp"]
        at = seconds if absolute else now + seconds
        request.timestamp.CopyFrom(Timestamp(seconds=at, nanos=event["nanos"]))
    return request


def usage_oracle(request: pb.RecordUsageRequest, now: int, c: Customer) -> grpc.StatusCode | None:
    """The code a RecordUsage call must end with (None: too close to a time boundary).
    Validation comes first (README: mistakes are INVALID_ARGUMENT), then the customer."""
    idem = request.idempotency_key
    if (
        request.meter not in METERS
        or not 0 < request.quantity <= 10**12
        or not idem
        or len(idem) > 256
    ):
        return Code.INVALID_ARGUMENT
    if request.HasField("timestamp"):
        at, oldest, newest = request.timestamp.seconds, now - 35 * 86400, now + 300
        if min(abs(at - oldest), abs(at - newest)) < 60:
            return None
        if not oldest <= at <= newest:
            return Code.INVALID_ARGUMENT
    if request.WhichOneof("customer") == "api_key":
        return Code.OK if request.api_key == c.key else Code.UNAUTHENTICATED
    if not request.customer_id:
        return Code.INVALID_ARGUMENT
    return Code.OK if request.customer_id == c.id else Code.NOT_FOUND


def month_of(request: pb.RecordUsageRequest, now: int) -> bool:
    """Whether the record counts in GetUsage's period (this calendar month, UTC)."""
    at = request.timestamp.seconds if request.HasField("timestamp") else now
    a, b = datetime.fromtimestamp(at, UTC), datetime.fromtimestamp(now, UTC)
    return (a.year, a.month) == (b.year, b.month)


def test_record_usage_answers_every_event_precisely(
    tollway_stub: pb_grpc.TollwayStub, channel: grpc.Channel, make_customer: MakeCustomer
) -> None:
    @fuzz(80)
    @given(st.lists(EVENT, min_size=1, max_size=6), st.booleans())
    def run(events: list[dict[str, Any]], batch: bool) -> None:
        c = make_customer("basic")
        now = int(time.time())
        requests = [usage_request(e, c, now) for e in events]
        if batch:
            reply, code = rpc(
                tollway_stub.RecordUsageBatch, pb.RecordUsageBatchRequest(events=requests)
            )
            assert code is Code.OK, code
            assert len(reply.results) == len(requests)
            outcomes = [
                (Code.OK if r.code == 0 else _CODES[r.code], r.response) for r in reply.results
            ]
        else:
            outcomes = []
            for request in requests:
                answer, code = rpc(tollway_stub.RecordUsage, request)
                outcomes.append((code, answer))
        seen: dict[str, str] = {}
        expected_totals: dict[str, int] = {}
        for request, (code, answer) in zip(requests, outcomes, strict=True):
            expected = usage_oracle(request, now, c)
            assert code in (Code.OK, Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.NOT_FOUND)
            if expected is None:
                continue
            assert code is expected, (request, code)
            if code is not Code.OK:
                continue
            assert answer.customer_id == c.id
            idem = request.idempotency_key
            if idem in seen:  # a repeat within the window counts nothing
                assert answer.duplicate and answer.record_id == seen[idem]
                continue
            assert not answer.duplicate and answer.record_id
            seen[idem] = answer.record_id
            if month_of(request, now):
                expected_totals[request.meter] = (
                    expected_totals.get(request.meter, 0) + request.quantity
                )
        usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
        reported = {m.meter: m.used for m in usage.meters if m.used}
        assert reported == expected_totals

    run()
    assert serving(channel)


_CODES = {code.value[0]: code for code in Code}


def test_get_usage_and_release_refuse_strangers(
    tollway_stub: pb_grpc.TollwayStub, channel: grpc.Channel, make_customer: MakeCustomer
) -> None:
    real = make_customer("duo")  # a plan with concurrency leases

    @fuzz(100)
    @given(who=RANDOM_KEYS, by_key=st.booleans(), lease=HOSTILE)
    def run(who: str, by_key: bool, lease: str) -> None:
        request = pb.GetUsageRequest(api_key=who) if by_key else pb.GetUsageRequest(customer_id=who)
        _, code = rpc(tollway_stub.GetUsage, request)
        if by_key:
            assert code is Code.UNAUTHENTICATED
        else:
            assert code is (Code.INVALID_ARGUMENT if who == "" else Code.NOT_FOUND)
        _, code = rpc(tollway_stub.Release, pb.ReleaseRequest(api_key=who, lease_id=lease))
        assert code is Code.UNAUTHENTICATED
        # A real key, a lease it never held: answered, and nothing released.
        answer, code = rpc(
            tollway_stub.Release, pb.ReleaseRequest(api_key=real.key, lease_id=lease)
        )
        assert code is Code.OK and not answer.released

    run()
    held = tollway_stub.Authorize(pb.AuthorizeRequest(api_key=real.key, request_id="r1"), timeout=5)
    assert held.allowed and held.lease_id == "r1"
    release = pb.ReleaseRequest(api_key=real.key, lease_id="r1")
    assert tollway_stub.Release(release, timeout=5).released
    assert not tollway_stub.Release(release, timeout=5).released
    assert serving(channel)


def test_messages_over_one_mebibyte_are_resource_exhausted(
    tollway_stub: pb_grpc.TollwayStub,
    check_stub: ext_authz_grpc.AuthorizationStub,
    channel: grpc.Channel,
    make_customer: MakeCustomer,
) -> None:
    c = make_customer("pro")
    too_big = [
        (tollway_stub.Authorize, pb.AuthorizeRequest(api_key="k" * MiB)),
        (tollway_stub.Authorize, pb.AuthorizeRequest(api_key=c.key, path="/" * (MiB + 10))),
        (
            tollway_stub.RecordUsageBatch,
            pb.RecordUsageBatchRequest(
                events=[
                    pb.RecordUsageRequest(
                        api_key=c.key,
                        meter="api_calls",
                        quantity=1,
                        idempotency_key=f"{i}-" + "x" * 200,
                    )
                    for i in range(5000)
                ]
            ),
        ),
        (tollway_stub.GetUsage, pb.GetUsageRequest(customer_id="c" * (MiB + 1))),
        (check_stub.Check, check_request({f"h{i}": "v" * 1000 for i in range(1100)})),
        (check_stub.Check, check_request({"x-api-key": c.key}, path="/" + "p" * MiB)),
    ]
    for method, request in too_big:
        assert request.ByteSize() > MiB
        _, code = rpc(method, request)
        assert code is Code.RESOURCE_EXHAUSTED
    # Nothing over the limit was processed: no usage recorded, no quota taken.
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert all(m.used == 0 for m in usage.meters) and usage.quota.used == 0
    # Just under the limit is an ordinary answer.
    near = pb.AuthorizeRequest(api_key=c.key, method="GET", path="/" * (MiB - 1000))
    assert near.ByteSize() < MiB
    answer, code = rpc(tollway_stub.Authorize, near)
    assert code is Code.OK and answer.allowed
    assert serving(channel)


# == gRPC: ext_proc Process (Envoy's response phase) =====================================

PHASES = [
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "request_trailers",
    "response_trailers",
    None,
]
METADATA = st.fixed_dictionaries(
    {},
    optional={
        "customer": st.one_of(st.builds(lambda: new_customer()), HOSTILE),
        "request_id": HOSTILE,
        "lease_id": HOSTILE,
        "plan": st.sampled_from(["basic", "metered", "duo", "", "nope"]),
        "cost": st.one_of(
            st.integers(-(10**6), 10**6),
            st.floats(allow_infinity=False),
            st.text(max_size=4),
            st.none(),
            st.booleans(),
        ),
        "bill_only_success": st.booleans(),
    },
)


def processing_request(
    phase: str | None, metadata: dict[str, Any] | None, status: str, cost: str | None
) -> ext_proc.ProcessingRequest:
    request = ext_proc.ProcessingRequest()
    if phase == "response_headers" or phase == "request_headers":
        pairs = [(":status", status)] + ([("x-tollway-cost", cost)] if cost is not None else [])
        headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
        getattr(request, phase).headers.CopyFrom(base_pb2.HeaderMap(headers=headers))
    elif phase is not None:
        getattr(request, phase).SetInParent()
    if metadata is not None:
        struct = Struct()
        struct.update(metadata)
        request.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(struct)
    return request


# BUG: sidecar/extproc.py answered hostile streams with UNKNOWN (an unhandled
# exception) instead of a response or INVALID_ARGUMENT. At 071b06b: an empty
# ProcessingRequest (ProcessingResponse(**{None: ...}) -> AttributeError), a
# non-integer metadata "cost" (int("abc")), a ":status" or an upstream
# x-tollway-cost of "\u00b2"/"\u00b9" (isdigit() but not int()), a metadata
# "customer" that is no valid id (store.record_usage -> TollwayError); and a
# negative "cost" was charged (x-tollway-charged: -5, quota refunded). Fixed by
# 8fa6ae1 and a4dd35e. STILL OPEN at a4dd35e: a NaN "cost" in the metadata makes
# MessageToDict raise ValueError ("Fail to serialize NaN", ExtProcService._settle
# ~L111) -> UNKNOWN. Envoy never sends that itself, but the port answers anyone
# who reaches it. Fix: catch ValueError around MessageToDict and skip settlement.
def test_process_streams_never_end_in_unknown(channel: grpc.Channel) -> None:
    stub = ext_proc_grpc.ExternalProcessorStub(channel)
    step = st.tuples(
        st.sampled_from(PHASES),
        st.none() | METADATA,
        st.one_of(
            st.sampled_from(["200", "503", "", "\u00b2", "abc", "99999999999"]), st.text(max_size=4)
        ),
        st.none() | st.one_of(st.sampled_from(["7", "-1", "1e3", "\u00b9"]), st.text(max_size=6)),
    )

    nan_cost = {"customer": "cus_nan", "request_id": "r", "cost": float("nan")}

    @fuzz(80)
    @given(st.lists(step, min_size=1, max_size=4))
    @example([("response_headers", nan_cost, "200", None)])
    @example([("response_headers", {"customer": "a b", "request_id": "r"}, "\u00b2", "\u00b9")])
    def run(steps: list[tuple[str | None, dict[str, Any] | None, str, str | None]]) -> None:
        requests = [processing_request(*s) for s in steps]
        answers, code, details = [], Code.OK, ""
        try:
            answers = list(stub.Process(iter(requests), timeout=10))
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        # Outside the except block, so a failure replays identically for Hypothesis.
        assert code in (Code.OK, Code.INVALID_ARGUMENT), (code, details)
        if code is Code.OK:  # one answer per phase sent, in order; an empty message
            # gets an empty answer or none
            phases = [a.WhichOneof("response") for a in answers]
            assert [p for p in phases if p is not None] == [s[0] for s in steps if s[0]]
            assert phases.count(None) <= [s[0] for s in steps].count(None)

    run()
    assert serving(channel)


# == Envoy Check, called directly ========================================================

HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "x-api-key",
            "authorization",
            "X-API-KEY",
            "x-api-key ",
            "x-tollway-customer",
            "cookie",
            ":path",
            "",
        ]
    ),
    st.text(max_size=20),
)
HEADER_VALUES = st.one_of(
    HOSTILE,
    RANDOM_KEYS,
    st.builds(
        lambda scheme, k: f"{scheme} {k}",
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token"]),
        RANDOM_KEYS,
    ),
)
# x-request-id gets no key-shaped values: the sidecar tags its log lines with it,
# and the suite fails if any log holds something shaped like a key.
REQUEST_ID_MAP = st.dictionaries(st.just("x-request-id"), HOSTILE, max_size=1)
HUGE_HEADER_MAPS = st.builds(
    lambda n, size: {f"x-h-{i}": "v" * size for i in range(n)},
    st.integers(1, 20_000),
    st.integers(0, 40),
)


def test_check_never_allows_without_a_valid_key(
    check_stub: ext_authz_grpc.AuthorizationStub, channel: grpc.Channel
) -> None:
    @fuzz(200)
    @given(
        headers=st.one_of(
            st.builds(
                lambda headers, rid: {**headers, **rid},
                st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=12),
                REQUEST_ID_MAP,
            ),
            HUGE_HEADER_MAPS,
        ),
        method=METHODS,
        path=st.one_of(PATHS, HOSTILE),
    )
    def run(headers: dict[str, str], method: str, path: str) -> None:
        answer, code = rpc(check_stub.Check, check_request(headers, method, path))
        assert code is Code.OK, code
        assert answer.status.code == 16  # google.rpc.Code.UNAUTHENTICATED
        status, body_code = denial(answer)
        assert status == 401 and body_code in ("missing_key", "invalid_key")

    run()
    assert serving(channel)


def test_check_with_a_valid_key_answers_only_200_403_or_429(
    check_stub: ext_authz_grpc.AuthorizationStub, channel: grpc.Channel, make_customer: MakeCustomer
) -> None:
    extra = st.builds(
        lambda headers, rid: {**headers, **rid},
        st.dictionaries(
            HEADER_NAMES.filter(lambda n: n not in ("x-api-key", "authorization")),
            HEADER_VALUES,
            max_size=8,
        ),
        REQUEST_ID_MAP,
    )

    @fuzz(80)
    @given(st.lists(st.tuples(METHODS, PATHS, extra), min_size=1, max_size=6))
    def run(requests: list[tuple[str, str, dict[str, str]]]) -> None:
        c = make_customer("basic")
        for method, path, headers in requests:
            answer, code = rpc(
                check_stub.Check,
                check_request({**headers, "x-api-key": f" {c.key} "}, method, path),
            )
            assert code is Code.OK, code
            if answer.status.code == 0:
                seen = upstream_headers(answer)
                assert (seen["x-tollway-customer"], seen["x-tollway-plan"]) == (c.id, "basic")
                assert list(answer.ok_response.headers_to_remove) == ["x-api-key"]
                continue
            status, body_code = denial(answer)
            if route_of(method, path)[1] == "export":
                assert (status, body_code) == (403, "feature_not_in_plan")
            else:
                assert (status, body_code) == (429, "rate_limited")

    run()
    assert serving(channel)


def test_duplicate_key_headers_x_api_key_wins_every_time(
    check_stub: ext_authz_grpc.AuthorizationStub, envoy_grpc: str, make_customer: MakeCustomer
) -> None:
    """Documented rule: [headers] api_key names are tried in order, then Bearer.
    So with both present, x-api-key decides, even when it is wrong and the
    Bearer token is right (no fallback), and the key's header is the one removed."""
    a, b = make_customer("pro"), make_customer("pro")
    garbage = "tw_test_" + "0" * 49
    cases = [
        ({"x-api-key": a.key, "authorization": f"Bearer {b.key}"}, a.id),
        ({"x-api-key": garbage, "authorization": f"Bearer {b.key}"}, None),
        ({"x-api-key": a.key, "authorization": "Bearer garbage"}, a.id),
        ({"x-api-key": "", "authorization": f"Bearer {b.key}"}, b.id),  # empty: not present
        ({"authorization": f"bearer   {b.key}  "}, b.id),
    ]
    for _ in range(3):
        for headers, winner in cases:
            answer = check_stub.Check(check_request(headers), timeout=5)
            if winner is None:
                assert denial(answer) == (401, "invalid_key")
            else:
                assert upstream_headers(answer)["x-tollway-customer"] == winner
    # Through Envoy: the same rule; and two x-api-key headers are joined by Envoy
    # into one "k1,k2" value, which is no key at all.
    for _ in range(3):
        ok = raw_request(
            envoy_grpc,
            "GET",
            "/",
            [("x-api-key", a.key.encode()), ("authorization", f"Bearer {b.key}".encode())],
        )
        assert ok[0] == 200 and json.loads(ok[2])["headers"]["x-tollway-customer"] == a.id
        wrong = raw_request(
            envoy_grpc,
            "GET",
            "/",
            [("x-api-key", garbage.encode()), ("authorization", f"Bearer {b.key}".encode())],
        )
        assert wrong[0] == 401 and json.loads(wrong[2])["code"] == "invalid_key"
        twice = raw_request(
            envoy_grpc, "GET", "/", [("x-api-key", a.key.encode()), ("x-api-key", a.key.encode())]
        )
        assert twice[0] == 401 and json.loads(twice[2])["code"] == "invalid_key"


# == Envoy over HTTP =====================================================================


def raw_request(
    base: str, method: str, path: str, headers: list[tuple[str, bytes]]
) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as given: http.client resolves nothing and allows bytes values."""
    url = urlsplit(base)
    conn = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Well-formed HTTP only: Envoy refuses malformed requests (unknown methods, control
# characters in values) by closing the connection after its 1 s delayed close, which
# would make fuzzing slow; those get their own concurrent test below.
HTTP_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
HTTP_PATHS = st.one_of(
    st.sampled_from(
        [
            "/",
            "/hello",
            "/v1/heavy",
            "//v1/heavy",
            "/v1/%68eavy",
            "/v1/export/x",
            "/v1/x/../export/y",
            "/%2e%2e/export",
            "/a%2Fb",
            "/%00",
            "/%ff%fe",
            "/" + "a" * 8000,
            "http://other.example/x",
        ]
    ),
    st.text(alphabet=string.printable[:94], max_size=60).map(lambda p: "/" + p),
    st.text(max_size=20).map(lambda p: "/" + quote(p.encode(), safe="/")),
).filter(lambda p: "status=" not in p and "sleep=" not in p)  # the echo upstream's knobs


def visible(text: str) -> str:
    return re.sub("[\x00-\x08\x0a-\x1f\x7f-\x9f]", "", text)


HTTP_VALUES = st.one_of(
    st.text(alphabet=st.characters(codec="latin-1"), max_size=60).map(
        lambda v: visible(v).encode("latin-1")
    ),
    st.text(max_size=20).map(lambda v: visible(v).encode()),
    RANDOM_KEYS.map(lambda v: visible(v).encode()[:6000]),
    st.builds(lambda n: b"v" * n, st.integers(0, 6000)),  # big, but under 60 KiB in all
)
HTTP_REQUEST_IDS = st.lists(
    st.tuples(st.just("x-request-id"), HOSTILE.map(lambda v: visible(v).encode()[:6000])),
    max_size=2,
)
HTTP_HEADERS = st.builds(
    lambda headers, rids: headers + rids,
    st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(["x-api-key", "authorization", "X-Api-Key", "x-tollway-customer"]),
                st.text(alphabet=TCHAR, min_size=1, max_size=16),
            ),
            HTTP_VALUES,
        ),
        max_size=7,
    ),
    HTTP_REQUEST_IDS,
)
ENVOY_OWN = frozenset({400, 404, 405, 413, 414, 431, 301, 302, 307, 308})


def test_envoy_never_lets_a_keyless_request_through(envoy_grpc: str) -> None:
    @fuzz(120)
    @given(method=HTTP_METHODS, path=HTTP_PATHS, headers=HTTP_HEADERS)
    def run(method: str, path: str, headers: list[tuple[str, bytes]]) -> None:
        try:
            status, _, body = raw_request(envoy_grpc, method, path, headers)
        except (ConnectionError, OSError):
            return  # Envoy closed a connection it refused to parse: nothing got through
        assert status < 500, (status, body[:200])
        assert status not in (200, 403, 429), (status, body[:200])
        if status == 401 and body:
            assert json.loads(body)["code"] in ("missing_key", "invalid_key")
        else:
            assert status in ENVOY_OWN or status == 401, status

    run()


def test_envoy_with_a_valid_key_answers_no_5xx(
    envoy_grpc: str, make_customer: MakeCustomer
) -> None:
    c = make_customer("pro")  # burst 100 at 100/s
    extra = st.builds(
        lambda headers, rids: headers + rids,
        st.lists(
            st.tuples(
                st.sampled_from(["x-tollway-customer", "x-tollway-plan", "cookie", "x-other"]),
                HTTP_VALUES,
            ),
            max_size=4,
        ),
        HTTP_REQUEST_IDS,
    )

    @fuzz(60)
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        path=HTTP_PATHS,
        headers=extra,
    )
    def run(method: str, path: str, headers: list[tuple[str, bytes]]) -> None:
        try:
            status, _, body = raw_request(
                envoy_grpc, method, path, [*headers, ("x-api-key", c.key.encode())]
            )
        except (ConnectionError, OSError):
            return
        assert status < 500, (status, body[:200])
        if status == 200:  # reached the upstream: as this customer, without the key
            seen = json.loads(body)["headers"]
            assert seen["x-tollway-customer"] == c.id and seen["x-tollway-plan"] == "pro"
            assert "x-api-key" not in seen
        else:
            assert status in ENVOY_OWN or status == 429, (status, body[:200])

    run()


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def one(i: int) -> None:
        try:
            results[i] = calls[i]()
        except (ConnectionError, OSError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_envoy_refuses_malformed_http_and_lets_nothing_through(
    envoy_grpc: str, make_customer: MakeCustomer
) -> None:
    key = make_customer("pro").key.encode()
    odd_methods = ["FOO", "get", "M-SEARCH", "PROPFIND", "0", "'x"]
    odd_values = [b"a\x01b", b"\x00", b"\x7f", b"\x1b[31m", b"a\x0bb"]
    cases: list[tuple[str, str, list[tuple[str, bytes]], bool]] = [
        (method, "/", [], False) for method in odd_methods
    ]
    cases += [("DELETE", "*", [], False), ("GET", "*", [("x-api-key", key)], True)]
    for value in odd_values:
        cases.append(("GET", "/", [("x-other", value)], False))
        cases.append(("GET", "/", [("x-api-key", key), ("x-other", value)], True))
        cases.append(("GET", "/", [("x-api-key", value)], False))
        cases.append(("GET", "/", [("authorization", b"Bearer " + value)], False))
    # Past Envoy's limits: 60 KiB of headers, 100 headers.
    many = [(f"x-h{i}", b"v") for i in range(120)]
    for extra in ([("x-big", b"v" * 70_000)], many):
        cases.append(("GET", "/", extra, False))
        cases.append(("GET", "/", [("x-api-key", key), *extra], True))
    answers = concurrently(
        [lambda m=m, p=p, h=h: raw_request(envoy_grpc, m, p, h) for m, p, h, _ in cases]
    )
    for (method, path, headers, keyed), answer in zip(cases, answers, strict=True):
        if isinstance(answer, Exception):
            continue  # closed without an answer: nothing reached the upstream
        status, _, body = answer
        assert status < 500, (method, path, headers, status, body[:200])
        if not keyed:
            assert status not in (200, 403, 429), (method, path, headers, status)


def slow_requests(envoy: str, key: str, request_ids: list[str]) -> list[int]:
    statuses: list[int] = []

    def one(request_id: str) -> None:
        headers = {"x-api-key": key, "x-request-id": request_id}
        statuses.append(httpx.get(f"{envoy}/slow?sleep=1", headers=headers, timeout=10).status_code)

    threads = [threading.Thread(target=one, args=(r,)) for r in request_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(statuses)


# BUG (regression test): sidecar/grpc_api.py CheckService.Check (~L268-276) names
# each request's concurrency lease (and, with ext_proc, its reservation) by the
# client's own x-request-id, which deploy/envoy.yaml passes through unchanged (the
# upstream sees the value the client sent). At 071b06b, requests sharing one
# x-request-id shared one lease (admit.lua ZADDs the same member): six concurrent
# requests on a concurrency-2 plan were all admitted. Fix proposed: have Envoy
# regenerate x-request-id for external requests (use_remote_address: true;
# preserve_external_request_id stays false), or make the lease id unique per
# Check (x-request-id plus a suffix when that id is already held).
def test_a_client_chosen_request_id_cannot_lift_the_concurrency_limit(
    envoy_grpc: str, make_customer: MakeCustomer
) -> None:
    fair = slow_requests(envoy_grpc, make_customer("duo").key, [f"r{i}" for i in range(6)])
    assert fair == [200, 200, 429, 429, 429, 429]  # the oracle: duo allows 2 at once
    same = slow_requests(envoy_grpc, make_customer("duo").key, ["same-id"] * 6)
    assert same.count(200) <= 2, same


# BUG (regression test), same cause (CheckService.Check; ExtProcService._settle
# settles with idempotency "settle:<x-request-id>"): at 071b06b a client repeating
# one x-request-id was metered once. Later responses found the idempotency claim
# and recorded nothing, and their reservations overwrote each other, so at most
# one more unit was billed when the last expired: five requests on plan
# "metered" put 5 on the quota but 1 on the api_calls meter Stripe bills.
def test_a_client_chosen_request_id_cannot_dodge_metering(
    envoy_grpc: str, tollway_stub: pb_grpc.TollwayStub, make_customer: MakeCustomer
) -> None:
    c = make_customer("metered")
    for _ in range(5):
        headers = {"x-api-key": c.key, "x-request-id": "repeat-me"}
        assert httpx.get(f"{envoy_grpc}/hello", headers=headers, timeout=10).status_code == 200
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert usage.quota.used == 5
    assert {m.meter: m.used for m in usage.meters} == {"api_calls": 5}


# BUG (regression test): a client that retries with the same x-request-id (many
# HTTP clients reuse it on retry) must not be throttled on a concurrency plan when
# its requests never overlap. At 071b06b such requests were admitted but metered
# once (above); 8fa6ae1 metered them but counted a lease id already held as
# "full" while sidecar/store/record_usage.lua returned on a duplicate idempotency
# claim ("settle:<id>") before releasing the lease: the second response left
# lease "<id>" held until lease_ttl, and the third request was a 429
# concurrency_limited. Fixed in a4dd35e (the lease is released before the
# duplicate check).
def test_a_client_reusing_its_request_id_one_at_a_time_is_not_throttled(
    envoy_grpc: str, tollway_stub: pb_grpc.TollwayStub, make_customer: MakeCustomer
) -> None:
    c = make_customer("duo")  # at most 2 in flight, metered
    statuses = []
    for _ in range(4):
        headers = {"x-api-key": c.key, "x-request-id": "retry-me"}
        statuses.append(httpx.get(f"{envoy_grpc}/hello", headers=headers, timeout=10).status_code)
    assert statuses == [200, 200, 200, 200]
    usage = tollway_stub.GetUsage(pb.GetUsageRequest(customer_id=c.id), timeout=5)
    assert usage.quota.used == 4 and {m.meter: m.used for m in usage.meters} == {"api_calls": 4}


# == the webhook endpoint ================================================================


def account(redis_url: str, customer: str) -> dict[bytes, bytes]:
    """The account hash as README.md names it: tw:{<customer>}:a."""
    with redis.Redis.from_url(redis_url) as client:
        return client.hgetall(f"tw:{{{customer}}}:a")  # type: ignore[no-any-return]


def post_webhook(stack: Stack, body: bytes, headers: dict[str, bytes | str]) -> httpx.Response:
    return httpx.post(
        f"{stack.companion}/webhooks/stripe", content=body, headers=headers, timeout=10
    )


CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "",
        "\u00e9/\u00e9",
    ]
)


@pytest.fixture(scope="module")
def doomed(stack: Stack, fake_stripe: FakeStripe, redis_url: str) -> dict[str, Any]:
    """An account provisioned by a genuine event, whose subscription Stripe has
    since canceled without telling us: any event for it that the companion
    accepted would cancel the account, so a forgery that got in would show."""
    customer = fake_stripe.create_customer("victim@example.com")
    sub = fake_stripe.create_subscription(customer, "price_basic", status="active")
    assert stack.deliver(make_event("customer.subscription.created", sub)).status_code == 200
    assert account(redis_url, customer)[b"status"] == b"active"
    canceled = fake_stripe.update_subscription(sub["id"], status="canceled")
    return canceled


FORGERIES = st.sampled_from(
    [
        "missing",
        "empty",
        "random",
        "random hex",
        "wrong secret",
        "other body",
        "v0 scheme",
        "no v1",
        "stale",
        "future",
        "first t stale",
        "spaced t",
    ]
)


def forged_header(kind: str, body: bytes, draw_text: str, offset: int) -> bytes | None:
    now = int(time.time())
    hexsig = hashlib.sha256(draw_text.encode()).hexdigest()
    genuine = sign_payload(body, WEBHOOK_SECRET)
    signature = genuine.split(",v1=")[1]
    headers: dict[str, str | bytes | None] = {
        "missing": None,
        "empty": b"",
        "random": visible(draw_text).encode()[:200],
        "random hex": f"t={now},v1={hexsig}".encode(),
        "wrong secret": sign_payload(body, "whsec_" + hexsig[:32]).encode(),
        "other body": genuine.encode(),  # replayed: signed for body, sent with another
        "v0 scheme": f"t={now},v0={signature}".encode(),
        "no v1": f"t={now}".encode(),
        "stale": sign_payload(body, WEBHOOK_SECRET, timestamp=now - TOLERANCE - 10 - offset),
        "future": sign_payload(body, WEBHOOK_SECRET, timestamp=now + TOLERANCE + 10 + offset),
        "first t stale": (f"t={now - 10_000},{genuine}").encode(),
        "spaced t": genuine.replace("t=", "t= ", 1).encode(),
    }
    value = headers[kind]
    return value.encode() if isinstance(value, str) else value


def test_forged_webhooks_are_400_and_change_nothing(
    stack: Stack, redis_url: str, doomed: dict[str, Any]
) -> None:
    before = account(redis_url, doomed["customer"])
    kinds = [
        "customer.subscription.deleted",
        "customer.subscription.updated",
        "customer.subscription.paused",
    ]

    @fuzz(120)
    @given(
        kind=FORGERIES,
        event_type=st.sampled_from(kinds),
        text=st.text(max_size=40),
        offset=st.integers(0, 10**9),
        content_type=CONTENT_TYPES,
    )
    def run(kind: str, event_type: str, text: str, offset: int, content_type: str | None) -> None:
        body = json.dumps(make_event(event_type, doomed)).encode()
        header = forged_header(kind, body, text, offset)
        headers: dict[str, bytes | str] = {}
        if header is not None:
            headers["stripe-signature"] = header
        if content_type is not None:
            headers["content-type"] = content_type.encode("utf-8")
        answer = post_webhook(stack, body + (b"\n" if kind == "other body" else b""), headers)
        assert answer.status_code == 400, (kind, answer.status_code, answer.text[:200])
        assert answer.json()["code"] in ("missing_signature", "invalid_signature")
        assert account(redis_url, doomed["customer"]) == before

    run()
    # The oracle is live: the genuine event is applied, and cancels the account.
    genuine = stack.deliver(make_event("customer.subscription.deleted", doomed))
    assert genuine.status_code == 200 and genuine.json()["result"] == "applied"
    assert account(redis_url, doomed["customer"])[b"status"] == b"canceled"


# BUG (regression test): webhook/app.py signature_ok caught only
# stripe.SignatureVerificationError, but the SDK compares signatures with
# hmac.compare_digest on str, which raises TypeError ("comparing strings with
# non-ASCII characters is not supported"). So a Stripe-Signature of
# "t=<any integer>,v1=\xe9" (one unsigned request, no secret needed) was a 500
# Internal Server Error instead of 400 invalid_signature. Found by the forgery
# fuzzing; pinned here. Fixed in 8fa6ae1 (a non-ASCII header is refused first).
def test_a_non_ascii_signature_is_400_not_500(stack: Stack) -> None:
    now = int(time.time())
    for header in (
        f"t={now},v1=".encode() + b"\xe9",
        b"t=1,v1=\xff\xfe",
        f"t={now},v1=caf\u00e9".encode("latin-1"),
    ):
        answer = post_webhook(stack, b"{}", {"stripe-signature": header})
        assert answer.status_code == 400, (header, answer.status_code, answer.text[:100])
        assert answer.json()["code"] == "invalid_signature"


def test_random_webhook_bodies_are_400_or_413(stack: Stack) -> None:
    @fuzz(100)
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.text(max_size=200).map(str.encode),
            st.builds(lambda n: b"{" * n, st.integers(0, 3 * MAX_BODY)),
            st.sampled_from([b"", b"{}", b"[]", b"null", b'{"id": 1, "type": []}', b"\xff\xfe"]),
        ),
        signature=st.none() | st.text(alphabet=string.printable[:94], max_size=120),
        content_type=CONTENT_TYPES,
    )
    def run(body: bytes, signature: str | None, content_type: str | None) -> None:
        headers: dict[str, bytes | str] = {}
        if signature is not None:
            headers["stripe-signature"] = signature
        if content_type is not None:
            headers["content-type"] = content_type.encode("utf-8")
        answer = post_webhook(stack, body, headers)
        expected = 413 if len(body) > MAX_BODY else 400
        assert answer.status_code == expected, (answer.status_code, answer.text[:200])

    run()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
IDS = st.one_of(
    st.builds(lambda: new_customer()), st.builds(lambda: "sub_" + new_customer()[4:]), JSON
)


# BUG (regression test): at 071b06b a correctly signed but malformed event was a
# 500, not a 400: webhook/stripe_map.py event_ref ((event.get("data") or {})
# .get("object")) raised AttributeError when "data" was true, a list or a string,
# and likewise for a non-object "parent"; webhook/sync.py handle_event
# (int(event.get("created"))) raised ValueError/OverflowError for "created": "x"
# or Infinity. Stripe never signs such events (robustness, not security), but a
# 5xx makes Stripe retry a poisoned event for three days. Fix: isinstance checks
# in event_ref and handle_event.
def test_signed_events_of_any_shape_are_200_or_400(stack: Stack) -> None:
    from webhook.stripe_map import HANDLED_EVENTS

    @fuzz(120)
    @given(
        event_type=st.one_of(st.sampled_from(sorted(HANDLED_EVENTS)), st.text(max_size=12)),
        data=st.one_of(
            JSON,
            st.fixed_dictionaries(
                {
                    "object": st.one_of(
                        JSON,
                        st.fixed_dictionaries(
                            {"id": IDS, "customer": IDS, "subscription": IDS, "parent": JSON}
                        ),
                    )
                }
            ),
        ),
        created=st.one_of(st.integers(0, 2**40), JSON),
        event_id=st.one_of(st.text(max_size=30), JSON),
    )
    def run(event_type: str, data: Any, created: Any, event_id: Any) -> None:
        body = json.dumps({"id": event_id, "type": event_type, "created": created, "data": data})
        answer = stack.deliver({}, body=body.encode())
        assert answer.status_code in (200, 400), (answer.status_code, body[:300])

    run()


def test_webhook_timestamps_outside_the_tolerance_are_refused(stack: Stack) -> None:
    @fuzz(60)
    @given(
        offset=st.one_of(
            st.integers(-(10**10), 10**10),
            st.integers(-TOLERANCE - 60, TOLERANCE + 60),
            st.sampled_from([-TOLERANCE - 11, TOLERANCE + 11, -TOLERANCE + 10, TOLERANCE - 10]),
        )
    )
    def run(offset: int) -> None:
        event = make_event("charge.refunded", {"id": "ch_1", "customer": "cus_1"})
        answer = stack.deliver(event, timestamp=int(time.time()) + offset)
        if abs(offset) <= TOLERANCE - 10:
            assert answer.status_code == 200 and answer.json()["result"] == "ignored"
        elif abs(offset) >= TOLERANCE + 10:
            assert answer.status_code == 400, offset
            assert answer.json()["code"] == "invalid_signature"
        else:
            assert answer.status_code in (200, 400)

    run()
    # A correctly signed but giant event is refused for its size, before anything else.
    giant = make_event("charge.refunded", {"id": "ch_1", "pad": "x" * MAX_BODY})
    assert stack.deliver(giant).status_code == 413


def _status_line(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while b"\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_the_companion_refuses_a_body_over_the_limit_before_reading_it_all(
    stack: Stack, framing: str
) -> None:
    url = urlsplit(stack.companion)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        head = (
            "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Stripe-Signature: t=1,v1=00\r\n"
        )
        if framing == "content-length":
            # Declares 100 MB, sends 1 KB and waits: the answer comes without the rest.
            sock.sendall(f"{head}Content-Length: 100000000\r\n\r\n".encode() + b"{" * 1024)
        else:
            # No declared length: chunks until past the limit, never the final chunk.
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"2000\r\n" + b"{" * 0x2000 + b"\r\n"
            for _ in range(MAX_BODY // 0x2000 + 2):
                sock.sendall(chunk)
        started = time.monotonic()
        status = _status_line(sock)
    assert status.startswith(b"HTTP/1.1 413"), status
    assert time.monotonic() - started < 5


# == secrets: keys are looked up by hash, never stored ====================================


def every_value(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """(key name, one stored element) for every key in the database, read by type."""
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        values: list[Any]
        if kind == b"string":
            values = [client.get(name)]
        elif kind == b"hash":
            values = [x for pair in client.hgetall(name).items() for x in pair]
        elif kind == b"set":
            values = list(client.smembers(name))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(name, 0, -1, withscores=True)]
        elif kind == b"list":
            values = client.lrange(name, 0, -1)
        elif kind == b"stream":
            values = [
                x for _, fields in client.xrange(name) for pair in fields.items() for x in pair
            ]
        else:
            values = []
        yield name, name
        for value in values:
            if value is not None:
                yield name, value if isinstance(value, bytes) else str(value).encode()


def test_keys_are_looked_up_by_sha256_and_stored_only_as_it(
    cli: Cli, redis_url: str, tollway_stub: pb_grpc.TollwayStub
) -> None:
    """No timing oracle on the key: the sidecar hashes what it is given and reads
    tw:k:{<sha256>}, so nothing compares a stored secret with the input. (By reading
    the code: sidecar/keys.py compares only the CRC32 checksum, which is not secret;
    webhook secrets are compared by the stripe SDK with hmac.compare_digest.)"""
    customer = new_customer()
    created = cli("accounts", "create", "--customer", customer, "--plan", "basic", "--json")
    assert created.returncode == 0, created.stderr
    issued = cli("keys", "issue", "--customer", customer, "--json")
    assert issued.returncode == 0, issued.stderr
    key = json.loads(issued.stdout)["key"]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert tollway_stub.Authorize(pb.AuthorizeRequest(api_key=key), timeout=5).allowed
    # A well-formed key one character away is looked up, and not found.
    neighbour = checksummed(key[:50] + B62[(B62.index(key[50]) + 1) % 62])
    missed = tollway_stub.Authorize(pb.AuthorizeRequest(api_key=neighbour), timeout=5)
    assert missed.reason == pb.REASON_INVALID_KEY and "not recognised" in missed.message
    with redis.Redis.from_url(redis_url) as client:
        record = client.hgetall(f"tw:k:{{{digest}}}")
        assert record[b"customer"] == customer.encode()
        assert client.hget(f"tw:{{{customer}}}:keys", f"key_{digest[:16]}") == digest.encode()
        secret = key[8:51].encode()
        leaks = [name for name, value in every_value(client) if secret in value]
    assert not leaks, f"the key's secret is stored under {leaks[:5]}"


# == keys that no longer work ===========================================================


def add_key(redis_url: str, customer: str, *, expires_at_us: int = 0, revoke: bool = False) -> str:
    """A key for an existing account, stored the way `tollway keys issue` stores one."""

    async def work() -> str:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            key = keys.generate("test")
            hashed = keys.key_hash(key)
            record = KeyRecord(keys.key_id(hashed), customer, "active", expires_at_us)
            await store.add_key(hashed, record)
            if revoke:
                await store.revoke_key(customer, record.key_id)
            return key
        finally:
            await store.close()

    return asyncio.run(work())


# BUG (regression test): up to 8fa6ae1 an expired key (past --expires-in, or an
# old key whose rotation overlap is over) was refused by Authorize and Check
# (401 key_expired) but still worked everywhere else a key is accepted, because
# those places checked only record.revoked, never record.expires_at_us:
# - webhook/app.py Companion.portal: POST /portal opened a Billing Portal
#   session, where the holder of a rotated-out (say, leaked) key can change the
#   payment method or cancel the subscription;
# - sidecar/grpc_api.py TollwayService._customer: GetUsage showed the customer's
#   usage and plan, and RecordUsage billed the customer;
# - sidecar/grpc_api.py TollwayService.Release checked only that the key existed:
#   revoked and expired keys released the customer's leases.
# Fixed in a4dd35e.
def test_an_expired_or_revoked_key_opens_nothing(
    stack: Stack, fake_stripe: FakeStripe, redis_url: str
) -> None:
    customer = fake_stripe.create_customer("rotated@example.com")
    sub = fake_stripe.create_subscription(customer, "price_basic", status="active")
    assert stack.deliver(make_event("customer.subscription.created", sub)).status_code == 200
    good = add_key(redis_url, customer)
    expired = add_key(redis_url, customer, expires_at_us=1)  # long past
    revoked = add_key(redis_url, customer, revoke=True)

    def portal(key: str) -> int:
        headers = {"x-api-key": key}
        return httpx.post(f"{stack.companion}/portal", headers=headers, timeout=10).status_code

    def usage_calls(key: str) -> list[grpc.StatusCode]:
        record = pb.RecordUsageRequest(
            api_key=key, meter="api_calls", quantity=1, idempotency_key=f"rotated-{key[-6:]}"
        )
        return [
            rpc(stack.stub.GetUsage, pb.GetUsageRequest(api_key=key))[1],
            rpc(stack.stub.RecordUsage, record)[1],
            rpc(stack.stub.Release, pb.ReleaseRequest(api_key=key, lease_id="any"))[1],
        ]

    # The oracle is live: the good key opens all of it.
    assert stack.authorize(good).allowed and portal(good) == 200
    assert usage_calls(good) == [Code.OK] * 3
    assert stack.authorize(expired).reason == pb.REASON_KEY_EXPIRED
    assert stack.authorize(revoked).reason == pb.REASON_KEY_REVOKED
    results = {
        name: (portal(key), usage_calls(key))
        for name, key in (("expired", expired), ("revoked", revoked))
    }
    assert results == {name: (401, [Code.UNAUTHENTICATED] * 3) for name in results}
    usage = stack.stub.GetUsage(pb.GetUsageRequest(customer_id=customer), timeout=5)
    assert {m.meter: m.used for m in usage.meters} == {"api_calls": 1}  # the good key's


# == HTTP ext_authz (sidecar/http_authz.py), called directly ================================


def http_authz_call(port: int, head: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Raw bytes to the sidecar's HTTP ext_authz port: (status, headers, body) of the
    one answer, read by its content-length."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(head)
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
        start, _, body = received.partition(b"\r\n\r\n")
        status_line, *lines = start.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines if b": " in line)
        length = 0 if head.startswith(b"HEAD ") else int(headers.get(b"content-length", 0))
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    assert status_line.startswith(b"HTTP/1.1 "), (head[:200], received[:200])  # an answer
    return int(status_line.split(b" ")[1]), headers, body


def http_authz_request(method: str, path: str, key: str | None) -> bytes:
    line = f"{method} {path} HTTP/1.1\r\nhost: tollway\r\n"
    return (line + (f"x-api-key: {key}\r\n" if key is not None else "") + "\r\n").encode()


def test_http_authz_never_allows_a_random_or_mutated_key(
    http_sidecar: HttpSidecar, make_customer: MakeCustomer
) -> None:
    """Whatever the key, method and path, the answer is a 401 or the server's own 400
    (a request it cannot parse): never a 200, never a 5xx."""
    real = make_customer("pro")
    port = http_sidecar.http_port

    @fuzz(200)
    @given(
        key=st.one_of(RANDOM_KEYS, mutants(real.key)),
        method=st.one_of(HTTP_METHODS, METHODS),
        path=st.one_of(HTTP_PATHS, PATHS, HOSTILE),
    )
    def run(key: str, method: str, path: str) -> None:
        if key.strip() == real.key:  # the real key padded: whitespace is not part of a value
            return
        status, _, body = http_authz_call(port, http_authz_request(method, path, key))
        assert status in (400, 401), (status, body[:200])
        if status == 401:
            assert json.loads(body)["code"] in ("missing_key", "invalid_key")

    run()
    # The oracle is live: the key every mutant came from is allowed.
    status, headers, _ = http_authz_call(port, http_authz_request("GET", "/", real.key))
    assert status == 200 and headers[b"x-tollway-customer"] == real.id.encode()


def test_http_authz_with_a_valid_key_answers_no_5xx(
    http_sidecar: HttpSidecar, make_customer: MakeCustomer
) -> None:
    c = make_customer("pro")  # burst 100 at 100/s, every feature in the config

    @fuzz(80)
    @given(method=st.one_of(HTTP_METHODS, METHODS), path=st.one_of(HTTP_PATHS, PATHS))
    def run(method: str, path: str) -> None:
        head = http_authz_request(method, path, c.key)
        status, headers, body = http_authz_call(http_sidecar.http_port, head)
        assert status in (200, 400, 429), (status, body[:200])
        if status == 200:  # allowed as this customer, the key header named for removal
            assert headers[b"x-tollway-customer"] == c.id.encode()
            assert headers[b"x-envoy-auth-headers-to-remove"] == b"x-api-key"

    run()
