"""A Stripe-compatible API server on loopback, for driving the real stripe SDK in tests.

`FakeStripe` serves the handful of v1 endpoints Tollway uses, over real HTTP, with
objects shaped like API version 2026-10-28.endive: subscription billing periods live on
``items.data[].current_period_start/end``, subscriptions default to flexible billing
mode, usage is reported with billing meter events (legacy usage records do not exist).
It speaks Stripe's form encoding, answers errors in Stripe's error envelope, replays
idempotent POSTs, and can inject faults (5xx, 429, dropped connections, delays, and
"applied but the answer was lost").

One-time payments work too: ``add_price(..., recurring=False)`` makes a one_time price,
Checkout Sessions take ``mode=payment``, and PaymentIntents can be created (``confirm=true``
charges a card ``pm_...`` at once), retrieved, confirmed and listed. As on Stripe, a
PaymentIntent never picks the customer's invoice_settings.default_payment_method by itself:
pass it as ``payment_method``. Cards are kept where Stripe keeps them: Checkout never sets
the customer's invoice_settings.default_payment_method; a payment-mode Checkout with
setup_future_usage attaches its card to the customer, a subscription-mode one attaches it
and makes it the subscription's default_payment_method; a customer's cards are listed
newest first (``/v1/customers/:id/payment_methods``, ``/v1/payment_methods?customer=``).
Test control: ``attach_payment_method`` saves a card to the customer (by default as its
invoice default, as the Billing portal does), ``decline_payment_methods_of`` makes that
customer's cards decline (402 card_error), ``payment_intents()`` shows what was charged.

    with FakeStripe() as fake:
        fake.add_price("price_basic", lookup_key="basic_monthly")
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url}, ...)

Everything not listed in the routes below answers 404 like Stripe's unknown URLs.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import copy
import hashlib
import hmac
import json
import re
import secrets
import socket
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "API_VERSION",
    "DUPLICATE_METER_EVENT_MESSAGE",
    "FakeStripe",
    "RecordedRequest",
    "invoice_event",
    "make_event",
    "parse_form",
    "sign_payload",
]

API_VERSION = "2026-10-28.endive"

# Stripe refuses a v1 meter event whose identifier it has already seen (24 h window) with a
# 400 invalid_request_error. Observed bodies carry this message and no `code`; the v2 API
# documents the code `duplicate_meter_event`. Set FakeStripe.duplicate_meter_event_code to
# answer with a code too.
DUPLICATE_METER_EVENT_MESSAGE = "An event already exists with identifier {identifier}."

JSON = dict[str, Any]
Reply = tuple[int, dict[str, str], bytes]

_ALNUM = string.ascii_letters + string.digits
_NOT_LISTS = frozenset({"metadata", "payload"})
_SUBSCRIPTION_STATUSES = frozenset(
    {
        "active",
        "canceled",
        "incomplete",
        "incomplete_expired",
        "past_due",
        "paused",
        "trialing",
        "unpaid",
    }
)
_METER_EVENT_PAST = 35 * 24 * 3600
# The messages Stripe's card errors carry, by decline_code (card_declined) or by code.
_DECLINE_MESSAGES = {
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "authentication_required": "Your card was declined. This transaction requires authentication.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
}
_ADVICE_CODES = {"insufficient_funds": "try_again_later", "generic_decline": "do_not_try_again"}
_MISSING_PAYMENT_METHOD_MESSAGE = (
    "You cannot confirm this PaymentIntent because it's missing a payment method. You can "
    "either update the PaymentIntent with a payment method and then confirm it again, or "
    "confirm it again directly with a payment method."
)
_MIN_AMOUNT = {"usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "jpy": 50}
_MAX_AMOUNT = 99_999_999
_METER_EVENT_FUTURE = 5 * 60


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


# --------------------------------------------------------------------------------------
# Form encoding


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket form encoding as nested dicts and lists.

    ``line_items[0][price]=p`` -> ``{"line_items": [{"price": "p"}]}``; ``expand[]=a`` and
    ``expand[0]=a`` -> ``{"expand": ["a"]}``. Values stay strings. Dicts under ``metadata``
    and ``payload`` are never turned into lists, whatever their keys.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        segments = [head, *re.findall(r"([^\[\]]*)\]", "[" + rest)] if rest else [head]
        node = root
        for index, segment in enumerate(segments):
            name = segment if segment != "" else str(len(node))
            if index == len(segments) - 1:
                node[name] = value
                break
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node = child
    return {key: _listify(value, key) for key, value in root.items()}


def _listify(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        return value
    if key in _NOT_LISTS:
        return {k: _listify(v, "") for k, v in value.items()}
    if value and all(k.isdigit() for k in value):
        return [_listify(value[k], "") for k in sorted(value, key=int)]
    return {k: _listify(v, k) for k, v in value.items()}


# --------------------------------------------------------------------------------------
# Webhook helpers


def sign_payload(
    payload: bytes | str,
    secret: str,
    *,
    timestamp: int | None = None,
    extra_secrets: Iterable[str] = (),
) -> str:
    """The `Stripe-Signature` header for `payload`: ``t=<ts>,v1=<hex>[,v1=<hex>...]``.

    Each v1 is HMAC-SHA256, keyed with the whole endpoint secret, over ``"<ts>." + payload``;
    one v1 per secret, as Stripe sends while a rolled secret is still valid.
    """
    body = payload.encode() if isinstance(payload, str) else payload
    t = int(time.time()) if timestamp is None else timestamp
    signed = str(t).encode() + b"." + body
    parts = [f"t={t}"]
    for key in (secret, *extra_secrets):
        parts.append("v1=" + hmac.new(key.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


def make_event(
    type: str,
    obj: Mapping[str, Any],
    *,
    created: int | None = None,
    event_id: str | None = None,
    previous_attributes: Mapping[str, Any] | None = None,
) -> JSON:
    """A Stripe event (snapshot payload) wrapping `obj`, as a webhook would deliver it."""
    data: JSON = {"object": copy.deepcopy(dict(obj))}
    if previous_attributes is not None:
        data["previous_attributes"] = copy.deepcopy(dict(previous_attributes))
    return {
        "id": event_id or _new_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": _new_id("req_", 14), "idempotency_key": str(uuid.uuid4())},
        "type": type,
    }


def invoice_event(type: str, sub: Mapping[str, Any], created: int | None = None) -> JSON:
    """An invoice event (invoice.paid, invoice.payment_failed) for subscription `sub`."""
    invoice = {
        "id": "in_" + sub["id"][4:],
        "object": "invoice",
        "customer": sub["customer"],
        "parent": {
            "subscription_details": {"subscription": sub["id"]},
            "type": "subscription_details",
        },
    }
    return make_event(type, invoice, created=created)


# --------------------------------------------------------------------------------------
# Errors, requests, faults


class StripeError(Exception):
    """An error answer in Stripe's envelope. `saved` says whether idempotency keeps it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        saved: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.saved = saved
        self.extra = copy.deepcopy(dict(extra or {}))  # decline_code, charge, payment_intent...

    def body(self) -> JSON:
        error: JSON = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = "https://stripe.com/docs/error-codes/" + self.code.replace("_", "-")
        if self.param is not None:
            error["param"] = self.param
        error.update(copy.deepcopy(self.extra))
        return {"error": dict(sorted(error.items()))}


def _missing(kind: str, ident: str, *, param: str | None = "id", status: int = 404) -> StripeError:
    return StripeError(
        status, f"No such {kind}: '{ident}'", code="resource_missing", param=param, saved=True
    )


def _param_missing(param: str) -> StripeError:
    return StripeError(
        400,
        f"Missing required param: {param}.",
        code="parameter_missing",
        param=param,
        saved=False,
    )


@dataclass
class RecordedRequest:
    """One HTTP request the fake received, whatever became of it."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]  # names lower-cased
    status: int | None = None  # None: the connection was dropped without an answer
    replayed: bool = False  # answered from the idempotency cache

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def stripe_version(self) -> str | None:
        return self.headers.get("stripe-version")


FaultKind = Literal["fail", "drop", "delay", "accept_then_drop"]


@dataclass
class _Fault:
    kind: FaultKind
    remaining: int
    path_prefix: str
    status: int = 500
    seconds: float = 0.0


@dataclass
class _Saved:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: bytes
    request_id: str


@dataclass
class _Session:
    public: JSON
    line_items: list[JSON]
    subscription_data: JSON = field(default_factory=dict)
    payment_intent_data: JSON = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, fake: FakeStripe) -> None:
        self.fake = fake
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is not news

    def cut_connections(self) -> None:
        with self.live_lock:
            live = list(self.live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        reply = self.server.fake._dispatch(method, self.path, list(self.headers.items()), body)
        if reply is None:
            self.close_connection = True  # end the connection with no answer at all
            return
        status, headers, payload = reply
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


# --------------------------------------------------------------------------------------
# The fake


Handler = Callable[[dict[str, Any], tuple[str, ...]], tuple[int, JSON]]


class FakeStripe:
    """A Stripe API on 127.0.0.1:<free port>, in a background thread. Use as a context manager."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.meter_events: list[JSON] = []
        self.duplicate_meter_event_code: str | None = None
        self._customers: dict[str, JSON] = {}
        self._products: dict[str, JSON] = {}
        self._prices: dict[str, JSON] = {}
        self._sessions: dict[str, _Session] = {}
        self._subscriptions: dict[str, JSON] = {}
        self._portal_sessions: dict[str, JSON] = {}
        self._payment_methods: dict[str, JSON] = {}
        self._payment_intents: dict[str, JSON] = {}
        self._charges: dict[str, JSON] = {}
        self._declines: dict[str, tuple[str, str | None]] = {}  # customer -> (code, decline_code)
        self._meter_identifiers: set[str] = set()
        self._idempotency: dict[tuple[str, str], _Saved] = {}
        self._faults: list[_Fault] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("POST", re.compile(r"/v1/customers"), self._create_customer),
            ("GET", re.compile(r"/v1/customers"), self._list_customers),
            ("GET", re.compile(r"/v1/customers/([^/]+)"), self._get_customer),
            (
                "GET",
                re.compile(r"/v1/customers/([^/]+)/payment_methods"),
                self._list_customer_payment_methods,
            ),
            ("GET", re.compile(r"/v1/payment_methods"), self._list_payment_methods),
            ("GET", re.compile(r"/v1/payment_methods/([^/]+)"), self._get_payment_method),
            ("POST", re.compile(r"/v1/payment_intents"), self._create_payment_intent),
            ("GET", re.compile(r"/v1/payment_intents"), self._list_payment_intents),
            ("GET", re.compile(r"/v1/payment_intents/([^/]+)"), self._get_payment_intent),
            (
                "POST",
                re.compile(r"/v1/payment_intents/([^/]+)/confirm"),
                self._confirm_payment_intent,
            ),
            ("GET", re.compile(r"/v1/prices"), self._list_prices),
            ("GET", re.compile(r"/v1/prices/([^/]+)"), self._get_price),
            ("POST", re.compile(r"/v1/checkout/sessions"), self._create_session),
            ("GET", re.compile(r"/v1/checkout/sessions/([^/]+)"), self._get_session),
            ("GET", re.compile(r"/v1/checkout/sessions/([^/]+)/line_items"), self._line_items),
            ("POST", re.compile(r"/v1/billing_portal/sessions"), self._create_portal_session),
            ("GET", re.compile(r"/v1/subscriptions"), self._list_subscriptions),
            ("GET", re.compile(r"/v1/subscriptions/([^/]+)"), self._get_subscription),
            ("POST", re.compile(r"/v1/subscriptions/([^/]+)"), self._update_subscription),
            ("DELETE", re.compile(r"/v1/subscriptions/([^/]+)"), self._cancel_subscription),
            ("POST", re.compile(r"/v1/billing/meter_events"), self._create_meter_event),
        ]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeStripe:
        if self._httpd is not None:
            raise RuntimeError("FakeStripe is already running")
        self._stopping.clear()
        self._httpd = _Server(self)
        port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakestripe:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()  # wakes delayed requests
        httpd.shutdown()
        thread.join()
        httpd.cut_connections()  # idle keep-alive connections end their handler threads
        httpd.server_close()  # joins the handler threads
        self._httpd = self._thread = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------

    def fail_next(self, count: int, *, status: int = 500, path_prefix: str = "/v1/") -> None:
        """The next `count` matching requests answer `status` (429: Stripe's rate-limit error)
        without being applied or remembered for idempotency."""
        self._add_fault(_Fault("fail", count, path_prefix, status=status))

    def drop_next(self, count: int, *, path_prefix: str = "/v1/") -> None:
        """The next `count` matching requests are not applied; the connection closes unanswered."""
        self._add_fault(_Fault("drop", count, path_prefix))

    def delay_next(self, count: int, seconds: float, *, path_prefix: str = "/v1/") -> None:
        """The next `count` matching requests wait `seconds` before being handled."""
        self._add_fault(_Fault("delay", count, path_prefix, seconds=seconds))

    def accept_then_drop_next(self, count: int, *, path_prefix: str = "/v1/") -> None:
        """The next `count` matching requests are applied (and their answer kept for an
        idempotent retry), then the connection closes without the answer."""
        self._add_fault(_Fault("accept_then_drop", count, path_prefix))

    def clear_faults(self) -> None:
        """Every fault still waiting is dropped: Stripe is healthy again."""
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and path.startswith(fault.path_prefix):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # -- test control ------------------------------------------------------------------

    def add_price(
        self,
        id: str,
        *,
        lookup_key: str | None = None,
        product: str | None = None,
        unit_amount: int = 1000,
        recurring: bool = True,
    ) -> JSON:
        """A per-unit USD price (and its product): monthly recurring and licensed, or with
        ``recurring=False`` a one-time price (``type="one_time"``, ``recurring: null``)."""
        with self._lock:
            now = self._now()
            product_id = product or _new_id("prod_", 14)
            if product_id not in self._products:
                self._products[product_id] = {
                    "id": product_id,
                    "object": "product",
                    "active": True,
                    "created": now,
                    "default_price": id,
                    "description": None,
                    "livemode": False,
                    "metadata": {},
                    "name": product_id,
                    "type": "service",
                    "updated": now,
                }
            if lookup_key is not None:
                for other in self._prices.values():
                    if other["lookup_key"] == lookup_key:
                        other["lookup_key"] = None  # a lookup key names one price at a time
            self._prices[id] = {
                "id": id,
                "object": "price",
                "active": True,
                "billing_scheme": "per_unit",
                "created": now,
                "currency": "usd",
                "custom_unit_amount": None,
                "livemode": False,
                "lookup_key": lookup_key,
                "metadata": {},
                "nickname": None,
                "product": product_id,
                "recurring": {
                    "interval": "month",
                    "interval_count": 1,
                    "meter": None,
                    "trial_period_days": None,
                    "usage_type": "licensed",
                }
                if recurring
                else None,
                "tax_behavior": "unspecified",
                "tiers_mode": None,
                "transform_quantity": None,
                "type": "recurring" if recurring else "one_time",
                "unit_amount": unit_amount,
                "unit_amount_decimal": str(unit_amount),
            }
            return copy.deepcopy(self._prices[id])

    def create_customer(self, email: str | None = None) -> str:
        with self._lock:
            return self._new_customer(email=email)["id"]  # type: ignore[no-any-return]

    def create_subscription(
        self,
        customer: str,
        price: str,
        *,
        status: str = "active",
        metadata: Mapping[str, str] | None = None,
    ) -> JSON:
        """A subscription to one price; an unknown customer id is registered on the fly."""
        with self._lock:
            if price not in self._prices:
                raise KeyError(f"no such price: {price!r}; add_price() it first")
            if self._prices[price]["type"] != "recurring":
                raise ValueError(f"price {price!r} is one_time; a subscription needs recurring")
            if customer not in self._customers:
                self._new_customer(customer_id=customer)
            sub = self._new_subscription(customer, [(price, 1)], status, dict(metadata or {}))
            return copy.deepcopy(sub)

    def update_subscription(
        self, sub_id: str, *, status: str | None = None, price: str | None = None
    ) -> JSON:
        """Sets the status and/or replaces the (first) item's price; touches nothing else."""
        with self._lock:
            sub = self._subscription_or_raise(sub_id)
            if status is not None:
                if status not in _SUBSCRIPTION_STATUSES:
                    raise ValueError(f"not a subscription status: {status!r}")
                sub["status"] = status
            if price is not None:
                if price not in self._prices:
                    raise KeyError(f"no such price: {price!r}")
                if self._prices[price]["type"] != "recurring":
                    raise ValueError(f"price {price!r} is one_time; a subscription needs recurring")
                item = sub["items"]["data"][0]
                item["price"] = copy.deepcopy(self._prices[price])
                item["plan"] = self._plan(price)
            return copy.deepcopy(sub)

    def complete_checkout(self, session_id: str, *, status: str = "active") -> JSON:
        """What paying does; returns the completed session, as a checkout.session.completed
        event carries it.

        mode=subscription: a customer (if the session had only an email), a new card
        ``pm_...`` attached to it, and a subscription (`status`) from the recurring line
        items with subscription_data[metadata] and that card as its default_payment_method.
        mode=payment: a customer if one is needed (customer_creation=always,
        payment_intent_data[setup_future_usage], or invoice_creation[enabled]), then a
        succeeded PaymentIntent for amount_total with payment_intent_data[metadata] and a new
        card ``pm_...``; with setup_future_usage (off_session or on_session) that card is
        attached to the customer. As on Stripe, neither sets the customer's
        invoice_settings.default_payment_method. Either way the session ends complete and
        paid."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise KeyError(f"no such checkout session: {session_id!r}")
            public = session.public
            if public["status"] != "open":
                raise ValueError(f"checkout session {session_id} is {public['status']}")
            if public["mode"] == "payment":
                self._complete_payment_checkout(session)
                return copy.deepcopy(public)
            customer_id = public["customer"]
            if customer_id is None:
                customer_id = self._new_customer(email=public["customer_email"])["id"]
            email = self._customers[customer_id]["email"]
            items = [
                (li["price"]["id"], li["quantity"])
                for li in session.line_items
                if li["price"]["type"] == "recurring"
            ]
            metadata = dict(session.subscription_data.get("metadata") or {})
            card = self._new_payment_method(customer_id, email=email)
            sub = self._new_subscription(customer_id, items, status, metadata)
            sub["default_payment_method"] = card["id"]
            public.update(
                status="complete",
                payment_status="paid",
                customer=customer_id,
                subscription=sub["id"],
                url=None,
                customer_details=self._customer_details(email),
            )
            return copy.deepcopy(public)

    def _complete_payment_checkout(self, session: _Session) -> None:
        public = session.public
        data = session.payment_intent_data
        future = data.get("setup_future_usage")
        customer_id = public["customer"]
        invoice_enabled = bool((public["invoice_creation"] or {}).get("enabled"))
        needs_customer = public["customer_creation"] == "always" or future or invoice_enabled
        if customer_id is None and needs_customer:
            customer_id = self._new_customer(email=public["customer_email"])["id"]
        email = self._customers[customer_id]["email"] if customer_id else None
        email = email or public["customer_email"]
        pm = self._new_payment_method(None, email=email)
        intent = self._new_payment_intent(
            amount=public["amount_total"],
            currency=public["currency"],
            customer=customer_id,
            payment_method=pm["id"],
            metadata=dict(data.get("metadata") or {}),
            description=data.get("description"),
            receipt_email=data.get("receipt_email"),
            setup_future_usage=future,
            automatic_payment_methods=None,
            payment_method_types=list(public["payment_method_types"]),
        )
        self._succeed(intent, pm)
        if customer_id is not None and future is not None:
            pm["customer"] = customer_id  # attached only: the invoice default stays as it was
        public.update(
            status="complete",
            payment_status="paid",
            customer=customer_id,
            payment_intent=intent["id"],
            url=None,
            customer_details=self._customer_details(email),
        )

    @staticmethod
    def _customer_details(email: str | None) -> JSON:
        return {
            "address": None,
            "email": email,
            "name": None,
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        }

    def attach_payment_method(self, customer_id: str, *, default: bool = True) -> str:
        """A new card ``pm_...`` attached to the customer (registered on the fly if unknown)
        and, unless ``default=False``, made its invoice_settings.default_payment_method (as
        the Billing portal or an API call does; Checkout never does)."""
        with self._lock:
            if customer_id not in self._customers:
                self._new_customer(customer_id=customer_id)
            customer = self._customers[customer_id]
            pm = self._new_payment_method(customer_id, email=customer["email"])
            if default:
                customer["invoice_settings"]["default_payment_method"] = pm["id"]
            return str(pm["id"])

    def decline_payment_methods_of(
        self,
        customer_id: str,
        *,
        code: str = "card_declined",
        decline_code: str | None = "insufficient_funds",
    ) -> None:
        """From now on every PaymentIntent confirm for this customer (its `customer`, or a
        payment method attached to it) fails as a declined card does: HTTP 402 card_error
        with `code`, `decline_code`, the failed `charge` and the `payment_intent` (left in
        requires_payment_method with last_payment_error). Checkout completion is unaffected
        (the customer types in a new card there)."""
        with self._lock:
            self._declines[customer_id] = (code, decline_code)

    def accept_payment_methods_of(self, customer_id: str) -> None:
        """Undoes decline_payment_methods_of: the customer's cards work again."""
        with self._lock:
            self._declines.pop(customer_id, None)

    def payment_intents(self, customer_id: str | None = None) -> list[JSON]:
        """Every PaymentIntent created (by the API or by complete_checkout), oldest first,
        optionally only those for one customer."""
        with self._lock:
            return [
                copy.deepcopy(pi)
                for pi in self._payment_intents.values()
                if customer_id is None or pi["customer"] == customer_id
            ]

    def payment_intent(self, intent_id: str) -> JSON:
        with self._lock:
            return copy.deepcopy(self._payment_intents[intent_id])

    def payment_method(self, pm_id: str) -> JSON:
        with self._lock:
            return copy.deepcopy(self._payment_methods[pm_id])

    def subscription(self, sub_id: str) -> JSON:
        with self._lock:
            return copy.deepcopy(self._subscription_or_raise(sub_id))

    def customer(self, customer_id: str) -> JSON:
        with self._lock:
            return copy.deepcopy(self._customers[customer_id])

    def checkout_session(self, session_id: str) -> JSON:
        with self._lock:
            return copy.deepcopy(self._sessions[session_id].public)

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        """The recorded requests for one method and exact path."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # -- request handling ----------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _dispatch(
        self, method: str, target: str, raw_headers: list[tuple[str, str]], body: bytes
    ) -> Reply | None:
        split = urlsplit(target)
        if split.path.startswith(("/c/pay/", "/p/session/")):
            return self._hosted_page(method, split.path)
        pairs = parse_qsl(split.query, keep_blank_values=True)
        if body:
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        headers = {name.lower(): value for name, value in raw_headers}
        record = RecordedRequest(method, split.path, parse_form(pairs), headers)
        with self._lock:
            self.requests.append(record)
            fault = self._take_fault(split.path)
        kind = fault.kind if fault else None
        if fault is not None and kind == "delay":
            self._stopping.wait(fault.seconds)
        if fault is not None and kind == "fail":
            reply = self._reply(self._fault_error(fault.status), headers)
        elif kind == "drop":
            return None
        else:
            with self._lock:
                reply = self._execute(record)
        if kind == "accept_then_drop":
            return None
        record.status = reply[0]
        return reply

    def _hosted_page(self, method: str, path: str) -> Reply:
        """The pages Stripe hosts for browsers: Checkout (a Pay button that does what
        complete_checkout does, then goes to the success_url) and the billing portal
        (a page naming the customer, with a link back)."""
        kind, _, ident = path.strip("/").rpartition("/")
        html = "text/html; charset=utf-8"
        with self._lock:
            if kind == "c/pay" and ident in self._sessions:
                public = self._sessions[ident].public
                if method == "POST" and public["status"] == "open":
                    self.complete_checkout(ident)
                if method == "POST":
                    target = str(public["success_url"]).replace("{CHECKOUT_SESSION_ID}", ident)
                    return 303, {"Location": target}, b""
                page = (
                    f"<!doctype html><title>Checkout</title><h1>Fake Stripe Checkout</h1>"
                    f"<p id='total'>{public['amount_total']} {public['currency']}</p>"
                    f"<form method='post'><button id='pay' type='submit'>Pay</button></form>"
                )
                return 200, {"Content-Type": html}, page.encode()
            portal = self._portal_sessions.get(ident)
            if kind == "p/session" and portal is not None:
                page = (
                    f"<!doctype html><title>Billing</title><h1>Billing portal</h1>"
                    f"<p id='customer'>{portal['customer']}</p>"
                    f"<a id='return' href='{portal['return_url']}'>Return</a>"
                )
                return 200, {"Content-Type": html}, page.encode()
        return 404, {"Content-Type": html}, b"no such page"

    def _execute(self, record: RecordedRequest) -> Reply:
        headers = record.headers
        api_key = self._api_key(headers.get("authorization"))
        if isinstance(api_key, StripeError):
            return self._reply(api_key, headers)
        idem = headers.get("idempotency-key") if record.method == "POST" else None
        if idem is not None:
            saved = self._idempotency.get((api_key, idem))
            if saved is not None:
                if (saved.method, saved.path, saved.params) != (
                    record.method,
                    record.path,
                    record.params,
                ):
                    error = StripeError(
                        400,
                        f"Keys for idempotent requests can only be reused with the same "
                        f"parameters they were first used with. '{idem}' was first used for "
                        f"{saved.method} {saved.path} with other parameters.",
                        type="idempotency_error",
                    )
                    return self._reply(error, headers)
                record.replayed = True
                extra = {"Idempotent-Replayed": "true", "Original-Request": saved.request_id}
                return self._raw_reply(saved.status, saved.body, headers, extra)
        try:
            status, obj = self._route(record)
            payload: JSON = obj
            saved_ok = True
        except StripeError as error:
            status, payload, saved_ok = error.status, error.body(), error.saved
        request_id = _new_id("req_", 14)
        body = json.dumps(payload, indent=2).encode()
        if idem is not None and saved_ok:
            self._idempotency[(api_key, idem)] = _Saved(
                record.method, record.path, record.params, status, body, request_id
            )
        return self._raw_reply(status, body, headers, {}, request_id=request_id)

    def _route(self, record: RecordedRequest) -> tuple[int, JSON]:
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(record.path)
            if match is not None and method == record.method:
                return handler(record.params, match.groups())
        # A known path with another method is answered like an unknown URL, as Stripe does.
        raise StripeError(
            404, f"Unrecognized request URL ({record.method}: {record.path}).", saved=False
        )

    def _api_key(self, authorization: str | None) -> str | StripeError:
        key = ""
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                key = credentials.strip()
            elif scheme.lower() == "basic":
                try:
                    key = base64.b64decode(credentials.strip()).decode().partition(":")[0]
                except (ValueError, UnicodeDecodeError):
                    key = ""
        if not key:
            return StripeError(
                401,
                "You did not provide an API key. Send it in the Authorization header as "
                "'Bearer sk_test_...'.",
                saved=False,
            )
        if not key.startswith(("sk_test_", "rk_test_")):
            shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:]
            return StripeError(401, f"Invalid API Key provided: {shown}", saved=False)
        return key

    def _fault_error(self, status: int) -> StripeError:
        if status == 429:
            return StripeError(
                429,
                "Request rate limit exceeded. Retry with exponential backoff.",
                code="rate_limit",
            )
        if status == 409:
            return StripeError(409, "Lock timeout: retry the request.", code="lock_timeout")
        if status >= 500:
            return StripeError(status, "An unknown error occurred.", type="api_error")
        return StripeError(status, f"Injected failure ({status}).")

    def _reply(self, error: StripeError, headers: Mapping[str, str]) -> Reply:
        return self._raw_reply(error.status, json.dumps(error.body(), indent=2).encode(), headers)

    def _raw_reply(
        self,
        status: int,
        body: bytes,
        request_headers: Mapping[str, str],
        extra: Mapping[str, str] | None = None,
        *,
        request_id: str | None = None,
    ) -> Reply:
        headers = {
            "Content-Type": "application/json",
            "Request-Id": request_id or _new_id("req_", 14),
            "Stripe-Version": request_headers.get("stripe-version") or API_VERSION,
        }
        idem = request_headers.get("idempotency-key")
        if idem is not None:
            headers["Idempotency-Key"] = idem
        headers.update(extra or {})
        return status, headers, body

    # -- params ---------------------------------------------------------------------------

    @staticmethod
    def _allow(params: Mapping[str, Any], allowed: Iterable[str]) -> None:
        known = {"expand", *allowed}
        for name in params:
            if name not in known:
                raise StripeError(
                    400,
                    f"Received unknown parameter: {name}",
                    code="parameter_unknown",
                    param=name,
                    saved=False,
                )

    @staticmethod
    def _str(params: Mapping[str, Any], name: str) -> str | None:
        value = params.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise StripeError(400, f"Invalid string: {name}", param=name, saved=False)
        return value

    @staticmethod
    def _int(value: Any, name: str) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise StripeError(
                400,
                f"Invalid integer: {value}",
                param=name,
                code="parameter_invalid_integer",
                saved=False,
            ) from None

    @staticmethod
    def _bool(value: Any, name: str) -> bool:
        if value in ("true", "false"):
            return bool(value == "true")
        raise StripeError(400, f"Invalid boolean: {value}", param=name, saved=False)

    @staticmethod
    def _metadata(value: Any, name: str = "metadata") -> dict[str, str]:
        if value is None or value == "":
            return {}
        if not isinstance(value, dict):
            raise StripeError(400, f"Invalid object: {name}", param=name, saved=False)
        for key, item in value.items():
            if not isinstance(item, str):
                raise StripeError(
                    400, f"Invalid string: {name}[{key}]", param=f"{name}[{key}]", saved=False
                )
            if len(key) > 40 or len(item) > 500:
                raise StripeError(
                    400, "Metadata keys are at most 40 and values 500 characters.", param=name
                )
        return dict(value)

    @staticmethod
    def _expand_list(params: Mapping[str, Any]) -> list[str]:
        value = params.get("expand")
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise StripeError(400, "Invalid array: expand", param="expand", saved=False)

    def _render(self, obj: JSON, params: Mapping[str, Any]) -> JSON:
        out = copy.deepcopy(obj)
        for path in self._expand_list(params):
            self._expand_path(out, path.split("."), path)
        return out

    def _expand_path(self, node: Any, segments: list[str], path: str) -> None:
        if isinstance(node, list):
            for item in node:
                self._expand_path(item, segments, path)
            return
        cannot = StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
        if not isinstance(node, dict):
            raise cannot
        head, rest = segments[0], segments[1:]
        if head == "line_items" and node.get("object") == "checkout.session":
            node[head] = self._line_items_page(node["id"], {})
        elif head not in node:
            raise cannot
        elif isinstance(node[head], str):
            resolved = self._resolve(node[head])
            if resolved is None:
                raise cannot
            node[head] = copy.deepcopy(resolved)
        if rest and node[head] is not None:
            self._expand_path(node[head], rest, path)

    def _resolve(self, ident: str) -> JSON | None:
        stores: list[Mapping[str, JSON]] = [
            self._customers,
            self._subscriptions,
            self._prices,
            self._products,
            self._payment_intents,
            self._payment_methods,
            self._charges,
        ]
        for store in stores:
            if ident in store:
                return store[ident]
        session = self._sessions.get(ident)
        return session.public if session else None

    def _page(self, items: list[JSON], params: Mapping[str, Any], url: str, kind: str) -> JSON:
        """One page of a newest-first list, with Stripe's cursor semantics."""
        limit = self._int(params.get("limit", "10"), "limit")
        if not 1 <= limit <= 100:
            raise StripeError(400, "Limit must be between 1 and 100.", param="limit", saved=False)
        ids = [item["id"] for item in items]
        after, before = params.get("starting_after"), params.get("ending_before")
        if after is not None:
            if after not in ids:
                raise _missing(kind, str(after), param="starting_after", status=400)
            rest = items[ids.index(after) + 1 :]
            page, has_more = rest[:limit], len(rest) > limit
        elif before is not None:
            if before not in ids:
                raise _missing(kind, str(before), param="ending_before", status=400)
            end = ids.index(before)
            page, has_more = items[max(0, end - limit) : end], end > limit
        else:
            page, has_more = items[:limit], len(items) > limit
        listing = {"object": "list", "data": page, "has_more": has_more, "url": url}
        return self._render(listing, params)

    # -- objects --------------------------------------------------------------------------

    def _new_customer(
        self,
        *,
        customer_id: str | None = None,
        email: str | None = None,
        name: str | None = None,
        description: str | None = None,
        phone: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> JSON:
        customer: JSON = {
            "id": customer_id or _new_id("cus_", 14),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": self._now(),
            "currency": None,
            "customer_account": None,
            "default_source": None,
            "delinquent": False,
            "description": description,
            "discount": None,
            "email": email,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": metadata or {},
            "name": name,
            "next_invoice_sequence": 1,
            "phone": phone,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._customers[customer["id"]] = customer
        return customer

    def _new_payment_method(self, customer: str | None, *, email: str | None = None) -> JSON:
        now = self._now()
        pm: JSON = {
            "id": _new_id("pm_"),
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": {
                "address": {
                    "city": None,
                    "country": None,
                    "line1": None,
                    "line2": None,
                    "postal_code": None,
                    "state": None,
                },
                "email": email,
                "name": None,
                "phone": None,
                "tax_id": None,
            },
            "card": {
                "brand": "visa",
                "checks": {
                    "address_line1_check": None,
                    "address_postal_code_check": None,
                    "cvc_check": "pass",
                },
                "country": "US",
                "display_brand": "visa",
                "exp_month": 12,
                "exp_year": datetime.fromtimestamp(now, UTC).year + 3,
                "fingerprint": _new_id("", 16),
                "funding": "credit",
                "generated_from": None,
                "last4": "4242",
                "networks": {"available": ["visa"], "preferred": None},
                "regulated_status": "unregulated",
                "three_d_secure_usage": {"supported": True},
                "wallet": None,
            },
            "created": now,
            "customer": customer,
            "customer_account": None,
            "livemode": False,
            "metadata": {},
            "type": "card",
        }
        self._payment_methods[pm["id"]] = pm
        return pm

    def _new_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer: str | None,
        payment_method: str | None,
        metadata: dict[str, str],
        description: str | None,
        receipt_email: str | None,
        setup_future_usage: str | None,
        automatic_payment_methods: JSON | None,
        payment_method_types: list[str],
    ) -> JSON:
        intent_id = _new_id("pi_")
        intent: JSON = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": automatic_payment_methods,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic_async",
            "client_secret": f"{intent_id}_secret_{_new_id('', 25)}",
            "confirmation_method": "automatic",
            "created": self._now(),
            "currency": currency,
            "customer": customer,
            "customer_account": None,
            "description": description,
            "excluded_payment_method_types": None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": metadata,
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": payment_method,
            "payment_method_configuration_details": None,
            "payment_method_options": {
                "card": {
                    "installments": None,
                    "mandate_options": None,
                    "network": None,
                    "request_three_d_secure": "automatic",
                }
            },
            "payment_method_types": payment_method_types,
            "processing": None,
            "receipt_email": receipt_email,
            "review": None,
            "setup_future_usage": setup_future_usage,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "requires_confirmation" if payment_method else "requires_payment_method",
            "transfer_data": None,
            "transfer_group": None,
        }
        self._payment_intents[intent_id] = intent
        return intent

    def _new_charge(self, intent: JSON, pm: JSON, failure: JSON | None) -> JSON:
        paid = failure is None
        failed: JSON = failure or {}
        charge: JSON = {
            "id": _new_id("ch_"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"] if paid else 0,
            "amount_refunded": 0,
            "balance_transaction": _new_id("txn_") if paid else None,
            "billing_details": copy.deepcopy(pm["billing_details"]),
            "captured": paid,
            "created": self._now(),
            "currency": intent["currency"],
            "customer": intent["customer"],
            "description": intent["description"],
            "disputed": False,
            "failure_code": failed.get("code"),
            "failure_message": failed.get("message"),
            "livemode": False,
            "metadata": copy.deepcopy(intent["metadata"]),
            "outcome": {
                "network_status": "approved_by_network" if paid else "declined_by_network",
                "reason": failed.get("decline_code"),
                "risk_level": "normal",
                "seller_message": "Payment complete."
                if paid
                else "The bank did not return any further details with this decline.",
                "type": "authorized" if paid else "issuer_declined",
            },
            "paid": paid,
            "payment_intent": intent["id"],
            "payment_method": pm["id"],
            "receipt_email": intent["receipt_email"],
            "refunded": False,
            "status": "succeeded" if paid else "failed",
        }
        self._charges[charge["id"]] = charge
        return charge

    def _succeed(self, intent: JSON, pm: JSON) -> None:
        charge = self._new_charge(intent, pm, None)
        intent.update(
            status="succeeded",
            amount_received=intent["amount"],
            latest_charge=charge["id"],
            last_payment_error=None,
            payment_method=pm["id"],
        )

    def _confirm(self, intent: JSON) -> None:
        """Confirms `intent` with its payment method: succeeded, or a Stripe card error."""
        if intent["payment_method"] is None:
            raise StripeError(
                400,
                _MISSING_PAYMENT_METHOD_MESSAGE,
                code="payment_intent_unexpected_state",
                param="payment_method",
                extra={"payment_intent": intent},
            )
        pm = self._payment_methods[intent["payment_method"]]
        decline = self._declines.get(intent["customer"] or "") or self._declines.get(
            pm["customer"] or ""
        )
        if decline is None:
            self._succeed(intent, pm)
            if intent["setup_future_usage"] and intent["customer"] and pm["customer"] is None:
                pm["customer"] = intent["customer"]
            return
        code, decline_code = decline
        message = _DECLINE_MESSAGES.get(decline_code or code) or _DECLINE_MESSAGES.get(code)
        failure: JSON = {"code": code, "message": message or "Your card was declined."}
        if decline_code is not None:
            failure["decline_code"] = decline_code
            if decline_code in _ADVICE_CODES:
                failure["advice_code"] = _ADVICE_CODES[decline_code]
        charge = self._new_charge(intent, pm, failure)
        last_error: JSON = {
            **failure,
            "charge": charge["id"],
            "doc_url": "https://stripe.com/docs/error-codes/" + code.replace("_", "-"),
            "payment_method": copy.deepcopy(pm),
            "type": "card_error",
        }
        intent.update(
            status="requires_payment_method",
            latest_charge=charge["id"],
            last_payment_error=last_error,
            payment_method=None,
        )
        extra = {k: v for k, v in last_error.items() if k not in {"code", "message", "type"}}
        raise StripeError(
            402,
            failure["message"],
            type="card_error",
            code=code,
            extra={**extra, "payment_intent": intent},
        )

    def _plan(self, price_id: str) -> JSON:
        price = self._prices[price_id]
        return {
            "id": price_id,
            "object": "plan",
            "active": price["active"],
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"],
            "created": price["created"],
            "currency": price["currency"],
            "interval": price["recurring"]["interval"],
            "interval_count": price["recurring"]["interval_count"],
            "livemode": False,
            "metadata": {},
            "meter": None,
            "nickname": None,
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": price["recurring"]["usage_type"],
        }

    def _new_subscription(
        self,
        customer: str,
        items: list[tuple[str, int]],
        status: str,
        metadata: dict[str, str],
    ) -> JSON:
        if status not in _SUBSCRIPTION_STATUSES:
            raise ValueError(f"not a subscription status: {status!r}")
        now = self._now()
        period_end = _add_month(now)
        sub_id = _new_id("sub_")
        sub_items: list[JSON] = [
            {
                "id": _new_id("si_", 14),
                "object": "subscription_item",
                "billing_thresholds": None,
                "created": now,
                "current_period_end": period_end,
                "current_period_start": now,
                "discounts": [],
                "metadata": {},
                "plan": self._plan(price_id),
                "price": copy.deepcopy(self._prices[price_id]),
                "quantity": quantity,
                "subscription": sub_id,
                "tax_rates": [],
            }
            for price_id, quantity in items
        ]
        trialing = status == "trialing"
        sub: JSON = {
            "id": sub_id,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": period_end if trialing else now,
            "billing_cycle_anchor_config": None,
            "billing_mode": {
                "flexible": {"proration_discounts": "included"},
                "type": "flexible",
                "updated_at": now,
            },
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": "usd",
            "customer": customer,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": sub_items,
                "has_more": False,
                "total_count": len(sub_items),
                "url": f"/v1/subscription_items?subscription={sub_id}",
            },
            "latest_invoice": None,
            "livemode": False,
            "metadata": metadata,
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": now,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": period_end if trialing else None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": now if trialing else None,
        }
        self._subscriptions[sub_id] = sub
        return sub

    def _subscription_or_raise(self, sub_id: str) -> JSON:
        sub = self._subscriptions.get(sub_id)
        if sub is None:
            raise KeyError(f"no such subscription: {sub_id!r}")
        return sub

    # -- endpoints ------------------------------------------------------------------------

    def _create_customer(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["email", "name", "description", "phone", "metadata"])
        customer = self._new_customer(
            email=self._str(params, "email"),
            name=self._str(params, "name"),
            description=self._str(params, "description"),
            phone=self._str(params, "phone"),
            metadata=self._metadata(params.get("metadata")),
        )
        return 200, self._render(customer, params)

    def _list_customers(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["email", "limit", "starting_after", "ending_before"])
        email = self._str(params, "email")
        items = [
            c for c in reversed(self._customers.values()) if email is None or c["email"] == email
        ]
        return 200, self._page(items, params, "/v1/customers", "customer")

    def _get_customer(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, [])
        customer = self._customers.get(ids[0])
        if customer is None:
            raise _missing("customer", ids[0])
        return 200, self._render(customer, params)

    def _list_prices(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(
            params,
            [
                "lookup_keys",
                "active",
                "product",
                "type",
                "limit",
                "starting_after",
                "ending_before",
            ],
        )
        keys = params.get("lookup_keys")
        if isinstance(keys, str):
            keys = [keys]
        active = self._bool(params["active"], "active") if "active" in params else None
        product = self._str(params, "product")
        kind = self._str(params, "type")
        items = [
            p
            for p in reversed(self._prices.values())
            if (keys is None or p["lookup_key"] in keys)
            and (active is None or p["active"] == active)
            and (product is None or p["product"] == product)
            and (kind is None or p["type"] == kind)
        ]
        return 200, self._page(items, params, "/v1/prices", "price")

    def _get_price(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, [])
        price = self._prices.get(ids[0])
        if price is None:
            raise _missing("price", ids[0])
        return 200, self._render(price, params)

    def _create_session(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(
            params,
            [
                "mode",
                "line_items",
                "customer",
                "customer_email",
                "success_url",
                "cancel_url",
                "metadata",
                "subscription_data",
                "payment_intent_data",
                "customer_creation",
                "invoice_creation",
                "client_reference_id",
                "allow_promotion_codes",
                "billing_address_collection",
                "customer_update",
                "automatic_tax",
                "tax_id_collection",
                "payment_method_collection",
                "locale",
                "ui_mode",
            ],
        )
        mode = self._str(params, "mode")
        if mode is None:
            raise _param_missing("mode")
        if mode not in ("subscription", "payment"):
            raise StripeError(
                400,
                "FakeStripe only supports mode=subscription and mode=payment.",
                param="mode",
                saved=False,
            )
        only_in = {
            "subscription_data": "subscription",
            "payment_method_collection": "subscription",
            "payment_intent_data": "payment",
            "customer_creation": "payment",
            "invoice_creation": "payment",
        }
        for name, wanted_mode in only_in.items():
            if name in params and mode != wanted_mode:
                raise StripeError(
                    400,
                    f"You can only pass `{name}` in `{wanted_mode}` mode.",
                    param=name,
                    saved=False,
                )
        creation = self._str(params, "customer_creation")
        if creation is not None and creation not in ("always", "if_required"):
            raise StripeError(
                400,
                f"Invalid customer_creation: must be one of always or if_required ({creation}).",
                param="customer_creation",
                saved=False,
            )
        customer = self._str(params, "customer")
        email = self._str(params, "customer_email")
        if customer is not None and email is not None:
            raise StripeError(
                400,
                "You may only specify one of these parameters: customer, customer_email.",
                param="customer_email",
                saved=False,
            )
        if customer is not None and creation is not None:
            raise StripeError(
                400,
                "You may only specify one of these parameters: customer, customer_creation.",
                param="customer_creation",
                saved=False,
            )
        if customer is not None and customer not in self._customers:
            raise _missing("customer", customer, param="customer", status=400)
        raw_items = params.get("line_items")
        if not raw_items:
            raise _param_missing("line_items")
        if not isinstance(raw_items, list):
            raise StripeError(400, "Invalid array: line_items", param="line_items", saved=False)
        line_items: list[JSON] = []
        for index, raw in enumerate(raw_items):
            where = f"line_items[{index}]"
            price_id = raw.get("price") if isinstance(raw, dict) else None
            if not price_id:
                raise _param_missing(f"{where}[price]")
            price = self._prices.get(price_id)
            if price is None:
                raise _missing("price", price_id, param=f"{where}[price]", status=400)
            if not price["active"]:
                raise StripeError(
                    400,
                    f"The price specified ({price_id}) is inactive. This field only accepts "
                    "active prices.",
                    param=f"{where}[price]",
                )
            if mode == "payment" and price["type"] == "recurring":
                raise StripeError(
                    400,
                    "You specified `payment` mode but passed a recurring price. Either switch "
                    "to `subscription` mode or use only one-time prices.",
                    param=f"{where}[price]",
                    saved=False,
                )
            quantity = self._int(raw.get("quantity", "1"), f"{where}[quantity]")
            if quantity < 1:
                raise StripeError(400, "Quantity must be at least 1.", param=f"{where}[quantity]")
            amount = price["unit_amount"] * quantity
            line_items.append(
                {
                    "id": _new_id("li_"),
                    "object": "item",
                    "adjustable_quantity": None,
                    "amount_discount": 0,
                    "amount_subtotal": amount,
                    "amount_tax": 0,
                    "amount_total": amount,
                    "currency": price["currency"],
                    "description": self._products[price["product"]]["name"],
                    "metadata": {},
                    "price": copy.deepcopy(price),
                    "quantity": quantity,
                }
            )
        if mode == "subscription" and all(li["price"]["type"] != "recurring" for li in line_items):
            raise StripeError(
                400,
                "You must provide at least one recurring price in `subscription` mode when "
                "using prices.",
                param="line_items",
                saved=False,
            )
        payment_intent_data = self._payment_intent_data(params.get("payment_intent_data"))
        invoice_creation: JSON | None = None
        if mode == "payment":
            invoice_creation = self._invoice_creation(params.get("invoice_creation"))
        subscription_data = params.get("subscription_data") or {}
        if not isinstance(subscription_data, dict):
            raise StripeError(400, "Invalid object: subscription_data", param="subscription_data")
        subscription_data = dict(subscription_data)
        subscription_data["metadata"] = self._metadata(
            subscription_data.get("metadata"), "subscription_data[metadata]"
        )
        now = self._now()
        session_id = _new_id("cs_test_", 58)
        total = sum(li["amount_total"] for li in line_items)
        public: JSON = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": total,
            "amount_total": total,
            "automatic_tax": {
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "billing_address_collection": None,
            "cancel_url": self._str(params, "cancel_url"),
            "client_reference_id": self._str(params, "client_reference_id"),
            "client_secret": None,
            "consent": None,
            "consent_collection": None,
            "created": now,
            "currency": "usd",
            "custom_fields": [],
            "customer": customer,
            "customer_creation": None
            if customer is not None
            else (creation or "if_required")
            if mode == "payment"
            else "always",
            "customer_details": None,
            "customer_email": email,
            "discounts": [],
            "expires_at": now + 24 * 3600,
            "invoice": None,
            "invoice_creation": invoice_creation,
            "livemode": False,
            "locale": None,
            "metadata": self._metadata(params.get("metadata")),
            "mode": mode,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "always",
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "recovered_from": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_options": [],
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": self._str(params, "success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted_page",
            # Its hosted page, on this server: a browser can pay (see _hosted_page).
            "url": f"{self.url or 'https://checkout.stripe.test'}/c/pay/{session_id}",
        }
        self._sessions[session_id] = _Session(
            public, line_items, subscription_data, payment_intent_data
        )
        return 200, self._render(public, params)

    def _payment_intent_data(self, raw: Any) -> JSON:
        if raw is None or raw == "":
            return {}
        name = "payment_intent_data"
        if not isinstance(raw, dict):
            raise StripeError(400, f"Invalid object: {name}", param=name, saved=False)
        known = {
            "setup_future_usage",
            "metadata",
            "description",
            "receipt_email",
            "statement_descriptor",
            "statement_descriptor_suffix",
            "capture_method",
        }
        for key in raw:
            if key not in known:
                raise StripeError(
                    400,
                    f"Received unknown parameter: {name}[{key}]",
                    code="parameter_unknown",
                    param=f"{name}[{key}]",
                    saved=False,
                )
        data: JSON = {"metadata": self._metadata(raw.get("metadata"), f"{name}[metadata]")}
        future = self._str(raw, "setup_future_usage")
        if future is not None and future not in ("off_session", "on_session"):
            raise StripeError(
                400,
                f"Invalid {name}[setup_future_usage]: must be one of off_session or on_session",
                param=f"{name}[setup_future_usage]",
                saved=False,
            )
        data["setup_future_usage"] = future
        for key in ("description", "receipt_email"):
            data[key] = self._str(raw, key)
        return data

    def _invoice_creation(self, raw: Any) -> JSON:
        """Accepted and echoed; no invoice is ever made."""
        name = "invoice_creation"
        if raw is not None and raw != "" and not isinstance(raw, dict):
            raise StripeError(400, f"Invalid object: {name}", param=name, saved=False)
        raw = raw or {}
        enabled = False
        if "enabled" in raw:
            enabled = self._bool(raw["enabled"], f"{name}[enabled]")
        elif raw:
            raise _param_missing(f"{name}[enabled]")
        given = raw.get("invoice_data") if isinstance(raw.get("invoice_data"), dict) else {}
        return {
            "enabled": enabled,
            "invoice_data": {
                "account_tax_ids": None,
                "custom_fields": None,
                "description": given.get("description") or None,
                "footer": given.get("footer") or None,
                "issuer": None,
                "metadata": self._metadata(
                    given.get("metadata"), f"{name}[invoice_data][metadata]"
                ),
                "rendering_options": None,
            },
        }

    def _get_session(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, [])
        session = self._sessions.get(ids[0])
        if session is None:
            raise _missing("checkout.session", ids[0])
        return 200, self._render(session.public, params)

    def _line_items_page(self, session_id: str, params: Mapping[str, Any]) -> JSON:
        session = self._sessions[session_id]
        url = f"/v1/checkout/sessions/{session_id}/line_items"
        return self._page(session.line_items, params, url, "line item")

    def _line_items(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["limit", "starting_after", "ending_before"])
        if ids[0] not in self._sessions:
            raise _missing("checkout.session", ids[0])
        return 200, self._line_items_page(ids[0], params)

    def _create_portal_session(
        self, params: dict[str, Any], _: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(params, ["customer", "return_url", "configuration", "locale", "flow_data"])
        customer = self._str(params, "customer")
        if customer is None:
            raise _param_missing("customer")
        if customer not in self._customers:
            raise _missing("customer", customer, param="customer", status=400)
        session_id = _new_id("bps_")
        portal: JSON = {
            "id": session_id,
            "object": "billing_portal.session",
            "configuration": self._str(params, "configuration") or "bpc_fakestripedefault",
            "created": self._now(),
            "customer": customer,
            "flow": None,
            "livemode": False,
            "locale": self._str(params, "locale"),
            "on_behalf_of": None,
            "return_url": self._str(params, "return_url"),
            "url": f"{self.url or 'https://billing.stripe.test'}/p/session/{session_id}",
        }
        self._portal_sessions[session_id] = portal
        return 200, self._render(portal, params)

    def _list_subscriptions(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(
            params, ["status", "customer", "price", "limit", "starting_after", "ending_before"]
        )
        status = self._str(params, "status")
        if status is not None and status not in {*_SUBSCRIPTION_STATUSES, "all", "ended"}:
            choices = ", ".join(["all", "ended", *sorted(_SUBSCRIPTION_STATUSES)])
            raise StripeError(
                400, f"Invalid status: must be one of {choices}.", param="status", saved=False
            )
        customer = self._str(params, "customer")
        price = self._str(params, "price")

        def wanted(sub: JSON) -> bool:
            if customer is not None and sub["customer"] != customer:
                return False
            if price is not None and all(i["price"]["id"] != price for i in sub["items"]["data"]):
                return False
            if status is None:
                return bool(sub["status"] != "canceled")
            if status == "ended":
                return sub["status"] in {"canceled", "incomplete_expired"}
            return status == "all" or sub["status"] == status

        items = [s for s in reversed(self._subscriptions.values()) if wanted(s)]
        return 200, self._page(items, params, "/v1/subscriptions", "subscription")

    def _get_subscription(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, [])
        sub = self._subscriptions.get(ids[0])
        if sub is None:
            raise _missing("subscription", ids[0])
        return 200, self._render(sub, params)

    def _update_subscription(
        self, params: dict[str, Any], ids: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(
            params,
            [
                "metadata",
                "cancel_at_period_end",
                "cancellation_details",
                "description",
                "items",
                "proration_behavior",
            ],
        )
        sub = self._subscriptions.get(ids[0])
        if sub is None:
            raise _missing("subscription", ids[0])
        canceled = sub["status"] in {"canceled", "incomplete_expired"}
        if canceled and set(params) - {"metadata", "cancellation_details", "expand"}:
            raise StripeError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        if "metadata" in params:
            if params["metadata"] == "":
                sub["metadata"] = {}
            else:
                for key, value in self._metadata(params["metadata"]).items():
                    if value == "":
                        sub["metadata"].pop(key, None)
                    else:
                        sub["metadata"][key] = value
        if "cancel_at_period_end" in params:
            at_end = self._bool(params["cancel_at_period_end"], "cancel_at_period_end")
            sub["cancel_at_period_end"] = at_end
            period_end = max(i["current_period_end"] for i in sub["items"]["data"])
            sub["cancel_at"] = period_end if at_end else None
            sub["canceled_at"] = self._now() if at_end else None
        details = params.get("cancellation_details")
        if isinstance(details, dict):
            for key in ("comment", "feedback"):
                if key in details:
                    sub["cancellation_details"][key] = details[key] or None
        if "description" in params:
            sub["description"] = self._str(params, "description")
        for index, change in enumerate(params.get("items") or []):
            if not isinstance(change, dict):
                raise StripeError(400, "Invalid object: items", param=f"items[{index}]")
            item = next((i for i in sub["items"]["data"] if i["id"] == change.get("id")), None)
            if item is None:
                raise _missing(
                    "subscription item",
                    str(change.get("id")),
                    param=f"items[{index}][id]",
                    status=400,
                )
            if "price" in change:
                if change["price"] not in self._prices:
                    raise _missing(
                        "price", change["price"], param=f"items[{index}][price]", status=400
                    )
                if self._prices[change["price"]]["type"] != "recurring":
                    raise StripeError(
                        400,
                        f"The price specified ({change['price']}) is set to `type=one_time` "
                        "but this field only accepts prices with `type=recurring`.",
                        param=f"items[{index}][price]",
                        saved=False,
                    )
                item["price"] = copy.deepcopy(self._prices[change["price"]])
                item["plan"] = self._plan(change["price"])
            if "quantity" in change:
                item["quantity"] = self._int(change["quantity"], f"items[{index}][quantity]")
        return 200, self._render(sub, params)

    def _cancel_subscription(
        self, params: dict[str, Any], ids: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(params, ["invoice_now", "prorate", "cancellation_details"])
        sub = self._subscriptions.get(ids[0])
        if sub is None:
            raise _missing("subscription", ids[0])
        if sub["status"] == "canceled":
            raise StripeError(400, f"The subscription {ids[0]} has already been canceled.")
        now = self._now()
        sub.update(status="canceled", canceled_at=now, ended_at=now)
        sub["cancellation_details"]["reason"] = "cancellation_requested"
        return 200, self._render(sub, params)

    def _get_payment_method(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, [])
        pm = self._payment_methods.get(ids[0])
        if pm is None:
            raise _missing("PaymentMethod", ids[0])
        return 200, self._render(pm, params)

    def _list_customer_payment_methods(
        self, params: dict[str, Any], ids: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(params, ["type", "allow_redisplay", "limit", "starting_after", "ending_before"])
        if ids[0] not in self._customers:
            raise _missing("customer", ids[0])
        url = f"/v1/customers/{ids[0]}/payment_methods"
        return 200, self._page(self._cards_of(ids[0], params), params, url, "PaymentMethod")

    def _list_payment_methods(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        """GET /v1/payment_methods: a customer's, with `customer`; without it Stripe lists
        only Treasury payment methods, of which there are none here."""
        self._allow(
            params,
            ["customer", "type", "allow_redisplay", "limit", "starting_after", "ending_before"],
        )
        customer = self._str(params, "customer")
        if customer is not None and customer not in self._customers:
            raise _missing("customer", customer, param="customer", status=400)
        items = self._cards_of(customer, params) if customer is not None else []
        return 200, self._page(items, params, "/v1/payment_methods", "PaymentMethod")

    def _cards_of(self, customer: str, params: Mapping[str, Any]) -> list[JSON]:
        """The customer's attached payment methods (of `type`, if given), newest first."""
        kind = self._str(params, "type")
        return [
            pm
            for pm in reversed(self._payment_methods.values())
            if pm["customer"] == customer and (kind is None or pm["type"] == kind)
        ]

    def _create_payment_intent(
        self, params: dict[str, Any], _: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(
            params,
            [
                "amount",
                "currency",
                "customer",
                "payment_method",
                "off_session",
                "confirm",
                "metadata",
                "description",
                "payment_method_types",
                "automatic_payment_methods",
                "error_on_requires_action",
                "receipt_email",
                "setup_future_usage",
                "return_url",
            ],
        )
        if params.get("amount") in (None, ""):
            raise _param_missing("amount")
        amount = self._int(params["amount"], "amount")
        currency = self._str(params, "currency")
        if currency is None:
            raise _param_missing("currency")
        currency = currency.lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise StripeError(400, f"Invalid currency: {currency}.", param="currency", saved=False)
        least = _MIN_AMOUNT.get(currency, 1)
        if amount < least:
            raise StripeError(
                400,
                f"Amount must be at least {least / 100:.2f} {currency}",
                code="amount_too_small",
                param="amount",
                saved=False,
            )
        if amount > _MAX_AMOUNT:
            raise StripeError(
                400,
                f"Amount must be no more than {_MAX_AMOUNT / 100:,.2f} {currency}",
                code="amount_too_large",
                param="amount",
                saved=False,
            )
        confirm = self._bool(params["confirm"], "confirm") if "confirm" in params else False
        for name in ("off_session", "error_on_requires_action", "return_url"):
            if name in params and not confirm:
                raise StripeError(
                    400,
                    f"You can only pass `{name}` when `confirm=true`.",
                    param=name,
                    saved=False,
                )
        if "off_session" in params and params["off_session"] not in ("one_off", "recurring"):
            self._bool(params["off_session"], "off_session")
        if "error_on_requires_action" in params:
            self._bool(params["error_on_requires_action"], "error_on_requires_action")
        customer = self._str(params, "customer")
        if customer is not None and customer not in self._customers:
            raise _missing("customer", customer, param="customer", status=400)
        pm_id = self._str(params, "payment_method")
        if pm_id is not None:
            pm = self._payment_methods.get(pm_id)
            if pm is None:
                raise _missing("PaymentMethod", pm_id, param="payment_method", status=400)
            if pm["customer"] is not None and customer is None:
                raise StripeError(
                    400,
                    "The provided PaymentMethod belongs to a Customer. Please include the "
                    "Customer in the `customer` parameter on the PaymentIntent.",
                    param="payment_method",
                    saved=False,
                )
            if pm["customer"] is not None and pm["customer"] != customer:
                raise StripeError(
                    400,
                    f"The provided PaymentMethod ({pm_id}) is attached to another Customer "
                    f"({pm['customer']}).",
                    param="payment_method",
                    saved=False,
                )
        future = self._str(params, "setup_future_usage")
        if future is not None and future not in ("off_session", "on_session"):
            raise StripeError(
                400,
                "Invalid setup_future_usage: must be one of off_session or on_session",
                param="setup_future_usage",
                saved=False,
            )
        types = params.get("payment_method_types")
        if isinstance(types, str):
            types = [types]
        if types is not None and (
            not isinstance(types, list) or not all(isinstance(t, str) for t in types)
        ):
            raise StripeError(
                400, "Invalid array: payment_method_types", param="payment_method_types"
            )
        automatic_raw = params.get("automatic_payment_methods")
        if automatic_raw is not None and types is not None:
            raise StripeError(
                400,
                "You may only specify one of these parameters: automatic_payment_methods, "
                "payment_method_types.",
                param="automatic_payment_methods",
                saved=False,
            )
        automatic: JSON | None = None
        if types is None:
            automatic = {"allow_redirects": "always", "enabled": True}
            if isinstance(automatic_raw, dict):
                if "enabled" not in automatic_raw:
                    raise _param_missing("automatic_payment_methods[enabled]")
                enabled = self._bool(automatic_raw["enabled"], "automatic_payment_methods[enabled]")
                redirects = automatic_raw.get("allow_redirects", "always")
                if redirects not in ("always", "never"):
                    raise StripeError(
                        400,
                        "Invalid automatic_payment_methods[allow_redirects]: must be one of "
                        "always or never",
                        param="automatic_payment_methods[allow_redirects]",
                        saved=False,
                    )
                automatic = {"allow_redirects": redirects, "enabled": True} if enabled else None
            elif automatic_raw is not None:
                raise StripeError(
                    400,
                    "Invalid object: automatic_payment_methods",
                    param="automatic_payment_methods",
                    saved=False,
                )
        intent = self._new_payment_intent(
            amount=amount,
            currency=currency,
            customer=customer,
            payment_method=pm_id,
            metadata=self._metadata(params.get("metadata")),
            description=self._str(params, "description"),
            receipt_email=self._str(params, "receipt_email"),
            setup_future_usage=future,
            automatic_payment_methods=automatic,
            payment_method_types=list(types) if types else ["card"],
        )
        if confirm:
            self._confirm(intent)
        return 200, self._render(intent, params)

    def _confirm_payment_intent(
        self, params: dict[str, Any], ids: tuple[str, ...]
    ) -> tuple[int, JSON]:
        self._allow(
            params,
            [
                "payment_method",
                "off_session",
                "error_on_requires_action",
                "receipt_email",
                "return_url",
                "setup_future_usage",
            ],
        )
        intent = self._payment_intents.get(ids[0])
        if intent is None:
            raise _missing("payment_intent", ids[0])
        if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
            raise StripeError(
                400,
                f"This PaymentIntent's payment_method could not be updated because it has a "
                f"status of {intent['status']}. You may only update the payment_method of a "
                "PaymentIntent with one of the following statuses: requires_payment_method, "
                "requires_confirmation, requires_action.",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": intent},
                saved=False,
            )
        if "off_session" in params and params["off_session"] not in ("one_off", "recurring"):
            self._bool(params["off_session"], "off_session")
        pm_id = self._str(params, "payment_method")
        if pm_id is not None:
            pm = self._payment_methods.get(pm_id)
            if pm is None:
                raise _missing("PaymentMethod", pm_id, param="payment_method", status=400)
            if pm["customer"] is not None and pm["customer"] != intent["customer"]:
                raise StripeError(
                    400,
                    f"The provided PaymentMethod ({pm_id}) is attached to another Customer.",
                    param="payment_method",
                    saved=False,
                )
            intent["payment_method"] = pm_id
        if "receipt_email" in params:
            intent["receipt_email"] = self._str(params, "receipt_email")
        if "setup_future_usage" in params:
            future = self._str(params, "setup_future_usage")
            if future is not None and future not in ("off_session", "on_session"):
                raise StripeError(
                    400,
                    "Invalid setup_future_usage: must be one of off_session or on_session",
                    param="setup_future_usage",
                    saved=False,
                )
            intent["setup_future_usage"] = future
        self._confirm(intent)
        return 200, self._render(intent, params)

    def _get_payment_intent(self, params: dict[str, Any], ids: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["client_secret"])
        intent = self._payment_intents.get(ids[0])
        if intent is None:
            raise _missing("payment_intent", ids[0])
        return 200, self._render(intent, params)

    def _list_payment_intents(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["customer", "limit", "starting_after", "ending_before"])
        customer = self._str(params, "customer")
        items = [
            pi
            for pi in reversed(self._payment_intents.values())
            if customer is None or pi["customer"] == customer
        ]
        return 200, self._page(items, params, "/v1/payment_intents", "payment_intent")

    def _create_meter_event(self, params: dict[str, Any], _: tuple[str, ...]) -> tuple[int, JSON]:
        self._allow(params, ["event_name", "payload", "identifier", "timestamp"])
        event_name = self._str(params, "event_name")
        if event_name is None:
            raise _param_missing("event_name")
        payload = params.get("payload")
        if not isinstance(payload, dict) or not payload:
            raise _param_missing("payload")
        for key in ("stripe_customer_id", "value"):
            if not payload.get(key):
                raise _param_missing(f"payload[{key}]")
        try:
            value = Decimal(payload["value"])
        except InvalidOperation:
            value = Decimal("NaN")
        if not value.is_finite():
            raise StripeError(
                400,
                f"The value in payload[value] must be a number, not '{payload['value']}'.",
                param="payload[value]",
            )
        now = self._now()
        timestamp = now
        if params.get("timestamp") not in (None, ""):
            timestamp = self._int(params["timestamp"], "timestamp")
            if timestamp < now - _METER_EVENT_PAST or timestamp > now + _METER_EVENT_FUTURE:
                raise StripeError(
                    400,
                    "The timestamp must be within the past 35 days and at most 5 minutes in "
                    "the future.",
                    param="timestamp",
                )
        identifier = self._str(params, "identifier") or str(uuid.uuid4())
        if identifier in self._meter_identifiers:
            raise StripeError(
                400,
                DUPLICATE_METER_EVENT_MESSAGE.format(identifier=identifier),
                code=self.duplicate_meter_event_code,
            )
        self._meter_identifiers.add(identifier)
        event: JSON = {
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": {str(k): str(v) for k, v in payload.items()},
            "timestamp": timestamp,
        }
        self.meter_events.append(copy.deepcopy(event))
        return 200, event


def _add_month(ts: int) -> int:
    """`ts` one calendar month later (day clamped to the month's end), in UTC."""
    when = datetime.fromtimestamp(ts, UTC)
    year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
    day = min(when.day, calendar.monthrange(year, month)[1])
    return int(when.replace(year=year, month=month, day=day).timestamp())
