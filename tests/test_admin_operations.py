"""The admin API's authentication, pure of transports, against the real store:
a host that keeps failing is refused for a while, then let back in as its
bucket refills, and a refusal meanwhile costs it nothing more."""

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


def test_a_failing_host_is_refused_then_let_back_in_as_its_bucket_refills(
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
        assert [await kind("twadm_nope") for _ in range(10)] == ["unauthenticated"] * 10
        assert await kind(good) == "rate_limited"
        assert await kind(good, peer="ipv4:10.0.0.2") == "ok"  # another host is not held back
        clock.now += 5  # not yet one attempt's worth (10 a minute: one per 6 s)
        assert await kind(good) == "rate_limited"
        clock.now += 1.5
        assert await kind(good) == "ok"
        assert await kind("twadm_nope") == "unauthenticated"  # that took the attempt back
        assert await kind(good) == "rate_limited"
        clock.now += 60
        assert [await kind(good) for _ in range(3)] == ["ok"] * 3

    aio.run(go())
