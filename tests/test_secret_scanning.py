"""Leaked-key revocation end to end: GitHub's secret scanning alerts, signed with
a local P-256 key the companion fetches from a local stand-in of GitHub's key
endpoint, against a real sidecar, companion and Redis."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar import keys
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.store import KeyRecord, Store
from tests.conftest import COMPANION_CONFIG, Customer, Stack, eventually, with_store
from tests.secretscan import secrets_in
from webhook.secret_scanning import LEAKED

pytestmark = pytest.mark.servers

TYPE = "tollway_api_key"
MakeCustomer = Callable[..., Customer]


class SigningKey:
    """A P-256 key pair standing in for one of GitHub's secret scanning keys."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.identifier = secrets.token_hex(32)

    def entry(self, *, current: bool = True) -> dict[str, Any]:
        pem = self.private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        return {"key_identifier": self.identifier, "key": pem.decode(), "is_current": current}

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self.private.sign(body, ec.ECDSA(hashes.SHA256()))).decode()


class KeyServer:
    """Serves {"public_keys": [...]} as GitHub's endpoint does; counts its fetches."""

    def __init__(self, *signing: SigningKey) -> None:
        self.keys = list(signing)
        self.fetches = 0
        self.failing = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                if outer.failing:
                    self.send_response(502)
                    self.end_headers()
                    return
                body = json.dumps({"public_keys": [k.entry() for k in outer.keys]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = (
            f"http://127.0.0.1:{self._server.server_address[1]}/meta/public_keys/secret_scanning"
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> KeyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def config(url: str, *, refetch_after: str = "1m") -> str:
    # COMPANION_CONFIG ends inside its [stripe] table.
    assert COMPANION_CONFIG.rstrip().rpartition("\n[")[2].startswith("stripe]")
    return (
        COMPANION_CONFIG
        + f'secret_scanning_keys_url = "{url}"\n'
        + f'secret_scanning_refetch_after = "{refetch_after}"\n'
    )


@pytest.fixture(scope="module")
def github_key() -> SigningKey:
    return SigningKey()


@pytest.fixture(scope="module")
def scanning_stack(
    stack_factory: Callable[[str], Stack], github_key: SigningKey
) -> Iterator[Stack]:
    with KeyServer(SigningKey(), github_key) as server:
        yield stack_factory(config(server.url))


def alert_body(*tokens: str, url: str = "https://github.com/octo/repo/blob/abc/app.py") -> bytes:
    return json.dumps(
        [{"token": t, "type": TYPE, "url": url, "source": "content"} for t in tokens]
    ).encode()


def post_alert(
    stack: Stack,
    body: bytes,
    *,
    key: SigningKey | None = None,
    identifier: str | None = None,
    signature: str | None = None,
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Github-Public-Key-Identifier"] = identifier or key.identifier
        headers["Github-Public-Key-Signature"] = signature or key.sign(body)
    return httpx.post(f"{stack.companion}/secret-scanning/github", content=body, headers=headers)


def expected(token: str, label: str) -> dict[str, str]:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return {"token_hash": digest, "token_type": TYPE, "label": label}


def works(stack: Stack, key: str) -> bool:
    return bool(stack.authorize(key).allowed)


def revoked_within_a_second(stack: Stack, key: str) -> None:
    eventually(lambda: stack.authorize(key).reason == pb.REASON_KEY_REVOKED, within=1.0, every=0.05)
    assert not works(stack, key)


def record(redis_url: str, key: str) -> KeyRecord | None:
    async def read(store: Store) -> KeyRecord | None:
        return await store.lookup_key(keys.key_hash(key))

    found: KeyRecord | None = with_store(redis_url, read)
    return found


def leak_notifications(redis_url: str, customer_id: str) -> list[dict[str, Any]]:
    async def read(store: Store) -> list[dict[str, Any]]:
        found, last = [], "0-0"
        while batch := await store.notifications_after(last, 1000):
            found += [p for _, p in batch if p.get("customer_id") == customer_id]
            last = batch[-1][0]
        return [p for p in found if p.get("type") == "key_leaked"]

    result: list[dict[str, Any]] = with_store(redis_url, read)
    return result


# -- genuine keys -----------------------------------------------------------------


def test_a_signed_alert_revokes_a_genuine_key_on_the_sidecar_within_a_second(
    scanning_stack: Stack, github_key: SigningKey, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("pro")
    assert works(scanning_stack, customer.key)  # the sidecar knows it as live
    answer = post_alert(scanning_stack, alert_body(customer.key), key=github_key)
    assert answer.status_code == 200
    assert answer.json() == [expected(customer.key, "true_positive")]
    revoked_within_a_second(scanning_stack, customer.key)
    found = record(redis_url, customer.key)
    assert found is not None and (found.state, found.revoked_reason) == ("revoked", LEAKED)


def test_the_merchant_is_told_once_and_no_token_is_logged(
    scanning_stack: Stack, github_key: SigningKey, make_customer: MakeCustomer, redis_url: str
) -> None:
    customer = make_customer("pro")
    place = "https://github.com/octo/leaky/blob/0123abc/config.env"
    body = alert_body(customer.key, customer.key, url=place)  # reported twice in one alert
    first = post_alert(scanning_stack, body, key=github_key)
    again = post_alert(scanning_stack, body, key=github_key)  # and GitHub sends it again
    assert first.json() == again.json() == [expected(customer.key, "true_positive")] * 2
    notified = leak_notifications(redis_url, customer.id)
    assert len(notified) == 1
    assert (notified[0]["key_id"], notified[0]["url"]) == (customer.key_id, place)
    assert customer.key not in json.dumps(notified)
    log = scanning_stack.logs[1].read_text()
    assert f"revoked leaked key {customer.key_id} of {customer.id}" in log
    assert customer.key not in log and not secrets_in(log)


# -- false positives ---------------------------------------------------------------


def test_unknown_keys_and_random_strings_are_false_positives(
    scanning_stack: Stack, github_key: SigningKey
) -> None:
    unknown = keys.generate("live")  # well formed, checksum right, never issued
    typo = unknown[:-1] + ("A" if unknown[-1] != "A" else "B")  # checksum wrong
    random_text = "tw_live_" + secrets.token_urlsafe(30)
    answer = post_alert(scanning_stack, alert_body(unknown, typo, random_text), key=github_key)
    assert answer.status_code == 200
    assert answer.json() == [
        expected(unknown, "false_positive"),
        expected(typo, "false_positive"),
        expected(random_text, "false_positive"),
    ]
    log = scanning_stack.logs[1].read_text()
    assert all(token not in log for token in (unknown, typo, random_text))


def test_a_mixed_alert_answers_each_match_in_order(
    scanning_stack: Stack, github_key: SigningKey, make_customer: MakeCustomer
) -> None:
    first, second = make_customer("pro"), make_customer("pro")
    unknown = keys.generate("test")
    tokens = ["not a key at all", first.key, unknown, second.key]
    answer = post_alert(scanning_stack, alert_body(*tokens), key=github_key)
    labels = ["false_positive", "true_positive", "false_positive", "true_positive"]
    assert answer.json() == [expected(t, label) for t, label in zip(tokens, labels, strict=True)]
    revoked_within_a_second(scanning_stack, first.key)
    revoked_within_a_second(scanning_stack, second.key)


# -- unverified alerts change nothing -----------------------------------------------


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("no headers", "missing_signature"),
        ("no signature", "missing_signature"),
        ("no identifier", "missing_signature"),
        ("signed by another key", "invalid_signature"),
        ("tampered body", "invalid_signature"),
        ("not base64", "invalid_signature"),
        ("unknown key identifier", "unknown_key"),
    ],
)
def test_unverified_alerts_are_refused_and_the_key_still_works(
    scanning_stack: Stack,
    github_key: SigningKey,
    make_customer: MakeCustomer,
    redis_url: str,
    how: str,
    code: str,
) -> None:
    customer = make_customer("pro")
    body = alert_body(customer.key)
    url = f"{scanning_stack.companion}/secret-scanning/github"
    if how == "no headers":
        answer = post_alert(scanning_stack, body)
    elif how in ("no signature", "no identifier"):
        header = {
            "no signature": {"Github-Public-Key-Identifier": github_key.identifier},
            "no identifier": {"Github-Public-Key-Signature": github_key.sign(body)},
        }[how]
        answer = httpx.post(url, content=body, headers=header)
    elif how == "signed by another key":
        forged = SigningKey().sign(body)
        answer = post_alert(scanning_stack, body, key=github_key, signature=forged)
    elif how == "tampered body":
        other = alert_body(keys.generate("test"))
        answer = post_alert(scanning_stack, body, key=github_key, signature=github_key.sign(other))
    elif how == "not base64":
        answer = post_alert(scanning_stack, body, key=github_key, signature="not*base64!")
    else:
        impostor = SigningKey()
        answer = post_alert(scanning_stack, body, key=impostor)
    assert answer.status_code == 400
    assert answer.json()["code"] == code and answer.json()["message"]
    time.sleep(0.2)  # what a revocation would have taken to reach the sidecar
    assert works(scanning_stack, customer.key)
    found = record(redis_url, customer.key)
    assert found is not None and found.state == "active"
    assert leak_notifications(redis_url, customer.id) == []


def test_malformed_and_oversized_alerts(scanning_stack: Stack, github_key: SigningKey) -> None:
    for body in (b"[{not json", b'{"token": "x", "type": "y"}', b'[{"type": "no token"}]'):
        answer = post_alert(scanning_stack, body, key=github_key)
        assert (answer.status_code, answer.json()["code"]) == (400, "malformed")
    huge = alert_body("x" * (1024 * 1024))
    answer = post_alert(scanning_stack, huge, key=github_key)
    assert answer.status_code == 413 and answer.json()["code"] == "too_large"
    assert post_alert(scanning_stack, b"[]", key=github_key).json() == []


# -- GitHub's keys: cached, rotated, fetched at most once a refetch interval ------------


def test_keys_are_cached_and_a_rotated_key_is_fetched_at_most_once_an_interval(
    stack_factory: Callable[[str], Stack], make_customer: MakeCustomer
) -> None:
    old, new = SigningKey(), SigningKey()
    with KeyServer(old) as server:
        stack = stack_factory(config(server.url, refetch_after="1s"))
        body = alert_body(keys.generate("test"))
        for _ in range(3):
            assert post_alert(stack, body, key=old).status_code == 200
        assert server.fetches == 1  # cached after the first

        server.keys.append(new)  # GitHub rotates
        time.sleep(1.1)
        assert post_alert(stack, body, key=new).status_code == 200  # refetched once
        assert server.fetches == 2

        for _ in range(5):  # forged identifiers: no fetch before the interval is out
            assert post_alert(stack, body, key=SigningKey()).json()["code"] == "unknown_key"
        assert server.fetches == 2

        server.failing = True  # GitHub's endpoint down: known keys still verify
        time.sleep(1.1)
        unknown = post_alert(stack, body, key=SigningKey())
        assert (unknown.status_code, unknown.json()["code"]) == (503, "keys_unavailable")
        assert server.fetches == 3
        customer = make_customer("pro")
        answer = post_alert(stack, alert_body(customer.key), key=old)
        assert answer.json() == [expected(customer.key, "true_positive")]
        revoked_within_a_second(stack, customer.key)
