"""Every Redis key name Tollway uses, and the messages it publishes about them.

Everything of one account sits under one hash tag, ``{customer}``, so in Redis
Cluster one script can touch it all atomically:

    tw:{cus_1}:a          account hash: plan, status, grace_until, created_at
    tw:{cus_1}:rl         limits: the token bucket (tokens, ts in microseconds) and the
                          current period's counter (k kind, p start, used); x expires at
    tw:{cus_1}:q          the period counter as releases before 0.2 kept it: read once
                          by the decision script, then deleted
    tw:{cus_1}:keys       key index: key id -> key hash (for list / revoke)
    tw:{cus_1}:events     Stripe event ids applied (sorted by when), kept 30 days
    tw:{cus_1}:lock       the companion's per-account lock around fetch + apply
    tw:{cus_1}:lock:bill  the reporter's per-account lock around billing
    tw:{cus_1}:checkouts  checkout session id -> key id whose plaintext was shown
    tw:{cus_1}:usage      usage stream (fields: shared/usage_stream.lua)
    tw:{cus_1}:totals     "<meter>|<month>" -> units recorded; "r|<meter>|<month>" -> billed
    tw:{cus_1}:idem:<sha> idempotency claim -> record id (dedupe window)
    tw:{cus_1}:rsv:<sha>  a reservation: estimate, meter, state (open|settled|expired)
    tw:{cus_1}:rsvs       open reservations -> settle-by time
    tw:{cus_1}:alerts     quota thresholds already notified this period
    tw:{cus_1}:notified   notification ids queued once (sorted by when), kept 30 days
    tw:{cus_1}:leases     concurrency leases held: lease id -> expiry
    tw:{cus_1}:kl:<key id>  one key's own limits: bucket, quota counter, uses left
    tw:{cus_1}:al         allotments held by sidecars (leased enforcement): id -> units,
                          period, when they lapse (store/admit.lua's header)
    tw:{cus_1}:cr         prepaid balance: live grants, debt, open burn batch
                          (the layout: store/shared/credits.lua)
    tw:{cus_1}:crl        the balance's ledger: every grant, burn batch and expiry
    tw:{cus_1}:crg        grant ids applied -> their ledger entry (each grant once)
    tw:{cus_1}:bill       reporter: cursor (last planned entry), pending events (JSON)
    tw:{cus_1}:bill:failed  events Stripe refused for good, for people to look at
    tw:k:{<sha256>}       key record: customer, key id, state, expires_at (us)
    tw:adm:{<sha256>}     admin token record: token id, name, scopes, state
    tw:ps:{<sha256>}      portal session (by its id's hash), JSON: customer, key id,
                          csrf, expires_at; expires with the session
    tw:ps:link:{<sha256>} one-time portal sign-in link (by its token's hash) -> customer

The key record lives in its own slot (its hash is what a request carries);
reading it is the one extra round trip before the decision script.

Global keys (single-key commands only, so any slot will do):

    tw:usage:dirty          customers with usage the reporter has not planned yet
    tw:notifications        notifications for the companion to deliver (capped stream)
    tw:notifications:cursor the last one delivered, by releases before consumer groups;
                            where a new group starts
    tw-relay-<url sha256>   the stream's consumer group of companions posting to one
                            notify_url ("tw-relay-log": those with none), not a key
    tw:invalidate           the pub/sub channel (classic PUBLISH reaches every node)
    tw:accounts             every account's customer id (sorted set, score 0: by id),
                            for paging through them; rebuilt by a scan when missing
    tw:adm:index            admin token id -> token hash
    tw:adm:idem:<sha>       an admin create's idempotency record: pending, or its result
    tw:ps:tries:<sha>       failed portal sign-ins this window, per address or key prefix
    tw:ps:secret            the portal cookies' signing secret, made by the first companion

Customer ids are checked here, once: braces in an id would move the hash tag.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

from sidecar.errors import TollwayError
from sidecar.ids import valid_id

__all__ = [
    "ACCOUNTS_INDEX",
    "ADMIN_TOKENS_INDEX",
    "DIRTY_KEY",
    "INVALIDATE_CHANNEL",
    "NOTIFICATIONS_CURSOR_KEY",
    "NOTIFICATIONS_KEY",
    "PORTAL_SECRET_KEY",
    "Invalidation",
    "account_changed",
    "account_key",
    "admin_idempotency_key",
    "admin_token_key",
    "alerts_key",
    "allotments_key",
    "bill_failed_key",
    "bill_key",
    "checkouts_key",
    "credit_grants_key",
    "credit_ledger_key",
    "credits_key",
    "customer_of",
    "events_key",
    "idempotency_key",
    "key_changed",
    "key_index_key",
    "key_limits_key",
    "key_record_key",
    "leases_key",
    "legacy_quota_key",
    "limits_key",
    "lock_key",
    "notification_group",
    "notified_key",
    "parse_invalidation",
    "portal_attempts_key",
    "portal_link_key",
    "portal_session_key",
    "request_hash",
    "reservation_key",
    "reservations_key",
    "totals_key",
    "usage_key",
    "valid_customer_id",
]


def valid_customer_id(customer_id: str) -> bool:
    """Whether an id can name an account (and so sit inside a hash tag)."""
    return valid_id(customer_id)


@functools.lru_cache(maxsize=4096)  # the request path names ~9 keys of one account each time
def _tag(customer_id: str) -> str:
    if not valid_id(customer_id):
        raise TollwayError(f"customer id {customer_id!r}: use letters, digits, '_' or '-'")
    return "{" + customer_id + "}"


def account_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:a"


def limits_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:rl"


def legacy_quota_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:q"


def allotments_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:al"


def key_limits_key(customer_id: str, key_id: str) -> str:
    return f"tw:{_tag(customer_id)}:kl:{key_id}"


def key_index_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:keys"


def events_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:events"


def notified_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:notified"


def lock_key(customer_id: str, purpose: str = "sync") -> str:
    """The companion's lock: "sync" (Stripe fetch + apply) or another purpose."""
    return f"tw:{_tag(customer_id)}:lock" + ("" if purpose == "sync" else f":{purpose}")


def checkouts_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:checkouts"


def usage_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:usage"


def totals_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:totals"


def idempotency_key(customer_id: str, key: str) -> str:
    return f"tw:{_tag(customer_id)}:idem:{_digest(key)}"


def reservation_key(customer_id: str, request_hash: str) -> str:
    return f"tw:{_tag(customer_id)}:rsv:{request_hash}"


def reservations_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:rsvs"


def alerts_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:alerts"


def leases_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:leases"


def credits_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:cr"


def credit_ledger_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:crl"


def credit_grants_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:crg"


def bill_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:bill"


def bill_failed_key(customer_id: str) -> str:
    return f"tw:{_tag(customer_id)}:bill:failed"


def customer_of(name: str) -> str:
    """The customer id inside an account key's hash tag."""
    return name[name.index("{") + 1 : name.index("}")]


def key_record_key(hashed: str) -> str:
    return f"tw:k:{{{hashed}}}"


def admin_token_key(hashed: str) -> str:
    return f"tw:adm:{{{hashed}}}"


def admin_idempotency_key(token_id: str, operation: str, key: str) -> str:
    """Per token and operation: one caller's key never answers another's call."""
    return f"tw:adm:idem:{_digest(token_id + '|' + operation + '|' + key)}"


def portal_session_key(hashed: str) -> str:
    return f"tw:ps:{{{hashed}}}"


def portal_link_key(hashed: str) -> str:
    return f"tw:ps:link:{{{hashed}}}"


def portal_attempts_key(hashed: str) -> str:
    return f"tw:ps:tries:{hashed}"


PORTAL_SECRET_KEY: Final = "tw:ps:secret"  # noqa: S105 (a key name, not a secret)
ACCOUNTS_INDEX: Final = "tw:accounts"
ADMIN_TOKENS_INDEX: Final = "tw:adm:index"
DIRTY_KEY: Final = "tw:usage:dirty"
NOTIFICATIONS_KEY: Final = "tw:notifications"
NOTIFICATIONS_CURSOR_KEY: Final = NOTIFICATIONS_KEY + ":cursor"


def notification_group(notify_url: str | None) -> str:
    """NOTIFICATIONS_KEY's consumer group for companions posting to one
    notify_url: they share the work; companions with another url (or none,
    "tw-relay-log") each see every entry."""
    if not notify_url:
        return "tw-relay-log"
    return "tw-relay-" + hashlib.sha256(notify_url.encode()).hexdigest()[:16]


# Pub/sub channel: a key or an account changed; sidecars drop what they cached
# about it (see sidecar/cache.py for the staleness bound).
INVALIDATE_CHANNEL: Final = "tw:invalidate"


def _digest(text: str) -> str:
    """A fixed-length, key-safe name for client-chosen strings."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def request_hash(request_id: str) -> str:
    """The name a request's reservation is kept under."""
    return _digest(request_id)


# -- invalidation messages: "k:<key hash>" or "c:<customer id>" ---------------


def key_changed(key_hash: str) -> str:
    return f"k:{key_hash}"


def account_changed(customer_id: str) -> str:
    return f"c:{customer_id}"


Invalidation = tuple[str, str]  # ("key", hash) | ("account", customer id) | ("", message)


def parse_invalidation(message: str) -> Invalidation:
    """What a message on INVALIDATE_CHANNEL names; ("", message) if nothing known."""
    kind, _, name = message.partition(":")
    if kind == "k":
        return "key", name
    if kind == "c":
        return "account", name
    return "", message
