"""Auto top-up: the balance fell to its mark, so buy [credits] auto_top_up_pack
off-session with the customer's saved card.

The decision script marks each fall of a balance past the top-up mark once
(the crossing, an id; cleared by the next grant) and a sidecar queues an
``auto_top_up_due`` entry for it; the relay (webhook/outbox.py) hands the entry
to one companion and keeps it pending until this handler returns. One charge
per crossing, whoever handles it and however often:

- under the account's "topup" lock, so two companions never charge at once;
- only while that crossing is still the account's due one: a grant since (this
  top-up's, granted by a companion that died before acknowledging; or the
  customer's own purchase) cleared it, and nothing is charged;
- never for an account whose setting is "off" now (it may have changed after
  the fall), nor for a crossing that already failed;
- the PaymentIntent carries the idempotency key
  ``tollway-top-up-<customer>-<crossing>``, so a companion killed after the
  charge and before the grant gets the same PaymentIntent back when the entry
  is taken over, and the grant id (the PaymentIntent id) grants once; the
  payment_intent.succeeded webhook grants the same id too, as a backstop.

A declined card (or no saved card) is notified once (auto_top_up_failed, with
Stripe's decline code, never card details) and not retried: the crossing stays
due, so no further fall is signalled until a grant (a purchase) lifts the
balance. Stripe or Redis being away leaves the entry pending, taken over
again after [stripe] notify_reclaim_after.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

import stripe

from sidecar.plans import CreditPack
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

    @property
    def pack(self) -> CreditPack | None:
        name = self._settings.core.credits.auto_top_up_pack
        return self._settings.core.catalog.credit_packs.get(name) if name else None

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
        pack = self.pack
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
        try:
            found = await self._client.v1.customers.retrieve_async(customer)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise stripe_failure(exc) from exc
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        data = found.to_dict()
        settings = data.get("invoice_settings")
        card = settings.get("default_payment_method") if isinstance(settings, dict) else None
        if isinstance(card, dict):
            card = card.get("id")
        return card if isinstance(card, str) and card else None

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
