"""deploy/envoy.yaml is a config Envoy accepts, and the renderer that `tollway dev`
and the tests use swaps its four ports and nothing else; deploy/envoy-http.yaml is
one too, and differs from it only in how ext_authz asks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.decision import Decision, Reason
from sidecar.envoy import settlement_fields
from sidecar.settings import load_settings
from tests import harness
from tests.conftest import render_envoy_http

REPO = harness.REPO_ROOT
TEMPLATE = harness.ENVOY_TEMPLATE.read_text()
PORTS = {"listen": 10000, "admin": 9901, "sidecar": 50051, "upstream": 8080}
NEW = {"listen": 41001, "admin": 41002, "sidecar": 41003, "upstream": 41004}


def validate(config: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    argv = [harness.envoy_binary(), "--mode", "validate", "-c", str(config),
            "--use-dynamic-base-id"]  # fmt: skip
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def port_values(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"port_value: (\d+)", text)]


def test_deploy_envoy_yaml_validates() -> None:
    done = validate(Path("deploy/envoy.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_validation_catches_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "envoy.yaml"
    broken.write_text(TEMPLATE.replace("cluster: upstream }", "cluster: no_such_cluster }"))
    assert validate(broken).returncode != 0


def test_rendered_config_validates(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(harness.render_envoy_config(TEMPLATE, **NEW))
    done = validate(config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_template_has_each_port_once() -> None:
    assert sorted(port_values(TEMPLATE)) == sorted(PORTS.values())


def test_render_swaps_each_port_exactly_once() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, **NEW)
    assert sorted(port_values(rendered)) == sorted(NEW.values())
    for role, old in PORTS.items():
        assert f"port_value: {old}" not in rendered, role
        assert rendered.count(f"port_value: {NEW[role]}") == 1, role


def test_render_puts_each_port_in_its_place() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, **NEW)
    before, after = TEMPLATE.splitlines(), rendered.splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(changed) == 4
    for role, old in PORTS.items():
        [line] = [a for b, a in changed if f"port_value: {old}" in b]
        assert line.endswith(f"port_value: {NEW[role]} }}"), (role, line)


def test_render_swaps_only_the_ports_given() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, sidecar=41003)
    assert sorted(port_values(rendered)) == sorted([10000, 9901, 41003, 8080])


@pytest.mark.parametrize("role", sorted(PORTS))
def test_render_rejects_a_template_missing_a_port(role: str) -> None:
    template = TEMPLATE.replace(f"port_value: {PORTS[role]}", "port_value: 1")
    with pytest.raises(ValueError, match=rf"port_value: {PORTS[role]}.*{role}"):
        harness.render_envoy_config(template, **NEW)


def test_render_rejects_a_template_with_a_port_twice() -> None:
    template = TEMPLATE + "# port_value: 8080\n"
    with pytest.raises(ValueError, match="upstream"):
        harness.render_envoy_config(template, **NEW)


def test_render_does_not_match_a_longer_port_number() -> None:
    template = TEMPLATE + "# port_value: 80801\n"
    rendered = harness.render_envoy_config(template, **NEW)
    assert rendered.endswith("# port_value: 80801\n")


def test_envoy_forwards_the_headers_the_sidecar_reads_the_key_from() -> None:
    # Envoy sends only allowed_headers to the sidecar: a key header missing there
    # would make every request a 401 missing_key.
    allowed = set(re.findall(r"- exact: ([\w-]+)", TEMPLATE))
    names = load_settings(REPO / "deploy" / "tollway.toml", {}).headers
    assert set(names.api_key) <= allowed
    if names.bearer:
        assert "authorization" in allowed


# -- deploy/envoy-http.yaml: the same Envoy, asking over HTTP (ext_authz http_service) --

HTTP_TEMPLATE_PATH = REPO / "deploy" / "envoy-http.yaml"
HTTP_PORTS = {"listen": 41001, "admin": 41002, "grpc": 41003, "http": 41005, "upstream": 41004}


def test_deploy_envoy_http_yaml_validates() -> None:
    done = validate(Path("deploy/envoy-http.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


@pytest.mark.parametrize("fail_open", [False, True])
def test_rendered_envoy_http_config_validates(tmp_path: Path, fail_open: bool) -> None:
    rendered = render_envoy_http(**HTTP_PORTS, fail_open=fail_open)
    assert sorted(port_values(rendered)) == sorted(HTTP_PORTS.values())
    assert f"uri: http://127.0.0.1:{HTTP_PORTS['http']}\n" in rendered
    config = tmp_path / "envoy-http.yaml"
    config.write_text(rendered)
    done = validate(config)
    assert done.returncode == 0, done.stdout + done.stderr


def _filters(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(the connection manager minus its filters, filters by name, clusters by name)."""
    doc = yaml.safe_load(path.read_text())
    [listener] = doc["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    config = dict(manager["typed_config"])
    filters = {f["name"]: f["typed_config"] for f in config.pop("http_filters")}
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    return config, filters, clusters


def test_envoy_http_yaml_differs_from_envoy_yaml_only_in_the_authz_transport() -> None:
    grpc_manager, grpc_filters, grpc_clusters = _filters(REPO / "deploy" / "envoy.yaml")
    http_manager, http_filters, http_clusters = _filters(HTTP_TEMPLATE_PATH)
    assert http_manager == grpc_manager  # routes, path normalization
    assert list(http_filters) == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.header_to_metadata",  # the estimate, as the number ext_proc reads
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    assert list(grpc_filters) == [n for n in http_filters if "header_to_metadata" not in n]
    for name in ("envoy.filters.http.ext_proc", "envoy.filters.http.router"):
        assert http_filters[name] == grpc_filters[name], name
    grpc_authz = dict(grpc_filters["envoy.filters.http.ext_authz"])
    http_authz = dict(http_filters["envoy.filters.http.ext_authz"])
    service = http_authz.pop("http_service")
    assert grpc_authz.pop("grpc_service")["timeout"] == service["server_uri"]["timeout"]
    assert http_authz == grpc_authz  # failure_mode_allow, status_on_error, allowed_headers
    assert "path_prefix" not in service  # the path is priced as the client sent it
    assert http_clusters["upstream"] == grpc_clusters["upstream"]
    assert http_clusters["tollway"] == grpc_clusters["tollway"]  # ext_proc's
    assert service["server_uri"]["cluster"] == "tollway_http"


def test_envoy_http_yaml_passes_what_the_http_answer_carries() -> None:
    """The names sidecar/http_authz.py answers with, in the lists that let them through."""
    from sidecar.http_authz import ESTIMATE_HEADER

    _, filters, _ = _filters(HTTP_TEMPLATE_PATH)
    response = filters["envoy.filters.http.ext_authz"]["http_service"]["authorization_response"]

    def names(field: str) -> set[str]:
        return {p.get("exact") or p["prefix"] + "*" for p in response[field]["patterns"]}

    headers = load_settings(REPO / "deploy" / "tollway.toml", {}).headers
    assert names("allowed_upstream_headers") == {
        headers.customer,
        headers.plan,
        "x-request-id",
        ESTIMATE_HEADER,
    }
    limits = {"ratelimit", "ratelimit-policy", "x-ratelimit-*"}
    assert names("allowed_client_headers_on_success") == limits
    assert names("allowed_client_headers") == limits | {"retry-after", "content-type"}
    settled = Decision(True, Reason.OK, "ok", "cus_a", "p", lease_id="l", reserved="r", cost=2)
    assert names("dynamic_metadata_from_headers") == set(settlement_fields(settled) or {}) - {
        "cost"  # the number comes through header_to_metadata
    }
    [rule] = filters["envoy.filters.http.header_to_metadata"]["request_rules"]
    assert rule["header"] == ESTIMATE_HEADER and rule["remove"] is True
    assert rule["on_header_present"] == {
        "metadata_namespace": "envoy.filters.http.ext_authz",
        "key": "cost",
        "type": "NUMBER",
    }


# -- deploy/envoy-accesslog.yaml: settling through the gRPC access log, not ext_proc --

ACCESSLOG_PATH = REPO / "deploy" / "envoy-accesslog.yaml"


def test_deploy_envoy_accesslog_yaml_validates() -> None:
    done = validate(Path("deploy/envoy-accesslog.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_rendered_envoy_accesslog_config_validates(tmp_path: Path) -> None:
    text = ACCESSLOG_PATH.read_text()
    assert sorted(port_values(text)) == sorted(PORTS.values())
    rendered = harness.render_envoy_config(text, **NEW)
    assert sorted(port_values(rendered)) == sorted(NEW.values())
    config = tmp_path / "envoy-accesslog.yaml"
    config.write_text(rendered)
    done = validate(config)
    assert done.returncode == 0, done.stdout + done.stderr


def _manager(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[Any]]:
    """(the connection manager minus its filters, filters by name, clusters)."""
    doc = yaml.safe_load(path.read_text())
    [listener] = doc["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    config = dict(manager["typed_config"])
    filters = {f["name"]: f.get("typed_config", {}) for f in config.pop("http_filters")}
    return config, filters, doc["static_resources"]["clusters"]


def test_envoy_accesslog_yaml_is_envoy_yaml_with_the_access_log_for_ext_proc() -> None:
    from sidecar.accesslog import COST_KEY, COST_NAMESPACE
    from sidecar.envoy import METADATA_NAMESPACE

    grpc_manager, grpc_filters, grpc_clusters = _manager(REPO / "deploy" / "envoy.yaml")
    manager, filters, clusters = _manager(ACCESSLOG_PATH)
    [logger] = manager.pop("access_log")
    assert manager == grpc_manager  # routes, path normalization
    assert clusters == grpc_clusters
    assert list(filters) == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.router",
    ]
    for name in ("envoy.filters.http.ext_authz", "envoy.filters.http.router"):
        assert filters[name] == grpc_filters[name], name
    # The cost header: out of the client's response, into the metadata the log carries.
    cost_header = load_settings(REPO / "deploy" / "tollway.toml", {}).envoy.cost_header
    [rule] = filters["envoy.filters.http.header_to_metadata"]["response_rules"]
    assert rule == {
        "header": cost_header,
        "on_header_present": {"metadata_namespace": COST_NAMESPACE, "key": COST_KEY,
                              "type": "STRING"},
        "remove": True,
    }  # fmt: skip
    # The log: to the sidecar, V3, only requests Tollway admitted.
    assert logger["name"] == "envoy.access_loggers.http_grpc"
    common = logger["typed_config"]["common_config"]
    assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": "tollway"}}
    assert common["transport_api_version"] == "V3"
    assert common["buffer_flush_interval"] == "0.2s"  # the lease release bound's base
    matcher = logger["filter"]["metadata_filter"]
    assert matcher["matcher"]["filter"] == METADATA_NAMESPACE
    assert matcher["match_if_key_not_found"] is False
