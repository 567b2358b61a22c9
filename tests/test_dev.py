"""`tollway dev` (what `make run` starts): a newcomer pastes the printed curl,
gets a 200, repeats it quickly and gets a 429 with Retry-After and RateLimit;
the printed sign-in link opens the customer's dashboard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from tests import harness

pytestmark = pytest.mark.servers  # starts its own servers


def fetch(url: str, key: str) -> tuple[int, Message]:
    request = urllib.request.Request(url, headers={"x-api-key": key})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


def assert_the_printed_link_opens_the_dashboard(link: str) -> None:
    import re

    import httpx

    page, token = link.split("#token=")
    with httpx.Client(timeout=5) as browser:  # what the page's script does with the fragment
        form = browser.get(page).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf
        signed_in = browser.post(page, data={"csrf": csrf[1], "token": token})
        assert signed_in.status_code == 303
        dashboard = browser.get(page.replace("/sign-in/link", "/dashboard"))
        assert dashboard.status_code == 200 and "cus_demo" in dashboard.text


def test_dev_prints_a_working_key_and_curl(tmp_path: Path) -> None:
    port = harness.free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    command = [sys.executable, "-m", "sidecar", "dev", "--json"]
    command += ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        assert lines, process.stderr.read() if process.stderr else ""
        announced = json.loads("".join(lines))
        key, curl = announced["api_key"], announced["curl"]
        assert key in curl and f"http://127.0.0.1:{port}/hello" in curl

        url = f"http://127.0.0.1:{port}/hello"
        statuses = []
        for _ in range(10):
            status, headers = fetch(url, key)
            statuses.append(status)
            if status == 429:
                break
        assert statuses[0] == 200
        assert statuses[-1] == 429, statuses
        assert int(headers["Retry-After"]) >= 1
        assert headers["RateLimit"].startswith('"rate";r=0;')
        assert "RateLimit-Policy" in headers
        assert fetch(url, "")[0] == 401
        assert_the_printed_link_opens_the_dashboard(announced["sign_in_link"])
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert key not in errors  # the key is shown once, on stdout, never logged
