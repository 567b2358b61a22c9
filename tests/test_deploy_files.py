"""The compose file and the Kubernetes manifests, read (no Docker or cluster
here): they parse, wire the pieces the way the README says, run as non-root
with health probes, and carry no secret values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.secretscan import secrets_in

DEPLOY = Path(__file__).parents[1] / "deploy"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_yaml_file_parses_and_holds_no_secret() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert load_all(path), path
        assert secrets_in(path.read_text()) == [], path


def test_compose_runs_envoy_sidecar_and_app_in_one_namespace() -> None:
    [compose] = load_all(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"app", "valkey", "sidecar", "companion", "envoy"}
    for name in ("sidecar", "companion", "envoy"):
        assert services[name]["network_mode"] == "service:app", name
    assert "10000:10000" in services["app"]["ports"]
    assert services["sidecar"]["command"][:1] == ["serve"]
    assert services["companion"]["command"][:1] == ["webhook"]
    assert "--appendonly" in services["valkey"]["command"]
    mounts = " ".join(services["envoy"]["volumes"])
    assert "./envoy.yaml:/etc/envoy/envoy.yaml" in mounts  # deploy/envoy.yaml, unchanged
    # ...which asks the sidecar over HTTP on 50052 and logs to its gRPC port, 50051.
    assert services["sidecar"]["command"][1:] == ["--listen", "127.0.0.1:50051"]
    assert services["sidecar"]["environment"]["TOLLWAY_HTTP_LISTEN"] == "127.0.0.1:50052"
    assert "./tollway.toml:/etc/tollway/tollway.toml:ro" in services["sidecar"]["volumes"]
    for name in ("sidecar", "companion"):
        env = services[name]["environment"]
        assert env["TOLLWAY_REDIS_URL"].startswith("redis://valkey:")
        assert not any("STRIPE" in key for key in env), "secrets come from .env only"


def containers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def test_the_api_pod_puts_tollway_beside_envoy_and_the_app() -> None:
    deployment, service = load_all(DEPLOY / "k8s" / "api-with-tollway.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    parts = containers(deployment)
    assert set(parts) == {"app", "envoy", "tollway"}
    tollway = parts["tollway"]
    assert tollway["args"][0] == "serve" and "127.0.0.1:50051" in tollway["args"]
    # deploy/envoy.yaml (mounted unchanged) asks over HTTP on 50052: every worker serves it.
    env = {e["name"]: e.get("value") for e in tollway["env"]}
    assert env["TOLLWAY_HTTP_LISTEN"] == "127.0.0.1:50052"
    # It listens on loopback, and kubelet dials the pod IP: probes run inside.
    assert tollway["readinessProbe"]["exec"]["command"] == ["tollway", "health"]
    assert tollway["livenessProbe"]["exec"]["command"] == ["tollway", "health", "--live"]
    redis = next(e for e in tollway["env"] if e["name"] == "TOLLWAY_REDIS_URL")
    assert "secretKeyRef" in redis["valueFrom"]
    assert parts["envoy"]["ports"][0]["containerPort"] == 10000


def test_the_companion_takes_its_stripe_secrets_from_a_secret() -> None:
    deployment, _ = load_all(DEPLOY / "k8s" / "companion.yaml")
    companion = containers(deployment)["companion"]
    assert companion["args"][0] == "webhook"
    assert companion["envFrom"] == [{"secretRef": {"name": "tollway-stripe"}}]
    assert companion["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "tcpSocket" in companion["livenessProbe"]  # a Redis outage is no reason to restart
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] != 0
