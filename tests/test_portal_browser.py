"""The developer portal in a real headless Chromium (tests/browser.py), against
the companion, the fake Stripe's hosted Checkout page, and the session's real
Envoy and sidecar: what a buyer and a customer see and do, click by click.

Screenshots of every page land in the artifacts directory (.tollway/artifacts/
or TOLLWAY_ARTIFACTS); the README's dashboard picture is one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions

from tests.browser import WebDriver, browser_fixture, screenshot, text_of, wait_for
from tests.conftest import Customer, PortalStack, eventually

pytestmark = pytest.mark.servers

__all__ = ["browser_fixture"]  # the `browser` fixture, used below

MakeCustomer = Callable[..., Customer]


@pytest.fixture(autouse=True)
def fresh(browser: WebDriver, portal_stack: PortalStack) -> Iterator[None]:
    """Each test starts signed out, as a new visitor."""
    browser.get(portal_stack.url + "/pricing")
    browser.delete_all_cookies()
    yield


def through_envoy(portal_stack: PortalStack, key: str) -> int:
    return httpx.get(f"{portal_stack.envoy}/v1/x", headers={"x-api-key": key}).status_code


def sign_in(browser: WebDriver, portal_stack: PortalStack, key: str) -> None:
    browser.get(portal_stack.url + "/sign-in")
    browser.find_element(By.NAME, "api_key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "form.stack button").click()
    wait_for(browser, lambda b: b.current_url.endswith("/dashboard"))


def shown(browser: WebDriver, css: str) -> str:
    """The text of css once the page (perhaps still loading after a click) has it."""
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, css))
    return text_of(browser, css)


def click(browser: WebDriver, css: str, *, confirm: bool = False) -> None:
    browser.find_element(By.CSS_SELECTOR, css).click()
    if confirm:
        wait_for(browser, expected_conditions.alert_is_present()).accept()


def test_a_buyer_goes_from_pricing_through_checkout_to_a_key_that_works(
    browser: WebDriver, portal_stack: PortalStack, fake_stripe: object
) -> None:
    browser.get(portal_stack.url + "/pricing")
    screenshot(browser, "portal-pricing")
    plan = browser.find_element(By.CSS_SELECTOR, 'section[data-plan="basic"]')
    assert "$10.00 / month" in plan.text
    plan.find_element(By.NAME, "email").send_keys("browser-buyer@example.com")
    plan.find_element(By.TAG_NAME, "button").click()
    wait_for(browser, lambda b: "/c/pay/" in b.current_url)  # Stripe's hosted page
    screenshot(browser, "portal-stripe-checkout")
    click(browser, "#pay")
    wait_for(browser, lambda b: "/checkout/complete" in b.current_url)
    key = shown(browser, "#api-key")
    assert key.startswith("tw_test_")
    assert key in text_of(browser, "#curl") and portal_stack.envoy in text_of(browser, "#curl")
    screenshot(browser, "portal-checkout-complete")
    click(browser, "button.copy")
    assert browser.find_element(By.CSS_SELECTOR, "button.copy").text in ("Copied", "Press Ctrl+C")
    assert through_envoy(portal_stack, key) == 200
    browser.find_element(By.LINK_TEXT, "Go to your dashboard").click()
    wait_for(browser, lambda b: b.current_url.endswith("/dashboard"))
    assert "Plan basic" in text_of(browser, "main")
    assert key not in browser.page_source  # shown once, on the page before


def test_the_dashboard_counts_a_burst_of_traffic_through_envoy(
    browser: WebDriver, portal_stack: PortalStack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("metered")
    statuses = [through_envoy(portal_stack, customer.key) for _ in range(6)]
    assert statuses == [200] * 6
    sign_in(browser, portal_stack, customer.key)

    def counted() -> bool:
        browser.refresh()
        meter = browser.find_element(By.CSS_SELECTOR, 'div[data-meter="api_calls"] .used')
        return meter.text == "6"

    eventually(counted, within=5.0, every=0.2)  # settled through the access log
    assert text_of(browser, "#quota-used") == "6"
    bars = browser.find_elements(By.CSS_SELECTOR, 'div[data-meter="api_calls"] rect.bar')
    assert sum(int(bar.get_attribute("data-units") or 0) for bar in bars) == 6
    screenshot(browser, "portal-dashboard")


def test_rotate_and_revoke_from_the_dashboard_take_effect_through_envoy_within_a_second(
    browser: WebDriver, portal_stack: PortalStack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    sign_in(browser, portal_stack, customer.key)
    click(browser, 'form[action="/dashboard/keys"] button')
    second = shown(browser, "#api-key")
    assert through_envoy(portal_stack, second) == 200
    screenshot(browser, "portal-new-key")

    # Revoke the second key (the dashboard asks first).
    click(
        browser,
        f'tr[data-key] form.confirm input[value="{key_id_of(browser, second)}"] ~ button',
        confirm=True,
    )
    wait_for(browser, lambda b: "notice=revoked" in b.current_url)
    # eventually fails past 1 s: the revocation reaches Envoy's answers within a second.
    eventually(lambda: through_envoy(portal_stack, second) in (401, 403), within=1.0)

    # Rotate the signed-in key, the old one stopping at once.
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-key="{customer.key_id}"]')
    row.find_element(By.CSS_SELECTOR, 'select[name="overlap"] option[value="0"]').click()
    row.find_element(By.CSS_SELECTOR, 'form[action="/dashboard/keys/rotate"] button').click()
    wait_for(browser, lambda b: b.find_elements(By.ID, "api-key"))
    third = text_of(browser, "#api-key")
    eventually(lambda: through_envoy(portal_stack, customer.key) in (401, 403), within=1.0)
    assert through_envoy(portal_stack, third) == 200
    browser.get(portal_stack.url + "/dashboard")  # still signed in: the session moved
    assert browser.current_url.endswith("/dashboard")


def key_id_of(browser: WebDriver, key: str) -> str:
    """The id of the key just shown: the one row not there before it (the newest)."""
    rows = browser.find_elements(By.CSS_SELECTOR, 'tr[data-key][data-state="active"]')
    return rows[-1].get_attribute("data-key") or ""


def test_a_customer_cannot_reach_anothers_keys_by_editing_the_page(
    browser: WebDriver, portal_stack: PortalStack, make_customer: MakeCustomer
) -> None:
    victim, intruder = make_customer("basic"), make_customer("basic")
    sign_in(browser, portal_stack, intruder.key)
    browser.get(portal_stack.url + f"/dashboard?customer={victim.id}")  # a guessed URL
    assert victim.id not in browser.page_source
    assert intruder.id in text_of(browser, "#customer")
    # Point the revoke form at the victim's key, as devtools would.
    browser.execute_script(
        "document.querySelector('form.confirm input[name=key_id]').value = arguments[0]",
        victim.key_id,
    )
    click(browser, "form.confirm button", confirm=True)
    assert "does not exist" in shown(browser, ".error")
    assert through_envoy(portal_stack, victim.key) == 200
    assert through_envoy(portal_stack, intruder.key) == 200


def test_a_form_stripped_of_its_csrf_token_changes_nothing(
    browser: WebDriver, portal_stack: PortalStack, make_customer: MakeCustomer
) -> None:
    customer = make_customer("basic")
    sign_in(browser, portal_stack, customer.key)
    screenshot(browser, "portal-dashboard-basic")
    browser.execute_script("document.querySelector('form.confirm input[name=csrf]').remove()")
    click(browser, "form.confirm button", confirm=True)
    wait_for(browser, lambda b: "This form expired" in b.page_source)
    assert through_envoy(portal_stack, customer.key) == 200
    browser.get(portal_stack.url + "/dashboard")
    assert len(browser.find_elements(By.CSS_SELECTOR, 'tr[data-state="active"]')) == 1


def test_a_sign_in_link_signs_in_once_and_leaves_the_address_bar(
    browser: WebDriver,
    portal_stack: PortalStack,
    make_customer: MakeCustomer,
    cli: Callable[..., object],
) -> None:
    customer = make_customer("basic")
    made = cli("--config", str(portal_stack.config), "portal", "link", "--customer", customer.id)
    url = made.stdout.split()[0]  # type: ignore[attr-defined]
    browser.get(url)
    assert "#token=" not in browser.current_url  # portal.js moved it into the form
    screenshot(browser, "portal-sign-in-link")
    click(browser, "#link-form button")
    wait_for(browser, lambda b: b.current_url.endswith("/dashboard"))
    assert customer.id in text_of(browser, "#customer")
    click(browser, 'form[action="/sign-out"] button')
    wait_for(browser, lambda b: "/sign-in" in b.current_url)
    screenshot(browser, "portal-sign-in")
    browser.get(url)  # the same link again
    click(browser, "#link-form button")
    assert "used already" in shown(browser, ".error")
