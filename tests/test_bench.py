"""The benchmark harness's own pieces (bench/): encoders, sampler, parsers, configs.

No load runs here; `make bench` is the load test.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from bench import envoy_config, grpc_load, h2load, memory, noop_server, run
from bench.workload import (
    ZipfSampler,
    authorize_body,
    envoy_uris,
    grpc_frame,
    parse_grpc_frames,
)
from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.settings import load_settings
from sidecar.store import Store, connect
from tests import harness

REPO = Path(__file__).resolve().parent.parent

# Captured from `h2load -D 4s --warm-up-time 1s -c 4 -m 16 -d body.bin ...` (nghttp2 1.52).
H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s of warm-up time and 4s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 5.00s, 5693.00 req/s, 746.31KB/s
requests: 22772 total, 22772 started, 22772 done, 22772 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 22772 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.92MB (3056874) total, 84.35KB (86370) headers (space savings 96.28%), 2.11MB (2209130) data
                     min         max         mean         sd        +/- sd
time for request:      270us     19.45ms     11.23ms      2.34ms    80.63%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :    1421.95     1425.44     1423.20        1.55    75.00%
"""  # noqa: E501

H2LOAD_SHORT = """\
finished in 351us, 0.00 req/s, 0B/s
requests: 10 total, 0 started, 0 done, 0 succeeded, 10 failed, 10 errored, 0 timeout
status codes: 3 2xx, 1 3xx, 4 4xx, 2 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""


# -- gRPC framing ------------------------------------------------------------------


def test_authorize_body_round_trips_through_the_protobuf_parser() -> None:
    key = keys.generate("test")
    body = authorize_body(key)
    assert body[0] == 0  # not compressed
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    [message] = parse_grpc_frames(body)
    request = pb.AuthorizeRequest.FromString(message)
    assert request.api_key == key
    assert (request.method, request.path) == ("GET", "/v1/search")
    assert keys.is_well_formed(request.api_key)


def test_frames_concatenate_and_keep_their_boundaries() -> None:
    messages = [b"", b"x", pb.AuthorizeRequest(api_key="k" * 300).SerializeToString()]
    assert parse_grpc_frames(b"".join(grpc_frame(m) for m in messages)) == messages


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x00\x00\x00", "truncated gRPC prefix"),
        (b"\x00\x00\x00\x00\x05abc", "truncated gRPC message"),
        (b"\x01\x00\x00\x00\x00", "compressed"),
    ],
)
def test_frame_parser_refuses_broken_input(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_grpc_frames(data)


def test_every_key_gives_a_body_of_the_same_size() -> None:
    sizes = {len(authorize_body(keys.generate("test"))) for _ in range(20)}
    assert len(sizes) == 1


# -- the Zipf key mix --------------------------------------------------------------


def test_zipf_is_skewed_towards_the_first_ranks() -> None:
    sampler = ZipfSampler(10_000, 1.1, seed=1)
    draws = sampler.sample(50_000)
    counts = collections.Counter(draws)
    assert all(0 <= rank < 10_000 for rank in draws)
    # The busiest key gets about its share, far above a uniform 1/10,000.
    share = counts[0] / len(draws)
    assert share == pytest.approx(sampler.probability(0), rel=0.1)
    assert share > 0.08
    assert counts[0] > 1.5 * counts[1] > 1.5 * counts[3]
    top_1_percent = sum(counts[rank] for rank in range(100)) / len(draws)
    assert top_1_percent > 0.5
    # ...and the tail is still visited: many distinct keys.
    assert len(counts) > 3_000


def test_zipf_probabilities_sum_to_one_and_decrease() -> None:
    sampler = ZipfSampler(1_000, 1.1)
    probabilities = [sampler.probability(rank) for rank in range(1_000)]
    assert math.fsum(probabilities) == pytest.approx(1.0)
    assert probabilities == sorted(probabilities, reverse=True)


def test_zipf_is_reproducible_and_distinct_is_distinct() -> None:
    assert ZipfSampler(500, seed=7).sample(100) == ZipfSampler(500, seed=7).sample(100)
    ranks = ZipfSampler(10_000, seed=3).distinct(8)
    assert len(ranks) == len(set(ranks)) == 8
    with pytest.raises(ValueError):
        ZipfSampler(3).distinct(4)


def test_envoy_uris_carry_the_key_in_the_query() -> None:
    uris = envoy_uris("http://127.0.0.1:1", ["tw_a", "tw_b"], [1, 0, 1])
    assert uris == [
        "http://127.0.0.1:1/v1/search?k=tw_b",
        "http://127.0.0.1:1/v1/search?k=tw_a",
        "http://127.0.0.1:1/v1/search?k=tw_b",
    ]


# -- h2load: command line and output -----------------------------------------------


def test_h2load_output_parser_reads_a_captured_run() -> None:
    summary = h2load.parse_output(H2LOAD_OUTPUT)
    assert summary.seconds == 5.0
    assert summary.rps == 5693.0
    assert (summary.total, summary.done, summary.succeeded) == (22772, 22772, 22772)
    assert (summary.failed, summary.errored, summary.timeout) == (0, 0, 0)
    assert summary.status == (22772, 0, 0, 0)
    assert (summary.bytes_total, summary.bytes_headers, summary.bytes_data) == (
        3056874,
        86370,
        2209130,
    )


def test_h2load_output_parser_reads_milliseconds_and_failures() -> None:
    summary = h2load.parse_output(H2LOAD_SHORT)
    assert summary.seconds == pytest.approx(0.000351)
    assert summary.status == (3, 1, 4, 2)
    assert (summary.failed, summary.errored) == (10, 10)


def test_h2load_output_parser_refuses_something_else() -> None:
    with pytest.raises(ValueError, match="unexpected h2load output"):
        h2load.parse_output("-D: value error 1.5\n")


def test_h2load_log_and_percentiles() -> None:
    log = [
        "1795799544485944\t200\t9768\n",
        "1795799544486068\t200\t120\n",
        "1795799544486070\t-1\t5\n",
        "garbage\n",
        "1795799544486208\t503\t50\n",
    ]
    latencies = sorted(h2load.parse_log(log))
    assert latencies == [50, 120, 9768]
    ordered = list(range(1, 1001))
    assert h2load.percentile(ordered, 50) == 500
    assert h2load.percentile(ordered, 99) == 990
    assert h2load.percentile(ordered, 99.9) == 999
    assert h2load.percentile(ordered, 100) == 1000
    assert h2load.percentile([7], 99.9) == 7
    assert math.isnan(h2load.percentile([], 50))


def test_h2load_command_line() -> None:
    load = h2load.Load(
        url="http://127.0.0.1:9/tollway.v1.Tollway/Authorize",
        body_file=Path("b.bin"),
        headers=("content-type: application/grpc", "te: trailers"),
        clients=2,
        streams=16,
        duration=1.5,
        warmup=0.5,
        rps=125.5,
        log_file=Path("x.log"),
    )
    argv = load.argv()
    assert argv[0] == "h2load"
    joined = " ".join(argv)
    assert "-c 2 -m 16" in joined
    assert "-D 1500ms --warm-up-time 500ms" in joined  # h2load refuses "1.5"
    assert "--rps 125.500" in joined
    assert "-H content-type: application/grpc" in joined
    assert "-d b.bin" in joined
    assert "--log-file x.log" in joined
    assert argv[-1] == load.url
    assert load.bound > 2.0

    uris = h2load.Load(uris_file=Path("u.txt"), requests=100).argv()
    assert "-i" in uris and "u.txt" in uris and "-n" in uris and "-D" not in uris


# -- Envoy configs -----------------------------------------------------------------

CONFIGS, MISSING = envoy_config.load_configs()
PLANNED = envoy_config.plan(CONFIGS)
PORTS = {"listen": 21000, "admin": 21001, "grpc": 21002, "http": 21003}
HTTP_FILTER = r"- name: (envoy\.filters\.http\.\w+)"


def test_the_variant_table_names_files_that_exist() -> None:
    """Every Envoy config the bench runs is named once, in envoy_config.CONFIGS."""
    assert MISSING == []
    assert envoy_config.CONFIGS[envoy_config.SHIPPED] == "envoy.yaml"  # as shipped, always
    for role, name in envoy_config.CONFIGS.items():
        assert (envoy_config.DEPLOY / name).is_file(), role
    for pair in envoy_config.PAIRS:
        assert pair.config in envoy_config.CONFIGS, pair
    pairs = {pair.name for pair in envoy_config.PAIRS}
    assert {envoy_config.CEILING_PAIR, envoy_config.HEADLINE_FLOOR, "http-authz"} <= pairs
    # No other module of the bench opens a deploy/ Envoy file by its name.
    for path in (REPO / "bench").glob("*.py"):
        if path.name != "envoy_config.py":
            code = path.read_text()
            assert "ENVOY_TEMPLATE" not in code, path
            assert not re.search(r"""["'/]envoy[\w-]*\.yaml["']""", code), path


def test_shapes_are_read_from_the_files() -> None:
    shapes = {role: config.shape for role, config in CONFIGS.items()}
    assert shapes["http"].transport == "http"
    assert shapes["grpc"].transport == "grpc"
    assert shapes["accesslog"].settlement == "access_log"
    assert shapes["accesslog"].describe().endswith("+ access log")
    assert envoy_config.EXT_AUTHZ in shapes[envoy_config.SHIPPED].filters
    both = CONFIGS["accesslog"].text.replace(
        "  - name: envoy.filters.http.router\n",
        f"  - name: {envoy_config.EXT_PROC}\n                  - name: envoy.filters.http.router\n",
    )
    with pytest.raises(ValueError, match="pick one"):
        envoy_config.shape(both)


def _rows(planned: list[envoy_config.Planned]) -> list[Any]:
    """(name, pair, authz) of every Envoy row the run has, with the row's name as id."""
    rows = [(run.pair_row(p.name, "noop"), p, True) for p in planned]
    rows += [(run.CEILING, p, False) for p in planned if p.name == envoy_config.CEILING_PAIR]
    return [pytest.param(*row, id=row[0]) for row in rows]


@pytest.mark.parametrize(("name", "p", "authz"), _rows(PLANNED))
def test_bench_envoy_configs_validate(
    tmp_path: Path, name: str, p: envoy_config.Planned, authz: bool
) -> None:
    text = envoy_config.render(p.config.text, **PORTS, authz=authz, authz_only=p.pair.authz_only)
    assert "direct_response" in text
    assert "cluster: upstream }" not in text  # the upstream is never reached
    for port in ("listen", "admin", "grpc"):
        assert f"port_value: {PORTS[port]}" in text
    if p.shape.transport == "http":
        assert f"uri: http://127.0.0.1:{PORTS['http']}\n" in text
        assert f"port_value: {PORTS['http']}" in text
    filters = re.findall(HTTP_FILTER, text)
    assert filters[0] == "envoy.filters.http.header_mutation"
    assert filters[1:] == [*p.shape.filters, "envoy.filters.http.router"]
    assert "%QUERY_PARAM(k)%" in text
    if p.pair.authz_only:
        assert p.shape.filters == (envoy_config.EXT_AUTHZ,)
        assert envoy_config.ACCESS_LOG not in text and "access_log:" not in text
        assert "The response path" not in text  # a cut filter's comments go with it
    disabled = len(envoy_config.tollway_filters(text))
    assert text.count("disabled: true") == (0 if authz else disabled)
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    argv = [harness.envoy_binary(), "--mode", "validate", "-c", str(config)]
    argv += ["--use-dynamic-base-id"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pairs_that_come_out_the_same_run_once() -> None:
    names = [p.name for p in PLANNED]
    assert len(names) == len(set(names))
    shipped = [p for p in PLANNED if p.is_(envoy_config.SHIPPED)]
    assert len(shipped) == 1 and envoy_config.FIXED_RATE in shipped[0].rates
    # Shipped as another file: its own pair, at the fixed rate only.
    other = dataclasses.replace(
        CONFIGS[envoy_config.SHIPPED], text=CONFIGS["http"].text + "\n# shipped\n"
    )
    alone = envoy_config.plan({**CONFIGS, envoy_config.SHIPPED: other})
    [own] = [p for p in alone if p.name == envoy_config.SHIPPED]
    assert own.rates == (envoy_config.FIXED_RATE,) and not own.shares and own.also == ()
    # A missing file skips its pairs, no more.
    without_http = {role: c for role, c in CONFIGS.items() if role != "http"}
    assert "http-authz" not in [p.name for p in envoy_config.plan(without_http)]


def test_envoy_rows_pair_each_row_with_a_no_op_row_of_the_same_config() -> None:
    rows = run.envoy_rows(PLANNED)
    by_pair = {p.name: p for p in PLANNED}
    for name, row in rows.items():
        floor = rows[row.floor]
        assert floor.authorizer == "noop" and rows[floor.floor] is floor  # a floor is its own
        if name != run.CEILING:
            assert row.pairs == floor.pairs and row.shape == floor.shape
            assert row.authorizer in name
    assert rows[run.CEILING].floor == run.pair_row(envoy_config.CEILING_PAIR, "noop")
    head = run.find_row(rows, envoy_config.HEADLINE_FLOOR, "noop")
    assert head is not None and rows[head].shape == envoy_config.Shape(
        "grpc", (envoy_config.EXT_AUTHZ,), "none"
    )
    shipped = run.find_row(rows, envoy_config.SHIPPED, "sidecar")
    assert shipped is not None and "**as shipped**" in rows[shipped].label
    assert run.find_row(rows, "http-authz", "sidecar") == "envoy-sidecar-http-authz"
    assert by_pair["http-authz"].shape.describe() == "HTTP ext_authz only"


@pytest.mark.parametrize("settlement", ["none", "ext_proc", "access_log"])
def test_sidecar_config_settles_as_the_envoy_config_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settlement: str
) -> None:
    monkeypatch.setattr(run, "WORK", tmp_path)
    settings = load_settings(run.sidecar_config(settlement), {})
    assert settings.envoy.settlement == settlement
    assert settings.catalog.plans.keys() == load_settings(run.CONFIG, {}).catalog.plans.keys()


def test_bench_envoy_config_fails_loudly_when_the_template_changes() -> None:
    template = CONFIGS["grpc"].text
    with pytest.raises(ValueError, match="route"):
        envoy_config.render(
            template.replace("route: { cluster: upstream }", "route: { cluster: api }"),
            **PORTS,
        )
    with pytest.raises(ValueError, match="HTTP port"):
        envoy_config.render(CONFIGS["http"].text, listen=1, admin=2, grpc=3)


# -- the floor and the bench config ------------------------------------------------


def test_noop_server_options_match_the_sidecar() -> None:
    """The floor must set up grpcio as sidecar/server.py does."""
    server_py = (REPO / "sidecar" / "server.py").read_text()
    sidecar_options = set(re.findall(r'"(grpc\.[a-z0-9_.]+)"', server_py))
    assert sidecar_options == {name for name, _ in noop_server.SERVER_OPTIONS}
    assert "grpc.aio.server(" in server_py
    # ...and serves HTTP as the sidecar does: its own uvicorn setup, in the same loop.
    assert "http_server(" in server_py and "listen_socket(" in server_py


def test_noop_ext_proc_passes_every_phase() -> None:
    for phase, response in noop_server._PASS.items():
        assert response.WhichOneof("response") == phase
    mutation = noop_server.CONTINUE_RESPONSE.response_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["x-tollway-cost"]


def test_noop_answers_are_the_sidecars_allows() -> None:
    authorize = pb.AuthorizeResponse.FromString(noop_server.ALLOW_AUTHORIZE.SerializeToString())
    assert authorize.allowed and authorize.reason == pb.REASON_OK
    plain, settling = noop_server.answers(settles=False), noop_server.answers(settles=True)
    for answers in (plain, settling):
        assert answers.check.status.code == 0 and answers.check.HasField("ok_response")
        assert list(answers.check.ok_response.headers_to_remove) == ["x-api-key"]
        assert (answers.http_status, answers.http_body) == (200, b"")
        headers = dict(answers.http_headers)
        assert headers[b"x-envoy-auth-headers-to-remove"] == b"x-api-key"
        assert headers[b"x-tollway-customer"] == b"cus_00000000000000"
        assert headers[b"content-length"] == b"0" and b"ratelimit" in headers
    # What a settlement needs: Check's metadata (the access log logs only requests
    # carrying `customer`), the HTTP answer's headers for dynamic_metadata_from_headers.
    assert not plain.check.HasField("dynamic_metadata")
    assert settling.check.dynamic_metadata["customer"] == "cus_00000000000000"
    assert settling.check.dynamic_metadata["request_id"]
    assert b"customer" not in dict(plain.http_headers)
    settled = dict(settling.http_headers)
    assert settled[b"request_id"] and settled[b"x-tollway-estimate"] == b"1"


def test_access_log_entries_are_read_from_the_noop_log(tmp_path: Path) -> None:
    log = tmp_path / "noop.log"
    line = noop_server.ACCESS_LOG_LINE
    log.write_text(f"started\n{line.format(entries=3)}\n{line.format(entries=40)}\n")
    assert run.access_log_entries(log) == 43


def test_bench_config_has_a_generous_plan_and_a_hostile_one() -> None:
    catalog = load_settings(run.CONFIG, {}).catalog
    bench, hostile = catalog.plans["bench"], catalog.plans["hostile"]
    assert bench.rate.per_second >= 10_000 and bench.overage == "bill"
    assert hostile.rate.per_second * 10 < 2_000  # ten times it stays a modest load
    assert catalog.route_for("GET", "/v1/search") is not None


def _http_access_log() -> str:
    """An HTTP ext_authz + access-log config built from parts, as deploy/envoy.yaml ships it:
    the HTTP config with deploy/envoy-accesslog.yaml's logger (a second one is harmless)."""
    access_log = envoy_config._ACCESS_LOG_BLOCK.search(CONFIGS["accesslog"].text)
    assert access_log is not None
    text = envoy_config._filter_item(envoy_config.EXT_PROC).sub("", CONFIGS["http"].text)
    text = text.replace("stat_prefix: api\n", "stat_prefix: api\n" + access_log[0], 1)
    assert envoy_config.shape(text).describe() == "HTTP ext_authz + access log"
    return text


def _planned(pair: str, *, shipped: str | None = None) -> envoy_config.Planned:
    configs = dict(CONFIGS)
    if shipped is not None:
        old = configs[envoy_config.SHIPPED]
        configs[envoy_config.SHIPPED] = envoy_config.Config(
            old.role, old.path, shipped, envoy_config.shape(shipped)
        )
    [p] = [p for p in envoy_config.plan(configs) if p.name == pair]
    return p


def test_a_shipped_http_access_log_config_runs_as_a_pair_of_its_own(tmp_path: Path) -> None:
    p = _planned(envoy_config.SHIPPED, shipped=_http_access_log())
    assert p.shape.settlement == "access_log" and p.shape.transport == "http"
    assert p.rates == (envoy_config.FIXED_RATE,)
    text = envoy_config.render(p.config.text, **PORTS)
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    argv = [harness.envoy_binary(), "--mode", "validate", "-c", str(config)]
    done = subprocess.run([*argv, "--use-dynamic-base-id"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _through_envoy(
    p: envoy_config.Planned, authorizer: run.Authorizer, *, linger: float = 0.0
) -> tuple[int, dict[str, str], bytes]:
    """One GET through p's bench Envoy config (as the bench renders it) asking
    authorizer; Envoy stops linger seconds after the answer."""
    listen, admin = harness.free_port(), harness.free_port()
    config = envoy_config.render(
        p.config.text,
        listen=listen,
        admin=admin,
        grpc=authorizer.grpc,
        http=authorizer.http,
        authz_only=p.pair.authz_only,
    )
    envoy = run.start_envoy(p.name, config, admin)
    try:
        url = f"http://127.0.0.1:{listen}/v1/search?k={keys.generate('test')}"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = response.status, dict(response.headers), response.read()
        time.sleep(linger)
        return answer
    finally:
        envoy.stop()


Start = Callable[..., run.Authorizer]


@pytest.fixture
def noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Start]:
    """Starts bench no-op servers (gRPC and HTTP), their logs in tmp_path; stops them."""
    monkeypatch.setattr(run, "WORK", tmp_path)
    started: list[harness.Child] = []

    def start(*, settles: bool = False) -> run.Authorizer:
        authorizer = run.start_noop_authorizer(settles=settles, name=f"noop-{len(started)}")
        started.append(authorizer.child)
        return authorizer

    with harness.stopping(started):
        yield start


@pytest.mark.servers
def test_noop_http_authorizer_answers_200_through_the_real_envoy_config(
    noop: Start,
) -> None:
    status, headers, body = _through_envoy(_planned("http-authz"), noop())
    assert (status, body) == (200, b"ok")
    assert headers["ratelimit"].startswith('"rate";r=')  # the no-op's answer reached the client


@pytest.mark.servers
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_noop_access_log_floor_receives_envoys_entries(noop: Start, transport: str) -> None:
    """Envoy logs only what the authorizer's answer admitted (its metadata names a
    customer): the settling no-op's answer must, so its floor gets every entry."""
    if transport == "grpc":
        p = _planned("accesslog")
    else:
        p = _planned(envoy_config.SHIPPED, shipped=_http_access_log())
    settling = noop(settles=True)
    status, _, body = _through_envoy(p, settling, linger=0.6)  # past buffer_flush_interval
    assert (status, body) == (200, b"ok")
    settling.child.stop()  # Envoy is stopped: its stream has ended
    assert run.access_log_entries(settling.child.log) == 1


# -- the report --------------------------------------------------------------------


def _result(rps: float, latency_ms: float, requests: int = 1000) -> h2load.Result:
    summary = h2load.parse_output(H2LOAD_OUTPUT)
    fake = dataclasses.replace(
        summary,
        rps=rps,
        done=requests,
        total=requests,
        status=(requests, 0, 0, 0),
        bytes_data=77 * requests,
    )
    return h2load.Result([fake], [round(latency_ms * 1000)] * 10, 1.0)


def test_valkey_cpu_per_decision_is_read_from_its_cpu_seconds() -> None:
    cpu = run.CpuUse({"valkey": 25.0}, wall=2.0)  # 0.5 s of Valkey CPU
    m = run.Measurement("sidecar", "peak", None, _result(5000, 1), cpu, allowed=10_000)
    m.commands = {"evalsha": 10_000, "hget": 40_000, "ping": 8}
    assert m.valkey_us == pytest.approx(50.0)
    assert m.commands_per_decision == pytest.approx(5.0)  # the sidecar's health pings left out
    assert m.per_decision() == {"hget": 4.0, "evalsha": 1.0}
    floor = run.Measurement("floor", "peak", None, _result(5000, 1), cpu)
    assert math.isnan(floor.valkey_us) and math.isnan(floor.commands_per_decision)


# The leased rows' Redis commands in the made-up run: 1,000 requests each.
LEASED_COMMANDS = {
    run.LEASED_HOT: {"evalsha": 20, "hset": 20, "ping": 30},  # 0.040 a request, pings left out
    run.LEASED_ZIPF: {"evalsha": 600, "hmget": 900},
    run.LEASED_ENVOY: {"evalsha": 50, "hset": 10},
}


def _fake_run() -> tuple[run.Bench, dict[str, run.Row]]:
    """Every row of today's plan, measured with made-up figures."""
    rows = run.with_leased({**run.GRPC_ROWS, **run.envoy_rows(PLANNED)}, 10_000)
    bench = run.Bench(run.QUICK, cast(run.Counters, None), {})
    peaks = {"floor": 4000.0, "sidecar": 1500.0, run.CEILING: 50000.0}
    peaks[run.pair_row(envoy_config.CEILING_PAIR, "noop")] = 3500.0
    peaks |= {run.LEASED_HOT: 3500.0, run.ZIPF_FLOOR: 3000.0, run.LEASED_ZIPF: 1500.0}
    peaks[run.LEASED_ENVOY] = 7000.0
    for target, row in rows.items():
        peaks.setdefault(target, 3000.0 if row.authorizer == "noop" else 1400.0)
    by_pair = {p.name: p for p in PLANNED}
    for target, row in rows.items():
        peak = peaks[target]
        cpu = run.CpuUse({"valkey": 1.5, "sidecar": 90.0}, wall=2.0)
        counted = row.floor != target and target != run.CEILING
        m = run.Measurement(target, "peak", None, _result(peak, 10), cpu, 1000 if counted else None)
        if counted:
            m.commands = LEASED_COMMANDS.get(target, {"evalsha": 1000, "hget": 4000})
        bench.measurements.append(m)
        p = by_pair.get(row.pairs[0]) if row.pairs else None
        if target == run.LEASED_ENVOY:  # as the run: at the shipped pair's rates, no shares
            p = dataclasses.replace(by_pair[envoy_config.SHIPPED], shares=False)
        base = peaks[row.floor]
        for share in run.SHARES if (p is None and not row.leased) or (p and p.shares) else ():
            offered = share * base
            achieved = min(offered, peak)
            bench.measurements.append(
                run.Measurement(target, f"{share:.0%}", offered, _result(achieved, share * 4))
            )
        for rate in p.rates if p is not None else ():
            latency = 1.5 if row.authorizer == "noop" else 3.0
            bench.measurements.append(
                run.Measurement(target, run.rate_load(rate), rate, _result(rate, latency))
            )
    bench.measurements.append(run.Measurement("floor", run.END_PEAK, None, _result(4080, 10)))
    return bench, rows


HOSTILE = {
    "rate": 50.0,
    "burst": 50,
    "offered": 500.0,
    "rps": 499.0,
    "allowed_rps": 50.0,
    "cmds_rps": 3000.0,
    "ratio": 6.0,
    "normal_ratio": 10.0,
    "breakdown": "evalsha 1.00",
    "cpu": run.CpuUse({"sidecar": 40.0, "other": 30.0}, [("pytest", 25.0)]),
}
RSS = {
    "before load": {"VmRSS": 50_000, "VmHWM": 50_000},
    "after load": {"VmRSS": 52_000, "VmHWM": 60_000},
}


def test_report_renders_every_section() -> None:
    bench, rows = _fake_run()
    bench.entries[run.pair_row("accesslog", "noop")] = 1234
    text = run.report(bench, rows, {"nproc": "2"}, run.QUICK, HOSTILE, RSS)
    for heading in (
        "Issue #13's targets",
        "Throughput at saturation",
        "Latency at fixed offered loads",
        "Hostile client",
        "Sidecar memory",
        "CPU during the saturation runs",
    ):
        assert f"## {heading}" in text
    assert "| sidecar Authorize (gRPC) | 1,500 | 0.37 |" in text  # of the better floor, 4,080
    assert "*overloaded*" in text  # the sidecar cannot take 50 % of the floor's peak
    assert "**6.00**" in text
    assert "4,000 req/s at the start of the run and 4,080 at the end (+2.0%)" in text
    assert "| floor again, at the end |" in text
    assert "| hostile attack | 0 | 0 | 40 | 0 | 0 | 0 | 30 (pytest 25) |" in text
    assert "received 1,234 entries from Envoy + no-op: gRPC Check + access log" in text
    assert "- gRPC Check + ext_proc against ext_authz only: sidecar 1,400 req/s" in text
    assert "- HTTP ext_authz against gRPC Check, both ext_authz only:" in text


def test_report_names_each_rows_floor() -> None:
    bench, rows = _fake_run()
    text = run.report(bench, rows, {}, run.QUICK, HOSTILE, RSS)
    table = text.split("## Throughput at saturation")[1].split("## Latency")[0]
    for target, row in rows.items():
        [line] = [line for line in table.splitlines() if line.startswith(f"| {row.label} |")]
        floor = "itself" if row.floor == target else rows[row.floor].label
        assert f"| {floor} |" in line, target
    # Each Envoy row is divided by the no-op behind the same config.
    http = rows["envoy-sidecar-http-authz"]
    assert rows[http.floor].label.startswith("Envoy + no-op: HTTP ext_authz only")
    [line] = [line for line in table.splitlines() if line.startswith(f"| {http.label} |")]
    assert "| 1,400 | 0.47 |" in line and "| 5.00 | 30.0 |" in line
    # The ceiling ran at its pair's loads only: the other pairs have no ratio to it.
    latency = text.split("## Latency")[1]
    [row] = [line for line in latency.splitlines() if line.startswith(f"| {http.label} | 25%")]
    assert row.endswith("| 1.00 / 1.00 / 1.00 | — | — |")


def test_report_summary_says_each_target_met_or_not() -> None:
    bench, rows = _fake_run()
    text = run.report(bench, rows, {}, run.QUICK, HOSTILE, RSS)
    summary = text.split("## Issue #13's targets")[1].split("## Issue #14's targets")[0]
    shipped = run.find_row(rows, envoy_config.SHIPPED, "sidecar")
    assert shipped is not None
    assert f"| {rows[shipped].label}: ≥ 1.5x Envoy + no-op grpc.aio ext_authz" in summary
    assert "| 1,400 ÷ 3,000 req/s = **0.47x** | **not met** |" in summary
    assert "| 1,500 ÷ 4,080 req/s = **0.37** | **not met** |" in summary
    assert summary.count("| **30.0 µs** | met |") == 2  # Authorize and HTTP rows
    assert summary.count("| **5.00** (hget 4.00, evalsha 1.00) | met |") == 2
    assert "p99 3.00 against 1.50 ms: **+1.50 ms**; p50 3.00 against 1.50 ms | met |" in summary
    latency = text.split("## Latency")[1]
    assert f"| {rows[shipped].label} | 1,000/s | 1,000 | 1,000 |" in latency


def test_report_summary_says_each_leased_target_met_or_not() -> None:
    bench, rows = _fake_run()
    text = run.report(bench, rows, {}, run.QUICK, HOSTILE, RSS)
    summary = text.split("## Issue #14's targets")[1].split("\n## ")[0]
    commands = "at saturation, leased: Redis commands per request"
    assert (
        f"| Hot key {commands} ≤ 0.05, sidecar Authorize (gRPC) "
        "| **0.040** (evalsha 0.020, hset 0.020) | met |"
    ) in summary  # the health pings left out
    assert (
        f"| Hot key {commands} ≤ 0.05, Envoy + sidecar, as shipped "
        "| **0.060** (evalsha 0.050, hset 0.010) | **not met** |"
    ) in summary
    assert (
        f"| 10,000-key Zipf mix {commands} ≤ 1, sidecar Authorize (gRPC) "
        "| **1.500** (hmget 0.900, evalsha 0.600) | **not met** |"
    ) in summary
    assert (
        f"| {rows[run.LEASED_HOT].label}: ≥ 0.8x its floor (no-op grpc.aio Authorize) "
        "| 3,500 ÷ 4,080 req/s = **0.86** | met |"
    ) in summary
    assert (
        f"| {rows[run.LEASED_ENVOY].label}: ≥ 2.5x Envoy + no-op grpc.aio ext_authz "
        "(ext_authz only) | 7,000 ÷ 3,000 req/s = **2.33x** | **not met** |"
    ) in summary
    assert "| no committed run to compare with | — |" in summary
    # The table gives leased rows' commands to three places, pings included as for every row.
    table = text.split("## Throughput at saturation")[1].split("## Latency")[0].splitlines()

    def row_of(target: str) -> str:
        [line] = [line for line in table if line.startswith(f"| {rows[target].label} |")]
        return line

    assert "| 3,500 | 0.86 | floor: no-op gRPC Authorize |" in row_of(run.LEASED_HOT)
    assert "| 0.070 |" in row_of(run.LEASED_HOT)
    assert f"| 1,500 | 0.50 | {rows[run.ZIPF_FLOOR].label} |" in row_of(run.LEASED_ZIPF)
    latency = text.split("## Latency")[1].split("## Hostile")[0]
    assert f"| {rows[run.LEASED_ENVOY].label} | 1,000/s |" in latency
    assert f"| {rows[run.LEASED_HOT].label} |" not in latency  # saturation only


def test_leased_rows_follow_the_exact_rows_they_repeat() -> None:
    rows = run.with_leased({**run.GRPC_ROWS, **run.envoy_rows(PLANNED)}, 10_000)
    names = list(rows)
    after = names.index("sidecar") + 1
    assert names[after : after + 3] == [run.LEASED_HOT, run.ZIPF_FLOOR, run.LEASED_ZIPF]
    shipped = run.find_row(rows, envoy_config.SHIPPED, "sidecar")  # still the exact row
    assert shipped is not None and not rows[shipped].leased
    assert names[names.index(shipped) + 1] == run.LEASED_ENVOY
    hot = rows[run.LEASED_ENVOY]
    assert hot.label == rows[shipped].label + ", leased, hot key" and hot.pairs == ()
    assert hot.floor == rows[shipped].floor  # the same no-op row: Envoy + no-op, as shipped
    assert rows[run.LEASED_HOT].floor == "floor"
    assert rows[run.LEASED_ZIPF].floor == run.ZIPF_FLOOR == rows[run.ZIPF_FLOOR].floor
    assert rows[run.LEASED_ZIPF].label == "sidecar Authorize (gRPC), leased, Zipf 10,000 keys"
    exact = run.exact_labels(rows)
    assert rows["sidecar"].label in exact and rows[shipped].label in exact
    for name in ("floor", run.CEILING, run.LEASED_HOT, run.ZIPF_FLOOR, run.LEASED_ZIPF):
        assert rows[name].label not in exact, name
    assert hot.label not in exact
    # No shipped config, no leased Envoy row.
    without = {role: c for role, c in CONFIGS.items() if role != envoy_config.SHIPPED}
    alone = run.with_leased({**run.GRPC_ROWS, **run.envoy_rows(envoy_config.plan(without))}, 10)
    assert run.LEASED_ENVOY not in alone and run.LEASED_ZIPF in alone


def test_bench_config_has_a_leased_plan_with_the_bench_plans_limits() -> None:
    plans = load_settings(run.CONFIG, {}).catalog.plans
    bench, leased = plans["bench"], plans[run.LEASED_PLAN]
    assert (bench.enforcement, leased.enforcement) == ("exact", "leased")
    assert dataclasses.replace(leased, name="bench", enforcement="exact") == bench


def test_grpc_load_tally_reads_as_an_h2load_result() -> None:
    tally = grpc_load.Tally(
        bodies=10,
        requests=200,
        allowed=190,
        denied=5,
        errors={"UNAVAILABLE": 5},
        distinct_allowed=9,
        seconds=2.0,
    )
    result = run.tally_result(tally)
    assert (result.rps, result.requests, result.not_ok) == (100.0, 200, 5)
    assert math.isnan(result.p(50))  # it times nothing
    assert run._outcome(run.Measurement("floor-zipf", "peak", None, result)) == (
        "95.0% answered allow, 5 failed"
    )
    counted = run.Measurement("leased-zipf", "peak", None, result, allowed=190)
    assert run._outcome(counted) == "95.0% allowed, 5 failed"


def test_commands_per_request_leave_the_pings_out() -> None:
    m = run.Measurement("leased-hot", "peak", None, _result(5000, 1, requests=2000))
    m.commands = {"evalsha": 40, "hset": 60, "ping": 100}
    assert m.commands_per_request == pytest.approx(0.05)
    assert m.breakdown() == "hset 0.030, evalsha 0.020"
    empty = run.Measurement("x", "peak", None, _result(0, 1, requests=0))
    assert math.isnan(empty.commands_per_request) and empty.breakdown() == ""


FACTS = {"commit": "abc1234", "date": "2026-12-01 04:00 UTC"}


def test_saturation_figures_read_a_report_back() -> None:
    bench, rows = _fake_run()
    text = run.report(bench, rows, FACTS, run.FULL, HOSTILE, RSS)
    figures = run.saturation_figures(text)
    assert set(figures) == {row.label for row in rows.values()}
    sidecar = figures[rows["sidecar"].label]
    assert (sidecar.vs_floor, sidecar.commands, sidecar.valkey_us) == (0.37, 5.0, 30.0)
    assert math.isnan(figures[rows["floor"].label].valkey_us)
    assert figures[rows[run.LEASED_HOT].label].commands == 0.07
    assert run.floor_drift(text) == pytest.approx(0.02)
    assert run.report_mode(text) == "full"
    assert run.saturation_figures("# no table") == {}
    committed = run.committed_report()  # the file as committed reads too
    if committed is not None:
        assert "sidecar Authorize (gRPC)" in run.saturation_figures(committed)


def test_exact_mode_is_compared_with_the_committed_run() -> None:
    bench, rows = _fake_run()
    before = run.report(bench, rows, FACTS, run.FULL, HOSTILE, RSS)
    exact = "| Exact mode: no figure worse than before"
    count = 3 * len(run.exact_labels(rows))  # vs floor, Redis cmds/req, Valkey µs/decision
    baseline = "commit abc1234, 2026-12-01 04:00 UTC, full mode"

    def line(text: str) -> str:
        [found] = [each for each in text.splitlines() if each.startswith(exact)]
        return found

    same = run.report(bench, rows, FACTS, run.FULL, HOSTILE, RSS, before)
    assert f"{count} figures against the committed run ({baseline}), noise ±10%" in line(same)
    assert line(same).endswith("**none worse** | met |")
    assert "## Exact mode against the last committed run" in same
    assert "| sidecar Authorize (gRPC) | vs floor | 0.37 | 0.37 | +0.0% | — |" in same

    slower, _ = _fake_run()
    m = slower.find("sidecar", "peak")
    assert m is not None
    m.result = _result(1100, 10)  # 0.27 of the floor, against 0.37
    worse = run.report(slower, rows, FACTS, run.FULL, HOSTILE, RSS, before)
    assert "**1 worse**: sidecar Authorize (gRPC): vs floor 0.37 → 0.27 (-27%)" in line(worse)
    assert line(worse).endswith("| **not met** |")
    assert "| sidecar Authorize (gRPC) | vs floor | 0.37 | 0.27 | -27.0% | **worse** |" in worse

    m.cpu = run.CpuUse({"valkey": 1.5, "other": 50.0}, wall=2.0)  # measured on a busy machine
    noisy = run.report(slower, rows, FACTS, run.FULL, HOSTILE, RSS, before)
    assert "**1 worse**, 1 of them noisy (†)" in line(noisy) and line(noisy).endswith("| — |")
    # A quick run against a full one hints; it cannot tell.
    quick = run.report(slower, rows, FACTS, run.QUICK, HOSTILE, RSS, before)
    assert "modes differ, so a hint only" in line(quick) and line(quick).endswith("| — |")
    # A drift larger than the change: the same figure.
    drifting, _ = _fake_run()
    end = drifting.find("floor", run.END_PEAK)
    assert end is not None
    end.result = _result(5600, 10)  # +40 % between the floor's two peaks
    shifted = drifting.find("sidecar", "peak")
    assert shifted is not None
    shifted.result = _result(1500 * 5600 / 4080 * 0.75, 10)  # 25 % below, within the drift
    calm = run.report(drifting, rows, FACTS, run.FULL, HOSTILE, RSS, before)
    assert "noise ±40%" in line(calm) and line(calm).endswith("| met |")


# -- the population ----------------------------------------------------------------


def test_clone_swaps_ids_in_names_fields_and_values() -> None:
    template = [
        ("tw:{cus_a}:a", {"plan": "bench", "status": "active"}),
        ("tw:{cus_a}:keys", {"key_1": "h1"}),
        ("tw:k:{h1}", {"customer": "cus_a", "key_id": "key_1", "state": "active"}),
    ]
    swap = {"cus_a": "cus_b", "h1": "h2", "key_1": "key_2"}
    assert list(run._clone(template, swap)) == [
        ("tw:{cus_b}:a", ["plan", "bench", "status", "active"]),
        ("tw:{cus_b}:keys", ["key_2", "h2"]),
        ("tw:k:{h2}", ["customer", "cus_b", "key_id", "key_2", "state", "active"]),
    ]


def test_population_reads_back_as_the_store_wrote_it(redis_url: str) -> None:
    """Copies of the Store's first account are what the Store would have written."""
    prefix = f"cus_pop{uuid.uuid4().hex[:8]}_"
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        population = run.create_population(client, redis_url, 4, prefix=prefix)

    async def read() -> list[tuple[str, str, str, bool]]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            rows = []
            for customer, api_key in zip(population.customers, population.api_keys, strict=True):
                account = await store.get_account(customer)
                record = await store.lookup_key(keys.key_hash(api_key))
                listed = await store.list_keys(customer)
                assert account is not None and record is not None
                assert listed == [record] and record.customer_id == customer
                assert keys.is_well_formed(api_key)
                rows.append((account.plan, account.status, record.state, record.usable()))
            return rows
        finally:
            await store.close()

    assert asyncio.run(read()) == [("bench", "active", "active", True)] * 4
    assert len(set(population.api_keys)) == 4
    assert population.hostile_customer not in population.customers


def test_leased_accounts_are_on_the_leased_plan(redis_url: str) -> None:
    prefix = f"cus_lease{uuid.uuid4().hex[:8]}_"
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        leased = run.create_leased(client, redis_url, 3, prefix=prefix)
    pairs = [*zip(leased.customers, leased.api_keys, strict=True)]
    pairs.append((leased.hot_customer, leased.hot_key))

    async def read() -> list[tuple[str, bool]]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        try:
            rows = []
            for customer, api_key in pairs:
                account = await store.get_account(customer)
                record = await store.lookup_key(keys.key_hash(api_key))
                assert account is not None and record is not None
                assert record.customer_id == customer
                rows.append((account.plan, record.usable()))
            return rows
        finally:
            await store.close()

    assert asyncio.run(read()) == [(run.LEASED_PLAN, True)] * 4
    assert leased.hot_customer not in leased.customers


# -- the memory run: its load client, bodies and report --------------------------------


@pytest.fixture
def noop_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The bench's no-op server (every Authorize allowed), its log in tmp_path."""
    monkeypatch.setattr(run, "WORK", tmp_path)
    port = harness.free_port()
    child = run.start_noop(port)
    try:
        yield port
    finally:
        child.stop()


def _grpc_load(tmp_path: Path, port: int, api_keys: list[str], seconds: float) -> Path:
    bodies = tmp_path / "bodies.bin"
    bodies.write_bytes(b"".join(authorize_body(key) for key in api_keys))
    result = tmp_path / "result.json"
    argv = [sys.executable, "-m", "bench.grpc_load", "--target", f"127.0.0.1:{port}"]
    argv += ["--bodies", str(bodies), "--seconds", str(seconds)]
    argv += ["--streams", "4", "--result", str(result)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return result


@pytest.mark.servers
def test_grpc_load_walks_every_body_and_counts_each_key_once(
    tmp_path: Path, noop_port: int
) -> None:
    api_keys = [keys.generate("test") for _ in range(5)]
    tally = grpc_load.read_tally(_grpc_load(tmp_path, noop_port, api_keys, 1.0))
    assert (tally.bodies, tally.distinct_allowed) == (5, 5)
    assert tally.requests == tally.allowed > 5  # it wrapped around
    assert (tally.denied, tally.errors) == (0, {})
    assert 0.9 < tally.seconds < 10


@pytest.mark.servers
def test_grpc_load_counts_failed_calls_as_errors(tmp_path: Path) -> None:
    closed = harness.free_port()  # nothing listens there
    tally = grpc_load.read_tally(_grpc_load(tmp_path, closed, [keys.generate("test")], 0.3))
    assert tally.allowed == tally.distinct_allowed == 0
    assert tally.requests == tally.errors.get("UNAVAILABLE", 0) > 0


def test_memory_bodies_deal_every_key_once_in_a_shuffled_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "WORK", tmp_path)
    api_keys = [keys.generate("test") for _ in range(7)]
    population = run.Population([f"cus_{i}" for i in range(7)], api_keys, "cus_h", "k")
    sent = [
        [pb.AuthorizeRequest.FromString(m).api_key for m in parse_grpc_frames(p.read_bytes())]
        for p in memory.write_bodies(population, 2)
    ]
    assert [len(part) for part in sent] == [4, 3]
    everything = sent[0] + sent[1]
    assert sorted(everything) == sorted(api_keys)
    assert everything != api_keys  # shuffled (seeded: the same order every run)


def _memory_run(rss_kib: list[int], distinct: int) -> memory.MemoryRun:
    run_ = memory.MemoryRun(
        keys=1000,
        seconds=40,
        clients=1,
        population_seconds=1.5,
        valkey_populated=2**20,
        idle_kib=40_000,
    )
    for i, rss in enumerate(rss_kib):
        answered = min(100 * i, 700)
        run_.samples.append(
            memory.Sample(10.0 * i, rss, max(rss_kib[: i + 1]), 2**21, answered, answered)
        )
    run_.tallies = [
        grpc_load.Tally(
            bodies=1000, requests=700, allowed=700, distinct_allowed=distinct, seconds=70
        )
    ]
    run_.touched_in_valkey = run_.allowed_in_valkey = distinct
    return run_


def test_memory_report_says_growth_and_coverage() -> None:
    flat = memory.report(
        _memory_run([40_000, 49_000, 50_000, 50_000, 51_000, 50_500, 51_000, 51_000], 700),
        {"nproc": "2"},
    )
    assert "| sidecar RSS at start (after the 30 s warm-up, t = 30 s) | 48.8 MiB |" in flat
    assert "| max (t = 40 s) | 49.8 MiB |" in flat
    assert "| **growth**, start to end (target < 10%: met) | **+2.0%** |" in flat
    assert "700 distinct keys (70.0%) were touched" in flat
    assert "| 70 | 49.8 MiB | +2.0% | 2 MiB | 700 | 700 |" in flat
    assert (
        "| mean RSS, first half of the window → second half | 49.3 MiB → 49.6 MiB (+0.7%) |" in flat
    )
    assert "not met" not in flat and "bytes per new key" not in flat
    growing = memory.report(
        _memory_run([40_000, 45_000, 50_000, 50_000, 55_000, 60_000, 65_000, 70_000], 1000), {}
    )
    assert "(target < 10%: **not met**) | **+40.0%** |" in growing
    assert "bytes per new key), and its mean still moved +23.8%" in growing
    assert "every one of the 1,000 keys was touched" in growing
    # Up and down around a level: the end sample says +10 %, the halves' means do not.
    cycling = memory.report(
        _memory_run([40_000, 45_000, 48_000, 50_000, 55_000, 56_000, 51_000, 52_000, 55_100], 1000),
        {},
    )
    assert "(target < 10%: **not met**) | **+10.2%** |" in cycling
    assert "but its mean moved -1.8% between the two halves of the window" in cycling
