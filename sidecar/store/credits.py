"""Prepaid credits: grants (grant_credits.lua), the balance as of now
(read_credits.lua) and its ledger.

The balance's layout, its burn order and the ledger's entries are written
once, in shared/credits.lua; the decision script (admit.lua) burns, and the
usage script (record_usage.lua) settles a reservation paid from credits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from sidecar.errors import TollwayError
from sidecar.store.base import StoreBase
from sidecar.store.names import credit_grants_key, credit_ledger_key, credits_key
from sidecar.store.text import text

__all__ = ["Balance", "CreditStore", "Grant", "GrantResult", "LedgerEntry"]

Kind = Literal["grant", "burn", "expire"]
Result = Literal["granted", "duplicate", "expired"]
# Grant ids sit in hash fields and in a reservation's list of what it burned.
_GRANT_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_KINDS: Final[dict[str, Kind]] = {"grant": "grant", "burn": "burn", "expire": "expire"}
_RESULTS: Final[dict[str, Result]] = {
    "granted": "granted",
    "duplicate": "duplicate",
    "expired": "expired",
}


@dataclass(frozen=True, slots=True)
class Grant:
    """A live grant: what is left of it, and when that lapses (0: never)."""

    grant_id: str
    remaining: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class Balance:
    balance: int  # what the next requests can burn (negative: a debt to pay first)
    debt: int  # settled above what the grants held; paid first by the next grant
    open_burn: int  # burned in the batch not yet on the ledger
    grants: tuple[Grant, ...]  # soonest-expiring first: the order they burn in


@dataclass(frozen=True, slots=True)
class GrantResult:
    result: Result
    balance: int
    # The fall past the auto top-up mark this grant started, leaving the balance
    # at or below it (grant_credits.lua), for the caller to queue; "" for none.
    top_up: str = ""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    entry_id: str  # the stream id: "<ms>-<seq>"
    kind: Kind
    credits: int  # a burn's is signed: refunds subtract
    fields: dict[str, str]  # grant, expires, reason, at; a burn's from and to

    @property
    def signed(self) -> int:
        """What the entry did to the balance."""
        return self.credits if self.kind == "grant" else -self.credits


class CreditStore(StoreBase):
    def _now_arg(self) -> str | int:
        return "" if self._clock_us is None else self._clock_us() // 1_000_000

    async def grant_credits(
        self,
        customer_id: str,
        *,
        grant_id: str,
        credits: int,
        expires_at: int = 0,
        reason: str = "",
        top_up_at: int | None = None,
    ) -> GrantResult:
        """Adds credits to the balance, at most once per grant_id (a retry, a
        duplicate delivery or a second companion changes nothing). top_up_at: the
        auto top-up mark of the account's plan (Credits.top_up_at_for), for an
        account without its own; a grant that leaves the balance at or below the
        mark that applies starts a new fall, which the caller queues (top_up)."""
        if credits <= 0:
            raise TollwayError("a grant adds at least one credit")
        if not _GRANT_ID_RE.fullmatch(grant_id):
            raise TollwayError("grant id: 1 to 200 letters, digits, '_', '.', ':' or '-'")
        async with self._guard("credit grant"):
            raw = await self._run(
                "grant_credits.lua",
                keys=[
                    credits_key(customer_id),
                    credit_ledger_key(customer_id),
                    credit_grants_key(customer_id),
                ],
                args=[
                    grant_id,
                    credits,
                    max(0, expires_at),
                    reason[:200],
                    self._now_arg(),
                    "" if top_up_at is None else top_up_at,
                ],
            )
        return GrantResult(_RESULTS[text(raw[0])], int(raw[1]), text(raw[2]))

    async def credit_balance(self, customer_id: str) -> Balance:
        """The balance as of now (lapsed grants swept, a finished batch closed)."""
        async with self._guard("credit read"):
            raw = await self._run(
                "read_credits.lua",
                keys=[credits_key(customer_id), credit_ledger_key(customer_id)],
                args=[self._now_arg()],
            )
        flat = raw[3]
        grants = tuple(
            Grant(text(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)
        )
        return Balance(int(raw[0]), int(raw[1]), int(raw[2]), grants)

    async def set_auto_top_up(self, customer_id: str, setting: int | Literal["off"] | None) -> None:
        """The account's own auto top-up: a mark (a balance), "off", or None to
        follow [credits] auto_top_up_at. Read by the next decision."""
        key = credits_key(customer_id)
        async with self._guard("auto top-up setting"):
            if setting is None:
                await self._redis.hdel(key, "ta")
            else:
                await self._redis.hset(key, "ta", str(setting))

    async def auto_top_up(self, customer_id: str) -> int | Literal["off"] | None:
        """The account's own auto top-up setting (None: the default applies)."""
        async with self._guard("auto top-up setting"):
            raw = await self._redis.hget(credits_key(customer_id), "ta")
        if raw is None:
            return None
        value = text(raw)
        return "off" if value == "off" else int(value)

    async def due_top_up(self, customer_id: str) -> str | None:
        """The fall past the top-up mark that is due a top-up (its id), or None:
        a burn (or a grant that leaves the balance at the mark) sets it once per
        fall and the next grant clears it, so a top-up charges only while its fall
        is still the due one."""
        async with self._guard("top-up due"):
            raw = await self._redis.hget(credits_key(customer_id), "tu")
        return text(raw) if raw is not None else None

    async def has_credits(self, customer_id: str) -> bool:
        """Whether the account was ever granted credits."""
        async with self._guard("credit read"):
            return bool(await self._redis.exists(credit_grants_key(customer_id)))

    async def credit_ledger(
        self, customer_id: str, *, count: int = 100, newest_first: bool = True
    ) -> list[LedgerEntry]:
        """The ledger's entries (count of them; 0: all), newest first by default."""
        key = credit_ledger_key(customer_id)
        async with self._guard("credit ledger"):
            raw: Any
            if newest_first:
                raw = await self._redis.xrevrange(key, "+", "-", count=count or None)
            else:
                raw = await self._redis.xrange(key, "-", "+", count=count or None)
        entries = []
        for entry_id, fields in raw or []:
            body = {text(k): text(v) for k, v in fields.items()}
            kind = _KINDS[body.pop("kind")]
            entries.append(LedgerEntry(text(entry_id), kind, int(body.pop("credits")), body))
        return entries
