"""The plan catalog: tiers customers pay for, and the routes that cost more.

Pure data and parsing; no I/O beyond what the caller hands in. Every error
names where it is (``plans[1] 'pro': rate``) so a bad file is one clear line.

    [[plans]]
    name = "pro"
    stripe_price = "price_123"         # and/or stripe_lookup_key
    rate = "50/s"                      # sustained token refill
    burst = 100                        # bucket size (default: the rate's count)
    quota = "100000/month"             # optional, per period
    overage = "block"                  # or "bill"
    features = ["search", "export"]
    meter = "api_calls"                # optional: bill each allowed request's cost
    concurrency = 10                   # optional: requests in flight at once
    lease_ttl = "60s"                  # a lease whose release never comes frees itself
    bill_only_success = true           # 5xx answers cost nothing (needs ext_proc)
    credits = true                     # each allowed request's cost burns prepaid credits
    credits_exhausted = "block"        # at zero: 402 credits_exhausted; or "bill" (meter it),
                                       # or a plan name (that plan's limits until a top-up)
    auto_top_up_at = 500               # optional, with auto_top_up_pack (credits plans only):
    auto_top_up_pack = "10k"           #   this plan's accounts' default, over [credits]'
    enforcement = "leased"             # or "exact" (default): see "Leased enforcement"
    shadow = ["quota"]                 # optional: these limits (or all: true) never deny;
                                       #   what they would deny is counted and flagged

    [[credit_packs]]
    name = "10k"
    credits = 10000
    stripe_price = "price_456"         # a one-time price; bought through Checkout
    expires_in = "365d"                # optional: a pack's credits lapse after this

    [[meters]]
    name = "api_calls"                 # what RecordUsage and plans refer to
    event_name = "api_calls"           # the Stripe Billing Meter's event name

    [[routes]]
    method = "POST"                    # or "*" (default)
    path = "/v1/export/*"              # * = one segment, ** = anything
    cost = 10
    feature = "export"
    enforcement = "exact"              # optional: decided in Redis on a leased plan too
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sidecar.errors import ConfigError
from sidecar.fields import Table

__all__ = [
    "SHADOW_LIMITS",
    "Catalog",
    "CreditPack",
    "Meter",
    "Plan",
    "Quota",
    "Rate",
    "Route",
    "parse_catalog",
]

Overage = Literal["block", "bill"]
Enforcement = Literal["exact", "leased"]
# The limits shadow mode can apply to: decided and counted, never denying.
SHADOW_LIMITS: Final = frozenset({"rate", "quota", "concurrency"})
Period = Literal["hour", "day", "month"]

_RATE_UNITS: Final = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hour"), 3600),
}
_PERIODS: Final[dict[str, Period]] = {"hour": "hour", "day": "day", "month": "month"}
_OVERAGES: Final[dict[str, Overage]] = {"block": "block", "bill": "bill"}
_ENFORCEMENTS: Final[dict[str, Enforcement]] = {"exact": "exact", "leased": "leased"}
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_COUNT_RE: Final = re.compile(r"\s*(\d[\d_]*)\s*/\s*([a-z]+)\s*")
_METHOD_RE: Final = re.compile(r"[A-Z]+|\*")
_PLAN_FIELDS: Final = frozenset(
    {
        "name",
        "stripe_price",
        "stripe_lookup_key",
        "rate",
        "burst",
        "quota",
        "overage",
        "features",
        "shadow",
        "description",
        "meter",
        "concurrency",
        "lease_ttl",
        "bill_only_success",
        "credits",
        "credits_exhausted",
        "auto_top_up_at",
        "auto_top_up_pack",
        "enforcement",
    }
)
_PACK_FIELDS: Final = frozenset({"name", "credits", "stripe_price", "expires_in", "description"})
_EVENT_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_ROUTE_FIELDS: Final = frozenset(
    {"method", "path", "cost", "feature", "bill_only_success", "enforcement"}
)


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    seconds: int

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h"}[self.seconds]
        noun = "request" if self.count == 1 else "requests"
        return f"{self.count} {noun}/{unit}"


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    period: Period

    def __str__(self) -> str:
        return f"{self.limit} per {self.period}"


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    rate: Rate
    burst: int
    quota: Quota | None = None
    overage: Overage = "block"
    features: frozenset[str] = frozenset()
    stripe_price: str | None = None
    stripe_lookup_key: str | None = None
    meter: str | None = None  # each allowed request's cost is metered here
    concurrency: int = 0  # requests in flight at once; 0: unlimited
    lease_ttl: int = 60  # seconds a lease lives without a release
    bill_only_success: bool = False  # refund requests answered with 5xx
    credits: bool = False  # each allowed request's cost burns the prepaid balance
    # What a request the balance cannot cover gets: "block" (402), "bill" (admitted,
    # its cost metered to the plan's meter), or "plan:<name>" (that plan's limits).
    credits_exhausted: str = "block"
    # Auto top-up for this plan's accounts without a mark of their own, over
    # [credits] auto_top_up_at / auto_top_up_pack (None: those apply).
    auto_top_up_at: int | None = None
    auto_top_up_pack: str | None = None
    # "leased": a sidecar takes an allotment of the bucket and the quota from Redis and
    # admits the account's next requests from it in-process (sidecar/allotments.py).
    enforcement: Enforcement = "exact"
    # Limits in shadow mode (rate, quota, concurrency): decided and counted as usual,
    # but what they would deny is admitted, with the reason it would have had.
    shadow: frozenset[str] = frozenset()

    @property
    def credits_fallback(self) -> str:
        """The plan enforced while the balance is short, or ""."""
        mode = self.credits_exhausted
        return mode[5:] if mode.startswith("plan:") else ""


@dataclass(frozen=True, slots=True)
class CreditPack:
    name: str
    credits: int
    stripe_price: str | None = None  # a one-time price: the pack is sold through Checkout
    expires_in: int = 0  # seconds a pack's credits last (0: they never lapse)
    description: str = ""


@dataclass(frozen=True, slots=True)
class Meter:
    name: str
    event_name: str  # the Stripe Billing Meter's event_name


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    cost: int = 1
    feature: str | None = None
    bill_only_success: bool | None = None  # None: the plan decides
    exact: bool = False  # decided in Redis even on a plan with leased enforcement
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile_path(self.path))

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and bool(self.pattern.fullmatch(path))


@dataclass(frozen=True, slots=True)
class Catalog:
    plans: Mapping[str, Plan]
    routes: Sequence[Route] = ()
    meters: Mapping[str, Meter] = field(default_factory=dict)
    credit_packs: Mapping[str, CreditPack] = field(default_factory=dict)

    def route_for(self, method: str, path: str) -> Route | None:
        """The first route matching method and path (the query string is ignored)."""
        if not self.routes:
            return None
        path = path.split("?", 1)[0]
        method = method.upper()
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None

    def plan_for_price(self, price_id: str | None, lookup_key: str | None = None) -> Plan | None:
        for plan in self.plans.values():
            if price_id and plan.stripe_price == price_id:
                return plan
            if lookup_key and plan.stripe_lookup_key == lookup_key:
                return plan
        return None


def _compile_path(path: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*)", path)
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(regex, re.DOTALL)  # a path may hold any character, newlines too


def parse_rate(text: str, where: str) -> Rate:
    match = _COUNT_RE.fullmatch(text) if isinstance(text, str) else None
    if not match or match.group(2) not in _RATE_UNITS or int(match.group(1)) <= 0:
        raise ConfigError(f"{where}: expected '<count>/<s|m|h>' like '50/s', got {text!r}")
    return Rate(count=int(match.group(1)), seconds=_RATE_UNITS[match.group(2)])


def parse_quota(text: str, where: str) -> Quota:
    match = _COUNT_RE.fullmatch(text) if isinstance(text, str) else None
    if not match or match.group(2) not in _PERIODS or int(match.group(1)) <= 0:
        raise ConfigError(
            f"{where}: expected '<count>/<hour|day|month>' like '100000/month', got {text!r}"
        )
    return Quota(limit=int(match.group(1)), period=_PERIODS[match.group(2)])


def _positive(number: int) -> bool:
    return number > 0


def _parse_plan(raw: Any, index: int) -> Plan:
    entry = Table.entry(raw, f"plans[{index}]")
    name = entry.string(
        "name", what="lower-case letters, digits, '-' or '_'", valid=_NAME_RE.fullmatch
    )
    entry = entry.named(name).only(_PLAN_FIELDS)
    where = entry.where
    if "rate" not in entry.data:
        raise ConfigError(f'{where}: rate: required, e.g. rate = "50/s"')
    rate = parse_rate(entry.data["rate"], f"{where}: rate")
    burst = entry.integer("burst", rate.count, what="a positive integer", valid=_positive)
    quota = parse_quota(entry.data["quota"], f"{where}: quota") if "quota" in entry.data else None
    overage = entry.string("overage", "block", what='"block" or "bill"', valid=_OVERAGES.get)
    features = entry.array("features", str, (), what="a list of names")
    meter = entry.string("meter", None, what="a meter name")
    concurrency = entry.integer("concurrency", 0, what="a positive integer", valid=_positive)
    lease_ttl = entry.duration("lease_ttl", 60)
    if lease_ttl <= 0:
        raise ConfigError(f"{where}: lease_ttl: must be longer than 0s")
    only_success = entry.boolean("bill_only_success", False)
    credits = entry.boolean("credits", False)
    exhausted = entry.string(
        "credits_exhausted",
        "block",
        what='"block", "bill" or a plan name',
        valid=_NAME_RE.fullmatch,
    )
    if "credits_exhausted" in entry.data and not credits:
        raise ConfigError(f"{where}: credits_exhausted: only for a plan with credits = true")
    if exhausted not in ("block", "bill"):
        exhausted = f"plan:{exhausted}"
    if credits and meter is not None and exhausted != "bill":
        raise ConfigError(
            f"{where}: meter: a credits plan meters only what its credits do not cover; "
            'set credits_exhausted = "bill" (or remove the meter)'
        )
    if exhausted == "bill" and meter is None:
        raise ConfigError(f'{where}: credits_exhausted: "bill" needs a meter to bill to')
    top_up_at = entry.integer("auto_top_up_at", -1, what="a balance >= 0", valid=lambda n: n >= 0)
    top_up_pack = entry.string("auto_top_up_pack", None, what="a credit pack's name")
    for name_of in ("auto_top_up_at", "auto_top_up_pack"):
        if name_of in entry.data and not credits:
            raise ConfigError(f"{where}: {name_of}: only for a plan with credits = true")
    if (top_up_pack is None) != (top_up_at < 0):
        raise ConfigError(f"{where}: auto_top_up_at and auto_top_up_pack: set both (or neither)")
    enforcement = entry.string(
        "enforcement", "exact", what='"exact" or "leased"', valid=_ENFORCEMENTS.get
    )
    if enforcement == "leased" and only_success:
        raise ConfigError(
            f'{where}: bill_only_success: a plan with enforcement = "leased" reserves nothing '
            "to refund: each request costs its route's cost when admitted"
        )
    shadow = _parse_shadow(entry.data.get("shadow", False), f"{where}: shadow")
    price = entry.string("stripe_price", None, what="a string")
    lookup = entry.string("stripe_lookup_key", None, what="a string")
    if price is not None and not price.startswith("price_"):
        raise ConfigError(f"{where}: stripe_price: expected a Stripe price id 'price_…'")
    return Plan(
        name=name,
        rate=rate,
        burst=burst,
        quota=quota,
        overage=_OVERAGES[overage],
        features=frozenset(features),
        shadow=shadow,
        stripe_price=price,
        stripe_lookup_key=lookup,
        meter=meter,
        concurrency=concurrency,
        lease_ttl=lease_ttl,
        bill_only_success=only_success,
        credits=credits,
        credits_exhausted=exhausted,
        auto_top_up_at=None if top_up_at < 0 else top_up_at,
        auto_top_up_pack=top_up_pack,
        enforcement=_ENFORCEMENTS[enforcement],
    )


def _parse_pack(raw: Any, index: int) -> CreditPack:
    entry = Table.entry(raw, f"credit_packs[{index}]")
    name = entry.string(
        "name", what="lower-case letters, digits, '-' or '_'", valid=_NAME_RE.fullmatch
    )
    entry = entry.named(name).only(_PACK_FIELDS)
    if "credits" not in entry.data:
        raise ConfigError(f"{entry.where}: credits: required, e.g. credits = 10000")
    credits = entry.integer("credits", 0, what="a positive integer", valid=_positive)
    price = entry.string(
        "stripe_price",
        None,
        what="a Stripe price id 'price_…'",
        valid=lambda p: p.startswith("price_"),
    )
    expires_in = entry.duration("expires_in", 0)
    if expires_in < 0:
        raise ConfigError(f"{entry.where}: expires_in: must not be negative")
    description = entry.string("description", "", what="a string")
    return CreditPack(name, credits, price, expires_in, description)


def _parse_meter(raw: Any, index: int) -> Meter:
    entry = Table.entry(raw, f"meters[{index}]").only({"name", "event_name"})
    name = entry.string(
        "name", what="lower-case letters, digits, '-' or '_'", valid=_NAME_RE.fullmatch, echo=False
    )
    event_name = entry.named(name).string(
        "event_name",
        name,
        what="a Stripe meter event name",
        valid=_EVENT_NAME_RE.fullmatch,
        echo=False,
    )
    return Meter(name=name, event_name=event_name)


def _parse_shadow(raw: object, where: str) -> frozenset[str]:
    """shadow = true (every limit of the plan) or a list of them: rollouts start with one."""
    if raw is True:
        return SHADOW_LIMITS
    if raw is False:
        return frozenset()
    names = raw if isinstance(raw, list) else None
    if names is None or not all(isinstance(n, str) and n in SHADOW_LIMITS for n in names):
        choices = ", ".join(f'"{n}"' for n in sorted(SHADOW_LIMITS))
        raise ConfigError(f"{where}: expected true, false or a list of {choices}")
    return frozenset(names)


def _parse_route(raw: Any, index: int, features: frozenset[str]) -> Route:
    entry = Table.entry(raw, f"routes[{index}]").only(_ROUTE_FIELDS)
    where = entry.where
    path = entry.string("path", what="a path like '/v1/search/*'")
    if not path.startswith("/"):
        raise ConfigError(f"{where}: path: must start with '/', got {path!r}")
    method = entry.string("method", "*", what="an HTTP method or '*'").upper()
    if not _METHOD_RE.fullmatch(method):
        raise ConfigError(f"{where}: method: expected an HTTP method or '*', got {method!r}")
    cost = entry.integer("cost", 1, what="a positive integer", valid=_positive)
    feature = entry.string("feature", None, what="a feature name")
    if feature is not None and feature not in features:
        raise ConfigError(f"{where}: feature: {feature!r} is in no plan's features")
    only_success = entry.boolean("bill_only_success", None)
    # Leasing is a plan's choice; a route may only keep its requests exact (one the
    # upstream prices, say, whose cost header then settles it).
    entry.string(
        "enforcement",
        "exact",
        what='"exact" (leasing is chosen per plan)',
        valid=lambda value: value == "exact",
    )
    return Route(
        method=method,
        path=path,
        cost=cost,
        feature=feature,
        bill_only_success=only_success,
        exact="enforcement" in entry.data,
    )


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    """Builds the catalog from a parsed TOML document, or raises ConfigError."""
    raw_plans = data.get("plans")
    if not isinstance(raw_plans, list) or not raw_plans:
        raise ConfigError("plans: at least one [[plans]] table is required")
    plans: dict[str, Plan] = {}
    for index, raw in enumerate(raw_plans):
        plan = _parse_plan(raw, index)
        if plan.name in plans:
            raise ConfigError(f"plans[{index}] '{plan.name}': name: duplicate plan name")
        plans[plan.name] = plan
    seen: dict[str, str] = {}
    for plan in plans.values():
        for ref in (plan.stripe_price, plan.stripe_lookup_key):
            if ref is not None:
                if ref in seen:
                    raise ConfigError(
                        f"plans '{plan.name}': {ref!r} is already used by plan '{seen[ref]}'"
                    )
                seen[ref] = plan.name
    document = Table(data)
    raw_meters = document.array("meters", object, (), what="a list of [[meters]] tables")
    meters: dict[str, Meter] = {}
    for index, raw in enumerate(raw_meters):
        meter = _parse_meter(raw, index)
        if meter.name in meters:
            raise ConfigError(f"meters[{index}] '{meter.name}': name: duplicate meter name")
        meters[meter.name] = meter
    for plan in plans.values():
        if plan.meter is not None and plan.meter not in meters:
            raise ConfigError(f"plans '{plan.name}': meter: {plan.meter!r} is not in [[meters]]")
    all_features = frozenset().union(*(p.features for p in plans.values()))
    raw_routes = document.array("routes", object, (), what="a list of [[routes]] tables")
    routes = tuple(_parse_route(raw, i, all_features) for i, raw in enumerate(raw_routes))
    raw_packs = document.array("credit_packs", object, (), what="a list of [[credit_packs]] tables")
    packs: dict[str, CreditPack] = {}
    for index, raw in enumerate(raw_packs):
        pack = _parse_pack(raw, index)
        if pack.name in packs:
            raise ConfigError(f"credit_packs[{index}] '{pack.name}': name: duplicate pack name")
        if pack.stripe_price is not None and pack.stripe_price in seen:
            raise ConfigError(
                f"credit_packs[{index}] '{pack.name}': stripe_price: "
                f"{pack.stripe_price!r} is already used by plan '{seen[pack.stripe_price]}'"
            )
        packs[pack.name] = pack
    for plan in plans.values():
        pack_name = plan.auto_top_up_pack
        if pack_name is not None and pack_name not in packs:
            raise ConfigError(
                f"plans '{plan.name}': auto_top_up_pack: {pack_name!r} is not in [[credit_packs]]"
            )
        fallback = plan.credits_fallback
        if fallback and (fallback not in plans or fallback == plan.name):
            raise ConfigError(
                f"plans '{plan.name}': credits_exhausted: {fallback!r} is not another plan"
            )
        if fallback and plans[fallback].credits:
            raise ConfigError(
                f"plans '{plan.name}': credits_exhausted: plan {fallback!r} burns credits too; "
                "a fallback must work with an empty balance"
            )
    return Catalog(plans=plans, routes=routes, meters=meters, credit_packs=packs)
