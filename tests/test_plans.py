"""The plan catalog: a bad file is one clear error naming the plan and field."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.errors import ConfigError
from sidecar.plans import Quota, Rate, parse_catalog
from sidecar.settings import Credits


def plan(**fields: Any) -> dict[str, Any]:
    return {"name": "pro", "rate": "50/s", **fields}


def test_a_full_plan_parses() -> None:
    catalog = parse_catalog(
        {
            "plans": [
                plan(
                    stripe_price="price_1",
                    burst=100,
                    quota="100_000/month",
                    overage="bill",
                    features=["export"],
                )
            ]
        }
    )
    pro = catalog.plans["pro"]
    assert pro.rate == Rate(50, 1) and pro.rate.per_second == 50
    assert pro.burst == 100
    assert pro.quota == Quota(100_000, "month")
    assert pro.overage == "bill"
    assert pro.features == {"export"}
    assert catalog.plan_for_price("price_1") is pro


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("600/m", 10.0), ("600/min", 10.0), ("3600/h", 1.0), ("5/second", 5.0), ("1/minute", 1 / 60)],
)
def test_rate_units(text: str, per_second: float) -> None:
    assert parse_catalog({"plans": [plan(rate=text)]}).plans["pro"].rate.per_second == per_second


def test_burst_defaults_to_the_rate_count() -> None:
    assert parse_catalog({"plans": [plan(rate="600/m")]}).plans["pro"].burst == 600


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rate": "fast"}, "plans[0] 'pro': rate: expected '<count>/<s|m|h>'"),
        ({"rate": "0/s"}, "plans[0] 'pro': rate"),
        ({"burst": 0}, "plans[0] 'pro': burst: expected a positive integer"),
        ({"burst": True}, "plans[0] 'pro': burst"),
        ({"quota": "100/fortnight"}, "plans[0] 'pro': quota: expected '<count>/<hour|day|month>'"),
        ({"overage": "maybe"}, 'plans[0] \'pro\': overage: expected "block" or "bill"'),
        ({"features": "export"}, "plans[0] 'pro': features: expected a list of names"),
        ({"stripe_price": "prod_1"}, "plans[0] 'pro': stripe_price: expected a Stripe price id"),
        ({"qouta": "1/day"}, "plans[0] 'pro': unknown field 'qouta'"),
        ({"name": "Pro Plan"}, "plans[0]: name: expected lower-case"),
        ({"enforcement": "lazy"}, 'plans[0] \'pro\': enforcement: expected "exact" or "leased"'),
        ({"shadow": "yes"}, "plans[0] 'pro': shadow: expected true, false or a list of"),
        ({"shadow": ["rate", "credits"]}, "plans[0] 'pro': shadow: expected true, false or a list"),
        (
            {"enforcement": "leased", "bill_only_success": True},
            "plans[0] 'pro': bill_only_success: a plan with enforcement = \"leased\" reserves",
        ),
    ],
)
def test_each_mistake_names_the_plan_and_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_catalog({"plans": [plan(**fields)]})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_rate_says_how_to_write_one() -> None:
    with pytest.raises(ConfigError, match=r"plans\[0\] 'pro': rate: required"):
        parse_catalog({"plans": [{"name": "pro"}]})


def test_duplicates_and_empty_catalogs_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        parse_catalog({})
    with pytest.raises(ConfigError, match="duplicate plan name"):
        parse_catalog({"plans": [plan(), plan()]})
    with pytest.raises(ConfigError, match="already used by plan 'pro'"):
        parse_catalog(
            {"plans": [plan(stripe_price="price_1"), plan(name="max", stripe_price="price_1")]}
        )


def test_routes_match_method_and_path_patterns_in_order() -> None:
    catalog = parse_catalog(
        {
            "plans": [plan(features=["export"])],
            "routes": [
                {"method": "post", "path": "/v1/export/**", "cost": 10, "feature": "export"},
                {"path": "/v1/items/*", "cost": 2},
                {"path": "/v1/**", "cost": 1},
            ],
        }
    )
    export = catalog.route_for("POST", "/v1/export/a/b?format=csv")
    assert export is not None and export.cost == 10 and export.feature == "export"
    item = catalog.route_for("GET", "/v1/items/42")
    assert item is not None and item.cost == 2
    nested = catalog.route_for("GET", "/v1/items/42/parts")
    assert nested is not None and nested.cost == 1  # '*' is one segment only
    get_export = catalog.route_for("GET", "/v1/export/a")
    assert get_export is not None and get_export.cost == 1
    assert catalog.route_for("GET", "/health") is None


def test_a_route_feature_must_exist_in_some_plan() -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]: feature: 'export' is in no plan"):
        parse_catalog({"plans": [plan()], "routes": [{"path": "/x", "feature": "export"}]})
    with pytest.raises(ConfigError, match=r"routes\[0\]: path: must start with '/'"):
        parse_catalog({"plans": [plan()], "routes": [{"path": "x"}]})
    with pytest.raises(ConfigError, match=r"routes\[0\]: cost: expected a positive integer"):
        parse_catalog({"plans": [plan()], "routes": [{"path": "/x", "cost": -1}]})


def test_enforcement_is_exact_unless_a_plan_asks_for_leased() -> None:
    catalog = parse_catalog({"plans": [plan(), plan(name="hot", enforcement="leased")]})
    assert catalog.plans["pro"].enforcement == "exact"
    assert catalog.plans["hot"].enforcement == "leased"


def test_a_route_may_keep_a_leased_plans_requests_exact_but_not_lease_them() -> None:
    route = {"path": "/v1/priced/**", "enforcement": "exact"}
    catalog = parse_catalog({"plans": [plan(enforcement="leased")], "routes": [route]})
    assert catalog.routes[0].exact
    with pytest.raises(ConfigError, match=r"routes\[0\]: enforcement: expected \"exact\""):
        parse_catalog({"plans": [plan()], "routes": [{**route, "enforcement": "leased"}]})


PACKS = [{"name": "10k", "credits": 10_000}, {"name": "1k", "credits": 1000}]


def test_a_credits_plan_may_set_its_own_auto_top_up_for_its_accounts() -> None:
    catalog = parse_catalog(
        {
            "plans": [
                plan(credits=True, auto_top_up_at=500, auto_top_up_pack="10k"),
                plan(name="small", credits=True),
            ],
            "credit_packs": PACKS,
        }
    )
    pro, small = catalog.plans["pro"], catalog.plans["small"]
    assert (pro.auto_top_up_at, pro.auto_top_up_pack) == (500, "10k")
    assert (small.auto_top_up_at, small.auto_top_up_pack) == (None, None)
    # The plan's own wins over [credits]'; a plan without its own follows [credits].
    credits = Credits(auto_top_up_at=100, auto_top_up_pack="1k")
    assert (credits.top_up_at_for(pro), credits.top_up_pack_for(pro)) == (500, "10k")
    assert (credits.top_up_at_for(small), credits.top_up_pack_for(small)) == (100, "1k")
    assert (credits.top_up_at_for(None), credits.top_up_pack_for(None)) == (100, "1k")
    assert Credits().top_up_at_for(small) is None
    zero = parse_catalog(
        {
            "plans": [plan(credits=True, auto_top_up_at=0, auto_top_up_pack="1k")],
            "credit_packs": PACKS,
        }
    )
    assert zero.plans["pro"].auto_top_up_at == 0  # top up when the balance is spent


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"auto_top_up_at": 100, "auto_top_up_pack": "10k"},
            "plans[0] 'pro': auto_top_up_at: only for a plan with credits = true",
        ),
        (
            {"auto_top_up_pack": "10k"},
            "plans[0] 'pro': auto_top_up_pack: only for a plan with credits = true",
        ),
        (
            {"credits": True, "auto_top_up_at": 100},
            "plans[0] 'pro': auto_top_up_at and auto_top_up_pack: set both (or neither)",
        ),
        (
            {"credits": True, "auto_top_up_pack": "10k"},
            "plans[0] 'pro': auto_top_up_at and auto_top_up_pack: set both (or neither)",
        ),
        (
            {"credits": True, "auto_top_up_at": -1, "auto_top_up_pack": "10k"},
            "plans[0] 'pro': auto_top_up_at: expected a balance >= 0",
        ),
        (
            {"credits": True, "auto_top_up_at": "100", "auto_top_up_pack": "10k"},
            "plans[0] 'pro': auto_top_up_at: expected a balance >= 0",
        ),
        (
            {"credits": True, "auto_top_up_at": 100, "auto_top_up_pack": "100k"},
            "plans 'pro': auto_top_up_pack: '100k' is not in [[credit_packs]]",
        ),
    ],
)
def test_a_plans_auto_top_up_mistakes_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_catalog({"plans": [plan(**fields)], "credit_packs": PACKS})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_shadow_mode_applies_to_every_limit_or_to_those_named() -> None:
    catalog = parse_catalog(
        {"plans": [plan(), plan(name="all", shadow=True), plan(name="some", shadow=["quota"])]}
    )
    assert catalog.plans["pro"].shadow == frozenset()
    assert catalog.plans["all"].shadow == {"rate", "quota", "concurrency"}
    assert catalog.plans["some"].shadow == {"quota"}
