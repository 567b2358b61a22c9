"""API key format: generation, offline validation, and the hash that is stored.

A key looks like ``tw_live_`` + 43 base62 characters of secret (256 bits from
the OS CSPRNG) + 6 base62 characters of CRC32 checksum over everything before
them. The checksum lets a malformed or mistyped key be refused without a
Redis round trip; it protects nothing, the secret part does. Only the SHA-256
of the whole key is ever stored; the key id shown in listings is a prefix of
that hash, so it cannot be turned back into the key.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib
from typing import Final, Literal

__all__ = [
    "ADMIN_PREFIX",
    "ENVIRONMENTS",
    "generate",
    "generate_token",
    "is_well_formed",
    "is_well_formed_token",
    "key_hash",
    "key_id",
    "token_id",
]

Environment = Literal["live", "test"]
ENVIRONMENTS: Final = ("live", "test")

_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET: Final = frozenset(_ALPHABET)
_SECRET_LEN: Final = 43  # 62**43 > 2**256
_CHECK_LEN: Final = 6  # 62**6 > 2**32
_PREFIX_LEN: Final = len("tw_live_")
KEY_LEN: Final = _PREFIX_LEN + _SECRET_LEN + _CHECK_LEN


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def generate(environment: Environment = "live") -> str:
    """A new key. The caller shows it once and stores only key_hash(key)."""
    body = f"tw_{environment}_" + _base62(secrets.randbits(256), _SECRET_LEN)
    return body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum are right (no I/O, no secrets compared)."""
    if len(key) != KEY_LEN or not key.isascii():
        return False
    prefix = key[:_PREFIX_LEN]
    if prefix not in ("tw_live_", "tw_test_"):
        return False
    tail = key[_PREFIX_LEN:]
    if not _ALPHABET_SET.issuperset(tail):
        return False
    return _checksum(key[:-_CHECK_LEN]) == key[-_CHECK_LEN:]


# Admin tokens (sidecar/admin/): the same shape under their own prefix, so a
# leaked one is told from an API key at a glance, and by secret scanners.
ADMIN_PREFIX: Final = "twadm_"
ADMIN_LEN: Final = len(ADMIN_PREFIX) + _SECRET_LEN + _CHECK_LEN


def generate_token() -> str:
    """A new admin token. The caller shows it once and stores only key_hash(token)."""
    body = ADMIN_PREFIX + _base62(secrets.randbits(256), _SECRET_LEN)
    return body + _checksum(body)


def is_well_formed_token(token: str) -> bool:
    if len(token) != ADMIN_LEN or not token.isascii() or not token.startswith(ADMIN_PREFIX):
        return False
    if not _ALPHABET_SET.issuperset(token[len(ADMIN_PREFIX) :]):
        return False
    return _checksum(token[:-_CHECK_LEN]) == token[-_CHECK_LEN:]


def key_hash(key: str) -> str:
    """Hex SHA-256 of the key: the only form in which a key is stored.

    A plain hash suffices because keys carry 256 random bits; there is no
    dictionary to guess from, so a slow password hash would only cost latency.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(hashed: str) -> str:
    """The public name of a key in listings and audit logs."""
    return "key_" + hashed[:16]


def token_id(hashed: str) -> str:
    """The public name of an admin token."""
    return "tok_" + hashed[:16]
