"""Stripe objects → account state. Pure: no I/O, no SDK; plain mappings in.

Which events Tollway acts on, and what each is about:

    checkout.session.completed          the session's customer + subscription
    customer.subscription.created|updated|deleted|paused|resumed|trial_will_end
                                        the subscription itself
    invoice.paid | invoice.payment_failed
                                        the invoice's subscription

and, as those, every other invoice.* and customer.subscription.* event that
names a subscription (invoice.payment_succeeded, invoice.updated,
customer.subscription.pending_update_applied, ...): an endpoint may be sent
some and not others, and a paid invoice must restore access whichever says so.

Every one is treated as "this subscription changed": the companion re-reads
the subscription from Stripe and applies what Stripe says now, so duplicated,
late or reordered deliveries all converge on Stripe's current state.

Credits (webhook/credits.py) are bought, not subscribed to:

    checkout.session.completed | checkout.session.async_payment_succeeded
                                        a mode=payment session with tollway_pack metadata
    payment_intent.succeeded            an auto top-up (tollway_pack + tollway_crossing)

credit_ref names the object to re-read; pack_sale reads what it sold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar.decision import STATUSES
from sidecar.ids import valid_id
from sidecar.plans import Catalog

__all__ = [
    "CREDIT_EVENTS",
    "HANDLED_EVENTS",
    "NOTIFYING_EVENTS",
    "SUBSCRIPTION_EVENT_PREFIXES",
    "CreditRef",
    "EventRef",
    "PackSale",
    "SubscriptionState",
    "credit_ref",
    "event_ref",
    "pack_sale",
    "preferred",
    "subscription_state",
]

HANDLED_EVENTS: Final = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_failed",
    }
)
# Any other event of these kinds that names a subscription re-syncs it as well.
SUBSCRIPTION_EVENT_PREFIXES: Final = ("invoice.", "customer.subscription.")
# Events a customer's humans should hear about (log + optional callback).
NOTIFYING_EVENTS: Final = {
    "invoice.payment_failed": "payment_failed",
    "customer.subscription.trial_will_end": "trial_will_end",
    "customer.subscription.deleted": "subscription_canceled",
}
LIVE_STATUSES: Final = frozenset({"active", "trialing", "past_due"})
# A session paid for (or free, with a 100% discount): its pack is granted.
_PAID: Final = frozenset({"paid", "no_payment_required"})
CREDIT_EVENTS: Final = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "payment_intent.succeeded",
    }
)


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    customer_id: str
    subscription_id: str
    status: str
    plan: str | None  # None: no item's price is in the plan catalog
    price_ref: str  # the price id (or lookup key) Stripe bills, for errors
    period_end: int
    created: int

    @property
    def error(self) -> str:
        if self.plan is None:
            return f"price {self.price_ref or '(none)'} is in no configured plan"
        return ""


@dataclass(frozen=True, slots=True)
class EventRef:
    """What an event is about: the account, and the subscription to re-read."""

    customer_id: str
    subscription_id: str | None
    plan_hint: str | None = None  # checkout metadata, when the event carries it


def _id(value: Any) -> str | None:
    """An id, whether Stripe sent it bare or as an expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and valid_id(value) else None


def subscription_state(sub: Mapping[str, Any], catalog: Catalog) -> SubscriptionState:
    """Reads a subscription object (any API version: items carry `price`, or
    `plan` in old payloads). Raises ValueError when it is not one."""
    customer, sub_id, status = _id(sub.get("customer")), _id(sub.get("id")), sub.get("status")
    if sub.get("object") != "subscription" or not customer or not sub_id:
        raise ValueError("not a subscription object")
    if status not in STATUSES:
        raise ValueError(f"unknown subscription status {status!r}")
    items = (sub.get("items") or {}).get("data") or []
    plan_name, ref, period_end = None, "", 0
    for item in items:
        price = item.get("price") or item.get("plan") or {}
        price_id, lookup = _id(price.get("id")), price.get("lookup_key")
        plan = catalog.plan_for_price(price_id, lookup if isinstance(lookup, str) else None)
        ref = ref or price_id or ""
        if plan is not None:
            plan_name, ref = plan.name, price_id or str(lookup)
            period_end = int(item.get("current_period_end") or 0)
            break
    if not period_end:  # payloads of versions before 2025-03-31 keep it on the subscription
        period_end = int(sub.get("current_period_end") or 0)
    return SubscriptionState(
        customer_id=customer,
        subscription_id=sub_id,
        status=str(status),
        plan=plan_name,
        price_ref=ref,
        period_end=period_end,
        created=int(sub.get("created") or 0),
    )


def event_ref(event: Mapping[str, Any]) -> EventRef | None:
    """The account and subscription an event concerns; None if Tollway ignores it."""
    kind = event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(kind, str) or not isinstance(obj, Mapping):
        return None
    if kind not in HANDLED_EVENTS and not kind.startswith(SUBSCRIPTION_EVENT_PREFIXES):
        return None
    customer = _id(obj.get("customer"))
    if customer is None:
        return None
    if kind == "checkout.session.completed":
        metadata = obj.get("metadata")
        hint = metadata.get("tollway_plan") if isinstance(metadata, Mapping) else None
        hint = hint if isinstance(hint, str) else None
        return EventRef(customer, _id(obj.get("subscription")), hint)
    if kind.startswith("customer.subscription."):
        return EventRef(customer, _id(obj.get("id")))
    # Invoices: the subscription moved under parent.subscription_details in 2025.
    parent = obj.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    from_parent = _id(details.get("subscription")) if isinstance(details, Mapping) else None
    return EventRef(customer, from_parent or _id(obj.get("subscription")))


def preferred(states: Iterable[SubscriptionState]) -> SubscriptionState | None:
    """The subscription that decides a customer's access when there are several:
    a live one (active, trialing, past_due) before an ended one, newest first."""
    ranked = sorted(states, key=lambda s: (s.status in LIVE_STATUSES, s.created), reverse=True)
    return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class CreditRef:
    """The object a credits event is about: a Checkout Session or a PaymentIntent."""

    kind: str  # session | payment_intent
    object_id: str


@dataclass(frozen=True, slots=True)
class PackSale:
    """What a paid-for (or not yet paid) pack purchase sold, as Stripe has it."""

    customer_id: str | None
    pack: str
    credits: int
    paid: bool
    crossing: str  # the fall an auto top-up was for ("" for a Checkout purchase)


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def credit_ref(event: Mapping[str, Any]) -> CreditRef | None:
    """The session or PaymentIntent a credits event concerns; None if it is not one.
    A PaymentIntent of a Checkout purchase is granted by its session, so only an
    auto top-up's (tollway_crossing set) counts here."""
    kind = event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if kind not in CREDIT_EVENTS or not isinstance(obj, Mapping):
        return None
    metadata = _metadata(obj)
    object_id = _id(obj.get("id"))
    if object_id is None or not isinstance(metadata.get("tollway_pack"), str):
        return None
    if kind == "payment_intent.succeeded":
        crossing = metadata.get("tollway_crossing")
        if not (isinstance(crossing, str) and crossing):
            return None
        return CreditRef("payment_intent", object_id)
    if obj.get("mode") != "payment":
        return None
    return CreditRef("session", object_id)


def pack_sale(obj: Mapping[str, Any], catalog: Catalog) -> PackSale | None:
    """Reads a Checkout Session or PaymentIntent Tollway made for a pack; None if it
    is not one. The credits are what the metadata says was sold (the catalog may
    have changed since), else the pack's."""
    metadata = _metadata(obj)
    name = metadata.get("tollway_pack")
    if not isinstance(name, str) or not name:
        return None
    raw = metadata.get("tollway_credits")
    pack = catalog.credit_packs.get(name)
    if isinstance(raw, str) and raw.isdigit() and int(raw) > 0:
        credits = int(raw)
    elif pack is not None:
        credits = pack.credits
    else:
        return None
    if obj.get("object") == "payment_intent":
        paid = obj.get("status") == "succeeded"
    else:
        paid = obj.get("status") == "complete" and obj.get("payment_status") in _PAID
    crossing = metadata.get("tollway_crossing")
    return PackSale(
        customer_id=_id(obj.get("customer")),
        pack=name,
        credits=credits,
        paid=paid,
        crossing=crossing if isinstance(crossing, str) else "",
    )
