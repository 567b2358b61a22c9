"""The benchmark harness's own pieces (bench/): encoders, sampler, parsers, configs.

No load runs here; `make bench` is the load test.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import subprocess
from pathlib import Path
from typing import cast

import pytest

from bench import envoy_config, h2load, noop_server, run
from bench.workload import (
    ZipfSampler,
    authorize_body,
    envoy_uris,
    grpc_frame,
    parse_grpc_frames,
)
from sidecar import dev, keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.settings import load_settings

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
    log = ["1795799544485944\t200\t9768\n", "1795799544486068\t200\t120\n",
           "1795799544486070\t-1\t5\n", "garbage\n", "1795799544486208\t503\t50\n"]  # fmt: skip
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

TEMPLATE = dev.ENVOY_TEMPLATE.read_text()
PORTS = {"listen": 21000, "admin": 21001, "authorizer": 21002}


@pytest.mark.parametrize("authz", [True, False])
def test_bench_envoy_configs_validate(tmp_path: Path, authz: bool) -> None:
    text = envoy_config.render(TEMPLATE, **PORTS, authz=authz)
    assert "direct_response" in text
    assert "cluster: upstream }" not in text  # the upstream is never reached
    for port in PORTS.values():
        assert f"port_value: {port}" in text
    filters = re.findall(r"- name: (envoy\.filters\.http\.\w+)", text)
    assert filters == [
        "envoy.filters.http.header_mutation",
        *re.findall(r"- name: (envoy\.filters\.http\.\w+)", TEMPLATE),
    ]
    assert "%QUERY_PARAM(k)%" in text
    tollway = envoy_config.tollway_filters(TEMPLATE)
    assert tollway[0] == "envoy.filters.http.ext_authz"
    assert text.count("disabled: true") == (0 if authz else len(tollway))
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    argv = [dev.envoy_binary(), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bench_envoy_config_fails_loudly_when_the_template_changes() -> None:
    with pytest.raises(ValueError, match="route"):
        envoy_config.render(
            TEMPLATE.replace("route: { cluster: upstream }", "route: { cluster: api }"),
            **PORTS,
            authz=True,
        )


# -- the floor and the bench config ------------------------------------------------


def test_noop_server_options_match_the_sidecar() -> None:
    """The floor must set up grpcio as sidecar/server.py does."""
    server_py = (REPO / "sidecar" / "server.py").read_text()
    sidecar_options = set(re.findall(r'"(grpc\.[a-z0-9_.]+)"', server_py))
    assert sidecar_options == {name for name, _ in noop_server.SERVER_OPTIONS}
    assert "grpc.aio.server(" in server_py


def test_noop_ext_proc_passes_every_phase() -> None:
    for phase, response in noop_server._PASS.items():
        assert response.WhichOneof("response") == phase
    mutation = noop_server.CONTINUE_RESPONSE.response_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["x-tollway-cost"]


def test_noop_answers_are_allows() -> None:
    authorize = pb.AuthorizeResponse.FromString(noop_server.ALLOW_AUTHORIZE.SerializeToString())
    assert authorize.allowed and authorize.reason == pb.REASON_OK
    check = noop_server.ALLOW_CHECK
    assert check.status.code == 0 and check.HasField("ok_response")
    assert list(check.ok_response.headers_to_remove) == ["x-api-key"]


def test_bench_config_has_a_generous_plan_and_a_hostile_one() -> None:
    catalog = load_settings(run.CONFIG, {}).catalog
    bench, hostile = catalog.plans["bench"], catalog.plans["hostile"]
    assert bench.rate.per_second >= 10_000 and bench.overage == "bill"
    assert hostile.rate.per_second * 10 < 2_000  # ten times it stays a modest load
    assert catalog.route_for("GET", "/v1/search") is not None


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


def test_report_renders_every_section() -> None:
    bench = run.Bench(run.QUICK, cast(run.Counters, None), {})
    targets = {"floor": 4000, "sidecar": 1500, "envoy-noop": 3500, "envoy-ceiling": 50000,
               "envoy-sidecar": 1400}  # fmt: skip
    for target, peak in targets.items():
        bench.measurements.append(run.Measurement(target, "peak", None, _result(peak, 10)))
        for share in run.SHARES:
            offered = share * (4000 if target in ("floor", "sidecar") else 3500)
            achieved = min(offered, peak)
            bench.measurements.append(
                run.Measurement(target, f"{share:.0%}", offered, _result(achieved, share * 4))
            )
    bench.measurements.append(run.Measurement("floor", run.END_PEAK, None, _result(4080, 10)))
    hostile = {"rate": 50.0, "burst": 50, "offered": 500.0, "rps": 499.0, "allowed_rps": 50.0,
               "cmds_rps": 3000.0, "ratio": 6.0, "normal_ratio": 10.0, "breakdown": "evalsha 1.00",
               "cpu": run.CpuUse({"sidecar": 40.0, "other": 30.0}, [("pytest", 25.0)])}  # fmt: skip
    rss = {"before load": {"VmRSS": 50_000, "VmHWM": 50_000},
           "after load": {"VmRSS": 52_000, "VmHWM": 60_000}}  # fmt: skip
    text = run.report(bench, {"nproc": "2"}, run.QUICK, hostile, rss)
    for heading in (
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
