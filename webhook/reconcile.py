"""Reconciliation: repair what missed webhooks left behind.

Lists every subscription in Stripe (all statuses, page by page), picks the one
that decides each customer's access (stripe_map.preferred), and compares it
with the account in Redis. Each account that differs is re-synced through the
same locked fetch-and-apply path as a webhook, so a reconcile racing a webhook
cannot write an older state over a newer one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import stripe

from sidecar.store import Store
from webhook.config import CompanionSettings
from webhook.notify import Notifier
from webhook.outbox import Outbox
from webhook.stripe_map import SubscriptionState, preferred, subscription_state
from webhook.sync import Syncer, stripe_failure

__all__ = ["Change", "Summary", "reconcile"]

log = logging.getLogger("tollway.reconcile")


@dataclass(frozen=True, slots=True)
class Change:
    customer_id: str
    subscription_id: str
    before: str  # "status/plan", or "-" for an account that did not exist
    after: str


@dataclass(slots=True)
class Summary:
    dry_run: bool
    subscriptions: int = 0
    customers: int = 0
    changes: list[Change] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def line(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        return (
            f"checked {self.subscriptions} subscriptions of {self.customers} customers: "
            f"{verb} {len(self.changes)}, skipped {len(self.skipped)}"
        )


async def reconcile(
    store: Store,
    client: stripe.StripeClient,
    settings: CompanionSettings,
    notifier: Notifier,
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    summary = Summary(dry_run=dry_run)
    catalog = settings.core.catalog
    by_customer: dict[str, list[SubscriptionState]] = {}
    try:
        page = await client.v1.subscriptions.list_async({"status": "all", "limit": 100})
        async for sub in page.auto_paging_iter():
            summary.subscriptions += 1
            if progress and summary.subscriptions % 100 == 0:
                progress(summary.subscriptions)
            try:
                state = subscription_state(sub.to_dict(), catalog)
            except ValueError as exc:
                summary.skipped.append(f"{sub.id}: {exc}")
                continue
            by_customer.setdefault(state.customer_id, []).append(state)
    except stripe.StripeError as exc:
        raise stripe_failure(exc) from exc
    summary.customers = len(by_customer)

    # Notifications go through the store's outbox, delivered by a companion's relay;
    # `notifier` is no longer used (kept for sidecar/cli's call).
    syncer = Syncer(store, client, settings, Outbox(store))
    for customer, states in sorted(by_customer.items()):
        wanted = preferred(states)
        assert wanted is not None  # every group has at least one state
        account = await store.get_account(customer)
        before = f"{account.status}/{account.plan}" if account else "-"
        plan = wanted.plan or (account.plan if account else "")
        after = f"{wanted.status}/{plan}"
        same_sub = account is not None and account.subscription_id == wanted.subscription_id
        if before == after and same_sub:
            continue
        if not dry_run:
            change = await syncer.sync(customer, wanted.subscription_id)
            if change is None:
                summary.skipped.append(f"{wanted.subscription_id}: vanished from Stripe")
                continue
            after = f"{change.new_status}/{change.new_plan}"
        summary.changes.append(Change(customer, wanted.subscription_id, before, after))
        log.info(
            "reconcile: %s %s -> %s%s", customer, before, after, " (dry run)" if dry_run else ""
        )
    return summary
