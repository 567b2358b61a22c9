"""The Dockerfile, read (no Docker engine here): what an operator relies on."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = (Path(__file__).parents[1] / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.split(None, 1)
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def values(name: str) -> list[str]:
    return [rest for op, rest in INSTRUCTIONS if op.upper() == name]


def test_multi_stage_build_on_a_slim_base() -> None:
    stages = values("FROM")
    assert len(stages) >= 2 and all("slim" in s for s in stages)
    assert any("--from=build" in c for c in values("COPY"))


def test_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    users = values("USER")
    assert users and users[-1] not in ("root", "0")
    assert values("HEALTHCHECK") and "tollway" in values("HEALTHCHECK")[0]


def test_one_image_serves_both_roles() -> None:
    assert values("ENTRYPOINT") == ['["tollway"]']
    assert "serve" in values("CMD")[0]
    assert "webhook" in DOCKERFILE  # the companion is the same image with `webhook`


def test_no_secrets_are_baked_in() -> None:
    assert not re.search(r"sk_(live|test)_|whsec_|STRIPE_SECRET_KEY\s*=", DOCKERFILE)
    for env in values("ENV"):
        assert "SECRET" not in env and "PASSWORD" not in env
