"""The developer portal's state (webhook/portal/): sign-in sessions, one-time
sign-in links, sign-in attempt counters and the cookie-signing secret.

Sessions live in Redis, not in the cookie: the cookie carries only a random
session id (signed, so a forged one is refused without a lookup), and a
session ends when its record does — at sign-out, at its expiry, or when the
key that opened it is revoked (the portal checks that key on every request).
Session ids and link tokens are stored only as SHA-256, like API keys.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sidecar.store.accounts import Accounts
from sidecar.store.names import (
    PORTAL_SECRET_KEY,
    portal_attempts_key,
    portal_link_key,
    portal_session_key,
)
from sidecar.store.text import text

__all__ = ["PortalSession", "PortalStore"]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _session_key(session_id: str) -> str:
    return portal_session_key(_digest(session_id))


@dataclass(frozen=True, slots=True)
class PortalSession:
    customer_id: str
    key_id: str  # the key that opened it; "" for a session opened by a sign-in link
    csrf: str  # the token every form of this session must carry
    expires_at: int  # Unix s


def _encode(session: PortalSession) -> str:
    return json.dumps(
        {
            "customer": session.customer_id,
            "key_id": session.key_id,
            "csrf": session.csrf,
            "expires_at": session.expires_at,
        }
    )


def _decode(raw: str) -> PortalSession | None:
    """A session record, or None for anything that is not one (never an error page)."""
    try:
        fields = json.loads(raw)
        return PortalSession(
            str(fields["customer"]),
            str(fields.get("key_id", "")),
            str(fields["csrf"]),
            int(fields["expires_at"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class PortalStore(Accounts):
    async def open_portal_session(
        self, customer_id: str, *, key_id: str, ttl: int
    ) -> tuple[str, PortalSession]:
        """A new session: (its id, for the cookie only, and the record)."""
        session_id = secrets.token_urlsafe(32)
        now = (await self.now_us()) // 1_000_000
        session = PortalSession(customer_id, key_id, secrets.token_urlsafe(24), now + ttl)
        # One string with its expiry in one SET: a record can never outlive its session.
        async with self._guard("portal session"):
            await self._redis.set(_session_key(session_id), _encode(session), ex=ttl)
        return session_id, session

    async def portal_session(self, session_id: str) -> PortalSession | None:
        async with self._guard("portal session"):
            raw: Any = await self._redis.get(_session_key(session_id))
        return None if raw is None else _decode(text(raw))

    async def move_portal_session(self, session_id: str, key_id: str) -> PortalSession | None:
        """The session now stands on another key (its own key was rotated); returns it.
        A session that ended meanwhile stays ended (XX), and its expiry stays (KEEPTTL)."""
        session = await self.portal_session(session_id)
        if session is None:
            return None
        moved = PortalSession(session.customer_id, key_id, session.csrf, session.expires_at)
        async with self._guard("portal session"):
            await self._redis.set(_session_key(session_id), _encode(moved), xx=True, keepttl=True)
        return moved

    async def end_portal_session(self, session_id: str) -> None:
        async with self._guard("portal session"):
            await self._redis.delete(_session_key(session_id))

    async def create_sign_in_link(self, customer_id: str, *, ttl: int) -> str:
        """A one-time token that opens a session for the customer (for support staff)."""
        await self.require_account(customer_id)
        token = secrets.token_urlsafe(32)
        async with self._guard("portal link"):
            await self._redis.set(portal_link_key(_digest(token)), customer_id, ex=ttl)
        return token

    async def redeem_sign_in_link(self, token: str) -> str | None:
        """The customer a link was made for, once: the token is gone after this."""
        async with self._guard("portal link"):
            customer: Any = await self._redis.getdel(portal_link_key(_digest(token)))
        return None if customer is None else text(customer)

    async def count_attempt(self, bucket: str, *, window: int) -> int:
        """Failed sign-ins in bucket (an address, a key prefix) this window, this one
        included. The bucket is stored hashed: a key prefix is never kept."""
        key = portal_attempts_key(_digest(bucket)[:32])
        async with self._guard("portal attempts"):
            # The window's expiry is set with the counter, so a counter always expires.
            await self._redis.set(key, 0, ex=window, nx=True)
            count = int(await self._redis.incr(key))
        return count

    async def attempts(self, bucket: str) -> int:
        """Failed sign-ins in bucket this window so far."""
        async with self._guard("portal attempts"):
            raw: Any = await self._redis.get(portal_attempts_key(_digest(bucket)[:32]))
        return int(raw or 0)

    async def portal_secret(self) -> bytes:
        """The cookie-signing secret shared by every companion of this Redis, made by
        whichever asks first (TOLLWAY_PORTAL_SECRET, when set, is used instead)."""
        async with self._guard("portal secret"):
            await self._redis.set(PORTAL_SECRET_KEY, secrets.token_hex(32), nx=True)
            value: Any = await self._redis.get(PORTAL_SECRET_KEY)
        return text(value).encode()
