"""A key's own limits and scope, decided with the account's in one step against
the real Valkey: they tighten what the plan allows and never loosen it, a key's
uses are exact across sidecars, a request outside a key's scope consumes
nothing, and rotating a key hands its replacement what is left of its uses
and its quota, never a fresh count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from sidecar import keys
from sidecar.authorizer import Authorizer
from sidecar.decision import Decision, Reason
from sidecar.errors import NotFound, TollwayError
from sidecar.key_policy import KeyPolicy, parse_policy
from sidecar.settings import settings_from_document
from sidecar.store import Store, connect
from sidecar.store.api_keys import Rotation
from sidecar.store.names import key_record_key
from tests.conftest import new_customer

pytestmark = pytest.mark.servers

SETTINGS = settings_from_document(
    {
        "plans": [
            {"name": "roomy", "rate": "100/s", "burst": 100, "features": ["search", "export"]},
            {"name": "small", "rate": "1/min", "burst": 3},
            {"name": "capped", "rate": "100/s", "burst": 100, "quota": "3/day"},
        ],
        "routes": [{"method": "POST", "path": "/v1/export/**", "feature": "export"}],
    },
    {},
)


@pytest.fixture
def stores(aio: asyncio.Runner, redis_url: str) -> Iterator[list[Store]]:
    """Two stores, as two sidecars would have."""
    made = [Store(connect(redis_url, timeout=2.0), timeout=2.0) for _ in range(2)]
    yield made
    for store in made:
        aio.run(store.close())


async def account_with_key(store: Store, plan: str, policy: KeyPolicy) -> tuple[str, str]:
    customer = new_customer()
    await store.create_account(customer, plan)
    key, _ = await store.issue_key(customer, environment="test", policy=policy)
    return customer, key


def authorizer(store: Store, *, record_last_use: bool = False) -> Authorizer:
    return Authorizer(store, lambda: SETTINGS, record_last_use=record_last_use)


async def ask(
    auth: Authorizer, key: str, path: str = "/v1/search", method: str = "GET"
) -> Decision:
    return await auth.authorize(key, method=method, path=path)


def test_a_key_with_three_uses_answers_exactly_three_across_two_sidecars(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        _, key = await account_with_key(stores[0], "roomy", parse_policy(uses=3))
        sidecars = [authorizer(s) for s in stores]
        answers = await asyncio.gather(*(ask(sidecars[i % 2], key) for i in range(20)))
        assert sum(d.allowed for d in answers) == 3
        refused = {d.reason for d in answers if not d.allowed}
        assert refused == {Reason.KEY_USES_EXHAUSTED}

    aio.run(go())


def test_a_keys_own_rate_tightens_the_plan_and_spares_the_accounts_other_keys(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer, tight = await account_with_key(
            stores[0], "roomy", parse_policy(rate="1/m", burst=2)
        )
        other, _ = await stores[0].issue_key(customer, environment="test")
        auth = authorizer(stores[0])
        answers = [await ask(auth, tight) for _ in range(4)]
        assert [d.allowed for d in answers] == [True, True, False, False]
        denied = answers[2]
        assert denied.reason is Reason.RATE_LIMITED
        assert denied.rate is not None and denied.rate.limit == 2  # the key's bucket, not 100
        assert "this key" in denied.message and denied.retry_after > 0
        assert all([(await ask(auth, other)).allowed for _ in range(5)])

    aio.run(go())


def test_a_keys_own_limits_never_loosen_the_plans(aio: asyncio.Runner, stores: list[Store]) -> None:
    async def go() -> None:
        _, key = await account_with_key(
            stores[0], "small", parse_policy(rate="100/s", burst=50, quota="1000/day")
        )
        auth = authorizer(stores[0])
        answers = [await ask(auth, key) for _ in range(6)]
        assert [d.allowed for d in answers] == [True] * 3 + [False] * 3
        assert answers[3].reason is Reason.RATE_LIMITED
        assert answers[3].rate is not None and answers[3].rate.limit == 3  # the plan's

    aio.run(go())


def test_a_keys_own_quota_never_loosens_the_plans_quota(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        _, key = await account_with_key(stores[0], "capped", parse_policy(quota="1000/day"))
        auth = authorizer(stores[0])
        answers = [await ask(auth, key) for _ in range(5)]
        assert [d.allowed for d in answers] == [True] * 3 + [False] * 2
        denied = answers[3]
        assert denied.reason is Reason.QUOTA_EXCEEDED
        assert denied.quota is not None and (denied.quota.limit, denied.quota.used) == (3, 3)

    aio.run(go())


def test_a_keys_own_quota_is_counted_and_named(aio: asyncio.Runner, stores: list[Store]) -> None:
    async def go() -> None:
        _, key = await account_with_key(stores[0], "roomy", parse_policy(quota="5/day"))
        auth = authorizer(stores[0])
        answers = [await ask(auth, key) for _ in range(7)]
        assert [d.allowed for d in answers] == [True] * 5 + [False] * 2
        denied = answers[5]
        assert denied.reason is Reason.QUOTA_EXCEEDED
        assert denied.quota is not None and (denied.quota.limit, denied.quota.used) == (5, 5)
        assert denied.retry_after > 0

    aio.run(go())


def test_a_request_outside_the_keys_scope_is_refused_and_consumes_nothing(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        policy = parse_policy(
            features=["search"], routes=["GET /v1/search", "POST /v1/export/**"], uses=2
        )
        _, key = await account_with_key(stores[0], "roomy", policy)
        auth = authorizer(stores[0])
        outside_route = await ask(auth, key, path="/v1/other")
        outside_feature = await ask(auth, key, path="/v1/export/a", method="POST")
        assert outside_route.reason is Reason.KEY_SCOPE
        assert outside_feature.reason is Reason.KEY_SCOPE  # the route is in scope, its feature not
        # neither took one of the key's two uses
        assert [(await ask(auth, key)).allowed for _ in range(3)] == [True, True, False]

    aio.run(go())


def test_updating_a_key_applies_at_once_and_restarts_its_uses(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer, key = await account_with_key(stores[0], "roomy", parse_policy(uses=1))
        auth = authorizer(stores[0])
        assert [(await ask(auth, key)).allowed for _ in range(2)] == [True, False]
        record = await stores[0].usable_record(key)
        assert record is not None
        updated = await stores[0].update_key(
            customer, record.key_id, parse_policy(name="renewed", uses=2)
        )
        assert updated.policy.name == "renewed"
        auth.forget(f"k:{keys.key_hash(key)}")  # what the invalidation does on every sidecar
        assert [(await ask(auth, key)).allowed for _ in range(3)] == [True, True, False]

    aio.run(go())


def test_last_used_is_written_after_a_use_and_at_most_once_a_minute(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer, key = await account_with_key(stores[0], "roomy", parse_policy(name="web"))
        auth = authorizer(stores[0], record_last_use=True)
        before = int(time.time())
        assert (await ask(auth, key)).allowed
        assert await auth.write_last_use() == 1  # the batch serve() writes every 5 s
        [record] = await stores[0].list_keys(customer)
        assert before <= record.last_used <= int(time.time())
        assert record.policy.name == "web"
        # Within the minute nothing is written again: a value set meanwhile stays.
        hashed = keys.key_hash(key)
        await stores[1].redis.hset(key_record_key(hashed), "last_used", 1)
        for _ in range(20):
            assert (await ask(auth, key)).allowed
        assert await auth.write_last_use() == 0
        [record] = await stores[0].list_keys(customer)
        assert record.last_used == 1
        await auth.close()

    aio.run(go())


# -- rotation --------------------------------------------------------------------------


def test_a_rotated_key_with_three_uses_of_which_one_was_spent_answers_exactly_two_more(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer = new_customer()
        await stores[0].create_account(customer, "roomy")
        old, record = await stores[0].issue_key(
            customer, environment="test", policy=parse_policy(name="ci", uses=3)
        )
        auth = authorizer(stores[0])
        assert (await ask(auth, old)).allowed
        rotation = await stores[0].rotate_key(customer, record.key_id, overlap=3600)
        assert rotation.record.policy == parse_policy(name="ci", uses=2)
        assert rotation.uses_moved == 2
        answers = [await ask(auth, rotation.key) for _ in range(3)]
        assert [d.allowed for d in answers] == [True, True, False]
        assert answers[2].reason is Reason.KEY_USES_EXHAUSTED
        # The old key still works for the overlap, but its uses went to the new one.
        assert (await ask(auth, old)).reason is Reason.KEY_USES_EXHAUSTED

    aio.run(go())


def test_rotating_a_key_while_it_answers_requests_never_adds_uses(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer = new_customer()
        await stores[0].create_account(customer, "roomy")
        old, record = await stores[0].issue_key(
            customer, environment="test", policy=parse_policy(uses=40)
        )
        sidecars = [authorizer(s) for s in stores]
        racing = [ask(sidecars[i % 2], old) for i in range(30)]
        rotating = stores[1].rotate_key(customer, record.key_id, overlap=3600)
        rotation, *before = await asyncio.gather(rotating, *racing)
        assert isinstance(rotation, Rotation)
        after = await asyncio.gather(*(ask(sidecars[i % 2], rotation.key) for i in range(50)))
        assert sum(d.allowed for d in after) == rotation.record.policy.uses
        assert sum(d.allowed for d in before) + rotation.record.policy.uses == 40

    aio.run(go())


def test_a_rotated_keys_own_quota_counts_on_from_the_old_keys(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        customer = new_customer()
        await stores[0].create_account(customer, "roomy")
        old, record = await stores[0].issue_key(
            customer, environment="test", policy=parse_policy(quota="5/day")
        )
        auth = authorizer(stores[0])
        assert [(await ask(auth, old)).allowed for _ in range(2)] == [True, True]
        rotation = await stores[0].rotate_key(customer, record.key_id, overlap=0)
        answers = [await ask(auth, rotation.key) for _ in range(4)]
        assert [d.allowed for d in answers] == [True, True, True, False]
        assert answers[3].reason is Reason.QUOTA_EXCEEDED
        assert answers[3].quota is not None and answers[3].quota.limit == 5

    aio.run(go())


def test_a_key_that_cannot_be_used_cannot_be_rotated(
    aio: asyncio.Runner, stores: list[Store]
) -> None:
    async def go() -> None:
        store = stores[0]
        customer = new_customer()
        await store.create_account(customer, "roomy")
        _, expired = await store.issue_key(customer, environment="test")
        await store.expire_key(customer, expired.key_id, await store.now_us() - 1)
        _, revoked = await store.issue_key(customer, environment="test")
        await store.revoke_key(customer, revoked.key_id)
        spent, used_up = await store.issue_key(
            customer, environment="test", policy=parse_policy(uses=1)
        )
        assert (await ask(authorizer(store), spent)).allowed
        for record, why in ((expired, "expired"), (revoked, "revoked"), (used_up, "no uses")):
            with pytest.raises(TollwayError, match=why):
                await store.rotate_key(customer, record.key_id, overlap=60)
        assert len(await store.list_keys(customer)) == 3  # no replacement was made
        with pytest.raises(NotFound):
            await store.rotate_key(customer, "key_0000000000000000", overlap=60)

    aio.run(go())
