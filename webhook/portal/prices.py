"""Plan and pack prices for /pricing, read from Stripe and kept a few minutes.

A price Stripe cannot give right now (down, slow, unknown id) is shown as
such, never guessed; the page still renders, and the cached answer of an
earlier read is used while it is fresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import stripe

__all__ = ["UNAVAILABLE", "Prices", "describe_price"]

log = logging.getLogger("tollway.portal")

UNAVAILABLE: Final = "Price shown at checkout"  # Stripe could not be asked just now
_TTL: Final = 300.0
# A failure or "not for sale" is kept this long: page views do not become Stripe calls.
_MISS_TTL: Final = 30.0
# Currencies Stripe counts in whole units (no cents): https://docs.stripe.com/currencies
_ZERO_DECIMAL: Final = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd"}
    | {"vuv", "xaf", "xof", "xpf"}
)
_SYMBOLS: Final = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "CA$", "aud": "A$"}


def describe_price(price: dict[str, Any]) -> str:
    """'$29.00 / month', '¥500', '$0.002 per unit'... from a Stripe Price object."""
    currency = str(price.get("currency") or "").lower()
    amount = price.get("unit_amount")
    if amount is None and price.get("unit_amount_decimal") is not None:
        amount = float(price["unit_amount_decimal"])
    if amount is None:
        return "Usage-based; see checkout"
    symbol = _SYMBOLS.get(currency, currency.upper() + " ")
    if currency in _ZERO_DECIMAL:
        text = f"{symbol}{amount:,.0f}"
    else:
        cents = float(amount)
        text = f"{symbol}{cents / 100:,.2f}" if cents == int(cents) else f"{symbol}{cents / 100:,}"
    recurring = price.get("recurring") or {}
    interval = recurring.get("interval")
    if interval:
        count = int(recurring.get("interval_count") or 1)
        text += f" / {interval}" if count == 1 else f" every {count} {interval}s"
        if recurring.get("usage_type") == "metered":
            text += " per unit used"
    return text


class Prices:
    def __init__(
        self,
        client: stripe.StripeClient | None,
        price_id: Callable[[str], Awaitable[str | None]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._price_id = price_id  # a plan's price id (by its price or lookup key)
        self._clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        self._misses: dict[str, tuple[float, str | None]] = {}  # plan or price id

    async def of_plan(self, plan: str) -> str | None:
        """The plan's price as text; None: the plan has no Stripe price (not for sale)."""
        if self._client is None:
            return None
        missed = self._misses.get(plan)
        if missed is not None and self._clock() - missed[0] < _MISS_TTL:
            return missed[1]
        try:
            price = await self._price_id(plan)
        except stripe.StripeError as exc:
            log.warning("pricing: no price for plan %s: %s", plan, type(exc).__name__)
            self._misses[plan] = (self._clock(), UNAVAILABLE)
            return UNAVAILABLE
        if price is None:
            self._misses[plan] = (self._clock(), None)
            return None
        return await self.of_price(price)

    async def of_price(self, price_id: str) -> str:
        cached = self._cache.get(price_id)
        now = self._clock()
        if cached is not None and now - cached[0] < _TTL:
            return cached[1]
        missed = self._misses.get(price_id)
        if self._client is None or (missed is not None and now - missed[0] < _MISS_TTL):
            return cached[1] if cached is not None else UNAVAILABLE
        try:
            price = await self._client.v1.prices.retrieve_async(price_id)
        except stripe.StripeError as exc:
            log.warning("pricing: price %s unreadable: %s", price_id, type(exc).__name__)
            self._misses[price_id] = (now, UNAVAILABLE)
            return cached[1] if cached is not None else UNAVAILABLE
        text = describe_price(price.to_dict())
        self._cache[price_id] = (now, text)
        return text
