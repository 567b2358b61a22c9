"""deploy/envoy.yaml is a config Envoy accepts, and the renderer that `tollway dev`
and the tests use swaps its four ports and nothing else."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sidecar.settings import load_settings
from tests import harness

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
