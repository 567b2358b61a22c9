"""`tollway dev` ships what it reads (sidecar/demo/), and `tollway serve` and
`tollway webhook` never load the demo or the test harness."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from sidecar.demo import processes
from tests.harness import REPO_ROOT


def test_the_demo_reads_deploys_files_shipped_as_package_data() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["sidecar"]
    for shipped in (processes.ENVOY_YAML, processes.DEMO_CONFIG):
        # A symlink, so deploy/ stays the one real file; setuptools copies its content.
        assert shipped.is_symlink(), shipped
        assert shipped.resolve() == (REPO_ROOT / "deploy" / shipped.name).resolve()
        assert f"demo/{shipped.name}" in package_data


def test_serve_and_webhook_never_import_the_demo_or_the_harness() -> None:
    code = (
        "import sys, sidecar.cli, sidecar.server, webhook.app, webhook.config\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sidecar.demo', 'tests'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_portals_stylesheet_and_script_ship_as_package_data() -> None:
    from importlib import resources

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "portal/static/*" in pyproject["tool"]["setuptools"]["package-data"]["webhook"]
    static = resources.files("webhook.portal") / "static"
    assert sorted(p.name for p in static.iterdir()) == ["portal.css", "portal.js"]


def test_free_ports_are_never_repeated_and_never_ones_the_kernel_lends_to_clients() -> None:
    # A port from the ephemeral range can be taken by any outgoing connection's local
    # end before the server meant for it binds (a sentinel once failed to start so).
    span = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low, high = int(span[0]), int(span[1])
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < low or port > high for port in ports)
    assert all(processes.port_is_free(port) for port in ports)
