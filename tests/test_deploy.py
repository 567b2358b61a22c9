"""The Envoy configs shipped in deploy/ are configs Envoy accepts, as written and
as rendered: envoy.yaml (the default: HTTP ext_authz + access-log settlement),
envoy-grpc.yaml (gRPC Check + ext_proc) and envoy-accesslog.yaml (gRPC Check +
access-log settlement). The renderer that `tollway dev` and the tests use swaps
their ports and nothing else. The default's filter chain and header lists are
held to the code, and each variant differs from it only where it says."""

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
from tests.conftest import render_envoy

REPO = harness.REPO_ROOT
TEMPLATE = harness.ENVOY_TEMPLATE.read_text()  # deploy/envoy.yaml, the default
GRPC_PATH = harness.ENVOY_GRPC_TEMPLATE
ACCESSLOG_PATH = REPO / "deploy" / "envoy-accesslog.yaml"
SHIPPED = ("envoy.yaml", "envoy-grpc.yaml", "envoy-accesslog.yaml")
# The default's ports by role (sidecar: Tollway's gRPC port; http: its HTTP ext_authz).
PORTS = {"listen": 10000, "admin": 9901, "sidecar": 50051, "http": 50052, "upstream": 8080}
NEW = {"listen": 41001, "admin": 41002, "sidecar": 41003, "http": 41005, "upstream": 41004}
GRPC_ROLES = ("listen", "admin", "sidecar", "upstream")  # the gRPC configs have no HTTP port


def validate(config: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    argv = [
        harness.envoy_binary(),
        "--mode",
        "validate",
        "-c",
        str(config),
        "--use-dynamic-base-id",
    ]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def port_values(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"port_value: (\d+)", text)]


def test_deploy_holds_exactly_the_shipped_envoy_configs() -> None:
    assert sorted(p.name for p in (REPO / "deploy").glob("envoy*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_envoy_config_validates(name: str) -> None:
    done = validate(Path("deploy") / name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr


def test_validation_catches_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "envoy.yaml"
    broken.write_text(TEMPLATE.replace("cluster: upstream }", "cluster: no_such_cluster }"))
    assert validate(broken).returncode != 0


@pytest.mark.parametrize("name", SHIPPED)
def test_each_rendered_config_validates(tmp_path: Path, name: str) -> None:
    text = (REPO / "deploy" / name).read_text()
    roles = PORTS if name == "envoy.yaml" else GRPC_ROLES
    assert sorted(port_values(text)) == sorted(PORTS[role] for role in roles)
    rendered = harness.render_envoy_config(text, **{role: NEW[role] for role in roles})
    assert sorted(port_values(rendered)) == sorted(NEW[role] for role in roles)
    config = tmp_path / name
    config.write_text(rendered)
    done = validate(config)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("fail_open", [False, True])
def test_the_default_rendered_for_the_tests_validates(tmp_path: Path, fail_open: bool) -> None:
    rendered = render_envoy(
        listen=NEW["listen"],
        admin=NEW["admin"],
        grpc=NEW["sidecar"],
        http=NEW["http"],
        upstream=NEW["upstream"],
        fail_open=fail_open,
    )
    assert sorted(port_values(rendered)) == sorted(NEW.values())
    assert rendered.count(f"failure_mode_allow: {str(fail_open).lower()}") == 1
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered)
    done = validate(config)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the renderer (tollway dev, the tests, the bench) ------------------------------------


def test_template_has_each_port_once() -> None:
    assert sorted(port_values(TEMPLATE)) == sorted(PORTS.values())
    assert TEMPLATE.count("uri: http://127.0.0.1:50052\n") == 1  # the HTTP authorizer's


def test_render_swaps_each_port_exactly_once() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, **NEW)
    assert sorted(port_values(rendered)) == sorted(NEW.values())
    for role, old in PORTS.items():
        assert f"port_value: {old}" not in rendered, role
        assert rendered.count(f"port_value: {NEW[role]}") == 1, role
    assert "uri: http://127.0.0.1:50052" not in rendered
    assert rendered.count(f"uri: http://127.0.0.1:{NEW['http']}\n") == 1


def test_render_puts_each_port_in_its_place() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, **NEW)
    before, after = TEMPLATE.splitlines(), rendered.splitlines()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(changed) == len(PORTS) + 1  # and the HTTP authorizer's server_uri
    for role, old in PORTS.items():
        [line] = [a for b, a in changed if f"port_value: {old}" in b]
        assert line.endswith(f"port_value: {NEW[role]} }}"), (role, line)
    [uri] = [a for b, a in changed if "uri: " in b]
    assert uri.endswith(f"uri: http://127.0.0.1:{NEW['http']}"), uri


def test_render_swaps_only_the_ports_given() -> None:
    rendered = harness.render_envoy_config(TEMPLATE, sidecar=41003)
    assert sorted(port_values(rendered)) == sorted([10000, 9901, 41003, 50052, 8080])
    assert "uri: http://127.0.0.1:50052\n" in rendered


@pytest.mark.parametrize("role", sorted(PORTS))
def test_render_rejects_a_template_missing_a_port(role: str) -> None:
    template = TEMPLATE.replace(f"port_value: {PORTS[role]}", "port_value: 1")
    with pytest.raises(ValueError, match=rf"port_value: {PORTS[role]}.*{role}"):
        harness.render_envoy_config(template, **NEW)


def test_render_rejects_an_http_port_its_server_uri_does_not_name() -> None:
    template = TEMPLATE.replace("uri: http://127.0.0.1:50052", "uri: http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"uri: .*:50052' \(http\)"):
        harness.render_envoy_config(template, **NEW)
    # A gRPC config has no HTTP port to swap.
    with pytest.raises(ValueError, match=r"port_value: 50052' \(http\)"):
        harness.render_envoy_config(GRPC_PATH.read_text(), http=41005)


def test_render_rejects_a_template_with_a_port_twice() -> None:
    template = TEMPLATE + "# port_value: 8080\n"
    with pytest.raises(ValueError, match="upstream"):
        harness.render_envoy_config(template, **NEW)


def test_render_does_not_match_a_longer_port_number() -> None:
    template = TEMPLATE + "# port_value: 80801\n"
    rendered = harness.render_envoy_config(template, **NEW)
    assert rendered.endswith("# port_value: 80801\n")


# -- what each config runs -----------------------------------------------------------------


def _manager(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(the connection manager minus its filters, filters by name, clusters by name)."""
    doc = yaml.safe_load(path.read_text())
    [listener] = doc["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    config = dict(manager["typed_config"])
    filters = {f["name"]: f.get("typed_config", {}) for f in config.pop("http_filters")}
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    return config, filters, clusters


DEFAULT_PATH = harness.ENVOY_TEMPLATE
AUTHZ = "envoy.filters.http.ext_authz"
TO_METADATA = "envoy.filters.http.header_to_metadata"
EXT_PROC = "envoy.filters.http.ext_proc"
ROUTER = "envoy.filters.http.router"


@pytest.mark.parametrize("name", SHIPPED)
def test_envoy_forwards_the_headers_the_sidecar_reads_the_key_from(name: str) -> None:
    # Envoy sends only allowed_headers to the sidecar: a key header missing there
    # would make every request a 401 missing_key.
    _, filters, _ = _manager(REPO / "deploy" / name)
    allowed = {p["exact"] for p in filters[AUTHZ]["allowed_headers"]["patterns"]}
    names = load_settings(REPO / "deploy" / "tollway.toml", {}).headers
    assert set(names.api_key) <= allowed
    if names.bearer:
        assert "authorization" in allowed
    assert "x-request-id" in allowed  # names the lease and the reservation


def test_the_default_asks_over_http_and_settles_through_the_access_log() -> None:
    from sidecar.accesslog import COST_KEY, COST_NAMESPACE
    from sidecar.envoy import METADATA_NAMESPACE

    manager, filters, clusters = _manager(DEFAULT_PATH)
    assert list(filters) == [AUTHZ, TO_METADATA, ROUTER]  # no ext_proc
    service = filters[AUTHZ]["http_service"]
    assert "grpc_service" not in filters[AUTHZ]
    assert "path_prefix" not in service  # the path is priced as the client sent it
    assert service["server_uri"]["cluster"] == "tollway_http"
    assert service["server_uri"]["uri"] == "http://127.0.0.1:50052"
    assert filters[AUTHZ]["failure_mode_allow"] is False
    assert filters[AUTHZ]["status_on_error"] == {"code": "ServiceUnavailable"}
    # What deploy/tollway.toml says the sidecar listens on, and settles with.
    settings = load_settings(REPO / "deploy" / "tollway.toml", {})
    assert settings.http_listen == "127.0.0.1:50052"
    assert settings.listen == "127.0.0.1:50051"
    assert settings.envoy.settlement == "access_log"
    endpoint = clusters["tollway_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 50052
    grpc = clusters["tollway"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc["endpoint"]["address"]["socket_address"]["port_value"] == 50051
    options = clusters["tollway"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(options)  # the access log is gRPC
    # The cost header: out of the client's response, into the metadata the log carries.
    [rule] = filters[TO_METADATA]["response_rules"]
    assert rule == {
        "header": settings.envoy.cost_header,
        "on_header_present": {
            "metadata_namespace": COST_NAMESPACE,
            "key": COST_KEY,
            "type": "STRING",
        },
        "remove": True,
    }
    # The log: to the sidecar, V3, only requests Tollway admitted.
    [logger] = manager["access_log"]
    assert logger["name"] == "envoy.access_loggers.http_grpc"
    common = logger["typed_config"]["common_config"]
    assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": "tollway"}}
    assert common["transport_api_version"] == "V3"
    assert common["buffer_flush_interval"] == "0.2s"  # the lease release bound's base
    matcher = logger["filter"]["metadata_filter"]
    assert matcher["matcher"]["filter"] == METADATA_NAMESPACE
    assert matcher["matcher"]["path"] == [{"key": "customer"}]
    assert matcher["match_if_key_not_found"] is False


def test_the_default_passes_what_the_http_answer_carries() -> None:
    """The names sidecar/http_authz.py answers with, in the lists that let them through."""
    from sidecar.envoy import CREDITS_HEADER, METADATA_NAMESPACE, SHADOW_HEADER
    from sidecar.http_authz import ESTIMATE_HEADER

    _, filters, _ = _manager(DEFAULT_PATH)
    response = filters[AUTHZ]["http_service"]["authorization_response"]

    def names(field: str) -> set[str]:
        return {p.get("exact") or p["prefix"] + "*" for p in response[field]["patterns"]}

    headers = load_settings(REPO / "deploy" / "tollway.toml", {}).headers
    assert names("allowed_upstream_headers") == {
        headers.customer,
        headers.plan,
        "x-request-id",
        ESTIMATE_HEADER,
        SHADOW_HEADER,
    }
    limits = {"ratelimit", "ratelimit-policy", "x-ratelimit-*", CREDITS_HEADER}
    assert names("allowed_client_headers_on_success") == limits | {SHADOW_HEADER}
    assert names("allowed_client_headers") == limits | {"retry-after", "content-type"}
    settled = Decision(True, Reason.OK, "ok", "cus_a", "p", lease_id="l", reserved="r", cost=2)
    assert names("dynamic_metadata_from_headers") == set(settlement_fields(settled) or {}) - {
        "cost"  # the number comes through header_to_metadata
    }
    [rule] = filters[TO_METADATA]["request_rules"]
    assert rule["header"] == ESTIMATE_HEADER and rule["remove"] is True
    assert rule["on_header_present"] == {
        "metadata_namespace": METADATA_NAMESPACE,
        "key": "cost",
        "type": "NUMBER",
    }


def test_envoy_accesslog_yaml_is_the_default_asking_over_grpc() -> None:
    """deploy/envoy-accesslog.yaml: the default's listener, routes, access log and
    cost header, with ext_authz as gRPC Check (so no estimate header to read)."""
    manager, filters, clusters = _manager(DEFAULT_PATH)
    grpc_manager, grpc_filters, grpc_clusters = _manager(ACCESSLOG_PATH)
    assert grpc_manager == manager  # routes, path normalization, the access log
    assert list(grpc_filters) == list(filters)
    assert grpc_filters[ROUTER] == filters[ROUTER]
    http_authz, grpc_authz = dict(filters[AUTHZ]), dict(grpc_filters[AUTHZ])
    service = http_authz.pop("http_service")
    assert grpc_authz.pop("grpc_service") == {
        "envoy_grpc": {"cluster_name": "tollway"},
        "timeout": service["server_uri"]["timeout"],
    }
    assert grpc_authz == http_authz  # failure_mode_allow, status_on_error, allowed_headers
    to_metadata = dict(filters[TO_METADATA])
    assert to_metadata.pop("request_rules")  # the estimate: Check sends it as metadata
    assert grpc_filters[TO_METADATA] == to_metadata
    assert grpc_clusters == {name: clusters[name] for name in ("tollway", "upstream")}


def test_envoy_grpc_yaml_is_the_gRPC_check_with_ext_proc() -> None:
    """deploy/envoy-grpc.yaml: the default's listener and routes, ext_authz as gRPC
    Check, and ext_proc settling each request before the client has its response."""
    manager, _, clusters = _manager(DEFAULT_PATH)
    grpc_manager, grpc_filters, grpc_clusters = _manager(GRPC_PATH)
    manager.pop("access_log")
    assert grpc_manager == manager  # routes, path normalization; no access log
    assert list(grpc_filters) == [AUTHZ, EXT_PROC, ROUTER]
    assert grpc_filters[AUTHZ] == _manager(ACCESSLOG_PATH)[1][AUTHZ]  # the same Check
    ext_proc = grpc_filters[EXT_PROC]
    assert ext_proc["grpc_service"]["envoy_grpc"] == {"cluster_name": "tollway"}
    assert ext_proc["failure_mode_allow"] is True  # a settlement never breaks a response
    assert ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"] == [AUTHZ]
    assert grpc_clusters == {name: clusters[name] for name in ("tollway", "upstream")}
