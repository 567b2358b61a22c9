"""The admin API's authentication, pure of transports, against the real store:
a valid token is always accepted, whatever its host did before; a host that
keeps failing is refused (rate_limited) for its further failures, then let back
in as its bucket refills, and a refusal meanwhile costs it nothing more."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.admin.operations import Admin, AdminError
from sidecar.admin.scopes import parse_scopes
from sidecar.settings import settings_from_document
from sidecar.store import Store

pytestmark = pytest.mark.servers

SETTINGS = settings_from_document({"plans": [{"name": "p", "rate": "1/s"}]}, {})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_host_is_refused_its_failures_then_let_back_in_as_its_bucket_refills(
    aio: asyncio.Runner, store: Store
) -> None:
    clock = Clock()
    admin = Admin(store, lambda: SETTINGS, clock=clock)

    async def kind(token: str, peer: str = "ipv4:10.0.0.1") -> str:
        try:
            await admin.authenticate(token, peer=peer)
        except AdminError as exc:
            return exc.kind
        return "ok"

    async def go() -> None:
        good, _ = await store.issue_admin_token("t", parse_scopes(["admin"]))
        revoked, gone = await store.issue_admin_token("r", parse_scopes(["admin"]))
        await store.revoke_admin_token(gone.token_id)
        assert [await kind("twadm_nope") for _ in range(10)] == ["unauthenticated"] * 10
        # Spent: every kind of failure is now rate_limited, and a valid token still works.
        assert [await kind(t) for t in ("twadm_nope", "", revoked)] == ["rate_limited"] * 3
        assert await kind(good) == "ok"
        assert await kind("twadm_nope", peer="ipv4:10.0.0.2") == "unauthenticated"  # its own
        clock.now += 5  # not yet one attempt's worth (10 a minute: one per 6 s)
        assert await kind("twadm_nope") == "rate_limited"
        clock.now += 1.5
        assert await kind("twadm_nope") == "unauthenticated"  # that took the attempt back
        assert await kind("twadm_nope") == "rate_limited"
        assert [await kind(good) for _ in range(20)] == ["ok"] * 20  # never counted
        clock.now += 60
        assert [await kind("twadm_nope") for _ in range(10)] == ["unauthenticated"] * 10

    aio.run(go())


def test_a_valid_token_is_accepted_from_a_host_whose_failures_are_spent(
    aio: asyncio.Runner, store: Store
) -> None:
    # Behind an ingress every caller shares its address: a stranger's bad
    # guesses must not lock the merchant's backend out.
    admin = Admin(store, lambda: SETTINGS, clock=Clock())

    async def go() -> None:
        good, record = await store.issue_admin_token("backend", parse_scopes(["accounts:read"]))
        ingress = "ipv4:10.1.0.1"
        for _ in range(50):
            with pytest.raises(AdminError):
                await admin.authenticate("twadm_guess", peer=ingress)
        assert (await admin.authenticate(good, peer=ingress)).token_id == record.token_id

    aio.run(go())
