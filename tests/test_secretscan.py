"""The suite's secret scanner finds what it must (so its silence means something)."""

from __future__ import annotations

from pathlib import Path

from sidecar import keys
from tests.secretscan import scan, secrets_in


def test_it_finds_each_kind_of_secret(tmp_path: Path) -> None:
    key = keys.generate("live")
    token = keys.generate_token()
    text = f"x {key} y sk_test_abcdEFGH1234 z whsec_0123456789abcdef rk_live_ABCDEFGH9 {token}"
    assert len(secrets_in(text)) == 5
    log = tmp_path / "a.txt"
    log.write_text(f"issued {key}\n")
    clean = tmp_path / "b.txt"
    clean.write_text("issued key_0123456789abcdef for cus_1\n")
    found = scan([log, clean])
    assert list(found) == [str(log)] and key not in str(found)
