"""FakeStripe speaks Stripe well enough for the real stripe SDK, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import stripe
from stripe.params import PaymentIntentCreateParams
from stripe.params.billing import MeterEventCreateParams

from tests.fakestripe import API_VERSION, FakeStripe, make_event, parse_form, sign_payload

pytestmark = pytest.mark.servers  # starts its own servers

MakeClient = Callable[..., stripe.StripeClient]


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        server.add_price("price_basic", lookup_key="basic_monthly", unit_amount=900)
        server.add_price("price_pro", lookup_key="pro_monthly", unit_amount=4900)
        yield server


@pytest.fixture
def make_client(fake: FakeStripe) -> Iterator[MakeClient]:
    """StripeClients on the fake; their HTTP clients are closed afterwards."""
    http_clients: list[stripe.HTTPXClient] = []

    def make(api_key: str = "sk_test_fake", *, retries: int = 0) -> stripe.StripeClient:
        http_client = stripe.HTTPXClient(allow_sync_methods=True)
        http_clients.append(http_client)
        return stripe.StripeClient(
            api_key,
            base_addresses={"api": fake.url},
            http_client=http_client,
            max_network_retries=retries,
        )

    yield make
    for http_client in http_clients:
        http_client.close()  # type: ignore[no-untyped-call]
        asyncio.run(http_client.close_async())  # type: ignore[no-untyped-call]


def as_dict(obj: object) -> object:
    return obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj


@pytest.fixture
def client(make_client: MakeClient) -> stripe.StripeClient:
    return make_client()


def test_form_encoding_nests_brackets() -> None:
    pairs = [
        ("line_items[0][price]", "p"),
        ("line_items[0][quantity]", "2"),
        ("metadata[tollway_plan]", "pro"),
        ("metadata[0]", "zero"),
        ("expand[]", "a"),
        ("expand[]", "b"),
        ("payload[value]", "5"),
    ]
    assert parse_form(pairs) == {
        "line_items": [{"price": "p", "quantity": "2"}],
        "metadata": {"tollway_plan": "pro", "0": "zero"},
        "expand": ["a", "b"],
        "payload": {"value": "5"},
    }


def test_checkout_session_lifecycle(fake: FakeStripe, client: stripe.StripeClient) -> None:
    session = client.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "line_items": [{"price": "price_pro", "quantity": 1}],
            "customer_email": "ada@example.com",
            "success_url": "https://app.test/ok",
            "cancel_url": "https://app.test/no",
            "metadata": {"tollway_plan": "pro"},
            "subscription_data": {"metadata": {"tollway_plan": "pro"}},
        }
    )
    assert session.id.startswith("cs_test_")
    assert (session.status, session.payment_status, session.mode) == (
        "open",
        "unpaid",
        "subscription",
    )
    assert session.url == f"{fake.url}/c/pay/{session.id}"  # its hosted page, served too
    assert as_dict(session.metadata) == {"tollway_plan": "pro"}
    assert session.customer is None and session.subscription is None

    sent = fake.calls("POST", "/v1/checkout/sessions")[0]
    assert sent.params["line_items"] == [{"price": "price_pro", "quantity": "1"}]
    assert sent.params["subscription_data"] == {"metadata": {"tollway_plan": "pro"}}
    assert sent.stripe_version == API_VERSION and sent.idempotency_key

    expanded = client.v1.checkout.sessions.retrieve(session.id, {"expand": ["line_items"]})
    assert expanded.line_items is not None
    assert [li.price.id for li in expanded.line_items.data if li.price] == ["price_pro"]
    assert expanded.line_items.data[0].amount_total == 4900
    listed = client.v1.checkout.sessions.line_items.list(session.id)
    assert [li.quantity for li in listed.data] == [1]

    fake.complete_checkout(session.id)
    done = client.v1.checkout.sessions.retrieve(session.id)
    assert (done.status, done.payment_status, done.url) == ("complete", "paid", None)
    assert isinstance(done.customer, str) and isinstance(done.subscription, str)
    sub = client.v1.subscriptions.retrieve(done.subscription, {"expand": ["customer"]})
    assert sub.status == "active" and as_dict(sub.metadata) == {"tollway_plan": "pro"}
    assert isinstance(sub.customer, stripe.Customer) and sub.customer.email == "ada@example.com"
    item = sub["items"].data[0]
    assert item.price.id == "price_pro"
    assert item.current_period_start < item.current_period_end
    assert "current_period_end" not in sub
    # The card typed in is the subscription's default, attached to the customer; the
    # customer's invoice default is not set (Checkout never sets it).
    card = sub.default_payment_method
    assert isinstance(card, str) and card.startswith("pm_")
    assert fake.payment_method(card)["customer"] == done.customer
    assert fake.customer(done.customer)["invoice_settings"]["default_payment_method"] is None


def test_prices_filter_by_lookup_key(client: stripe.StripeClient) -> None:
    prices = client.v1.prices.list({"lookup_keys": ["pro_monthly"]})
    assert [p.id for p in prices.data] == ["price_pro"]
    assert client.v1.prices.retrieve("price_basic").unit_amount == 900


def test_subscription_list_auto_paginates(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = fake.create_customer("many@example.com")
    made = {fake.create_subscription(customer, "price_basic")["id"] for _ in range(25)}
    gone = fake.create_subscription(customer, "price_basic")["id"]
    fake.update_subscription(gone, status="canceled")

    listing = client.v1.subscriptions.list({"customer": customer, "limit": 10})
    seen = [sub.id for sub in listing.auto_paging_iter()]
    assert len(seen) == 25 and set(seen) == made
    assert len(fake.calls("GET", "/v1/subscriptions")) == 3
    everything = client.v1.subscriptions.list({"customer": customer, "status": "all", "limit": 100})
    assert len(everything.data) == 26


def test_subscription_update_and_cancel(fake: FakeStripe, client: stripe.StripeClient) -> None:
    sub_id = fake.create_subscription("cus_fixture01", "price_basic", metadata={"a": "1"})["id"]
    updated = client.v1.subscriptions.update(
        sub_id, {"metadata": {"b": "2"}, "cancel_at_period_end": True}
    )
    assert as_dict(updated.metadata) == {"a": "1", "b": "2"} and updated.cancel_at_period_end
    assert updated.cancel_at == updated["items"].data[0].current_period_end

    fake.update_subscription(sub_id, price="price_pro")
    assert fake.subscription(sub_id)["items"]["data"][0]["price"]["id"] == "price_pro"

    canceled = client.v1.subscriptions.cancel(sub_id)
    assert canceled.status == "canceled" and canceled.ended_at is not None


def test_billing_portal_session(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create({"email": "bo@example.com"})
    assert customer.id.startswith("cus_") and not customer.livemode
    portal = client.v1.billing_portal.sessions.create(
        {"customer": customer.id, "return_url": "https://app.test/account"}
    )
    assert portal.id.startswith("bps_") and portal.object == "billing_portal.session"
    assert portal.customer == customer.id and portal.return_url == "https://app.test/account"
    assert portal.url == f"{fake.url}/p/session/{portal.id}"


def test_meter_events_refuse_a_repeated_identifier(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    params: MeterEventCreateParams = {
        "event_name": "tollway_requests",
        "payload": {"stripe_customer_id": "cus_meter01", "value": "5"},
        "identifier": "usage-1",
        "timestamp": int(time.time()),
    }
    event = client.v1.billing.meter_events.create(params)
    assert (event.object, event.identifier, event.payload["value"]) == (
        "billing.meter_event",
        "usage-1",
        "5",
    )
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.billing.meter_events.create(params)
    assert raised.value.http_status == 400
    assert raised.value.user_message and "usage-1" in raised.value.user_message
    assert [e["identifier"] for e in fake.meter_events] == ["usage-1"]


def test_unknown_price_is_a_user_facing_error(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.checkout.sessions.create(
            {"mode": "subscription", "line_items": [{"price": "price_nope", "quantity": 1}]}
        )
    error = raised.value
    assert error.user_message == "No such price: 'price_nope'"
    assert (error.code, error.param, error.http_status) == (
        "resource_missing",
        "line_items[0][price]",
        400,
    )


def test_missing_or_bad_api_key(fake: FakeStripe, make_client: MakeClient) -> None:
    # The SDK cannot send an empty key ("Bearer " is not a legal header value), so the
    # wire-level "no key at all" case is a plain HTTP request.
    answer = httpx.get(f"{fake.url}/v1/customers/cus_x")
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.AuthenticationError) as raised:
        # A live-mode key the fake refuses; built from parts so no scanner mistakes it
        # for a real secret.
        make_client("sk_live_" + "fake").v1.customers.retrieve("cus_x")
    assert raised.value.http_status == 401 and raised.value.user_message
    assert fake.calls("GET", "/v1/customers/cus_x")[-1].status == 401


def test_webhook_signatures(fake: FakeStripe) -> None:
    sub = fake.create_subscription("cus_hook01", "price_basic")
    payload = json.dumps(make_event("customer.subscription.created", sub)).encode()
    header = sign_payload(payload, "whsec_new", extra_secrets=["whsec_old"])
    event = stripe.Webhook.construct_event(payload, header, "whsec_old")
    assert event.type == "customer.subscription.created" and event.data.object.id == sub["id"]
    assert event.api_version == API_VERSION
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, "whsec_wrong")


def test_async_retrieve(fake: FakeStripe) -> None:
    sub_id = fake.create_subscription("cus_async01", "price_pro")["id"]
    http_client = stripe.HTTPXClient(allow_sync_methods=True)
    client = stripe.StripeClient(
        "sk_test_fake",
        base_addresses={"api": fake.url},
        http_client=http_client,
        max_network_retries=0,
    )

    async def fetch() -> stripe.Subscription:
        try:
            return await client.v1.subscriptions.retrieve_async(sub_id)
        finally:
            # in the loop its connections belong to
            await http_client.close_async()  # type: ignore[no-untyped-call]

    try:
        assert asyncio.run(fetch()).id == sub_id
    finally:
        http_client.close()  # type: ignore[no-untyped-call]


def test_the_sdk_retries_an_injected_500(fake: FakeStripe, make_client: MakeClient) -> None:
    fake.fail_next(1, status=500)
    customer = make_client(retries=2).v1.customers.create({"email": "retry@example.com"})
    attempts = fake.calls("POST", "/v1/customers")
    assert [a.status for a in attempts] == [500, 200]
    assert attempts[0].idempotency_key == attempts[1].idempotency_key
    assert fake.customer(customer.id)["email"] == "retry@example.com"


def test_idempotency_key_replays_the_first_answer(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    options: stripe.RequestOptions = {"idempotency_key": "create-cus-1"}
    first = client.v1.customers.create({"email": "once@example.com"}, options)
    again = client.v1.customers.create({"email": "once@example.com"}, options)
    assert first.id == again.id
    assert [r.replayed for r in fake.calls("POST", "/v1/customers")] == [False, True]
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create({"email": "other@example.com"}, options)


def test_faults(fake: FakeStripe, make_client: MakeClient) -> None:
    client = make_client()
    fake.fail_next(1, status=429)
    with pytest.raises(stripe.RateLimitError):
        client.v1.prices.retrieve("price_basic")
    fake.drop_next(1)
    with pytest.raises(stripe.APIConnectionError):
        client.v1.prices.retrieve("price_basic")
    fake.delay_next(1, 0.3)
    started = time.monotonic()
    client.v1.prices.retrieve("price_basic")
    assert time.monotonic() - started >= 0.3

    # Applied, answer lost: the SDK's retry (same Idempotency-Key) gets the saved answer.
    fake.accept_then_drop_next(1, path_prefix="/v1/billing/meter_events")
    event = make_client(retries=1).v1.billing.meter_events.create(
        {"event_name": "e", "payload": {"stripe_customer_id": "cus_lost01", "value": "1"}}
    )
    assert [e["identifier"] for e in fake.meter_events] == [event.identifier]
    attempts = fake.calls("POST", "/v1/billing/meter_events")
    assert [(a.status, a.replayed) for a in attempts] == [(None, False), (200, True)]


# -- one-time payments ---------------------------------------------------------------------


@pytest.fixture
def one_time(fake: FakeStripe) -> str:
    price = fake.add_price(
        "price_credits", product="prod_credits", unit_amount=2500, recurring=False
    )
    assert (price["type"], price["recurring"]) == ("one_time", None)
    return "price_credits"


def test_payment_checkout_lifecycle(
    fake: FakeStripe, client: stripe.StripeClient, one_time: str
) -> None:
    session = client.v1.checkout.sessions.create(
        {
            "mode": "payment",
            "line_items": [{"price": one_time, "quantity": 2}],
            "customer_email": "pay@example.com",
            "customer_creation": "always",
            "success_url": "https://app.test/ok",
            "metadata": {"tollway_pack": "credits"},
            "payment_intent_data": {
                "setup_future_usage": "off_session",
                "metadata": {"tollway_pack": "credits"},
            },
            "invoice_creation": {"enabled": True},
        }
    )
    assert (session.mode, session.status, session.payment_status) == ("payment", "open", "unpaid")
    assert (session.amount_total, session.currency) == (5000, "usd")
    assert session.payment_intent is None and session.subscription is None
    assert session.customer is None and session.customer_creation == "always"
    listed = client.v1.checkout.sessions.line_items.list(session.id)
    assert [(li.price.id, li.quantity) for li in listed.data if li.price] == [(one_time, 2)]
    assert listed.data[0].price and listed.data[0].price.recurring is None

    completed = fake.complete_checkout(session.id)
    done = client.v1.checkout.sessions.retrieve(session.id, {"expand": ["payment_intent"]})
    assert (done.status, done.payment_status, done.url) == ("complete", "paid", None)
    assert done.subscription is None and isinstance(done.customer, str)
    assert completed["payment_intent"] == fake.checkout_session(session.id)["payment_intent"]
    intent = done.payment_intent
    assert isinstance(intent, stripe.PaymentIntent)
    assert (intent.status, intent.amount, intent.customer) == ("succeeded", 5000, done.customer)
    assert as_dict(intent.metadata) == {"tollway_pack": "credits"}
    assert intent.payment_method and intent.payment_method.startswith("pm_")  # type: ignore[union-attr]
    assert isinstance(intent.latest_charge, str) and intent.latest_charge.startswith("ch_")
    customer = client.v1.customers.retrieve(done.customer)
    assert customer.email == "pay@example.com"
    # setup_future_usage attaches the card to the customer, and only that: the
    # customer's invoice default stays unset, as on Stripe.
    assert customer.invoice_settings is not None
    assert customer.invoice_settings.default_payment_method is None
    assert fake.payment_method(str(intent.payment_method))["customer"] == done.customer
    cards = client.v1.customers.payment_methods.list(done.customer, {"type": "card"})
    assert [m.id for m in cards.data] == [intent.payment_method]
    assert [pi["id"] for pi in fake.payment_intents(done.customer)] == [intent.id]

    event = make_event("checkout.session.completed", completed)
    payload = json.dumps(event).encode()
    parsed = stripe.Webhook.construct_event(payload, sign_payload(payload, "whsec_x"), "whsec_x")
    assert parsed.data.object.mode == "payment"
    assert parsed.data.object.payment_intent == intent.id


def test_payment_checkout_without_saving_needs_no_customer(
    fake: FakeStripe, client: stripe.StripeClient, one_time: str
) -> None:
    session = client.v1.checkout.sessions.create(
        {
            "mode": "payment",
            "line_items": [{"price": one_time}],
            "customer_email": "guest@example.com",
        }
    )
    assert session.customer_creation == "if_required"
    completed = fake.complete_checkout(session.id)
    assert completed["customer"] is None and completed["payment_status"] == "paid"
    assert completed["customer_details"]["email"] == "guest@example.com"
    intent = fake.payment_intent(completed["payment_intent"])
    assert (intent["customer"], intent["setup_future_usage"]) == (None, None)
    assert fake.payment_method(intent["payment_method"])["customer"] is None


def test_checkout_mode_must_match_the_prices(client: stripe.StripeClient, one_time: str) -> None:
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.checkout.sessions.create(
            {"mode": "payment", "line_items": [{"price": "price_pro", "quantity": 1}]}
        )
    assert raised.value.param == "line_items[0][price]"
    assert raised.value.user_message and "recurring price" in raised.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.checkout.sessions.create(
            {"mode": "subscription", "line_items": [{"price": one_time, "quantity": 1}]}
        )
    assert raised.value.user_message and "at least one recurring price" in raised.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.checkout.sessions.create(
            {
                "mode": "subscription",
                "line_items": [{"price": "price_pro"}],
                "payment_intent_data": {"metadata": {"a": "b"}},
            }
        )
    assert raised.value.param == "payment_intent_data"
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.checkout.sessions.create(
            {
                "mode": "payment",
                "line_items": [{"price": one_time}],
                "payment_intent_data": {"setup_future_usage": "sometimes"},
            }
        )
    assert raised.value.param == "payment_intent_data[setup_future_usage]"


def test_off_session_payment_intent_with_the_saved_card(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = fake.create_customer("saved@example.com")
    assert fake.customer(customer)["invoice_settings"]["default_payment_method"] is None
    pm = fake.attach_payment_method(customer)
    settings = client.v1.customers.retrieve(customer).invoice_settings
    assert settings is not None and settings.default_payment_method == pm
    intent = client.v1.payment_intents.create(
        {
            "amount": 1200,
            "currency": "usd",
            "customer": customer,
            "payment_method": str(settings.default_payment_method),
            "off_session": True,
            "confirm": True,
            "metadata": {"tollway_invoice": "inv-1"},
            "description": "Tollway overage",
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "expand": ["latest_charge"],
        }
    )
    assert (intent.status, intent.amount_received, intent.payment_method) == ("succeeded", 1200, pm)
    assert isinstance(intent.latest_charge, stripe.Charge) and intent.latest_charge.paid
    assert client.v1.payment_intents.retrieve(intent.id).metadata["tollway_invoice"] == "inv-1"
    listing = client.v1.payment_intents.list({"customer": customer})
    assert [pi.id for pi in listing.data] == [intent.id]
    assert client.v1.payment_intents.list({"customer": "cus_nobody"}).data == []
    methods = client.v1.customers.payment_methods.list(customer)
    assert [m.id for m in methods.data] == [pm]


def test_a_customers_cards_are_listed_newest_first_by_either_endpoint(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = fake.create_customer("cards@example.com")
    older = fake.attach_payment_method(customer, default=False)
    newer = fake.attach_payment_method(customer, default=False)
    fake.attach_payment_method(fake.create_customer("other@example.com"))  # not theirs
    assert fake.customer(customer)["invoice_settings"]["default_payment_method"] is None
    by_customer = client.v1.customers.payment_methods.list(customer, {"type": "card"})
    assert [m.id for m in by_customer.data] == [newer, older]
    by_filter = client.v1.payment_methods.list({"customer": customer, "type": "card"})
    assert [m.id for m in by_filter.data] == [newer, older]
    first = client.v1.payment_methods.list({"customer": customer, "limit": 1})
    assert [m.id for m in first.data] == [newer] and first.has_more
    assert client.v1.payment_methods.list({"customer": customer, "type": "sepa_debit"}).data == []
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.payment_methods.list({"customer": "cus_nobody"})
    assert raised.value.http_status == 400 and raised.value.param == "customer"


def test_payment_intent_idempotency(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = fake.create_customer("idem@example.com")
    pm = fake.attach_payment_method(customer)
    params: PaymentIntentCreateParams = {
        "amount": 700,
        "currency": "usd",
        "customer": customer,
        "payment_method": pm,
        "off_session": True,
        "confirm": True,
    }
    options: stripe.RequestOptions = {"idempotency_key": "charge-inv-7"}
    first = client.v1.payment_intents.create(params, options)
    again = client.v1.payment_intents.create(params, options)
    assert first.id == again.id and again.status == "succeeded"
    assert len(fake.payment_intents(customer)) == 1
    assert [r.replayed for r in fake.calls("POST", "/v1/payment_intents")] == [False, True]
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.create({**params, "amount": 800}, options)
    assert len(fake.payment_intents(customer)) == 1


def test_declined_card_is_a_card_error(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = fake.create_customer("broke@example.com")
    pm = fake.attach_payment_method(customer)
    fake.decline_payment_methods_of(customer)
    params: PaymentIntentCreateParams = {
        "amount": 900,
        "currency": "usd",
        "customer": customer,
        "payment_method": pm,
        "off_session": True,
        "confirm": True,
    }
    options: stripe.RequestOptions = {"idempotency_key": "declined-1"}
    with pytest.raises(stripe.CardError) as raised:
        client.v1.payment_intents.create(params, options)
    error = raised.value
    assert (error.http_status, error.code) == (402, "card_declined")
    assert error.user_message == "Your card has insufficient funds."
    assert error.error is not None and error.error.type == "card_error"
    assert error.error.decline_code == "insufficient_funds"
    failed = error.error.payment_intent
    assert failed is not None and failed.status == "requires_payment_method"
    assert (
        failed.last_payment_error and failed.last_payment_error.decline_code == "insufficient_funds"
    )
    assert isinstance(error.error.charge, str) and error.error.charge == failed.latest_charge
    assert error.error.payment_method is not None and error.error.payment_method.id == pm

    # The attempt is remembered: a retry with the key replays the decline, makes nothing new.
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(params, options)
    recorded = fake.payment_intents(customer)
    assert [pi["id"] for pi in recorded] == [failed.id]
    assert recorded[0]["status"] == "requires_payment_method"
    assert recorded[0]["payment_method"] is None

    event = make_event("payment_intent.payment_failed", recorded[0])
    payload = json.dumps(event).encode()
    parsed = stripe.Webhook.construct_event(payload, sign_payload(payload, "whsec_x"), "whsec_x")
    assert parsed.type == "payment_intent.payment_failed"
    assert parsed.data.object.last_payment_error.decline_code == "insufficient_funds"

    fake.accept_payment_methods_of(customer)
    paid = client.v1.payment_intents.create(params)
    assert paid.status == "succeeded"
    event = make_event("payment_intent.succeeded", fake.payment_intent(paid.id))
    assert event["data"]["object"]["status"] == "succeeded"


def test_other_decline_codes(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = fake.create_customer()
    pm = fake.attach_payment_method(customer)
    fake.decline_payment_methods_of(customer, code="expired_card", decline_code=None)
    with pytest.raises(stripe.CardError) as raised:
        client.v1.payment_intents.create(
            {
                "amount": 900,
                "currency": "usd",
                "customer": customer,
                "payment_method": pm,
                "off_session": True,
                "confirm": True,
            }
        )
    assert raised.value.code == "expired_card"
    assert raised.value.error and raised.value.error.decline_code is None
    assert raised.value.user_message == "Your card has expired."


def test_payment_intent_without_a_payment_method(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = fake.create_customer("nocard@example.com")
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client.v1.payment_intents.create(
            {
                "amount": 900,
                "currency": "usd",
                "customer": customer,
                "off_session": True,
                "confirm": True,
            }
        )
    error = raised.value
    assert (error.http_status, error.param) == (400, "payment_method")
    assert error.code == "payment_intent_unexpected_state"
    assert error.user_message and "missing a payment method" in error.user_message
    assert error.error and error.error.payment_intent
    assert error.error.payment_intent.status == "requires_payment_method"

    # Unconfirmed, it waits; confirming later with a card pays it.
    pending = client.v1.payment_intents.create(
        {"amount": 900, "currency": "usd", "customer": customer}
    )
    assert pending.status == "requires_payment_method"
    pm = fake.attach_payment_method(customer)
    paid = client.v1.payment_intents.confirm(
        pending.id, {"payment_method": pm, "off_session": True}
    )
    assert paid.status == "succeeded"


def test_payment_intent_parameters_are_checked(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    customer = fake.create_customer()
    pm = fake.attach_payment_method(customer)
    cases: list[tuple[dict[str, object], str | None]] = [
        ({"currency": "usd"}, "amount"),
        ({"amount": 900}, "currency"),
        ({"amount": 10, "currency": "usd"}, "amount"),
        ({"amount": 900, "currency": "usd", "off_session": True}, "off_session"),
        ({"amount": 900, "currency": "usd", "customer": "cus_nope"}, "customer"),
        ({"amount": 900, "currency": "usd", "payment_method": "pm_nope"}, "payment_method"),
        ({"amount": 900, "currency": "usd", "payment_method": pm}, "payment_method"),
        ({"amount": 900, "currency": "usd", "capture": "now"}, "capture"),
    ]
    for params, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as raised:
            client.v1.payment_intents.create(params)  # type: ignore[arg-type]
        assert raised.value.param == param, params
    assert fake.payment_intents() == []


def test_one_time_prices_are_not_for_subscriptions(fake: FakeStripe, one_time: str) -> None:
    with pytest.raises(ValueError):
        fake.create_subscription("cus_once01", one_time)
    assert fake.add_price("price_legacy")["type"] == "recurring"


def test_the_hosted_checkout_page_pays_and_goes_to_the_success_url(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    import httpx

    session = client.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "line_items": [{"price": "price_pro", "quantity": 1}],
            "customer_email": "cy@example.com",
            "success_url": "https://app.test/ok?session_id={CHECKOUT_SESSION_ID}",
        }
    )
    assert session.url is not None
    page = httpx.get(session.url)
    assert page.status_code == 200 and "id='pay'" in page.text
    paid = httpx.post(session.url)
    assert paid.status_code == 303
    assert paid.headers["location"] == f"https://app.test/ok?session_id={session.id}"
    done = fake.checkout_session(session.id)
    assert done["status"] == "complete" and done["subscription"] is not None
    assert httpx.get(f"{fake.url}/c/pay/cs_unknown").status_code == 404
