"""The developer portal over HTTP, as a browser (or an attacker's script) sends it:
a real companion, the fake Stripe and the session's Valkey and Envoy.

Each test is a claim a customer could check: what pricing shows, that a key
signs in without ever being kept in the browser, that sessions end when they
should, that one customer's session can neither see nor touch another's
keys, that every form needs its CSRF token, and that sign-in guessing is
slowed. The same pages in a real browser: tests/test_portal_browser.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sidecar.store import Store
from sidecar.store.names import portal_session_key
from tests.conftest import Customer, PortalStack, with_store

pytestmark = pytest.mark.servers

MakeCustomer = Callable[..., Customer]


def address() -> str:
    """A client address of the test's own (X-Forwarded-For, which the companion
    trusts from loopback as a proxy's): sign-in limits are per address."""
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"


@pytest.fixture
def visitor(portal_stack: PortalStack) -> Iterator[httpx.Client]:
    """A cookie jar speaking to the portal from an address of its own."""
    with httpx.Client(
        base_url=portal_stack.url, timeout=5.0, headers={"x-forwarded-for": address()}
    ) as client:
        yield client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match[1]


def sign_in(client: httpx.Client, key: str) -> httpx.Response:
    page = client.get("/sign-in")
    return client.post("/sign-in", data={"csrf": csrf_of(page.text), "api_key": key})


def signed_in(client: httpx.Client, key: str) -> str:
    """Signs in; returns the dashboard's HTML."""
    answer = sign_in(client, key)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/dashboard"
    dashboard = client.get("/dashboard")
    assert dashboard.status_code == 200
    return dashboard.text


def usable(redis_url: str, key: str) -> bool:
    async def work(store: Store) -> bool:
        return await store.usable_record(key) is not None

    result: bool = with_store(redis_url, work)
    return result


def key_ids(html: str) -> set[str]:
    return set(re.findall(r'<tr data-key="([^"]+)"', html))


# -- what every page carries -------------------------------------------------------------


def test_every_page_forbids_framing_inline_script_and_referrers(visitor: httpx.Client) -> None:
    for path in ("/pricing", "/sign-in", "/sign-in/link"):
        answer = visitor.get(path)
        assert answer.status_code == 200
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
        # Never stored: each page holds its visitor's CSRF token, most hold account data.
        assert answer.headers["cache-control"] == "no-store"
        assert "<script>" not in answer.text and " style=" not in answer.text


def test_pricing_lists_every_plan_with_its_stripe_price_and_the_credit_packs(
    visitor: httpx.Client, portal_stack: PortalStack
) -> None:
    page = visitor.get("/pricing").text
    # fake_stripe: price_basic and pro_monthly are $10.00 a month.
    basic = re.search(r'data-plan="basic">(.*?)</section>', page, re.S)
    assert basic and "$10.00 / month" in basic[1] and "10 requests/s, bursts of 5" in basic[1]
    assert "1,000 per month included" in basic[1] and 'name="plan" value="basic"' in basic[1]
    pro = re.search(r'data-plan="pro">(.*?)</section>', page, re.S)
    assert pro and "$10.00 / month" in pro[1] and "export" in pro[1]
    tight = re.search(r'data-plan="tight">(.*?)</section>', page, re.S)
    assert tight and "Not sold online" in tight[1] and "<form" not in tight[1]
    assert "starter" in page and "10 credits" in page and "1,000 credits" in page


def test_pricing_checkout_needs_the_pages_token_then_goes_to_stripe(
    visitor: httpx.Client, fake_stripe: Any
) -> None:
    page = visitor.get("/pricing").text
    form = {"plan": "basic", "email": "buyer@example.com"}
    assert visitor.post("/pricing/checkout", data=form).status_code == 403
    answer = visitor.post("/pricing/checkout", data={**form, "csrf": csrf_of(page)})
    assert answer.status_code == 303
    session_id = answer.headers["location"].rsplit("/", 1)[1]
    assert answer.headers["location"].startswith(fake_stripe.url + "/c/pay/cs_")
    session = fake_stripe.checkout_session(session_id)
    assert session["customer_email"] == "buyer@example.com"
    assert session["metadata"] == {"tollway_plan": "basic"}


# -- signing in ----------------------------------------------------------------------------


def test_a_key_signs_in_to_an_httponly_strict_session_cookie_that_is_not_the_key(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")
    answer = sign_in(visitor, customer.key)
    assert answer.status_code == 303
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and "tollway_session" in v
    )
    attributes = cookie.lower()
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "max-age=600" in attributes  # [portal] session_ttl = "10m"
    assert "secure" not in attributes  # served on loopback: a browser drops Secure over http
    assert customer.key not in cookie
    dashboard = visitor.get("/dashboard")
    assert dashboard.headers["cache-control"] == "no-store"
    assert customer.id in dashboard.text and customer.key not in dashboard.text
    assert key_ids(dashboard.text) == {customer.key_id}


def test_a_wrong_key_is_refused_without_saying_more(
    visitor: httpx.Client, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    answer = sign_in(visitor, customer.key[:-1] + ("A" if customer.key[-1] != "A" else "B"))
    assert answer.status_code == 401
    assert "not valid" in answer.text
    assert "tollway_session" not in answer.headers.get("set-cookie", "")
    assert visitor.get("/dashboard").headers["location"] == "/sign-in"


def test_sign_in_without_the_forms_token_is_refused(
    visitor: httpx.Client, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    visitor.get("/sign-in")  # the token cookie, but not the field
    answer = visitor.post("/sign-in", data={"api_key": customer.key})
    assert answer.status_code == 403
    assert visitor.get("/dashboard").status_code == 303


def test_sign_in_attempts_are_limited_per_key_prefix_and_per_address(
    portal_stack: PortalStack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    wrong = customer.key[:12] + "x" * (len(customer.key) - 12)
    statuses = []
    for _ in range(6):  # 5 a minute per key prefix, each from another address
        with httpx.Client(
            base_url=portal_stack.url, headers={"x-forwarded-for": address()}
        ) as client:
            statuses.append(sign_in(client, wrong).status_code)
    assert statuses == [401] * 5 + [429]
    # Signing in with a good key counts nothing: only failures do.
    with httpx.Client(base_url=portal_stack.url, headers={"x-forwarded-for": address()}) as me:
        good = make_customer("basic")
        statuses = []
        for _ in range(12):
            me.cookies.clear()  # signed out again, the same address
            statuses.append(sign_in(me, good.key).status_code)
        assert statuses == [303] * 12
    with httpx.Client(base_url=portal_stack.url, headers={"x-forwarded-for": address()}) as one:
        guesses = [sign_in(one, f"tw_test_{i:02d}").status_code for i in range(11)]
        assert guesses == [401] * 10 + [429]  # 10 a minute per address
        # The limit holds even for a good key, then: guessing cannot be mixed with it.
        assert sign_in(one, make_customer("basic").key).status_code == 429


# -- sessions end --------------------------------------------------------------------------


def test_a_revoked_key_ends_the_sessions_it_opened(
    visitor: httpx.Client, make_customer: MakeCustomer, cli: Callable[..., Any]
) -> None:
    customer = make_customer("basic")
    signed_in(visitor, customer.key)
    revoked = cli("keys", "revoke", "--customer", customer.id, customer.key_id)
    assert revoked.returncode == 0, revoked.stderr
    answer = visitor.get("/dashboard")
    assert answer.status_code == 303 and answer.headers["location"] == "/sign-in"


def test_sessions_expire(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")
    signed_in(visitor, customer.key)

    async def sessions(store: Store) -> list[tuple[str, int]]:
        found = []
        async for name in store.redis.scan_iter(match=portal_session_key("*")):
            record = json.loads(await store.redis.get(name) or "{}")
            if record.get("customer") == customer.id:
                found.append((name.decode(), await store.redis.ttl(name)))
        return found

    [(name, ttl)] = with_store(redis_url, sessions)
    assert 590 <= ttl <= 600  # Redis drops the record at session_ttl

    async def time_passes(store: Store) -> None:  # as if its ten minutes were up
        record = json.loads(await store.redis.get(name))
        record["expires_at"] = int(time.time()) - 1
        await store.redis.set(name, json.dumps(record), keepttl=True)

    with_store(redis_url, time_passes)
    assert visitor.get("/dashboard").headers["location"] == "/sign-in"


def test_sign_out_ends_the_session_for_good(
    visitor: httpx.Client, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    page = signed_in(visitor, customer.key)
    cookie = visitor.cookies["tollway_session"]
    out = visitor.post("/sign-out", data={"csrf": csrf_of(page)})
    assert out.status_code == 303 and out.headers["location"] == "/sign-in?notice=signed_out"
    visitor.cookies.set("tollway_session", cookie)  # a copy of the cookie kept somewhere
    assert visitor.get("/dashboard").headers["location"] == "/sign-in"


def test_a_forged_cookie_is_refused(visitor: httpx.Client) -> None:
    visitor.cookies.set("tollway_session", "a" * 43 + "." + "b" * 32)
    assert visitor.get("/dashboard").headers["location"] == "/sign-in"


def test_a_sign_in_link_from_the_cli_works_once(
    visitor: httpx.Client, make_customer: MakeCustomer, portal_stack: PortalStack, cli: Any
) -> None:
    customer = make_customer("basic")
    made = cli("--config", str(portal_stack.config), "portal", "link", "--customer", customer.id)
    assert made.returncode == 0, made.stderr
    url = made.stdout.split()[0]
    assert url.startswith(f"{portal_stack.url}/sign-in/link#token=")
    token = url.split("#token=", 1)[1]
    page = visitor.get("/sign-in/link")  # the fragment never reaches the server
    assert token not in page.text
    first = visitor.post("/sign-in/link", data={"csrf": csrf_of(page.text), "token": token})
    assert first.status_code == 303 and first.headers["location"] == "/dashboard"
    assert customer.id in visitor.get("/dashboard").text
    with httpx.Client(base_url=portal_stack.url, headers={"x-forwarded-for": address()}) as other:
        again = other.get("/sign-in/link")
        second = other.post("/sign-in/link", data={"csrf": csrf_of(again.text), "token": token})
        assert second.status_code == 400 and "used already" in second.text


# -- one customer, one account -------------------------------------------------------------


def test_a_session_can_neither_see_nor_touch_another_customers_keys(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    mine, theirs = make_customer("basic"), make_customer("basic")
    page = signed_in(visitor, mine.key)
    assert theirs.id not in page and theirs.key_id not in page
    token = csrf_of(page)
    # Their key id in my forms, and their customer id added for good measure.
    for action in ("revoke", "rotate"):
        answer = visitor.post(
            f"/dashboard/keys/{action}",
            data={"csrf": token, "key_id": theirs.key_id, "customer": theirs.id, "overlap": "0"},
        )
        assert answer.status_code == 400 and "does not exist" in answer.text
        assert theirs.id not in answer.text
    assert usable(redis_url, theirs.key)
    # A new key from my session is mine.
    made = visitor.post("/dashboard/keys", data={"csrf": token, "customer": theirs.id})
    assert made.status_code == 200
    assert key_ids(visitor.get("/dashboard").text) - {mine.key_id}
    with httpx.Client(base_url=visitor.base_url, headers={"x-forwarded-for": address()}) as them:
        assert key_ids(signed_in(them, theirs.key)) == {theirs.key_id}


def test_every_form_needs_the_sessions_own_token(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str, portal_stack: PortalStack
) -> None:
    mine, other = make_customer("basic"), make_customer("basic")
    signed_in(visitor, mine.key)
    with httpx.Client(base_url=portal_stack.url, headers={"x-forwarded-for": address()}) as them:
        their_token = csrf_of(signed_in(them, other.key))
    for token in (None, "", their_token):
        data = {"key_id": mine.key_id} | ({} if token is None else {"csrf": token})
        assert visitor.post("/dashboard/keys/revoke", data=data).status_code == 403
        assert visitor.post("/sign-out", data=data).status_code == 403
    assert usable(redis_url, mine.key)
    assert visitor.get("/dashboard").status_code == 200  # still signed in


# -- keys from the dashboard ---------------------------------------------------------------


def new_key_on(html: str) -> str:
    match = re.search(r'<code id="api-key">(tw_[A-Za-z0-9_]+)</code>', html)
    assert match, "no new key on the page"
    return match[1]


def test_a_key_made_on_the_dashboard_works_and_is_shown_only_once(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")
    page = signed_in(visitor, customer.key)
    form = {"csrf": csrf_of(page), "nonce": re.findall(r'name="nonce" value="([^"]+)"', page)[-1]}
    made = visitor.post("/dashboard/keys", data=form)
    key = new_key_on(made.text)
    assert made.headers["cache-control"] == "no-store"
    assert usable(redis_url, key)
    assert key not in visitor.get("/dashboard").text
    # The same form sent again (a double click, a reload) makes no second key.
    again = visitor.post("/dashboard/keys", data=form)
    assert "already created" in again.text and 'id="api-key"' not in again.text
    assert len(key_ids(visitor.get("/dashboard").text)) == 2


def test_rotating_the_signed_in_key_keeps_the_session_and_stops_the_old_key(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")
    page = signed_in(visitor, customer.key)
    rotated = visitor.post(
        "/dashboard/keys/rotate",
        data={"csrf": csrf_of(page), "key_id": customer.key_id, "overlap": "0", "nonce": "n1"},
    )
    assert rotated.status_code == 200
    new = new_key_on(rotated.text)
    assert usable(redis_url, new) and not usable(redis_url, customer.key)
    assert visitor.get("/dashboard").status_code == 200  # the session moved to the new key


def test_an_overlap_not_offered_is_refused(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")
    page = signed_in(visitor, customer.key)
    answer = visitor.post(
        "/dashboard/keys/rotate",
        data={"csrf": csrf_of(page), "key_id": customer.key_id, "overlap": "99999999"},
    )
    assert answer.status_code == 400 and usable(redis_url, customer.key)


# -- what the dashboard shows --------------------------------------------------------------


def test_the_dashboard_counts_this_months_metered_usage_per_day(
    visitor: httpx.Client, make_customer: MakeCustomer, tollway_stub: Any
) -> None:
    from sidecar.gen.tollway.v1 import tollway_pb2 as pb

    customer = make_customer("metered")
    for _ in range(7):
        decision = tollway_stub.Authorize(
            pb.AuthorizeRequest(api_key=customer.key, method="GET", path="/v1/x"), timeout=5
        )
        assert decision.allowed
    page = signed_in(visitor, customer.key)
    meter = re.search(r'data-meter="api_calls">(.*?)</div>', page, re.S)
    assert meter, page
    assert '<strong class="used">7</strong>' in meter[1]
    today = int(time.time()) // 86400 * 86400
    assert f'data-day="{today}" data-units="7"' in meter[1]
    assert '<strong id="quota-used">7</strong> of 10 this day' in page


def test_a_past_due_account_sees_its_grace_period_count_down(
    visitor: httpx.Client, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("basic")

    async def past_due(store: Store) -> None:
        await store.set_status(customer.id, "past_due", grace_until=int(time.time()) + 2 * 86400)

    with_store(redis_url, past_due)
    page = signed_in(visitor, customer.key)
    assert "Your last payment failed" in page
    assert re.search(r'class="countdown" data-until="\d+">(1 d 23 h 5\d|2 d 0 h 0) min<', page)


def test_checkout_complete_shows_the_key_once_with_a_working_snippet_and_signs_in(
    portal_stack: PortalStack, fake_stripe: Any, redis_url: str
) -> None:
    with httpx.Client(
        base_url=portal_stack.url, timeout=5.0, headers={"x-forwarded-for": address()}
    ) as client:
        page = client.get("/pricing").text
        started = client.post(
            "/pricing/checkout",
            data={"csrf": csrf_of(page), "plan": "basic", "email": "new@example.com"},
        )
        session_id = started.headers["location"].rsplit("/", 1)[1]
        fake_stripe.complete_checkout(session_id)
        done = client.get(f"/checkout/complete?session_id={session_id}")
        assert done.status_code == 200 and done.headers["cache-control"] == "no-store"
        key = new_key_on(done.text)
        assert f"curl -H &#x27;x-api-key: {key}&#x27; {portal_stack.envoy}/" in done.text
        assert 'class="copy"' in done.text
        assert f"base_url=&quot;{portal_stack.envoy}&quot;" in done.text  # the Python snippet
        assert usable(redis_url, key)
        assert (
            httpx.get(f"{portal_stack.envoy}/v1/x", headers={"x-api-key": key}).status_code == 200
        )
        dashboard = client.get("/dashboard")
        assert dashboard.status_code == 200 and "basic" in dashboard.text
        assert key not in dashboard.text
        # The billing button: Stripe's Billing Portal for this customer, back to here.
        billing = client.post("/dashboard/billing", data={"csrf": csrf_of(dashboard.text)})
        assert billing.status_code == 303 and "/p/session/bps_" in billing.headers["location"]
        opened = fake_stripe.calls("POST", "/v1/billing_portal/sessions")[-1].params
        customer = fake_stripe.checkout_session(session_id)["customer"]
        assert opened == {"customer": customer, "return_url": f"{portal_stack.url}/dashboard"}
        again = client.get(f"/checkout/complete?session_id={session_id}")
        assert again.status_code == 410 and key not in again.text


def test_the_cli_refuses_a_link_for_an_account_that_does_not_exist(
    cli: Callable[..., subprocess.CompletedProcess[str]], portal_stack: PortalStack
) -> None:
    made = cli("--config", str(portal_stack.config), "portal", "link", "--customer", "cus_nobody1")
    assert made.returncode == 1
    assert "cus_nobody1 does not exist" in made.stderr


def test_a_prepaid_account_sees_its_balance_and_buys_a_pack_through_checkout(
    visitor: httpx.Client, redis_url: str, fake_stripe: Any
) -> None:
    # add_price replaces a price of the same id: harmless if another module added it.
    fake_stripe.add_price(
        "price_pack_starter", product="prod_pack", recurring=False, unit_amount=500
    )
    import stripe

    from tests.conftest import STRIPE_SECRET

    client = stripe.StripeClient(STRIPE_SECRET, base_addresses={"api": fake_stripe.url})
    customer_id = client.v1.customers.create({"email": "prepaid@example.com"}).id

    async def prepaid_account(store: Store) -> str:
        await store.create_account(customer_id, "prepaid")
        key, _ = await store.issue_key(customer_id, environment="test")
        await store.grant_credits(
            customer_id, grant_id=f"g_{uuid.uuid4().hex[:8]}", credits=42, expires_at=0, reason="t"
        )
        return key

    key: str = with_store(redis_url, prepaid_account)
    page = signed_in(visitor, key)
    assert '<strong id="credits">42</strong>' in page
    # Its price as Stripe says it, or the fallback if an earlier page found it missing.
    assert re.search(r"Buy starter: 10 credits \((\$5\.00|Price shown at checkout)\)", page)
    bought = visitor.post("/dashboard/credits", data={"csrf": csrf_of(page), "pack": "starter"})
    assert bought.status_code == 303
    session_id = bought.headers["location"].rsplit("/", 1)[1]
    session = fake_stripe.checkout_session(session_id)
    assert session["mode"] == "payment" and session["customer"] == customer_id
    # A pack the catalog does not sell is refused on the page, and nothing is started.
    refused = visitor.post("/dashboard/credits", data={"csrf": csrf_of(page), "pack": "nope"})
    assert refused.status_code == 400 and "pack must be one of" in refused.text
