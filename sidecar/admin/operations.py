"""The admin API's operations, written once for both transports: gRPC on the
sidecar (sidecar/admin/grpc_api.py) and JSON on the companion
(webhook/admin_api.py). Each transport only maps its request to a call here and
the result (or an AdminError) back to its reply.

Every call is made by a caller: an admin token, authenticated by
``Admin.authenticate`` and checked against the operation's scope. Creates take
an idempotency key: the same token retrying the same create with the same key
gets the first result back (an issued key's plaintext is not kept, so a replay
returns the key's id and record with ``api_key`` empty and ``replayed`` true:
the plaintext is shown once, ever). Failed authentications are rate-limited
per peer, in this process; a valid token is never refused for its peer's
failures (``Admin.authenticate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, TypeVar

from sidecar import keys
from sidecar.admin.scopes import allows
from sidecar.cache import TtlCache
from sidecar.decision import STATUSES
from sidecar.errors import AlreadyExists, NotFound, StoreUnavailable, TollwayError
from sidecar.key_policy import NO_POLICY, KeyPolicy, parse_policy
from sidecar.report import usage_report
from sidecar.settings import Settings
from sidecar.store import Account, KeyRecord, Store, TokenRecord
from sidecar.store.api_keys import Rotation
from sidecar.store.names import valid_customer_id

__all__ = [
    "ERROR_STATUS",
    "AccountView",
    "Admin",
    "AdminError",
    "CreditsView",
    "IssuedKey",
    "KeyView",
    "UsageView",
]

log = logging.getLogger("tollway.admin")

Kind = Literal[
    "unauthenticated",
    "permission_denied",
    "invalid_argument",
    "not_found",
    "already_exists",
    "in_progress",
    "rate_limited",
    "unavailable",
]
# kind -> (HTTP status, gRPC status code name)
ERROR_STATUS: Final[dict[Kind, tuple[int, str]]] = {
    "unauthenticated": (401, "UNAUTHENTICATED"),
    "permission_denied": (403, "PERMISSION_DENIED"),
    "invalid_argument": (400, "INVALID_ARGUMENT"),
    "not_found": (404, "NOT_FOUND"),
    "already_exists": (409, "ALREADY_EXISTS"),
    "in_progress": (409, "ABORTED"),
    "rate_limited": (429, "RESOURCE_EXHAUSTED"),
    "unavailable": (503, "UNAVAILABLE"),
}
IDEMPOTENCY_TTL: Final = 86400
_MAX_PAGE: Final = 1000
# Failed authentications a peer may make: a bucket of this many, refilled over a minute.
# (Valid tokens neither spend nor need it.)
_AUTH_FAILURES: Final = 10

T = TypeVar("T")


class AdminError(TollwayError):
    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class AccountView:
    customer_id: str
    plan: str
    status: str
    grace_until: int
    created_at: int
    subscription_id: str

    @classmethod
    def of(cls, account: Account) -> AccountView:
        return cls(
            account.customer_id,
            account.plan,
            account.status,
            account.grace_until,
            account.created_at,
            account.subscription_id,
        )


@dataclass(frozen=True, slots=True)
class KeyView:
    key_id: str
    customer_id: str
    state: str
    environment: str
    created_at: int
    expires_at: int  # Unix s; 0: never
    revoked_reason: str
    last_used: int = 0  # Unix s, to the minute; 0: never
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    scope_features: list[str] | None = None  # None: the plan's
    scope_routes: list[str] = field(default_factory=list)
    rate: str | None = None  # the key's own limits ("5/s", "1000/day"); None: none
    burst: int | None = None
    quota: str | None = None
    uses: int | None = None

    @classmethod
    def of(cls, record: KeyRecord) -> KeyView:
        return cls(
            record.key_id,
            record.customer_id,
            record.state,
            record.environment,
            record.created_at,
            record.expires_at_us // 1_000_000,
            record.revoked_reason,
            record.last_used,
            **record.policy.view(),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class IssuedKey:
    api_key: str  # the plaintext, this once ("" on a replay: it is never kept)
    key: KeyView
    replayed: bool = False
    replaces: str = ""  # a rotation: the key id it replaces
    old_key_expires_at: int = 0  # and when that one stops working


@dataclass(frozen=True, slots=True)
class MeterView:
    meter: str
    used: int
    reported: int
    pending: int


@dataclass(frozen=True, slots=True)
class UsageView:
    customer_id: str
    plan: str
    period_start: int
    meters: tuple[MeterView, ...]
    quota_limit: int
    quota_used: int
    credits: int | None  # the prepaid balance; None: never granted any


@dataclass(frozen=True, slots=True)
class CreditsView:
    customer_id: str
    balance: int
    grant_id: str = ""  # a grant: its id, and whether it was new
    result: str = ""


class _PeerFailures:
    """Failed authentications per peer: a small token bucket each (the oldest
    peers are forgotten past 10,000: a flood of addresses cannot grow it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, peer: str) -> float:
        entry = self._buckets.get(peer)
        if entry is None:
            return _AUTH_FAILURES
        tokens, at = entry
        return min(_AUTH_FAILURES, tokens + (self._clock() - at) * _AUTH_FAILURES / 60)

    def exhausted(self, peer: str) -> bool:
        return self._level(peer) < 1

    def failed(self, peer: str) -> None:
        level = self._level(peer)
        self._buckets.pop(peer, None)
        self._buckets[peer] = (level - 1, self._clock())
        if len(self._buckets) > 10_000:
            del self._buckets[next(iter(self._buckets))]


class Admin:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings
        self._failures = _PeerFailures(clock)
        # A token's record for a second: a revocation lands within it, as a key's does.
        self._tokens: TtlCache[str, tuple[TokenRecord | None]] = TtlCache(clock=clock)

    # -- who is calling ----------------------------------------------------------------

    async def authenticate(self, presented: str, *, peer: str) -> TokenRecord:
        """The caller's token, or AdminError unauthenticated / rate_limited.

        A valid token is accepted whatever its peer did before: behind an
        ingress every caller shares one address, and a stranger's bad guesses
        must not lock out the merchant's backend. Only failures are counted, per
        peer; once a peer's are spent, its next failures are rate_limited
        instead of unauthenticated, and are neither counted nor logged."""
        record: TokenRecord | None = None
        if presented:
            hashed = keys.key_hash(presented)
            cached = self._tokens.get(hashed)
            if cached is None:
                cached = (await self._guarded(self._store.admin_token(presented)),)
                self._tokens.put(hashed, cached)
            record = cached[0]
        if record is not None and not record.revoked:
            return record
        if self._failures.exhausted(peer):
            raise AdminError(
                "rate_limited", "too many failed authentications from this host; retry in a minute"
            )
        self._failures.failed(peer)
        if not presented:
            raise AdminError(
                "unauthenticated", "admin token required: send Authorization: Bearer twadm_…"
            )
        what = "revoked" if record is not None else "not valid"
        # Named by its id when it is known; a presented token is never logged.
        log.warning(
            "admin: refused a %s token%s from %s",
            what,
            f" ({record.token_id})" if record else "",
            peer,
        )
        raise AdminError("unauthenticated", f"admin token is {what}")

    @staticmethod
    def require(caller: TokenRecord, scope: str) -> None:
        if not allows(caller.scopes, scope):
            raise AdminError("permission_denied", f"token {caller.token_id} lacks scope {scope!r}")

    # -- accounts ----------------------------------------------------------------------

    async def create_account(
        self,
        caller: TokenRecord,
        *,
        customer_id: str,
        plan: str,
        status: str = "active",
        idempotency_key: str = "",
    ) -> AccountView:
        self.require(caller, "accounts:write")
        self._check_customer(customer_id)
        self._check_plan(plan)
        if status not in STATUSES:
            raise AdminError("invalid_argument", f"status: one of {', '.join(STATUSES)}")

        async def create() -> dict[str, Any]:
            account = await self._store.create_account(customer_id, plan, status)
            return asdict(AccountView.of(account))

        request = {"customer_id": customer_id, "plan": plan, "status": status}
        result = await self._once(caller, "create_account", idempotency_key, request, create)
        return AccountView(**result)

    async def get_account(self, caller: TokenRecord, customer_id: str) -> AccountView:
        self.require(caller, "accounts:read")
        return AccountView.of(await self._account(customer_id))

    async def list_accounts(
        self, caller: TokenRecord, *, page_size: int = 100, page_token: str = ""
    ) -> tuple[list[AccountView], str]:
        """A page of accounts by customer id, and the token of the next ("" at the end)."""
        self.require(caller, "accounts:read")
        if not 0 <= page_size <= _MAX_PAGE:
            raise AdminError("invalid_argument", f"page_size: 1 to {_MAX_PAGE} (0: 100)")
        size = page_size or 100
        if page_token and not valid_customer_id(page_token):
            raise AdminError("invalid_argument", "page_token: not one this API gave out")
        found = await self._guarded(self._store.list_accounts(after=page_token, limit=size + 1))
        page = [AccountView.of(a) for a in found[:size]]
        return page, (page[-1].customer_id if len(found) > size else "")

    async def set_plan(self, caller: TokenRecord, customer_id: str, plan: str) -> AccountView:
        self.require(caller, "accounts:write")
        self._check_plan(plan)
        await self._account(customer_id)
        return AccountView.of(await self._guarded(self._store.set_plan(customer_id, plan)))

    async def set_status(
        self, caller: TokenRecord, customer_id: str, status: str, *, grace_seconds: int = 0
    ) -> AccountView:
        self.require(caller, "accounts:write")
        if status not in STATUSES:
            raise AdminError("invalid_argument", f"status: one of {', '.join(STATUSES)}")
        if grace_seconds < 0 or (grace_seconds and status != "past_due"):
            raise AdminError("invalid_argument", "grace_seconds: only for past_due, and >= 0")
        await self._account(customer_id)
        grace_until = int(time.time()) + grace_seconds if grace_seconds else 0
        changed = self._store.set_status(customer_id, status, grace_until=grace_until)
        return AccountView.of(await self._guarded(changed))

    # -- keys --------------------------------------------------------------------------

    async def issue_key(
        self,
        caller: TokenRecord,
        customer_id: str,
        *,
        environment: str = "live",
        expires_in: int = 0,
        policy: KeyPolicy = NO_POLICY,
        idempotency_key: str = "",
    ) -> IssuedKey:
        self.require(caller, "keys:write")
        env = self._environment(environment)
        if expires_in < 0:
            raise AdminError("invalid_argument", "expires_in: seconds >= 0 (0: never)")
        await self._account(customer_id)
        issued: list[str] = []

        async def issue() -> dict[str, Any]:
            key, record = await self._store.issue_key(
                customer_id, environment=env, expires_in=expires_in or None, policy=policy
            )
            issued.append(key)
            log.info(
                "admin: token %s issued key %s to %s", caller.token_id, record.key_id, customer_id
            )
            return asdict(KeyView.of(record))

        request = {
            "customer_id": customer_id,
            "environment": env,
            "expires_in": expires_in,
            "policy": policy.fields(),
        }
        undo = self._undo_issue(customer_id)
        result = await self._once(caller, "issue_key", idempotency_key, request, issue, undo=undo)
        return IssuedKey(issued[0] if issued else "", KeyView(**result), replayed=not issued)

    async def get_key(self, caller: TokenRecord, customer_id: str, key_id: str) -> KeyView:
        self.require(caller, "keys:read")
        return KeyView.of(await self._key(customer_id, key_id))

    async def list_keys(self, caller: TokenRecord, customer_id: str) -> list[KeyView]:
        self.require(caller, "keys:read")
        await self._account(customer_id)
        return [KeyView.of(r) for r in await self._guarded(self._store.list_keys(customer_id))]

    async def update_key(
        self, caller: TokenRecord, customer_id: str, key_id: str, policy: KeyPolicy
    ) -> KeyView:
        """Replaces the key's name, metadata, scope and limits (its counters restart)."""
        self.require(caller, "keys:write")
        await self._key(customer_id, key_id)
        record = await self._guarded(self._store.update_key(customer_id, key_id, policy))
        log.info("admin: token %s updated key %s of %s", caller.token_id, key_id, customer_id)
        return KeyView.of(record)

    async def revoke_key(self, caller: TokenRecord, customer_id: str, key_id: str) -> KeyView:
        self.require(caller, "keys:write")
        await self._key(customer_id, key_id)
        await self._guarded(self._store.revoke_key(customer_id, key_id, reason="admin"))
        log.info("admin: token %s revoked key %s of %s", caller.token_id, key_id, customer_id)
        return KeyView.of(await self._key(customer_id, key_id))

    async def rotate_key(
        self,
        caller: TokenRecord,
        customer_id: str,
        key_id: str,
        *,
        overlap: int = 86400,
        idempotency_key: str = "",
    ) -> IssuedKey:
        """A replacement key with the old one's environment, policy and expiry
        (its uses left move to it; sidecar/store/api_keys.py's rotate_key); the
        old one keeps working for overlap seconds, never past its own expiry."""
        self.require(caller, "keys:write")
        if overlap < 0:
            raise AdminError("invalid_argument", "overlap: seconds >= 0")
        await self._key(customer_id, key_id)
        rotations: list[Rotation] = []

        async def rotate() -> dict[str, Any]:
            rotation = await self._store.rotate_key(customer_id, key_id, overlap=overlap)
            rotations.append(rotation)
            log.info(
                "admin: token %s rotated key %s of %s to %s",
                caller.token_id,
                key_id,
                customer_id,
                rotation.record.key_id,
            )
            return {
                "key": asdict(KeyView.of(rotation.record)),
                "old_key_expires_at": rotation.old_expires_at_us // 1_000_000,
            }

        async def undo(result: dict[str, Any]) -> None:
            # The new key reached no one: the rotation is taken back whole.
            for rotation in rotations:
                await self._store.undo_rotation(rotation)

        request = {"customer_id": customer_id, "key_id": key_id, "overlap": overlap}
        result = await self._once(caller, "rotate_key", idempotency_key, request, rotate, undo=undo)
        return IssuedKey(
            rotations[0].key if rotations else "",
            KeyView(**result["key"]),
            replayed=not rotations,
            replaces=key_id,
            old_key_expires_at=int(result["old_key_expires_at"]),
        )

    # -- usage and credits -------------------------------------------------------------

    async def get_usage(self, caller: TokenRecord, customer_id: str) -> UsageView:
        self.require(caller, "usage:read")
        await self._account(customer_id)
        report = await self._guarded(usage_report(self._store, self._settings(), customer_id))
        return UsageView(
            customer_id=customer_id,
            plan=report.plan,
            period_start=report.period_start,
            meters=tuple(MeterView(m.meter, m.used, m.reported, m.pending) for m in report.meters),
            quota_limit=report.quota_limit,
            quota_used=report.quota_used,
            credits=report.credits,
        )

    async def get_credits(self, caller: TokenRecord, customer_id: str) -> CreditsView:
        self.require(caller, "credits:read")
        await self._account(customer_id)
        balance = await self._guarded(self._store.credit_balance(customer_id))
        return CreditsView(customer_id, balance.balance)

    async def grant_credits(
        self,
        caller: TokenRecord,
        customer_id: str,
        *,
        credits: int,
        expires_in: int = 0,
        reason: str = "",
        idempotency_key: str = "",
    ) -> CreditsView:
        """A grant; with an idempotency key its grant id is derived from it, so
        even a retry after the key's record lapsed grants once."""
        self.require(caller, "credits:write")
        if credits <= 0:
            raise AdminError("invalid_argument", "credits: at least 1")
        if expires_in < 0:
            raise AdminError("invalid_argument", "expires_in: seconds >= 0 (0: never)")
        await self._account(customer_id)
        if idempotency_key:
            digest = hashlib.sha256(f"{caller.token_id}|{idempotency_key}".encode()).hexdigest()
            grant_id = "admin_" + digest[:24]
        else:
            grant_id = "admin_" + uuid.uuid4().hex[:24]
        expires_at = int(time.time()) + expires_in if expires_in else 0
        granted = await self._guarded(
            self._store.grant_credits(
                customer_id,
                grant_id=grant_id,
                credits=credits,
                expires_at=expires_at,
                reason=(reason or f"admin {caller.name}")[:200],
            )
        )
        return CreditsView(customer_id, granted.balance, grant_id, granted.result)

    # -- shared ------------------------------------------------------------------------

    def _undo_issue(self, customer_id: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        """Revokes a key whose issue could not be recorded for replays: its
        plaintext reached no one, and a retry issues another."""

        async def undo(result: dict[str, Any]) -> None:
            await self._store.revoke_key(customer_id, result["key_id"], reason="unrecorded")

        return undo

    @staticmethod
    def policy(**written: Any) -> KeyPolicy:
        """A key policy from a request's fields (sidecar/key_policy.py's parse_policy)."""
        try:
            return parse_policy(**written)
        except TollwayError as exc:
            raise AdminError("invalid_argument", str(exc)) from None

    async def _once(
        self,
        caller: TokenRecord,
        operation: str,
        idempotency_key: str,
        request: dict[str, Any],
        create: Callable[[], Awaitable[dict[str, Any]]],
        *,
        undo: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """create(), or with an idempotency key the result of its first success;
        the key reused for a different request is refused."""
        if not idempotency_key:
            return await self._guarded(create())
        if len(idempotency_key) > 255:
            raise AdminError("invalid_argument", "idempotency_key: at most 255 characters")
        store = self._store
        fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        replay = await self._guarded(
            store.begin_idempotent(caller.token_id, operation, idempotency_key, ttl=IDEMPOTENCY_TTL)
        )
        if replay is not None:
            if replay.result is None:
                raise AdminError("in_progress", "a call with this idempotency key is in progress")
            if replay.result.get("request") != fingerprint:
                raise AdminError(
                    "invalid_argument",
                    "idempotency_key was used for a different request; use a new key",
                )
            stored: dict[str, Any] = replay.result["result"]
            return stored
        try:
            result = await self._guarded(create())
        except BaseException:
            with contextlib.suppress(TollwayError):  # the claim lapses by itself anyway
                await store.finish_idempotent(
                    caller.token_id, operation, idempotency_key, None, ttl=IDEMPOTENCY_TTL
                )
            raise
        record = {"request": fingerprint, "result": result}
        try:
            await store.finish_idempotent(
                caller.token_id, operation, idempotency_key, record, ttl=IDEMPOTENCY_TTL
            )
        except TollwayError as exc:
            if undo is not None:
                with contextlib.suppress(TollwayError):
                    await undo(result)
            raise AdminError("unavailable", f"not recorded, retry: {exc}") from None
        return result

    async def _guarded(self, work: Awaitable[T]) -> T:
        """The store's errors as the admin API's."""
        try:
            return await work
        except StoreUnavailable as exc:
            raise AdminError("unavailable", str(exc)) from None
        except NotFound as exc:
            raise AdminError("not_found", str(exc)) from None
        except AlreadyExists as exc:
            raise AdminError("already_exists", str(exc)) from None
        except AdminError:
            raise
        except TollwayError as exc:
            raise AdminError("invalid_argument", str(exc)) from None

    @staticmethod
    def _check_customer(customer_id: str) -> None:
        if not valid_customer_id(customer_id):
            raise AdminError(
                "invalid_argument", "customer_id: 1 to 255 letters, digits, '_' or '-'"
            )

    def _check_plan(self, plan: str) -> None:
        plans = self._settings().catalog.plans
        if plan not in plans:
            raise AdminError("invalid_argument", f"plan: one of {', '.join(plans)}")

    @staticmethod
    def _environment(environment: str) -> keys.Environment:
        if environment == "test":
            return "test"
        if environment in ("live", ""):
            return "live"
        raise AdminError("invalid_argument", 'environment: "live" or "test"')

    async def _account(self, customer_id: str) -> Account:
        self._check_customer(customer_id)
        account = await self._guarded(self._store.get_account(customer_id))
        if account is None:
            raise AdminError("not_found", f"account {customer_id} does not exist")
        return account

    async def _key(self, customer_id: str, key_id: str) -> KeyRecord:
        await self._account(customer_id)
        for record in await self._guarded(self._store.list_keys(customer_id)):
            if record.key_id == key_id:
                return record
        raise AdminError("not_found", f"key {key_id[:40]} of {customer_id} does not exist")
