"""The portal's parts that need no server (webhook/portal/: security, chart,
views, prices): cookies that cannot be forged, tokens compared safely, a chart
whose bars say the exact counts, every value escaped, prices described as
Stripe states them and a clear fallback when Stripe cannot be asked."""

from __future__ import annotations

import asyncio
import re
import socket

import stripe

from webhook.portal import views
from webhook.portal.chart import daily_chart, gauge
from webhook.portal.prices import UNAVAILABLE, Prices, describe_price
from webhook.portal.security import cookie_attributes, same_token, sign, unsign

SECRET = b"s" * 32
DAY = 86400


def test_a_signed_session_cookie_opens_only_with_its_own_secret_and_id() -> None:
    cookie = sign(SECRET, "session-id_1")
    assert unsign(SECRET, cookie) == "session-id_1"
    assert unsign(b"t" * 32, cookie) is None
    session, mac = cookie.rsplit(".", 1)
    assert unsign(SECRET, f"session-id_2.{mac}") is None
    other = "A" if mac[-1] != "A" else "B"
    assert unsign(SECRET, f"{session}.{mac[:-1]}{other}") is None
    for forged in ("", ".", "no-dot", f".{mac}", f"{session}.", "é.é", f"{cookie}x"):
        assert unsign(SECRET, forged) is None


def test_csrf_tokens_match_only_exactly() -> None:
    assert same_token("abc123", "abc123")
    for presented in ("abc124", "", None, 123, ["abc123"], "abc123 ", "ábc123"):
        assert not same_token("abc123", presented)
    assert not same_token("", "")  # no token expected is never a match
    assert not same_token("éé", "abc")  # a cookie may hold anything: no error, no match


def test_cookies_are_secure_everywhere_but_loopback() -> None:
    assert cookie_attributes("https://billing.example.com", 60)["secure"] is True
    assert cookie_attributes("http://127.0.0.1:8000", 60)["secure"] is False
    assert cookie_attributes("http://localhost:8000", 60)["secure"] is False
    attributes = cookie_attributes("https://x.example", None)
    assert attributes["httponly"] is True and attributes["samesite"] == "strict"


def bars(svg: str) -> list[tuple[int, float, str]]:
    return [
        (int(units), float(height), title)
        for height, units, title in re.findall(
            r'height="([\d.]+)" fill="[^"]+" data-day="\d+" data-units="(\d+)"><title>([^<]+)<',
            svg,
        )
    ]


def test_the_daily_chart_draws_each_day_in_proportion_and_titles_its_exact_count() -> None:
    start = 1_796_083_200  # 2026-12-01
    svg = daily_chart(
        [(start, 1000), (start + DAY, 500), (start + 2 * DAY, 1), (start + 3 * DAY, 0)],
        label="api_calls",
    )
    drawn = bars(svg)
    assert [units for units, _, _ in drawn] == [1000, 500, 1, 0]
    assert drawn[1][1] == drawn[0][1] / 2
    assert drawn[2][1] >= 1.0  # a day with any use is never drawn as none
    assert drawn[3][1] == 0
    assert drawn[0][2] == "Dec 01: 1,000"
    assert ">1k<" in svg  # the scale's top


def test_an_empty_month_draws_without_dividing_by_zero() -> None:
    svg = daily_chart([(d * DAY, 0) for d in range(31)], label="x")
    assert len(bars(svg)) == 31 and all(height == 0 for _, height, _ in bars(svg))
    assert daily_chart([], label="x").startswith("<svg")


def test_the_chart_labels_today_and_escapes_its_label() -> None:
    start = 1_796_083_200
    days = [(start + d * DAY, d) for d in range(31)]
    svg = daily_chart(days, label='<b>"x"</b>', today=start + 10 * DAY)
    assert ">today<" in svg
    assert "<b>" not in svg and "&lt;b&gt;" in svg


def test_a_gauge_fills_to_its_share_and_never_past_full() -> None:
    assert 'data-share="0.5000"' in gauge(5, 10, label="x")
    assert 'data-share="1.0000"' in gauge(50, 10, label="x")
    assert 'data-share="0.0000"' in gauge(5, 0, label="x")


def test_stripe_prices_are_described_as_a_customer_reads_them() -> None:
    monthly = {"currency": "usd", "unit_amount": 2900, "recurring": {"interval": "month"}}
    assert describe_price(monthly) == "$29.00 / month"
    yen = {"currency": "jpy", "unit_amount": 500, "recurring": None}
    assert describe_price(yen) == "¥500"
    metered = {
        "currency": "eur",
        "unit_amount_decimal": "0.5",
        "recurring": {"interval": "month", "usage_type": "metered"},
    }
    assert describe_price(metered) == "€0.005 / month per unit used"
    quarterly = {
        "currency": "chf",
        "unit_amount": 9000,
        "recurring": {"interval": "month", "interval_count": 3},
    }
    assert describe_price(quarterly) == "CHF 90.00 every 3 months"
    assert describe_price({"currency": "usd"}) == "Usage-based; see checkout"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_stripe_shows_a_clear_fallback_and_keeps_what_it_knew() -> None:
    client = stripe.StripeClient(
        "sk_test_portal",
        base_addresses={"api": f"http://127.0.0.1:{closed_port()}"},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=1),
    )
    now = [0.0]

    async def price_id(plan: str) -> str:
        return "price_x"

    async def run() -> tuple[str, str]:
        prices = Prices(client, price_id, clock=lambda: now[0])
        first = await prices.of_plan("basic")
        prices._cache["price_x"] = (0.0, "$1.00 / month")  # what an earlier read said
        now[0] = 301.0  # stale: asked again, Stripe still down
        return first or "", await prices.of_price("price_x")

    first, stale = asyncio.run(run())
    assert first == UNAVAILABLE
    assert stale == "$1.00 / month"


def test_every_value_on_a_page_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    plan = views.PlanCard(evil, "1 request/s", 1, "", (evil,), evil, True)
    page = views.pricing_page([plan], [], portal=evil, csrf='"><x>')
    assert "<script>alert" not in page and '"><x>' not in page
    row = views.KeyRow("key_1", evil, "active", 0, 0, 0, True)
    dashboard = views.Dashboard(
        customer_id=evil,
        plan=evil,
        status=evil,
        grace_until=0,
        now=0,
        rate="1 request/s",
        burst=1,
        tokens=1,
        quota_limit=0,
        quota_used=0,
        quota_period="month",
        quota_resets=0,
        meters=(views.MeterUsage(evil, 1, 0, 1, ((0, 1),)),),
        keys=(row,),
        credits=None,
        notice=evil,
        errors=(evil,),
    )
    html = views.dashboard_page(dashboard, portal="x", csrf="t")
    assert "<script>alert" not in html
    assert html.count("&lt;script&gt;") >= 5
