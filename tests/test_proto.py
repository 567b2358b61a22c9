"""The public API: buf-lint clean, and the committed Python code matches the .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests import protogen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path / "gen")
    assert fresh, "protoc generated nothing"
    for path in fresh:
        committed = protogen.GEN_DIR / path.relative_to(tmp_path / "gen")
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"


def test_buf_lint_passes() -> None:
    # buf-bin installs `buf` beside the interpreter, which may not be on PATH.
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf, "buf not installed: pip install -e '.[dev]'"
    result = subprocess.run(
        [buf, "lint"], cwd=protogen.ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_reason_enum_covers_every_decision() -> None:
    from sidecar.decision import Reason
    from sidecar.gen.tollway.v1 import tollway_pb2

    names = set(tollway_pb2.Reason.keys())
    assert {f"REASON_{r.name}" for r in Reason} <= names
