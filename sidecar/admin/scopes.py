"""Admin token scopes: what a token may do (pure, no I/O).

A scope is ``<resource>:<read|write>``; write implies read. ``admin`` is every
scope, including managing other admin tokens. Service credentials for backends
are tokens too: ``usage:write`` lets a backend record usage by customer id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sidecar.errors import TollwayError

__all__ = ["RESOURCES", "SCOPES", "allows", "parse_scopes"]

RESOURCES: Final = ("accounts", "keys", "usage", "credits")
SCOPES: Final = frozenset({f"{r}:{a}" for r in RESOURCES for a in ("read", "write")} | {"admin"})


def parse_scopes(items: Iterable[str]) -> frozenset[str]:
    """Scopes as written (comma-separated lists allowed); TollwayError names a bad one."""
    scopes = {s.strip() for item in items for s in item.split(",") if s.strip()}
    unknown = sorted(scopes - SCOPES)
    if unknown:
        raise TollwayError(
            f"unknown scope {unknown[0]!r}; scopes: admin, or <resource>:<read|write> "
            f"for resource in {', '.join(RESOURCES)}"
        )
    if not scopes:
        raise TollwayError("a token needs at least one scope")
    return frozenset(scopes)


def allows(granted: frozenset[str], needed: str) -> bool:
    """Whether a token with `granted` may do what needs `needed`."""
    if "admin" in granted or needed in granted:
        return True
    resource, _, action = needed.partition(":")
    return action == "read" and f"{resource}:write" in granted
