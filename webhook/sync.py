"""Keeps accounts in step with Stripe: one subscription at a time, serialized
per account, each webhook event applied at most once.

The rule that makes order irrelevant: an event only says *which* subscription
changed. The companion re-reads that subscription from Stripe under the
account's lock and writes what Stripe says now, recording the event id in the
same atomic step. Retries and duplicates are no-ops; a late event re-applies
the current truth; a Stripe outage answers 503 so Stripe delivers again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import stripe

from sidecar.errors import TollwayError
from sidecar.plans import Catalog
from sidecar.store import SUBSCRIPTION_ENDED, Store, SubscriptionChange
from webhook.config import API_VERSION, CompanionSettings, StripeSettings
from webhook.outbox import Outbox
from webhook.stripe_map import NOTIFYING_EVENTS, SubscriptionState, event_ref, subscription_state

__all__ = ["StripeUnavailable", "Syncer", "make_client"]

log = logging.getLogger("tollway.sync")


class StripeUnavailable(TollwayError):
    """Stripe could not be asked (network, 5xx, rate limit, credentials)."""


def make_client(settings: StripeSettings) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    """The Stripe client and its HTTP client (close it with close_async() in the
    event loop that used it)."""
    if not settings.secret_key:
        raise TollwayError("STRIPE_SECRET_KEY is not set: Stripe sync is off")
    http = stripe.HTTPXClient(timeout=settings.timeout, allow_sync_methods=True)
    client = stripe.StripeClient(
        settings.secret_key,
        stripe_version=API_VERSION,
        base_addresses={"api": settings.api_base} if settings.api_base else None,
        http_client=http,
        max_network_retries=settings.max_network_retries,
    )
    return client, http


def stripe_failure(exc: stripe.StripeError) -> StripeUnavailable:
    # The message names the kind only: Stripe's text can echo request details.
    return StripeUnavailable(f"Stripe request failed: {type(exc).__name__}")


class Syncer:
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

    @property
    def catalog(self) -> Catalog:
        return self._settings.core.catalog

    async def fetch_subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription as Stripe has it now; None if Stripe has no such thing."""
        try:
            sub = await self._client.v1.subscriptions.retrieve_async(subscription_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise stripe_failure(exc) from exc
        except stripe.StripeError as exc:
            raise stripe_failure(exc) from exc
        return sub.to_dict()

    async def handle_event(self, event: Mapping[str, Any]) -> str:
        """Applies one verified event; returns applied | kept | duplicate | ignored."""
        kind, event_id = str(event.get("type")), str(event.get("id"))
        ref = event_ref(event)
        if ref is None or ref.subscription_id is None:
            log.info("event %s (%s): nothing for Tollway to do", event_id, kind)
            return "ignored"
        if await self._store.event_seen(ref.customer_id, event_id):
            # Applied before; its notification may not have been queued (the
            # companion that applied it died first): queue it now, once.
            await self._notify_once(kind, event_id, ref.customer_id, None)
            return "duplicate"
        stamp = event.get("created")
        created = stamp if isinstance(stamp, int) and stamp > 0 else int(time.time())
        change = await self.sync(
            ref.customer_id, ref.subscription_id, event_id=event_id, trouble_since=created
        )
        if change is None:
            log.warning(
                "event %s (%s): subscription %s not found in Stripe",
                event_id,
                kind,
                ref.subscription_id,
            )
            return "ignored"
        await self._notify_once(kind, event_id, ref.customer_id, change)
        return change.result

    async def _notify_once(
        self, kind: str, event_id: str, customer: str, change: SubscriptionChange | None
    ) -> None:
        """The event's notification, if its kind has one, queued once however
        often the event arrives (the account's state as of now, for a repeat)."""
        if kind not in NOTIFYING_EVENTS:
            return
        notification = NOTIFYING_EVENTS[kind]
        notification_id = f"{notification}:{event_id}"
        if change is None:
            if await self._outbox.was_queued(customer, notification_id):
                return
            account = await self._store.get_account(customer)
            status, grace_until = (account.status, account.grace_until) if account else ("", 0)
        else:
            status, grace_until = change.new_status, change.grace_until
        details: dict[str, Any] = {"event": event_id, "status": status}
        if grace_until:
            details["grace_until"] = grace_until
        await self._outbox.queue_once(
            notification, customer, notification_id=notification_id, **details
        )

    async def sync(
        self,
        customer_id: str,
        subscription_id: str,
        *,
        event_id: str = "",
        trouble_since: int | None = None,
    ) -> SubscriptionChange | None:
        """Re-reads one subscription and applies it to the customer's account."""
        async with self._store.account_lock(customer_id):
            sub = await self.fetch_subscription(subscription_id)
            if sub is None:
                return None
            state = subscription_state(sub, self.catalog)
            if state.customer_id != customer_id:
                log.error(
                    "subscription %s belongs to %s, not %s; not applied",
                    subscription_id,
                    state.customer_id,
                    customer_id,
                )
                return None
            return await self.apply(state, event_id=event_id, trouble_since=trouble_since)

    async def apply(
        self, state: SubscriptionState, *, event_id: str = "", trouble_since: int | None = None
    ) -> SubscriptionChange:
        """Writes a subscription's state (the caller holds the account's lock)."""
        customer = state.customer_id
        if state.error:
            log.error("account %s: %s; keeping its current plan", customer, state.error)
            if event_id:  # once per event, however often it arrives
                await self._outbox.queue_once(
                    "unknown_price",
                    customer,
                    notification_id=f"unknown_price:{event_id}",
                    price=state.price_ref,
                    subscription_id=state.subscription_id,
                )
            else:  # a reconcile or a checkout return: each finds it again
                await self._outbox.queue(
                    "unknown_price",
                    customer,
                    price=state.price_ref,
                    subscription_id=state.subscription_id,
                )
        change = await self._store.apply_subscription(
            customer,
            event_id=event_id,
            subscription_id=state.subscription_id,
            status=state.status,
            plan=state.plan,
            error=state.error,
            period_end=state.period_end,
            grace_seconds=self._settings.core.billing.grace_seconds,
            trouble_since=trouble_since or int(time.time()),
        )
        if change.result == "applied" and (change.old_status, change.old_plan) != (
            change.new_status,
            change.new_plan,
        ):
            log.info(
                "account %s: %s/%s -> %s/%s",
                customer,
                change.old_status or "-",
                change.old_plan or "-",
                change.new_status,
                change.new_plan,
            )
        if change.result == "applied":
            await self._store.invalidate(customer=customer)
        ended = change.new_status == "canceled" and change.old_status != "canceled"
        if change.result == "applied" and ended:
            revoked = await self._store.revoke_all_keys(customer, reason=SUBSCRIPTION_ENDED)
            log.info("account %s: subscription ended; %d keys marked revoked", customer, revoked)
        return change
