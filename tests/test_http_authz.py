"""HTTP ext_authz (sidecar/http_authz.py): what Envoy's http_service reads from
the sidecar's answer. The app is driven directly (a real Store on the test
Valkey) where the answer is the claim; the sidecar process itself where the
claim is about HTTP on the wire: size limits, malformed requests, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from google.protobuf.json_format import MessageToDict

from sidecar import keys
from sidecar.authorizer import Authorizer
from sidecar.decision import Decision, QuotaState, RateState, Reason
from sidecar.envoy import check_response
from sidecar.errors import ConfigError
from sidecar.http_authz import MAX_HEAD_BYTES, HttpAuthz, View, answer, http_server, listen_socket
from sidecar.server import Sidecar
from sidecar.settings import HeaderNames, Settings, load_settings, settings_from_document
from sidecar.store import Store, connect
from tests import harness
from tests.conftest import Customer, HttpSidecar

MakeCustomer = Callable[..., Customer]
Cli = Callable[..., subprocess.CompletedProcess[str]]
Headers = list[tuple[bytes, bytes]]


@pytest.fixture
def settings(config_path: Path, redis_url: str) -> Settings:
    return load_settings(config_path, {"TOLLWAY_REDIS_URL": redis_url})


@pytest.fixture
def app(store: Store, settings: Settings) -> HttpAuthz:
    return HttpAuthz(Sidecar(settings, store).authorizer, lambda: settings)


def call(
    aio: asyncio.Runner,
    app: HttpAuthz,
    path: str = "/v1/search",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: str = "GET",
    query: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request as uvicorn hands it to the app: (status, headers, body)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": list(headers),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    aio.run(app(scope, receive, send))
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    names = [name for name, _ in start["headers"]]
    assert len(names) == len(set(names)), names  # each header once
    answered = {name.decode(): value.decode() for name, value in start["headers"]}
    assert answered["content-length"] == str(len(body["body"]))
    return start["status"], answered, body["body"]


def key_header(customer: Customer) -> Headers:
    return [(b"x-api-key", customer.key.encode())]


# -- allowed --------------------------------------------------------------------------


def test_an_allowed_request_is_200_with_identity_and_the_key_header_to_remove(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    status, headers, body = call(aio, app, headers=[*key_header(c), (b"x-request-id", b"r-1")])
    assert (status, body) == (200, b"")
    assert headers["x-tollway-customer"] == c.id
    assert headers["x-tollway-plan"] == "basic"
    assert headers["x-envoy-auth-headers-to-remove"] == "x-api-key"
    assert headers["ratelimit-policy"] == '"rate";q=5;w=1'
    assert headers["ratelimit"].startswith('"rate";r=4;t=')
    assert headers["x-ratelimit-remaining"] == "4"
    assert "retry-after" not in headers
    assert "x-request-id" not in headers  # Envoy's own names the request


def test_a_bearer_key_names_authorization_for_removal(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    bearer = [(b"authorization", f"Bearer {c.key}".encode())]
    status, headers, _ = call(aio, app, headers=bearer)
    assert status == 200
    assert headers["x-envoy-auth-headers-to-remove"] == "authorization"


def test_without_x_request_id_one_is_made_sent_upstream_and_names_the_reservation(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")  # the test config settles (access_log): Check reserves
    _, headers, _ = call(aio, app, headers=key_header(c))
    made = headers["x-request-id"]
    assert len(made) == 32
    assert headers["request_id"] == made
    _, headers, _ = call(aio, app, headers=[*key_header(c), (b"x-request-id", b"req-7")])
    assert headers["request_id"] == "req-7"
    assert (headers["customer"], headers["plan"]) == (c.id, "basic")


def test_settlement_fields_carry_the_lease_the_estimate_and_bill_only_success(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("duo")  # concurrency 2, bill_only_success
    _, headers, _ = call(aio, app, "/v1/heavy", headers=[*key_header(c), (b"x-request-id", b"q")])
    assert headers["lease_id"] == headers["request_id"] == "q"
    assert headers["x-tollway-estimate"] == "4"  # /v1/heavy costs 4
    assert headers["bill_only_success"] == "true"
    _, plain, _ = call(aio, app, headers=key_header(make_customer("basic")))
    assert "bill_only_success" not in plain  # false is absent: "false" would read as true


def test_the_route_is_priced_from_path_and_query_as_check_prices_it(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")  # burst 5; /v1/heavy costs 4
    _, headers, _ = call(aio, app, "/v1/heavy", headers=key_header(c), query=b"x=1&y=/v1/o")
    assert headers["x-ratelimit-remaining"] == "1"
    status, _, body = call(aio, app, "/v1/export/x", headers=key_header(c), method="POST")
    assert status == 403 and json.loads(body)["code"] == "feature_not_in_plan"


def test_header_names_follow_a_settings_reload(
    aio: asyncio.Runner, store: Store, settings: Settings, make_customer: MakeCustomer
) -> None:
    current = [settings]
    app = HttpAuthz(Sidecar(settings, store).authorizer, lambda: current[0])
    c = make_customer("basic")
    renamed = HeaderNames(api_key=("x-key",), bearer=False, customer="x-who", plan="x-tier")
    current[0] = replace(settings, headers=renamed)
    status, headers, _ = call(aio, app, headers=[(b"x-key", c.key.encode())])
    assert status == 200
    assert (headers["x-who"], headers["x-tier"]) == (c.id, "basic")
    assert headers["x-envoy-auth-headers-to-remove"] == "x-key"
    assert call(aio, app, headers=key_header(c))[0] == 401  # x-api-key is no longer read


# -- denied ---------------------------------------------------------------------------


def test_a_missing_key_is_401_json_with_www_authenticate(
    aio: asyncio.Runner, app: HttpAuthz
) -> None:
    status, headers, body = call(aio, app)
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["code"] == "missing_key"


def test_a_repeated_key_header_is_refused_not_read_twice(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("basic")
    status, _, body = call(aio, app, headers=key_header(c) * 2)
    assert status == 401 and json.loads(body)["code"] == "invalid_key"


def test_an_empty_bucket_is_429_with_retry_after_and_the_limit(
    aio: asyncio.Runner, app: HttpAuthz, make_customer: MakeCustomer
) -> None:
    c = make_customer("tight")  # burst 2, 1/min
    assert [call(aio, app, headers=key_header(c))[0] for _ in range(2)] == [200, 200]
    status, headers, body = call(aio, app, headers=key_header(c))
    assert status == 429
    assert json.loads(body)["code"] == "rate_limited"
    assert 0 < int(headers["retry-after"]) <= 60
    assert headers["ratelimit"].startswith('"rate";r=0;t=')
    assert headers["x-ratelimit-remaining"] == "0"


# Check and HTTP answer one decision alike: one mapping (sidecar/envoy.py), two wires.
_RATE = RateState(limit=5, remaining=0, reset_seconds=3, rate_per_second=10, window_seconds=1)
_QUOTA = QuotaState(
    limit=3, used=3, remaining=0, period_end=0, reset_seconds=90, window_seconds=86400
)
DECISIONS = [
    Decision(True, Reason.OK, "ok", "cus_a", "basic", rate=replace(_RATE, remaining=4)),
    Decision(
        True,
        Reason.OK,
        "ok",
        "cus_a",
        "duo",
        rate=_RATE,
        lease_id="L",
        cost=3,
        reserved="R",
        bill_only_success=True,
    ),
    Decision(False, Reason.RATE_LIMITED, "slow down", "cus_a", "basic", rate=_RATE, retry_after=1),
    Decision(False, Reason.QUOTA_EXCEEDED, "used up", "cus_a", "q", _RATE, _QUOTA, retry_after=90),
    *(
        Decision(False, reason, f"no: {reason.value}")
        for reason in Reason
        if reason not in (Reason.OK, Reason.RATE_LIMITED, Reason.QUOTA_EXCEEDED)
    ),
]


@pytest.mark.parametrize("decision", DECISIONS, ids=lambda d: f"{d.reason.value}-{d.plan}")
def test_http_answers_a_decision_as_check_does(decision: Decision, settings: Settings) -> None:
    view = View.of(settings)
    status, pairs, body = answer(decision, key_header="x-api-key", view=view, made_request_id="m")
    headers = {name.decode(): value.decode() for name, value in pairs}
    check = check_response(
        decision,
        key_header="x-api-key",
        names=settings.headers,
        upstream_headers=[("x-request-id", "m")],
    )
    if not decision.allowed:
        denied = check.denied_response
        assert status == denied.status.code
        assert body.decode() == denied.body
        expected = {h.header.key: h.header.value for h in denied.headers}
        assert headers == {**expected, "content-length": str(len(body))}
        return
    ok = check.ok_response
    assert status == 200 and body == b""
    upstream = {h.header.key: h.header.value for h in ok.headers}
    to_client = {h.header.key: h.header.value for h in ok.response_headers_to_add}
    assert upstream.items() <= headers.items()
    assert to_client.items() <= headers.items()
    assert [headers["x-envoy-auth-headers-to-remove"]] == list(ok.headers_to_remove)
    fields = {k: v for k, v in MessageToDict(check.dynamic_metadata).items() if v not in ("", 0)}
    if fields:  # dynamic_metadata_from_headers makes text; the estimate comes as a number
        cost = fields.pop("cost")
        assert float(headers["x-tollway-estimate"]) == cost
        text = {k: "true" if v is True else str(v) for k, v in fields.items()}
        assert text.items() <= headers.items()


# -- Redis down, and bugs -------------------------------------------------------------


def test_an_unreachable_redis_is_503_with_a_short_body(
    aio: asyncio.Runner, settings: Settings
) -> None:
    dead = Store(connect(f"redis://127.0.0.1:{harness.free_port()}", timeout=0.2), timeout=0.2)
    app = HttpAuthz(Sidecar(settings, dead).authorizer, lambda: settings)
    try:
        started = time.monotonic()
        status, headers, body = call(aio, app, headers=[(b"x-api-key", keys.generate().encode())])
        assert time.monotonic() - started < 1
        assert status == 503 and headers["content-type"].startswith("text/plain")
        assert 0 < len(body) < 40
        assert call(aio, app)[0] == 401  # a missing key needs no Redis
    finally:
        aio.run(dead.close())


class _Broken:
    async def authorize(self, *args: Any, **kwargs: Any) -> Decision:
        raise RuntimeError("a bug")


def test_a_bug_is_a_500_from_uvicorn_never_an_allow(
    aio: asyncio.Runner, settings: Settings
) -> None:
    app = HttpAuthz(cast(Authorizer, _Broken()), lambda: settings)
    port = harness.free_port()
    server = http_server(app, drain_seconds=1)

    async def run() -> httpx.Response:
        serving = asyncio.create_task(
            server.serve(sockets=[listen_socket(f"127.0.0.1:{port}", reuse_port=False)])
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                return await client.get("/", headers={"x-api-key": keys.generate()})
        finally:
            server.should_exit = True
            await serving

    response = aio.run(run())
    assert response.status_code == 500
    assert "x-tollway-customer" not in response.headers


def test_lifespan_is_answered(aio: asyncio.Runner, app: HttpAuthz) -> None:
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    aio.run(app({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- on the wire: the sidecar process -------------------------------------------------


def exchange(port: int, data: bytes) -> bytes:
    """Sends raw bytes on a fresh connection; what came back until it closed or idled."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        sock.settimeout(1)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and received.startswith(b"HTTP/1.1 4"):
                    break
    return received


def head_of(size: int) -> bytes:
    """A request head of exactly size bytes (request line, headers, blank line)."""
    start, end = b"GET /v1/search HTTP/1.1\r\nhost: t\r\nx-pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_head_over_1_mib_is_431_to_the_byte(http_sidecar: HttpSidecar) -> None:
    at_limit = exchange(http_sidecar.http_port, head_of(MAX_HEAD_BYTES))
    assert at_limit.startswith(b"HTTP/1.1 401 "), at_limit[:80]
    over = exchange(http_sidecar.http_port, head_of(MAX_HEAD_BYTES + 1))
    assert over.startswith(b"HTTP/1.1 431 "), over[:80]
    # However much more comes, it is never buffered: the answer comes first.
    endless = exchange(http_sidecar.http_port, head_of(8 * MAX_HEAD_BYTES))
    assert endless.startswith(b"HTTP/1.1 431 "), endless[:80]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NONSENSE\r\n\r\n",
        b"GET /v1/search HTTP/1.1\r\nhost: t\r\nno colon here\r\n\r\n",
        b"GET /v1/search HTTP/1.1\r\nhost: t\r\nx-api-key: a\x00b\r\n\r\n",
        b"GET /v1/ search HTTP/1.1\r\nhost: t\r\n\r\n",
        b"BREW /v1/search HTTP/1.1\r\nhost: t\r\n\r\n",
        b"GET /v1/search HTTP/9.9\r\nhost: t\r\n\r\n",
        b"GET /v1/search HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    ],
)
def test_a_malformed_request_is_400_and_the_sidecar_keeps_serving(
    http_sidecar: HttpSidecar, request_bytes: bytes
) -> None:
    reply = exchange(http_sidecar.http_port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert httpx.get(f"{http_sidecar.url}/v1/search", timeout=5).status_code == 401


def test_sigterm_stops_both_ports_cleanly(
    tmp_path: Path, config_path: Path, redis_url: str
) -> None:
    grpc_port, http_port = harness.free_port(), harness.free_port()
    log = tmp_path / "sidecar.log"
    child = harness.start_sidecar(
        config_path, redis_url=redis_url, port=grpc_port, log=log, http_port=http_port
    )
    try:
        assert httpx.get(f"http://127.0.0.1:{http_port}/", timeout=5).status_code == 401
        child.process.send_signal(signal.SIGTERM)
        assert child.process.wait(timeout=10) == 0
    finally:
        child.stop()
    assert harness.port_is_free(http_port) and harness.port_is_free(grpc_port)
    assert "Traceback" not in log.read_text()


# -- [sidecar] http_listen ------------------------------------------------------------

PLANS: dict[str, Any] = {"plans": [{"name": "free", "rate": "1/s"}]}


@pytest.mark.parametrize(
    ("document", "environ", "expected"),
    [
        ({}, {}, None),
        ({"sidecar": {"http_listen": ""}}, {}, None),
        ({"sidecar": {"http_listen": "127.0.0.1:50052"}}, {}, "127.0.0.1:50052"),
        ({"sidecar": {"http_listen": "[::1]:50052"}}, {}, "[::1]:50052"),
        ({}, {"TOLLWAY_HTTP_LISTEN": "0.0.0.0:8181"}, "0.0.0.0:8181"),
        ({"sidecar": {"http_listen": "127.0.0.1:1"}}, {"TOLLWAY_HTTP_LISTEN": "h:2"}, "h:2"),
    ],
)
def test_http_listen_is_read_from_the_file_or_the_environment(
    document: dict[str, Any], environ: dict[str, str], expected: str | None
) -> None:
    assert settings_from_document({**PLANS, **document}, environ).http_listen == expected


@pytest.mark.parametrize("value", ["50052", "localhost", 50052, True])
def test_a_bad_http_listen_is_one_error_naming_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^\[sidecar\] http_listen: expected host:port"):
        settings_from_document({**PLANS, "sidecar": {"http_listen": value}}, {})


def test_a_busy_http_port_stops_serve_with_one_clear_line(cli: Cli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        done = cli(
            "serve",
            "--listen",
            f"127.0.0.1:{harness.free_port()}",
            extra_env={"TOLLWAY_HTTP_LISTEN": taken},
        )
    assert done.returncode == 1
    assert f"[sidecar] http_listen: cannot bind {taken}" in done.stderr
    assert "Traceback" not in done.stderr
