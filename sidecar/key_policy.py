"""What one API key may do beyond its plan: a name and metadata for people,
a scope that narrows the plan (features, routes), limits of its own (a rate,
a quota) and a number of uses. Pure: parsing, checking, no I/O.

A key's limits apply on top of its account's, in the same atomic step
(store/admit.lua): both must pass, so a key's limits can only tighten what
the plan allows, never loosen it. Its scope is checked before Redis is
asked: a request outside it is 403 key_scope. Uses count requests (not
cost): a key with 3 uses answers 3 requests, then 403 key_uses_exhausted.

    scope features   ["search"]: only requests needing no feature or one of these
    scope routes     ["GET /v1/search/*", "/v1/status"]: only paths matching one
                     (the [[routes]] syntax; a method first narrows it further)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from sidecar.errors import TollwayError
from sidecar.plans import Plan, Quota, Rate, Route, parse_quota, parse_rate

__all__ = ["MAX_METADATA_BYTES", "NO_POLICY", "KeyPolicy", "parse_policy", "policy_from_fields"]

MAX_METADATA_BYTES: Final = 1024
_METHOD_RE: Final = re.compile(r"(?:([A-Z]+)\s+)?(/\S*)")


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    name: str = ""
    metadata: str = ""  # a JSON object's text, at most MAX_METADATA_BYTES
    features: frozenset[str] | None = None  # None: the plan's
    routes: tuple[Route, ...] = ()  # (): any path
    rate: Rate | None = None  # the key's own bucket, on top of the account's
    burst: int = 0
    quota: Quota | None = None  # the key's own quota, on top of the account's
    uses: int = 0  # requests the key answers in all (0: no limit)

    @property
    def limited(self) -> bool:
        """Whether the decision script keeps state for this key."""
        return self.rate is not None or self.quota is not None or self.uses > 0

    def allows(self, method: str, path: str, feature: str | None) -> bool:
        """Whether the request is inside the key's scope."""
        if self.features is not None and feature is not None and feature not in self.features:
            return False
        if not self.routes:
            return True
        bare = path.split("?", 1)[0]
        return any(route.matches(method.upper(), bare) for route in self.routes)

    def plan_view(self, plan: Plan) -> Plan:
        """The key's limits as a plan, for describing its denials (RateLimit headers)."""
        return Plan(
            name=plan.name,
            rate=self.rate or plan.rate,
            burst=self.burst or plan.burst,
            quota=self.quota,
        )

    def view(self) -> dict[str, object]:
        """As people and APIs read it (JSON-ready)."""
        stored = self.fields()
        return {
            "name": self.name,
            "metadata": json.loads(self.metadata) if self.metadata else {},
            "scope_features": None if self.features is None else sorted(self.features),
            "scope_routes": [_route_text(r) for r in self.routes],
            "rate": stored["rate"] or None,
            "burst": self.burst or None,
            "quota": stored["quota"] or None,
            "uses": self.uses or None,
        }

    def fields(self) -> dict[str, str]:
        """As the key record stores it (store/api_keys.py)."""
        stored = {
            "name": self.name,
            "meta": self.metadata,
            "scope_features": "" if self.features is None else ",".join(sorted(self.features)),
            "scope_routes": "\n".join(_route_text(r) for r in self.routes),
            "rate": f"{self.rate.count}/{_UNIT[self.rate.seconds]}" if self.rate else "",
            "burst": str(self.burst) if self.rate else "",
            "quota": f"{self.quota.limit}/{self.quota.period}" if self.quota else "",
            "uses": str(self.uses) if self.uses else "",
        }
        stored["has_scope_features"] = "1" if self.features is not None else ""
        return stored


_UNIT: Final = {1: "s", 60: "m", 3600: "h"}


def _route_text(route: Route) -> str:
    return route.path if route.method == "*" else f"{route.method} {route.path}"


def parse_policy(
    *,
    name: str = "",
    metadata: Mapping[str, object] | str | None = None,
    features: Iterable[str] | None = None,
    routes: Iterable[str] = (),
    rate: str = "",
    burst: int = 0,
    quota: str = "",
    uses: int = 0,
) -> KeyPolicy:
    """A policy from what a person or an API call wrote; TollwayError names the field."""
    if len(name) > 100:
        raise TollwayError("name: at most 100 characters")
    text = _metadata_text(metadata)
    parsed_routes = []
    for written in routes:
        match = _METHOD_RE.fullmatch(written.strip())
        if not match:
            raise TollwayError(f"scope route {written[:80]!r}: expected '[METHOD] /path/*'")
        parsed_routes.append(Route(method=match[1] or "*", path=match[2]))
    parsed_rate = parse_rate(rate, "rate") if rate else None
    if burst < 0 or (burst and parsed_rate is None):
        raise TollwayError("burst: a positive number, with a rate")
    if uses < 0:
        raise TollwayError("uses: 0 (no limit) or more")
    return KeyPolicy(
        name=name,
        metadata=text,
        features=None if features is None else frozenset(features),
        routes=tuple(parsed_routes),
        rate=parsed_rate,
        burst=(burst or parsed_rate.count) if parsed_rate else 0,
        quota=parse_quota(quota, "quota") if quota else None,
        uses=uses,
    )


def _metadata_text(metadata: Mapping[str, object] | str | None) -> str:
    if metadata is None or metadata == "":
        return ""
    if isinstance(metadata, str):
        try:
            value = json.loads(metadata)
        except ValueError:
            raise TollwayError("metadata: not JSON") from None
    else:
        value = metadata
    if not isinstance(value, dict):
        raise TollwayError("metadata: a JSON object")
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise TollwayError(f"metadata: at most {MAX_METADATA_BYTES} bytes as JSON")
    return text


def policy_from_fields(fields: Mapping[str, str]) -> KeyPolicy:
    """The policy a key record holds (fields as KeyPolicy.fields wrote them)."""
    if not any(
        fields.get(f)
        for f in ("name", "meta", "has_scope_features", "scope_routes", "rate", "quota", "uses")
    ):
        return NO_POLICY
    features = fields.get("scope_features", "")
    return KeyPolicy(
        name=fields.get("name", ""),
        metadata=fields.get("meta", ""),
        features=frozenset(f for f in features.split(",") if f)
        if fields.get("has_scope_features")
        else None,
        routes=tuple(
            Route(method=m[1] or "*", path=m[2])
            for line in fields.get("scope_routes", "").split("\n")
            if line and (m := _METHOD_RE.fullmatch(line))
        ),
        rate=parse_rate(fields["rate"], "rate") if fields.get("rate") else None,
        burst=int(fields.get("burst") or 0),
        quota=parse_quota(fields["quota"], "quota") if fields.get("quota") else None,
        uses=int(fields.get("uses") or 0),
    )


NO_POLICY: Final = KeyPolicy()  # a key that is just its plan
