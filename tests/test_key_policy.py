"""A key's own policy, pure: what its scope lets through, and the mistakes
that are refused with the field's name."""

from __future__ import annotations

import pytest

from sidecar.errors import TollwayError
from sidecar.key_policy import NO_POLICY, parse_policy, policy_from_fields


def test_a_key_without_a_policy_allows_whatever_the_plan_does() -> None:
    assert NO_POLICY.allows("POST", "/v1/export/x", "export")
    assert not NO_POLICY.limited


def test_scope_features_deny_other_features_but_not_featureless_requests() -> None:
    policy = parse_policy(features=["search"])
    assert policy.allows("GET", "/v1/search", "search")
    assert policy.allows("GET", "/v1/status", None)
    assert not policy.allows("POST", "/v1/export/x", "export")
    assert not parse_policy(features=[]).allows("GET", "/v1/search", "search")


def test_scope_routes_match_like_routes_with_an_optional_method() -> None:
    policy = parse_policy(routes=["GET /v1/search/*", "/v1/status"])
    assert policy.allows("GET", "/v1/search/books?q=1", None)
    assert policy.allows("get", "/v1/search/books", None)
    assert not policy.allows("POST", "/v1/search/books", None)
    assert policy.allows("DELETE", "/v1/status", None)
    assert not policy.allows("GET", "/v1/search/books/deep", None)
    assert not policy.allows("GET", "/v1/other", None)


def test_a_policy_survives_the_key_record() -> None:
    policy = parse_policy(
        name="ci bot",
        metadata={"team": "data", "n": 2},
        features=["search"],
        routes=["GET /v1/search/*"],
        rate="5/s",
        burst=7,
        quota="100/day",
        uses=3,
    )
    assert policy_from_fields(policy.fields()) == policy
    assert policy.limited
    assert policy_from_fields(parse_policy(features=[]).fields()).features == frozenset()
    assert policy_from_fields(NO_POLICY.fields()) is NO_POLICY


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "x" * 101}, "name"),
        ({"metadata": "[1]"}, "metadata"),
        ({"metadata": "{"}, "metadata"),
        ({"metadata": {"big": "x" * 2000}}, "metadata"),
        ({"routes": ["search"]}, "scope route"),
        ({"rate": "fast"}, "rate"),
        ({"burst": 5}, "burst"),
        ({"quota": "10/week"}, "quota"),
        ({"uses": -1}, "uses"),
    ],
)
def test_mistakes_are_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(TollwayError, match=rf"^{field}"):
        parse_policy(**kwargs)  # type: ignore[arg-type]
