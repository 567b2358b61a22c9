"""Admin tokens (sidecar/admin/): records by token hash, the index of them,
and the idempotency records of admin creates.

A token is stored only as its SHA-256, like an API key; a record is never
deleted, only revoked, so audits can name it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar import keys
from sidecar.errors import NotFound, TollwayError
from sidecar.store.base import StoreBase
from sidecar.store.names import ADMIN_TOKENS_INDEX, admin_idempotency_key, admin_token_key
from sidecar.store.text import text

__all__ = ["AdminTokens", "Replay", "TokenRecord"]

_PENDING: Final = "pending"
_PENDING_SECONDS: Final = 30  # a create that crashed mid-way frees its key after this


@dataclass(frozen=True, slots=True)
class TokenRecord:
    token_id: str
    name: str
    scopes: frozenset[str]
    state: str  # active | revoked
    created_at: int

    @property
    def revoked(self) -> bool:
        return self.state == "revoked"


@dataclass(frozen=True, slots=True)
class Replay:
    """An idempotency key seen before: the first call's result, or None while
    that call is still running."""

    result: dict[str, Any] | None


def _record(raw: Mapping[bytes | str, bytes | str]) -> TokenRecord:
    fields = {text(k): text(v) for k, v in raw.items()}
    return TokenRecord(
        token_id=fields["token_id"],
        name=fields.get("name", ""),
        scopes=frozenset(s for s in fields.get("scopes", "").split(",") if s),
        state=fields.get("state", "active"),
        created_at=int(fields.get("created_at", "0")),
    )


class AdminTokens(StoreBase):
    async def issue_admin_token(self, name: str, scopes: frozenset[str]) -> tuple[str, TokenRecord]:
        """A new token: (plaintext to show once, stored record)."""
        if not name or len(name) > 100:
            raise TollwayError("token name: 1 to 100 characters")
        token = keys.generate_token()
        hashed = keys.key_hash(token)
        record = TokenRecord(keys.token_id(hashed), name, scopes, "active", int(time.time()))
        async with self._guard("admin token create"):
            await self._redis.hset(
                admin_token_key(hashed),
                mapping={
                    "token_id": record.token_id,
                    "name": name,
                    "scopes": ",".join(sorted(scopes)),
                    "state": "active",
                    "created_at": record.created_at,
                },
            )
            await self._redis.hset(ADMIN_TOKENS_INDEX, record.token_id, hashed)
        return token, record

    async def admin_token(self, presented: str) -> TokenRecord | None:
        """The record of a well-formed, known token (revoked ones too); else None."""
        if not keys.is_well_formed_token(presented):
            return None
        async with self._guard("admin token lookup"):
            raw = await self._redis.hgetall(admin_token_key(keys.key_hash(presented)))
        return _record(raw) if raw else None

    async def list_admin_tokens(self) -> list[TokenRecord]:
        async with self._guard("admin token list"):
            index = await self._redis.hgetall(ADMIN_TOKENS_INDEX)
            records = []
            for hashed in index.values():
                raw = await self._redis.hgetall(admin_token_key(text(hashed)))
                if raw:
                    records.append(_record(raw))
        return sorted(records, key=lambda r: (r.created_at, r.token_id))

    async def revoke_admin_token(self, token_id: str) -> None:
        async with self._guard("admin token revoke"):
            hashed = await self._redis.hget(ADMIN_TOKENS_INDEX, token_id)
            if hashed is None:
                raise NotFound(f"admin token {token_id} does not exist")
            await self._redis.hset(
                admin_token_key(text(hashed)),
                mapping={"state": "revoked", "revoked_at": int(time.time())},
            )

    async def begin_idempotent(
        self, token_id: str, operation: str, key: str, *, ttl: int
    ) -> Replay | None:
        """Claims key for one create by this token; None: go ahead (then call
        finish_idempotent), else the Replay of the call that claimed it first."""
        name = admin_idempotency_key(token_id, operation, key)
        async with self._guard("idempotency claim"):
            if await self._redis.set(name, _PENDING, nx=True, ex=_PENDING_SECONDS):
                return None
            raw = await self._redis.get(name)
        if raw is None or text(raw) == _PENDING:
            return Replay(None)
        stored: dict[str, Any] = json.loads(text(raw))
        return Replay(stored)

    async def finish_idempotent(
        self, token_id: str, operation: str, key: str, result: dict[str, Any] | None, *, ttl: int
    ) -> None:
        """Keeps the create's result for replays (None: it failed; the key is freed)."""
        name = admin_idempotency_key(token_id, operation, key)
        async with self._guard("idempotency record"):
            if result is None:
                await self._redis.delete(name)
            else:
                await self._redis.set(name, json.dumps(result), ex=ttl)
