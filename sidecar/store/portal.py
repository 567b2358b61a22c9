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


@dataclass(frozen=True, slots=True)
class PortalSession:
    customer_id: str
    key_id: str  # the key that opened it; "" for a session opened by a sign-in link
    csrf: str  # the token every form of this session must carry
    expires_at: int  # Unix s


class PortalStore(Accounts):
    async def open_portal_session(
        self, customer_id: str, *, key_id: str, ttl: int
    ) -> tuple[str, PortalSession]:
        """A new session: (its id, for the cookie only, and the record)."""
        session_id = secrets.token_urlsafe(32)
        now = (await self.now_us()) // 1_000_000
        session = PortalSession(customer_id, key_id, secrets.token_urlsafe(24), now + ttl)
        key = portal_session_key(_digest(session_id))
        async with self._guard("portal session"):
            fields: dict[Any, Any] = {
                "customer": customer_id,
                "key_id": key_id,
                "csrf": session.csrf,
                "expires_at": session.expires_at,
            }
            await self._redis.hset(key, mapping=fields)
            await self._redis.expire(key, ttl)
        return session_id, session

    async def portal_session(self, session_id: str) -> PortalSession | None:
        async with self._guard("portal session"):
            raw: Any = await self._redis.hgetall(portal_session_key(_digest(session_id)))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        return PortalSession(
            fields["customer"], fields.get("key_id", ""), fields["csrf"], int(fields["expires_at"])
        )

    async def move_portal_session(self, session_id: str, key_id: str) -> None:
        """The session now stands on another key (its own key was rotated)."""
        async with self._guard("portal session"):
            await self._redis.hset(portal_session_key(_digest(session_id)), "key_id", key_id)

    async def end_portal_session(self, session_id: str) -> None:
        async with self._guard("portal session"):
            await self._redis.delete(portal_session_key(_digest(session_id)))

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
        """Sign-in attempts in bucket (an address, a key prefix) this window, this one
        included. The bucket is stored hashed: a key prefix is never kept."""
        key = portal_attempts_key(_digest(bucket)[:32])
        async with self._guard("portal attempts"):
            count = int(await self._redis.incr(key))
            if count == 1:
                await self._redis.expire(key, window)
        return count

    async def portal_secret(self) -> bytes:
        """The cookie-signing secret shared by every companion of this Redis, made by
        whichever asks first (TOLLWAY_PORTAL_SECRET, when set, is used instead)."""
        async with self._guard("portal secret"):
            await self._redis.set(PORTAL_SECRET_KEY, secrets.token_hex(32), nx=True)
            value: Any = await self._redis.get(PORTAL_SECRET_KEY)
        return text(value).encode()
