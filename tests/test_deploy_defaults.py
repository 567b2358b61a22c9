"""The safe defaults of what we ship, read from the files (no Docker or cluster
here): the image's sidecar listens on every interface, as its Dockerfile says
and explains, and the shipped config makes that safe by requiring service
tokens; the companion's plain HTTP is never a public Service, and every file
that binds it to every interface says where TLS is and keeps /admin/v1 in."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from sidecar.settings import load_settings

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of each of the Dockerfile's instructions called name."""
    lines = re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
    found = [line.split(None, 1) for line in lines if line.strip() and line[0] != "#"]
    return [rest for op, rest in found if op.upper() == name]


def test_the_shipped_config_requires_a_service_token() -> None:
    written = tomllib.loads((DEPLOY / "tollway.toml").read_text())
    assert written["sidecar"]["require_service_token"] is True
    assert load_settings(
        DEPLOY / "tollway.toml", {}
    ).require_service_token  # as the sidecar reads it


def test_the_image_listens_on_every_interface_where_its_dockerfile_says_why() -> None:
    assert instructions("CMD") == ['["serve", "--listen", "0.0.0.0:50051"]']
    assert "50051" in instructions("EXPOSE")[0].split()
    # The comment right above CMD says why, and what guards the port.
    above = DOCKERFILE[: DOCKERFILE.index("\nCMD ")].rsplit("\nENTRYPOINT", 1)[1]
    for reason in ("loopback", "require_service_token = true", "tls_cert", "tls_client_ca"):
        assert reason in above, reason


def test_the_sidecar_binds_loopback_where_envoy_shares_its_network() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["sidecar"]["command"] == ["serve", "--listen", "127.0.0.1:50051"]
    deployment, _ = yaml.safe_load_all((DEPLOY / "k8s" / "api-with-tollway.yaml").read_text())
    [tollway] = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tollway"
    ]
    assert tollway["args"][:3] == ["serve", "--listen", "127.0.0.1:50051"]


def test_the_companions_kubernetes_service_is_not_public() -> None:
    docs: list[dict[str, Any]] = list(
        yaml.safe_load_all((DEPLOY / "k8s" / "companion.yaml").read_text())
    )
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_each_file_that_binds_the_companion_to_every_interface_says_where_tls_is() -> None:
    binding = [
        path
        for path in sorted(DEPLOY.rglob("*.y*ml"))
        if re.search(r'"webhook",\s*"--listen",\s*"0\.0\.0\.0:', path.read_text())
    ]
    assert {p.name for p in binding} == {"docker-compose.yml", "companion.yaml"}
    for path in binding:
        comments = re.sub(r"\s*\n\s*#\s*", " ", path.read_text())  # one line of prose
        assert re.search(r"TLS is terminated|terminates TLS", comments), path
        assert "/admin/v1" in comments, path
