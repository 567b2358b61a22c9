"""API keys: records by key hash (in their own slot), the per-account index,
the one way to turn a presented key into a usable record, and rotation.

A key is stored only as its SHA-256 (sidecar/keys.py); a record is never
deleted, only revoked or expired, so audits can name it.

Rotation (``rotate_key``, for the admin API and the CLI alike) replaces a usable
key with one that has its environment, policy and expiry; the old key works on
for the overlap, never past its own expiry. What the old key's own counters
hold moves with it: the uses left (the new key answers exactly those, and the
old one answers no more: together they never answer more than the key's uses)
and this period's quota count (the new key's quota counts on from it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from sidecar import keys
from sidecar.errors import NotFound, TollwayError
from sidecar.key_policy import NO_POLICY, KeyPolicy, policy_from_fields
from sidecar.store.accounts import Accounts
from sidecar.store.names import key_index_key, key_limits_key, key_record_key
from sidecar.store.text import text

__all__ = ["SUBSCRIPTION_ENDED", "ApiKeys", "KeyRecord", "Rotation"]

# Why the companion revoked an account's keys: its subscription was deleted.
SUBSCRIPTION_ENDED: Final = "subscription_ended"
# How long store/admit.lua keeps a key's counters when it has no uses (its
# EXPIRE on KEYS[12]): a quota counter carried to a rotated key lives as long.
_KEY_LIMITS_TTL: Final = 35 * 86400


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    customer_id: str
    state: str  # active | revoked
    expires_at_us: int = 0  # 0: never
    created_at: int = 0
    environment: str = "live"
    revoked_reason: str = ""  # "subscription_ended" when the companion revoked it
    policy: KeyPolicy = NO_POLICY  # name, metadata, scope, limits of its own, uses
    last_used: int = 0  # Unix s, written at most once a minute (Authorizer)

    @property
    def revoked(self) -> bool:
        return self.state == "revoked"

    def usable(self, now_us: int | None = None) -> bool:
        """Neither revoked nor expired (by the wall clock, or now_us): what any
        call naming a customer by this key requires, not just Authorize."""
        now = time.time_ns() // 1000 if now_us is None else now_us
        return not self.revoked and (self.expires_at_us == 0 or now < self.expires_at_us)


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation done: the new key (its plaintext, to show once), the key it
    replaces as it was, when that one now stops, and the uses moved to the new one."""

    key: str = field(repr=False)
    record: KeyRecord
    replaced: KeyRecord
    old_expires_at_us: int
    uses_moved: int = 0


def _key_record(raw: Mapping[bytes | str, bytes | str]) -> KeyRecord:
    fields = {text(k): text(v) for k, v in raw.items()}
    return KeyRecord(
        key_id=fields["key_id"],
        customer_id=fields["customer"],
        state=fields.get("state", "active"),
        expires_at_us=int(fields.get("expires_at", "0")),
        created_at=int(fields.get("created_at", "0")),
        environment=fields.get("env", "live"),
        revoked_reason=fields.get("revoked_reason", ""),
        policy=policy_from_fields(fields),
        last_used=int(fields.get("last_used") or 0),
    )


class ApiKeys(Accounts):
    async def lookup_key(self, hashed: str) -> KeyRecord | None:
        async with self._guard("key lookup"):
            if self._fast is None:
                raw = await self._redis.hgetall(key_record_key(hashed))
            else:
                flat = await self._fast.execute("HGETALL", key_record_key(hashed))
                raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return _key_record(raw) if raw else None

    async def usable_record(self, presented: str) -> KeyRecord | None:
        """The record of a well-formed, known, unrevoked, unexpired key; else None.
        The key is taken exactly: a key with anything around it is not the key
        (an HTTP header's surrounding whitespace is HTTP's, and envoy.extract_key
        drops it as HTTP says). Raises StoreUnavailable: an outage is never "no
        such key"."""
        if not keys.is_well_formed(presented):
            return None
        record = await self.lookup_key(keys.key_hash(presented))
        return record if record is not None and record.usable() else None

    async def issue_key(
        self,
        customer_id: str,
        *,
        environment: keys.Environment,
        expires_in: int | None = None,
        expires_at_us: int = 0,
        policy: KeyPolicy | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for an existing account: (plaintext to show once, stored record).
        It expires expires_in seconds from now, or at expires_at_us; else never."""
        await self.require_account(customer_id)
        key = keys.generate(environment)
        hashed = keys.key_hash(key)
        now_us = await self.now_us()
        if expires_in:
            expires_at_us = now_us + expires_in * 1_000_000
        record = KeyRecord(
            key_id=keys.key_id(hashed),
            customer_id=customer_id,
            state="active",
            expires_at_us=expires_at_us,
            created_at=now_us // 1_000_000,
            environment=environment,
            policy=policy or NO_POLICY,
        )
        await self.add_key(hashed, record)
        return key, record

    async def add_key(self, hashed: str, record: KeyRecord) -> None:
        # Two slots, so two writes: the record first, so an index entry never
        # points at nothing.
        async with self._guard("key create"):
            mapping: dict[Any, Any] = {
                "customer": record.customer_id,
                "key_id": record.key_id,
                "state": record.state,
                "expires_at": record.expires_at_us,
                "created_at": record.created_at,
                "env": record.environment,
                **record.policy.fields(),
            }
            await self._redis.hset(key_record_key(hashed), mapping=mapping)
            await self._redis.hset(key_index_key(record.customer_id), record.key_id, hashed)
        await self.invalidate(key_hash=hashed)  # a sidecar may remember it as unknown

    async def list_keys(self, customer_id: str) -> list[KeyRecord]:
        async with self._guard("key list"):
            index = await self._redis.hgetall(key_index_key(customer_id))
            records = []
            for hashed in index.values():
                raw = await self._redis.hgetall(key_record_key(text(hashed)))
                if raw:
                    records.append(_key_record(raw))
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def _key_hash(self, customer_id: str, key_id: str) -> str:
        async with self._guard("key read"):
            hashed = await self._redis.hget(key_index_key(customer_id), key_id)
        if hashed is None:
            raise NotFound(f"key {key_id} of {customer_id} does not exist")
        return text(hashed)

    async def key_record(self, customer_id: str, key_id: str) -> KeyRecord | None:
        """One key of the account by its id; None if it has no such key."""
        async with self._guard("key read"):
            hashed = await self._redis.hget(key_index_key(customer_id), key_id)
            raw = await self._redis.hgetall(key_record_key(text(hashed))) if hashed else None
        return _key_record(raw) if raw else None

    async def revoke_key(self, customer_id: str, key_id: str, *, reason: str = "") -> None:
        hashed = await self._key_hash(customer_id, key_id)
        async with self._guard("key revoke"):
            await self._redis.hset(
                key_record_key(hashed),
                mapping={
                    "state": "revoked",
                    "revoked_at": int(time.time()),
                    "revoked_reason": reason,
                },
            )
        await self.invalidate(key_hash=hashed)

    async def update_key(self, customer_id: str, key_id: str, policy: KeyPolicy) -> KeyRecord:
        """Replaces the key's policy; a new number of uses starts counting again."""
        hashed = await self._key_hash(customer_id, key_id)
        async with self._guard("key update"):
            fields: dict[Any, Any] = policy.fields()
            await self._redis.hset(key_record_key(hashed), mapping=fields)
            # Its counters (bucket, quota, uses left) follow the new limits from zero.
            await self._redis.delete(key_limits_key(customer_id, key_id))
        await self.invalidate(key_hash=hashed)
        record = await self.lookup_key(hashed)
        assert record is not None
        return record

    async def touch_keys(self, used: Mapping[str, int]) -> None:
        """Records when each key (by hash) was last used, in one pipeline. (Key
        records are never deleted, so this never writes a record that is gone.)"""
        async with self._guard("key last used"):
            pipe = self._redis.pipeline(transaction=False)
            for hashed, at in used.items():
                pipe.hset(key_record_key(hashed), "last_used", at)
            await pipe.execute()

    async def expire_key(self, customer_id: str, key_id: str, at_us: int) -> int:
        """Sets the key's expiry to at_us, unless it already expires sooner;
        returns the expiry it has now."""
        hashed = await self._key_hash(customer_id, key_id)
        async with self._guard("key expiry"):
            current = await self._redis.hget(key_record_key(hashed), "expires_at")
            current_us = int(current or 0)
            if current_us == 0 or at_us < current_us:
                await self._redis.hset(key_record_key(hashed), "expires_at", at_us)
                current_us = at_us
        await self.invalidate(key_hash=hashed)
        return current_us

    async def rotate_key(self, customer_id: str, key_id: str, *, overlap: int) -> Rotation:
        """A replacement for a usable key (the module's docstring says what it
        keeps); the old key works overlap seconds more, or until its own expiry
        if that is sooner. NotFound: no such key; TollwayError: it is revoked,
        expired, or has no uses left. A failure part way undoes what was done."""
        old = await self.key_record(customer_id, key_id)
        if old is None:
            raise NotFound(f"key {key_id} of {customer_id} does not exist")
        now_us = await self.now_us()
        if not old.usable(now_us):
            state = "revoked" if old.revoked else "expired"
            raise TollwayError(f"key {key_id} is {state}; issue a new key instead")
        policy = old.policy
        moved = 0
        if policy.uses:
            moved = await self._take_uses(customer_id, key_id, policy.uses)
            if moved < 1:
                raise TollwayError(f"key {key_id} has no uses left; issue a new key instead")
            policy = replace(policy, uses=moved)
        environment: keys.Environment = "test" if old.environment == "test" else "live"
        try:
            key, record = await self.issue_key(
                customer_id, environment=environment, expires_at_us=old.expires_at_us, policy=policy
            )
        except BaseException:
            if moved:
                with contextlib.suppress(TollwayError):
                    await self._give_uses(customer_id, key_id, moved)
            raise
        rotation = Rotation(key, record, old, old.expires_at_us, moved)
        try:
            if policy.quota is not None:
                await self._carry_quota(customer_id, key_id, record.key_id, uses=policy.uses)
            until = await self.expire_key(customer_id, key_id, now_us + overlap * 1_000_000)
        except BaseException:
            with contextlib.suppress(TollwayError):
                await self.undo_rotation(rotation)
            raise
        return replace(rotation, old_expires_at_us=until)

    async def undo_rotation(self, rotation: Rotation) -> None:
        """Takes a rotation back (its new key reached no one): the new key is
        revoked, and the old one gets its expiry and its uses back."""
        old = rotation.replaced
        await self.revoke_key(old.customer_id, rotation.record.key_id, reason="unrecorded")
        if rotation.uses_moved:
            await self._give_uses(old.customer_id, old.key_id, rotation.uses_moved)
        hashed = await self._key_hash(old.customer_id, old.key_id)
        async with self._guard("key expiry"):
            await self._redis.hset(key_record_key(hashed), "expires_at", old.expires_at_us)
        await self.invalidate(key_hash=hashed)

    async def _take_uses(self, customer_id: str, key_id: str, uses: int) -> int:
        """Takes every use a key has left (it answers no more requests) and returns
        how many that was. No lock: the decision script only ever lowers the
        count, so what one decrement by the count read leaves says how many
        requests were answered between the read and the decrement."""
        name = key_limits_key(customer_id, key_id)
        async with self._guard("key uses"):
            await self._redis.hsetnx(name, "n", uses)  # a key never used yet: all of them
            seen = int(await self._redis.hget(name, "n") or 0)
            if seen < 1:
                return 0
            after = int(await self._redis.hincrby(name, "n", -seen))
            if after != 0:  # requests answered meanwhile: they spent some of what was seen
                await self._redis.hset(name, "n", 0)
        return max(0, seen + min(after, 0))

    async def _give_uses(self, customer_id: str, key_id: str, uses: int) -> None:
        async with self._guard("key uses"):
            await self._redis.hincrby(key_limits_key(customer_id, key_id), "n", uses)

    async def _carry_quota(self, customer_id: str, old_id: str, new_id: str, *, uses: int) -> None:
        """Starts the new key's quota counter where the old key's is this period."""
        async with self._guard("key quota"):
            kind, start, used = await self._redis.hmget(
                key_limits_key(customer_id, old_id), ["k", "p", "used"]
            )
            if kind is None or start is None or not used:
                return
            name = key_limits_key(customer_id, new_id)
            await self._redis.hset(name, mapping={"k": kind, "p": start, "used": used})
            if not uses:  # a key with uses keeps its counters for good, as admit.lua does
                await self._redis.expire(name, _KEY_LIMITS_TTL)

    async def revoke_all_keys(self, customer_id: str, *, reason: str = "") -> int:
        """Marks every active key of the account revoked (records stay, for audit)."""
        revoked = 0
        for record in await self.list_keys(customer_id):
            if not record.revoked:
                await self.revoke_key(customer_id, record.key_id, reason=reason)
                revoked += 1
        return revoked
