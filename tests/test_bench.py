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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

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

TEMPLATE = harness.ENVOY_TEMPLATE.read_text()
PORTS = {"listen": 21000, "admin": 21001, "authorizer": 21002}
TOLLWAY = envoy_config.tollway_filters(TEMPLATE)
OTHERS = tuple(name for name in TOLLWAY if name != envoy_config.EXT_AUTHZ)  # ext_proc


@pytest.mark.parametrize("authz", [True, False])
@pytest.mark.parametrize("without", [(), OTHERS], ids=["all filters", "ext_authz only"])
def test_bench_envoy_configs_validate(
    tmp_path: Path, authz: bool, without: tuple[str, ...]
) -> None:
    text = envoy_config.render(TEMPLATE, **PORTS, authz=authz, without=without)
    assert "direct_response" in text
    assert "cluster: upstream }" not in text  # the upstream is never reached
    for port in PORTS.values():
        assert f"port_value: {port}" in text
    http_filter = r"- name: (envoy\.filters\.http\.\w+)"
    filters = re.findall(http_filter, text)
    kept = [f for f in re.findall(http_filter, TEMPLATE) if f not in without]
    assert filters == ["envoy.filters.http.header_mutation", *kept]
    assert "%QUERY_PARAM(k)%" in text
    assert TOLLWAY[0] == "envoy.filters.http.ext_authz"
    assert text.count("disabled: true") == (0 if authz else len(TOLLWAY) - len(without))
    if without:  # the filter's own comments go with it
        assert "The response path" not in text and "ExternalProcessor" not in text
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    argv = [harness.envoy_binary(), "--mode", "validate", "-c", str(config)]
    argv += ["--use-dynamic-base-id"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bench_envoy_config_leaves_out_only_filters_it_has_and_never_ext_authz() -> None:
    for without in ([envoy_config.EXT_AUTHZ], ["envoy.filters.http.lua"]):
        with pytest.raises(ValueError, match="cannot leave out"):
            envoy_config.render(TEMPLATE, **PORTS, authz=True, without=without)


def test_envoy_variants_pair_each_row_with_a_no_op_row_of_the_same_filters() -> None:
    variants = run.envoy_variants(TOLLWAY)
    by_name = {v.name: v for v in variants}
    assert len(by_name) == len(variants)
    for variant in variants:
        assert variant.name in run.LABELS
        base = by_name[run.BASELINE[variant.name]]
        assert base.authorizer == "noop" and base.authz
        assert base.without == variant.without
    if OTHERS:  # deploy/envoy.yaml runs ext_proc: the ext_authz-only pair is in the run
        assert by_name["envoy-sidecar-authz"].without == OTHERS
        assert run.BASELINE["envoy-sidecar-authz"] == "envoy-noop-authz"
    # With ext_authz alone in deploy/envoy.yaml the pair would repeat the main rows.
    assert [v.name for v in run.envoy_variants([envoy_config.EXT_AUTHZ])] == [
        "envoy-noop",
        "envoy-ceiling",
        "envoy-sidecar",
    ]


@pytest.mark.parametrize("filters", [list(TOLLWAY), [envoy_config.EXT_AUTHZ]])
def test_sidecar_config_runs_ext_proc_exactly_when_envoy_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filters: list[str]
) -> None:
    monkeypatch.setattr(run, "WORK", tmp_path)
    settings = load_settings(run.sidecar_config(filters), {})
    assert settings.envoy.ext_proc is (envoy_config.EXT_PROC in filters)
    assert settings.catalog.plans.keys() == load_settings(run.CONFIG, {}).catalog.plans.keys()


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
    targets = {
        "floor": 4000,
        "sidecar": 1500,
        "envoy-noop": 3500,
        "envoy-ceiling": 50000,
        "envoy-sidecar": 1400,
        "envoy-noop-authz": 6000,
        "envoy-sidecar-authz": 3000,
    }
    for target, peak in targets.items():
        bench.measurements.append(run.Measurement(target, "peak", None, _result(peak, 10)))
        base = targets[run.BASELINE[target]]
        for share in run.SHARES:
            offered = share * base
            achieved = min(offered, peak)
            bench.measurements.append(
                run.Measurement(target, f"{share:.0%}", offered, _result(achieved, share * 4))
            )
    bench.measurements.append(run.Measurement("floor", run.END_PEAK, None, _result(4080, 10)))
    hostile = {
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
    rss = {
        "before load": {"VmRSS": 50_000, "VmHWM": 50_000},
        "after load": {"VmRSS": 52_000, "VmHWM": 60_000},
    }
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
    # Each Envoy row names the no-op row it is divided by: the same filters.
    assert (
        "| Envoy + sidecar, ext_authz only | 3,000 | 0.50 "
        "| Envoy + no-op authorizer, ext_authz only | 0.06 |"
    ) in text
    assert (
        "| Envoy + sidecar, all Tollway filters | 1,400 | 0.40 "
        "| Envoy + no-op authorizer, all Tollway filters | 0.03 |"
    ) in text
    assert "3,000 req/s with ext_authz only and 1,400 with every filter (0.47 of it)" in text
    # The ceiling ran at other offered loads than the ext_authz-only rows: no ratio to it.
    [row] = [line for line in text.splitlines() if "Envoy + sidecar, ext_authz only | 25%" in line]
    assert row.endswith("| 1.00 / 1.00 / 1.00 | — | — |")


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
