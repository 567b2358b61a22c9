"""What an id from outside may look like: Stripe's ids (cus_..., sub_..., price_...)
and the customer ids that name accounts. One pattern, so an id the companion
accepts from Stripe is always one the store can put inside a hash tag (a
brace would move the tag). No I/O."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["ID_PATTERN", "valid_id"]

ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,128}"
_ID_RE: Final = re.compile(ID_PATTERN)


def valid_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))
