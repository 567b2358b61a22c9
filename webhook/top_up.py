"""Auto top-up: the balance fell to its mark, so buy the auto top-up pack (the
account's plan's auto_top_up_pack, else [credits]') off-session with the
customer's saved card.

The decision script marks each fall of a balance past the top-up mark once
(the crossing, an id; cleared by the next grant), and so does a settlement's
burn, or a grant that leaves the balance at or below the mark; a sidecar (or
the companion that granted) queues an ``auto_top_up_due`` entry for it, and
the scripts report a fall still due again a minute later, in case that entry
was lost. The relay (webhook/outbox.py) hands the entry to one companion and
keeps it pending until this handler returns. One charge per crossing, whoever
handles it and however often:

- under the account's "topup" lock, so two companions never charge at once;
- only while that crossing is still the account's due one: a grant since (this
  top-up's, granted by a companion that died before acknowledging; or the
  customer's own purchase) cleared it, and nothing is charged;
- never for an account whose setting is "off" now (it may have changed after
  the fall), nor for a crossing that already failed, nor for an account that
  is not on a plan with credits;
- the PaymentIntent carries the idempotency key
  ``tollway-top-up-<customer>-<crossing>``, so a companion killed after the
  charge and before the grant gets the same PaymentIntent back when the entry
  is taken over, and the grant id (the PaymentIntent id) grants once; the
  payment_intent.succeeded webhook grants the same id too, as a backstop.

The card: where Stripe keeps the one the customer saved. The customer's
invoice_settings.default_payment_method when set (the Billing portal sets it);
else the default_payment_method of the customer's subscriptions (subscription
Checkout sets it there, not on the customer); else the newest card attached to
the customer (payment Checkout with setup_future_usage only attaches it).

A declined card (or no saved card) is notified once (auto_top_up_failed, with
Stripe's decline code, never card details) and not retried: the crossing stays
due, so no further fall is signalled until a grant (a purchase) lifts the
balance, and its repeats find the failure and charge nothing. Stripe or Redis
being away leaves the entry pending, taken over again after [stripe]
notify_reclaim_after.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

import stripe

from sidecar.plans import CreditPack, Plan
from sidecar.store import Store
from sidecar.store.names import valid_customer_id
from webhook.config import CompanionSettings
from webhook.credits import PackGrants
from webhook.outbox import Outbox
from webhook.sync import stripe_failure

__all__ = ["TopUps"]

log = logging.getLogger("tollway.top_up")

_CROSSING_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # "<us>-<n>" today


def idempotency_key(customer_id: str, crossing: str) -> str:
    return f"tollway-top-up-{customer_id}-{crossing}"


def _id_of(value: object) -> str | None:
    """A payment method's id, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


class TopUps:
    def __init__(
        self,
        store: Store,
        client: stripe.StripeClient,
        settings: CompanionSettings,
        outbox: Outbox,
        grants: PackGrants,
    ) -> None:
        self._store = store
        self._client = client
        self._settings = settings
        self._outbox = outbox
        self._grants = grants
        self._prices: dict[str, tuple[int, str]] = {}  # a price's amount never changes

    def pack_for(self, plan: Plan | None) -> CreditPack | None:
        """The pack an auto top-up buys for an account on plan (None: none set)."""
        name = self._settings.core.credits.top_up_pack_for(plan)
        return self._settings.core.catalog.credit_packs.get(name) if name else None

    @property
    def offered(self) -> bool:
        """Whether any account may be topped up: a pack set in [credits] or on a plan."""
        plans = self._settings.core.catalog.plans.values()
        return self.pack_for(None) is not None or any(p.auto_top_up_pack for p in plans)

    async def plan_of(self, customer: str) -> Plan | None:
        """The account's plan as configured here (None: no account, or a plan not here)."""
        account = await self._store.get_account(customer)
        return self._settings.core.catalog.plans.get(account.plan) if account else None

    async def handle_due(self, payload: dict[str, Any]) -> None:
        """Handles one auto_top_up_due entry; raises StoreUnavailable or
        StripeUnavailable to have it retried later."""
        customer, crossing = payload.get("customer_id"), payload.get("crossing")
        if not (isinstance(customer, str) and valid_customer_id(customer)):
            log.error("auto top-up due for no valid customer; dropped")
            return
        if not (isinstance(crossing, str) and _CROSSING_RE.fullmatch(crossing)):
            log.error(
                "auto top-up due for %s without a valid crossing (%r); dropped", customer, crossing
            )
            return
        plan = await self.plan_of(customer)
        if plan is None or not plan.credits:
            log.info("auto top-up due for %s, whose plan burns no credits; not charged", customer)
            return
        pack = self.pack_for(plan)
        if pack is None or pack.stripe_price is None:
            log.error("auto top-up due for %s, but no pack with a Stripe price is set", customer)
            return
        async with self._store.account_lock(customer, purpose="topup", ttl=60, wait=30):
            await self._charge(customer, crossing, pack)

    async def _charge(self, customer: str, crossing: str, pack: CreditPack) -> None:
        assert pack.stripe_price is not None
        if await self._store.auto_top_up(customer) == "off":
            log.info("auto top-up for %s: turned off; not charged", customer)
            return
        if await self._store.due_top_up(customer) != crossing:
            log.info("auto top-up for %s (%s): already served; not charged", customer, crossing)
            return
        if await self._outbox.was_queued(customer, f"auto_top_up_failed:{crossing}"):
            log.info("auto top-up for %s (%s): failed before; not retried", customer, crossing)
            return
        card = await self._saved_card(customer)
        if card is None:
            await self._failed(customer, crossing, pack, reason="no_payment_method")
            return
        price = await self._price(pack.stripe_price)
        if price is None:
            await self._failed(customer, crossing, pack, reason="price_not_chargeable")
            return
        amount, currency = price
        metadata = {
            "tollway_pack": pack.name,
            "tollway_credits": str(pack.credits),
            "tollway_crossing": crossing,
        }
        try:
            intent = await self._client.v1.payment_intents.create_async(
                {
                    "amount": amount,
                    "currency": currency,
                    "customer": customer,
                    "payment_method": card,
                    "off_session": True,
                    "confirm": True,
                    "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                    "description": f"Tollway auto top-up: pack {pack.name}",
                    "metadata": metadata,
                },
                {"idempotency_key": idempotency_key(customer, crossing)},
            )
        except stripe.CardError as exc:
            decline = getattr(exc.error, "decline_code", None) if exc.error else None
            await self._failed(
                customer, crossing, pack, reason=exc.code or "card_declined", decline_code=decline
            )
            return
        except stripe.InvalidRequestError as exc:
            if exc.http_status and exc.http_status >= 500:
                raise stripe_failure(exc) from exc
            await self._failed(customer, crossing, pack, reason=exc.code or "invalid_request")
            return
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        if intent.status != "succeeded":
            log.info(
                "auto top-up %s for %s is %s; payment_intent.succeeded will grant it",
                intent.id,
                customer,
                intent.status,
            )
            return
        granted = await self._grants.grant_intent(intent.to_dict())
        log.info(
            "auto top-up for %s: %s charged, pack %s %s",
            customer,
            intent.id,
            pack.name,
            granted.result if granted else "not granted",
        )

    async def _saved_card(self, customer: str) -> str | None:
        """The card to charge (see the module): None if the customer saved none."""
        try:
            found = (await self._client.v1.customers.retrieve_async(customer)).to_dict()
            card = _id_of((found.get("invoice_settings") or {}).get("default_payment_method"))
            if card:
                return card
            subscriptions = await self._client.v1.subscriptions.list_async(
                {"customer": customer, "limit": 10}
            )
            for subscription in subscriptions.data:
                card = _id_of(subscription.to_dict().get("default_payment_method"))
                if card:
                    return card
            attached = await self._client.v1.customers.payment_methods.list_async(
                customer, {"type": "card", "limit": 1}
            )
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise stripe_failure(exc) from exc
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        return attached.data[0].id if attached.data else None  # Stripe lists the newest first

    async def _price(self, price_id: str) -> tuple[int, str] | None:
        """The pack price's amount and currency; None if Stripe has no such fixed price."""
        if price_id not in self._prices:
            try:
                price = await self._client.v1.prices.retrieve_async(price_id)
            except stripe.InvalidRequestError as exc:
                if exc.http_status == 404:
                    log.error("auto top-up: Stripe has no price %s", price_id)
                    return None
                raise stripe_failure(exc) from exc
            except stripe.StripeError as exc:
                raise stripe_failure(exc) from exc
            if price.unit_amount is None:
                log.error("auto top-up: price %s has no fixed amount", price_id)
                return None
            self._prices[price_id] = (int(price.unit_amount), str(price.currency))
        return self._prices[price_id]

    async def _failed(
        self,
        customer: str,
        crossing: str,
        pack: CreditPack,
        *,
        reason: str,
        decline_code: str | None = None,
    ) -> None:
        log.warning(
            "auto top-up for %s failed (%s%s); not retried until the next top-up",
            customer,
            reason,
            f", {decline_code}" if decline_code else "",
        )
        details: dict[str, Any] = {"pack": pack.name, "crossing": crossing, "reason": reason}
        if decline_code:
            details["decline_code"] = decline_code
        await self._outbox.queue_once(
            "auto_top_up_failed",
            customer,
            notification_id=f"auto_top_up_failed:{crossing}",
            **details,
        )
