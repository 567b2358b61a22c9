"""Leaked-key revocation: GitHub's secret scanning partner alerts, POST /secret-scanning/github.

Register Tollway's keys with GitHub's secret scanning partner program
(secret-scanning@github.com) as:

    type     tollway_api_key
    pattern  tw_(live|test)_[0-9A-Za-z]{49}
             43 base62 characters of secret, then 6 of CRC32 checksum (sidecar/keys.py)
    URL      <[stripe] public_url>/secret-scanning/github

GitHub then POSTs a JSON array of matches, {token, type, url, source}, found
in public repositories, gists and npm packages. The rules:

- Nothing is read, and nothing changes, before the signature verifies:
  Github-Public-Key-Signature is a base64 ECDSA P-256 / SHA-256 signature
  over the raw body, by the key whose key_identifier is
  Github-Public-Key-Identifier in GitHub's key list ([stripe]
  secret_scanning_keys_url, {"public_keys": [{key_identifier, key (PEM),
  is_current}]}). A missing header, a bad signature, an unknown identifier or
  a malformed body is a 400 {code, message}; a body over 1 MiB is a 413.
- The key list is cached for secret_scanning_keys_ttl. An identifier not in
  it refetches the list, but no fetch follows another within
  secret_scanning_refetch_after, so forged alerts cannot make the companion
  poll GitHub (or spend its rate limit). A failed refresh keeps the keys it
  had; with none to check against, the answer is 503.
- A match is genuine when it is a well-formed key (its checksum holds) whose
  SHA-256 is a known key record. A genuine key not yet revoked is revoked
  ("leaked: github secret scanning"; the sidecars hear within a second), and
  the merchant is told through the notification stream: "key_leaked" with the
  key id and where GitHub found it, queued once per key however often GitHub
  reports it. Anything else is a false positive and changes nothing.
- The answer is GitHub's documented feedback format, one object per match in
  the order received: {"token_hash": SHA-256 hex, "token_type": type,
  "label": "true_positive" | "false_positive"}. The hash, not token_raw:
  the answer, like the logs, never carries a key; logs name keys by key id.
- Redis unavailable: 503. What was done stays done; an alert sent again
  revokes nothing twice and queues no second notification.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import httpx
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sidecar import keys
from sidecar.errors import NotFound, StoreUnavailable
from sidecar.store import Store
from webhook.bodies import error, read_limited
from webhook.config import StripeSettings
from webhook.outbox import Outbox

__all__ = [
    "LEAKED",
    "MAX_BODY_BYTES",
    "KeysUnavailable",
    "LeakedKeys",
    "Match",
    "PublicKeys",
    "feedback",
    "parse_alert",
    "signature_ok",
]

log = logging.getLogger("tollway.secret_scanning")

LEAKED: Final = "leaked: github secret scanning"  # the revoked key's reason
MAX_BODY_BYTES: Final = 1024 * 1024
_FETCH_TIMEOUT: Final = 5.0

Label = Literal["true_positive", "false_positive"]


class KeysUnavailable(Exception):
    """GitHub's key list could not be fetched and no key is known to check with."""


@dataclass(frozen=True, slots=True)
class Match:
    """One reported secret; its repr leaves the token out."""

    token: str = field(repr=False)
    type: str = ""
    url: str = ""
    source: str = ""


def parse_alert(body: bytes) -> list[Match] | None:
    """The matches of an alert body, or None if it is not GitHub's JSON array."""
    try:
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not isinstance(data, list):
        return None
    matches = []
    for item in data:
        if not isinstance(item, dict):
            return None
        token, kind = item.get("token"), item.get("type")
        url, source = item.get("url") or "", item.get("source") or ""  # url may be empty
        if not (
            isinstance(token, str)
            and isinstance(kind, str)
            and isinstance(url, str)
            and isinstance(source, str)
        ):
            return None
        matches.append(Match(token, kind, url, source))
    return matches


def feedback(match: Match, label: Label) -> dict[str, str]:
    """GitHub's feedback for one match, in its hashed form."""
    token_hash = hashlib.sha256(match.token.encode()).hexdigest()
    return {"token_hash": token_hash, "token_type": match.type, "label": label}


def signature_ok(key: ec.EllipticCurvePublicKey, body: bytes, signature: str) -> bool:
    """The base64 DER ECDSA signature over the raw body verifies with key (SHA-256)."""
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, body, ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):  # binascii.Error is a ValueError
        return False
    return True


def _parse_keys(document: object) -> dict[str, ec.EllipticCurvePublicKey] | None:
    """{key_identifier: key} of GitHub's list (P-256 keys only), or None if it is not one."""
    entries = document.get("public_keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return None
    found: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        identifier = entry.get("key_identifier") if isinstance(entry, dict) else None
        pem = entry.get("key") if isinstance(entry, dict) else None
        if not (isinstance(identifier, str) and isinstance(pem, str)):
            continue
        try:
            key = load_pem_public_key(pem.encode())
        except (ValueError, UnsupportedAlgorithm):
            log.warning("secret scanning: GitHub key %.80r is not a PEM public key", identifier)
            continue
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            found[identifier] = key
        else:
            log.warning("secret scanning: GitHub key %.80r is not ECDSA P-256", identifier)
    return found


class PublicKeys:
    """GitHub's secret scanning keys by identifier, cached; fetches are rate limited."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        refetch_after: float,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._ttl = ttl
        self._refetch_after = refetch_after
        self._token = token
        self._clock = clock
        self._lock = asyncio.Lock()
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._etag = ""
        self._fetched_at = -math.inf  # last successful fetch
        self._tried_at = -math.inf  # last fetch, successful or not
        self._failed = False  # the last fetch failed

    @classmethod
    def from_settings(cls, settings: StripeSettings) -> PublicKeys:
        return cls(
            settings.secret_scanning_keys_url,
            ttl=settings.secret_scanning_keys_ttl,
            refetch_after=settings.secret_scanning_refetch_after,
            token=settings.github_token,
        )

    def _due(self, identifier: str) -> bool:
        now = self._clock()
        if now - self._tried_at < self._refetch_after:
            return False
        return now - self._fetched_at >= self._ttl or identifier not in self._keys

    async def key(self, identifier: str) -> ec.EllipticCurvePublicKey | None:
        """The key named identifier, or None if GitHub lists none by that name.
        Raises KeysUnavailable if it is not known and the list could not be fetched."""
        if self._due(identifier):
            async with self._lock:
                if self._due(identifier):  # not fetched meanwhile by another request
                    await self._fetch()
        found = self._keys.get(identifier)
        if found is None and self._failed:
            raise KeysUnavailable("GitHub's secret scanning keys could not be fetched")
        return found

    async def _fetch(self) -> None:
        self._tried_at = self._clock()
        headers = {"accept": "application/json", "user-agent": "tollway-companion"}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        if self._etag and self._keys:
            headers["if-none-match"] = self._etag  # a 304 costs no rate limit
        try:
            async with httpx.AsyncClient(timeout=_FETCH_TIMEOUT) as client:
                response = await client.get(self._url, headers=headers)
            unchanged = response.status_code == 304
            if not unchanged:
                response.raise_for_status()
                parsed = _parse_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            self._failed = True
            log.error("secret scanning: fetching GitHub's keys failed: %s", type(exc).__name__)
            return
        if not unchanged:
            if parsed is None:
                self._failed = True
                log.error("secret scanning: GitHub's key list is not {public_keys: [...]}")
                return
            self._keys = parsed
            self._etag = response.headers.get("etag", "")
            log.info("secret scanning: %d GitHub signing keys fetched", len(parsed))
        self._fetched_at = self._tried_at
        self._failed = False


class LeakedKeys:
    """The endpoint: verifies an alert, revokes the genuine keys in it, answers each match."""

    def __init__(self, store: Store, outbox: Outbox, public_keys: PublicKeys) -> None:
        self._store = store
        self._outbox = outbox
        self.public_keys = public_keys

    async def alert(self, request: Request) -> Response:
        body = await read_limited(request, MAX_BODY_BYTES)
        if body is None:
            return error(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
        identifier = request.headers.get("github-public-key-identifier", "")
        signature = request.headers.get("github-public-key-signature", "")
        if not identifier or not signature:
            return error(
                400,
                "missing_signature",
                "Github-Public-Key-Identifier and Github-Public-Key-Signature required",
            )
        try:
            key = await self.public_keys.key(identifier)
        except KeysUnavailable as exc:
            return error(503, "keys_unavailable", str(exc))
        if key is None:
            log.warning("secret scanning: refused an alert signed by unknown key %.80r", identifier)
            return error(400, "unknown_key", "no GitHub secret scanning key has that identifier")
        if not signature_ok(key, body, signature):
            log.warning("secret scanning: refused an alert whose signature does not verify")
            return error(400, "invalid_signature", "signature does not verify")
        matches = parse_alert(body)
        if matches is None:
            return error(400, "malformed", "expected a JSON array of {token, type, url, source}")
        try:
            labels = [await self._judge(match) for match in matches]
        except StoreUnavailable as exc:
            log.error("secret scanning: alert not fully handled, Redis unavailable: %s", exc)
            return error(503, "unavailable", "try again later")
        genuine = labels.count("true_positive")
        log.info("secret scanning: alert of %d matches, %d genuine keys", len(matches), genuine)
        return JSONResponse([feedback(m, label) for m, label in zip(matches, labels, strict=True)])

    async def _judge(self, match: Match) -> Label:
        """Revokes the match's key if it is genuine and live; says which it was."""
        if not keys.is_well_formed(match.token):
            return "false_positive"
        record = await self._store.lookup_key(keys.key_hash(match.token))
        if record is None:
            return "false_positive"
        leaked_here = record.revoked_reason == LEAKED  # revoked by an earlier alert
        if not record.revoked:
            try:
                await self._store.revoke_key(record.customer_id, record.key_id, reason=LEAKED)
            except NotFound:  # a record missing from its account's index: nothing to name it by
                log.error(
                    "secret scanning: leaked key %s of %s is not in its account's index; "
                    "revoke it by hand",
                    record.key_id,
                    record.customer_id,
                )
                return "true_positive"
            log.warning(
                "secret scanning: revoked leaked key %s of %s (found at %s)",
                record.key_id,
                record.customer_id,
                match.url or "an unnamed place",
            )
            leaked_here = True
        if leaked_here:
            await self._outbox.queue_once(
                "key_leaked",
                record.customer_id,
                notification_id=f"key_leaked:{record.key_id}",
                key_id=record.key_id,
                url=match.url,
                source=match.source,
            )
        return "true_positive"
