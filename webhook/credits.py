"""Credit packs: sold through Checkout (mode=payment), granted exactly once.

A pack is a [[credit_packs]] entry with a one-time stripe_price. POST /checkout
with {"pack", "customer"} opens a session for it; its metadata (on the session
and on its PaymentIntent) names the pack and its credits, and it saves the card
for off-session use (setup_future_usage), so auto top-up (webhook/top_up.py)
can charge it later.

Credits belong to an account, so a pack is sold only to a customer who has a
Tollway account on a plan that burns credits: an email-only buyer (a new
Stripe customer, who has no account and no key) is refused with 400
account_required, and so is a customer id without an account (400) or on a
plan without credits (400 plan_without_credits). Subscribe first (or have an
operator create the account); then buy packs with the customer id.

Granting: whatever tells us (checkout.session.completed, a later
checkout.session.async_payment_succeeded, the browser back at
/checkout/complete, or an auto top-up's payment_intent.succeeded), the object
is re-read from Stripe, which is the truth: only a paid session (or a
succeeded PaymentIntent) grants, and the grant id is the session id (or the
PaymentIntent id), so the store grants at most once per purchase however many
deliveries, companions or browser tabs race (grant_credits.lua). A pack whose
metadata outlived its catalog entry is still granted what was sold (the money
was taken), without an expiry. A purchase for a customer without an account
is granted too (kept for the account that may come) and logged.

A grant that leaves the balance at or below the account's auto top-up mark (a
top-up the balance fell past meanwhile, a pack smaller than the gap) starts a
new fall (grant_credits.lua); the grant's companion queues its
``auto_top_up_due`` at once, as a sidecar does for a burn's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import stripe

from sidecar.store import Store
from webhook.config import CompanionSettings
from webhook.outbox import Outbox
from webhook.stripe_map import PackSale, credit_ref, pack_sale
from webhook.sync import stripe_failure

__all__ = ["Granted", "PackGrants", "checkout_params"]

log = logging.getLogger("tollway.credits")

_SESSION_RE: Final = re.compile(r"cs_[A-Za-z0-9_]{1,200}")
_INTENT_RE: Final = re.compile(r"pi_[A-Za-z0-9_]{1,200}")


def checkout_params(
    settings: CompanionSettings, pack_name: str, customer_id: str
) -> dict[str, Any]:
    """The Checkout Session for one pack, quantity 1 (the pack must have a price)."""
    pack = settings.core.catalog.credit_packs[pack_name]
    assert pack.stripe_price is not None  # the caller refused a pack not for sale
    metadata = {"tollway_pack": pack.name, "tollway_credits": str(pack.credits)}
    return {
        "mode": "payment",
        "customer": customer_id,
        "success_url": settings.stripe.success_url,
        "cancel_url": settings.stripe.cancel_url,
        "line_items": [{"price": pack.stripe_price, "quantity": 1}],
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata, "setup_future_usage": "off_session"},
    }


@dataclass(frozen=True, slots=True)
class Granted:
    result: str  # applied | duplicate | unpaid
    customer_id: str
    pack: str
    credits: int
    balance: int


class PackGrants:
    def __init__(
        self,
        store: Store,
        client: stripe.StripeClient,
        settings: CompanionSettings,
        outbox: Outbox,
    ) -> None:
        self._store = store
        self._client = client
        self._settings = settings
        self._outbox = outbox

    async def handle_event(self, event: Mapping[str, Any]) -> str | None:
        """applied | duplicate | unpaid | ignored for a credits event; None for
        any other event (the subscription sync takes it)."""
        ref = credit_ref(event)
        if ref is None:
            return None
        if ref.kind == "session":
            granted = await self.grant_session(ref.object_id)
        else:
            granted = await self.grant_payment_intent(ref.object_id)
        return "ignored" if granted is None else granted.result

    async def fetch_session(self, session_id: str) -> dict[str, Any] | None:
        if not _SESSION_RE.fullmatch(session_id):
            return None
        try:
            session = await self._client.v1.checkout.sessions.retrieve_async(session_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise stripe_failure(exc) from exc
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        return session.to_dict()

    async def grant_session(
        self, session_id: str, session: dict[str, Any] | None = None
    ) -> Granted | None:
        """Grants a pack session's credits once it is paid; None if it is no pack sale."""
        if session is None:
            session = await self.fetch_session(session_id)
        if session is None or session.get("id") != session_id or session.get("mode") != "payment":
            return None
        return await self._grant(session_id, pack_sale(session, self._settings.core.catalog))

    async def grant_payment_intent(self, intent_id: str) -> Granted | None:
        """Grants an auto top-up's credits once its PaymentIntent succeeded."""
        if not _INTENT_RE.fullmatch(intent_id):
            return None
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(intent_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise stripe_failure(exc) from exc
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        return await self.grant_intent(intent.to_dict())

    async def grant_intent(self, intent: dict[str, Any]) -> Granted | None:
        sale = pack_sale(intent, self._settings.core.catalog)
        if sale is None or not sale.crossing:
            return None  # a Checkout purchase's PaymentIntent: its session grants it
        granted = await self._grant(str(intent.get("id")), sale)
        if granted is not None and granted.result != "unpaid":
            await self._outbox.queue_once(
                "auto_top_up_succeeded",
                granted.customer_id,
                notification_id=f"auto_top_up:{sale.crossing}",
                pack=sale.pack,
                credits=sale.credits,
                balance=granted.balance,
                payment_intent=str(intent.get("id")),
            )
        return granted

    async def _grant(self, grant_id: str, sale: PackSale | None) -> Granted | None:
        if sale is None or sale.customer_id is None:
            log.warning(
                "%s: names no pack Tollway sells, or no customer; nothing granted", grant_id
            )
            return None
        customer = sale.customer_id
        if not sale.paid:
            log.info(
                "%s: pack %s for %s not paid yet; nothing granted", grant_id, sale.pack, customer
            )
            return Granted("unpaid", customer, sale.pack, sale.credits, 0)
        pack = self._settings.core.catalog.credit_packs.get(sale.pack)
        expires_at = int(time.time()) + pack.expires_in if pack and pack.expires_in else 0
        if pack is None:
            log.warning(
                "%s: pack %s is no longer configured; granting what was sold", grant_id, sale.pack
            )
        account = await self._store.get_account(customer)
        plan = self._settings.core.catalog.plans.get(account.plan) if account else None
        result = await self._store.grant_credits(
            customer,
            grant_id=grant_id,
            credits=sale.credits,
            expires_at=expires_at,
            reason=f"pack {sale.pack}",
            # Only a plan that burns credits tops up (webhook/top_up.py).
            top_up_at=self._settings.core.credits.top_up_at_for(plan)
            if plan is not None and plan.credits
            else None,
        )
        if result.result == "granted":
            log.info(
                "credits: %d granted to %s for pack %s (%s); balance %d",
                sale.credits,
                customer,
                sale.pack,
                grant_id,
                result.balance,
            )
            if account is None:
                log.warning("credits: %s has no account yet; its credits wait for it", customer)
        if result.top_up:
            log.info(
                "credits: %s is still at or below its auto top-up mark (balance %d); "
                "top-up %s queued",
                customer,
                result.balance,
                result.top_up,
            )
            await self._outbox.queue(
                "auto_top_up_due",
                customer,
                notification_id=f"auto_top_up_due:{result.top_up}",
                plan=plan.name if plan else "",
                crossing=result.top_up,
                balance=result.balance,
            )
        outcome = {"granted": "applied", "duplicate": "duplicate"}.get(result.result, "expired")
        return Granted(outcome, customer, sale.pack, sale.credits, result.balance)
