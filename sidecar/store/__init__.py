"""Tollway's state in Redis, by concern. Each module sits beside the Lua it drives:

    names.py          every key name, the hash tag, the invalidation messages
    connection.py     Redis URLs, clients, and what a failure becomes (StoreUnavailable)
    pipelining.py     the request path's one shared, pipelined connection
    base.py           the client, deadline, clock and script loader every part shares
    accounts.py       accounts: plan, status, grace
    api_keys.py       API key records, and turning a presented key into a usable record
    admission.py      the decision script (admit.lua): its inputs, its answer
    allotments.py     allotments handed back (return_allotment.lua), leased enforcement
    sync.py           Stripe sync: events applied once, locks, checkout claims
    usage.py          usage records, reservations, leases, totals
    credits.py        prepaid credits: grants, the balance, its ledger
    admin_tokens.py   admin tokens, and the idempotency records of admin creates
    billing.py        what to report to Stripe, and what it accepted or refused
    notifications.py  notifications for the companion to deliver
    portal.py         the developer portal's sessions, sign-in links and attempts
    shared/           Lua chunks inlined into several scripts

``Store`` is all of them over one client: one instance per process.
"""

from __future__ import annotations

from sidecar.store.accounts import Account
from sidecar.store.admin_tokens import AdminTokens, TokenRecord
from sidecar.store.admission import AdmissionStore
from sidecar.store.allotments import AllotmentReturn, AllotmentStore, Returned
from sidecar.store.api_keys import SUBSCRIPTION_ENDED, ApiKeys, KeyRecord
from sidecar.store.billing import Billing
from sidecar.store.connection import Client, connect, subscriber
from sidecar.store.credits import Balance, CreditStore, GrantResult
from sidecar.store.notifications import Notifications
from sidecar.store.portal import PortalSession, PortalStore
from sidecar.store.sync import StripeSync, SubscriptionChange
from sidecar.store.usage import Recorded, UsageStore

__all__ = [
    "SUBSCRIPTION_ENDED",
    "Account",
    "AllotmentReturn",
    "Balance",
    "Client",
    "GrantResult",
    "KeyRecord",
    "PortalSession",
    "Recorded",
    "Returned",
    "Store",
    "SubscriptionChange",
    "TokenRecord",
    "connect",
    "subscriber",
]


class Store(
    ApiKeys,
    AdmissionStore,
    AllotmentStore,
    StripeSync,
    UsageStore,
    CreditStore,
    Billing,
    Notifications,
    AdminTokens,
    PortalStore,
):
    """Tollway's state in Redis. One instance per process, shared by all requests."""
