"""The portal's defences that need no I/O: signed session cookies, CSRF token
checks, the response headers every page carries, and a caller's address.

The cookie holds a random session id and an HMAC of it; the session itself
lives in Redis (sidecar/store/portal.py). The signature lets a forged or
garbled cookie be refused before any lookup; the record decides the rest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "COOKIE",
    "CSRF_COOKIE",
    "cookie_attributes",
    "is_loopback",
    "page_headers",
    "same_token",
    "sign",
    "unsign",
]

COOKIE: Final = "tollway_session"
# Before sign-in there is no session to hold a CSRF token: the sign-in forms
# compare a hidden field with this cookie instead (the double-submit pattern).
CSRF_COOKIE: Final = "tollway_csrf"
_SIG_LEN: Final = 32  # base64 characters of HMAC-SHA256 kept (192 bits)

# No inline script or style anywhere: the CSP forbids both, so an injected tag
# runs nothing. Scripts and styles come from /portal/static only.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _mac(secret: bytes, value: str) -> str:
    digest = hmac.new(secret, value.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:_SIG_LEN]


def sign(secret: bytes, session_id: str) -> str:
    return f"{session_id}.{_mac(secret, session_id)}"


def unsign(secret: bytes, cookie: str) -> str | None:
    """The session id of a cookie this deployment signed; None for anything else."""
    session_id, dot, mac = cookie.rpartition(".")
    if not dot or not session_id or not cookie.isascii():
        return None
    return session_id if hmac.compare_digest(mac, _mac(secret, session_id)) else None


def same_token(expected: str, presented: object) -> bool:
    """A CSRF token check in constant time; a missing or odd value never matches."""
    if not expected or not expected.isascii():  # a cookie's value may be anything
        return False
    if not isinstance(presented, str) or not presented.isascii():
        return False
    return hmac.compare_digest(expected, presented)


def is_loopback(public_url: str) -> bool:
    host = urlsplit(public_url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def cookie_attributes(public_url: str, max_age: int | None) -> dict[str, object]:
    """Starlette set_cookie arguments: HttpOnly, SameSite=Strict, Secure unless the
    portal is served on loopback (a browser drops Secure cookies over plain http)."""
    return {
        "httponly": True,
        "samesite": "strict",
        "secure": not is_loopback(public_url),
        "path": "/",
        "max_age": max_age,
    }


def page_headers() -> dict[str, str]:
    """Headers for every portal page. None may be stored: each carries a token of its
    visitor's (a form's CSRF token) and most show account data."""
    return {
        "content-security-policy": _CSP,
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
        "x-content-type-options": "nosniff",
        "cache-control": "no-store",
    }
