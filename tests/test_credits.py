"""Prepaid credits in the store, against the real Valkey: what a balance admits,
the order grants burn in, when they lapse, and a ledger that always adds up
to the balance."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from importlib import resources

import pytest

from sidecar.decision import OutcomeCode
from sidecar.plans import Plan, Rate, parse_catalog
from sidecar.store import Recorded, Store, connect
from sidecar.store.admission import admission
from sidecar.store.names import credits_key
from sidecar.store.text import text
from tests.conftest import new_customer

CATALOG = parse_catalog(
    {
        "plans": [
            {"name": "prepaid", "rate": "1000/s", "quota": "1000000/month", "credits": True},
            {
                "name": "prepaid_bill",
                "rate": "1000/s",
                "credits": True,
                "credits_exhausted": "bill",
                "meter": "calls",
            },
            {"name": "plain", "rate": "1000/s", "meter": "calls"},
        ],
        "meters": [{"name": "calls"}],
    }
)
PREPAID = CATALOG.plans["prepaid"]
START_US = 1_900_000_000_000_000


class Clock:
    def __init__(self) -> None:
        self.us = START_US

    def __call__(self) -> int:
        return self.us

    @property
    def s(self) -> int:
        return self.us // 1_000_000

    def advance(self, seconds: float) -> None:
        self.us += int(seconds * 1_000_000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cstore(aio: asyncio.Runner, redis_url: str, clock: Clock) -> Iterator[Store]:
    """A store whose decisions and grants run on the test's clock."""
    instance = Store(connect(redis_url, timeout=2.0), timeout=2.0, clock_us=clock)
    yield instance
    aio.run(instance.close())


async def account(store: Store, plan: str = "prepaid") -> str:
    customer = new_customer()
    await store.create_account(customer, plan)
    return customer


async def spend(
    store: Store,
    customer: str,
    cost: int = 1,
    plan: Plan = PREPAID,
    *,
    request_id: str = "",
    low: tuple[int, ...] = (),
    top_up_at: int | None = None,
) -> OutcomeCode:
    outcome = await store.admit(
        customer,
        admission(
            plan,
            cost=cost,
            feature_ok=True,
            key_expires_at_us=0,
            request_id=request_id,
            low_balance=low,
            top_up_at=top_up_at,
        ),
    )
    return outcome.code


async def ledger_sum(store: Store, customer: str) -> int:
    """grants - burns - expiries, the open batch counted with the burns."""
    entries = await store.credit_ledger(customer, count=0)
    balance = await store.credit_balance(customer)
    return sum(e.signed for e in entries) - balance.open_burn


def test_a_balance_admits_exactly_what_it_holds_and_a_denial_consumes_nothing(
    aio: asyncio.Runner, cstore: Store
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g1", credits=10)
        codes = [await spend(cstore, customer) for _ in range(11)]
        assert codes == [OutcomeCode.OK] * 10 + [OutcomeCode.CREDITS]
        assert (await cstore.credit_balance(customer)).balance == 0
        _, used, _ = await cstore.usage(customer)
        assert used == 10  # the denied 11th took no quota

        await cstore.grant_credits(customer, grant_id="g2", credits=2)
        assert await spend(cstore, customer, cost=3) is OutcomeCode.CREDITS
        assert (await cstore.credit_balance(customer)).balance == 2
        assert (await cstore.usage(customer))[1] == 10
        assert await spend(cstore, customer, cost=2) is OutcomeCode.OK

    aio.run(go())


def test_an_account_without_credits_is_denied_at_once(aio: asyncio.Runner, cstore: Store) -> None:
    async def go() -> None:
        customer = await account(cstore)
        assert await spend(cstore, customer) is OutcomeCode.CREDITS
        assert (await cstore.credit_balance(customer)).balance == 0

    aio.run(go())


def test_a_grant_counts_once_however_often_it_is_applied(
    aio: asyncio.Runner, cstore: Store
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        results = await asyncio.gather(
            *(cstore.grant_credits(customer, grant_id="cs_same", credits=7) for _ in range(5))
        )
        assert sorted(r.result for r in results) == ["duplicate"] * 4 + ["granted"]
        assert (await cstore.credit_balance(customer)).balance == 7
        assert [e.kind for e in await cstore.credit_ledger(customer)] == ["grant"]

    aio.run(go())


def test_the_soonest_expiring_grant_burns_first_and_a_lapsed_remainder_is_dropped(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="forever", credits=5)
        await cstore.grant_credits(customer, grant_id="late", credits=5, expires_at=clock.s + 200)
        await cstore.grant_credits(customer, grant_id="soon", credits=5, expires_at=clock.s + 100)
        for _ in range(3):
            assert await spend(cstore, customer) is OutcomeCode.OK
        left = {g.grant_id: g.remaining for g in (await cstore.credit_balance(customer)).grants}
        assert left == {"soon": 2, "late": 5, "forever": 5}
        order = [g.grant_id for g in (await cstore.credit_balance(customer)).grants]
        assert order == ["soon", "late", "forever"]

        clock.advance(150)  # "soon" lapses with 2 left
        balance = await cstore.credit_balance(customer)
        assert balance.balance == 10
        assert [g.grant_id for g in balance.grants] == ["late", "forever"]
        expiries = [e for e in await cstore.credit_ledger(customer) if e.kind == "expire"]
        assert [(e.fields["grant"], e.credits) for e in expiries] == [("soon", 2)]

        assert await spend(cstore, customer, cost=7) is OutcomeCode.OK  # 5 late, then 2 forever
        left = {g.grant_id: g.remaining for g in (await cstore.credit_balance(customer)).grants}
        assert left == {"forever": 3}
        assert await ledger_sum(cstore, customer) == 3

    aio.run(go())


def test_a_grant_already_past_its_expiry_changes_nothing(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        result = await cstore.grant_credits(customer, grant_id="old", credits=5, expires_at=clock.s)
        assert result.result == "expired"
        assert (await cstore.credit_balance(customer)).balance == 0
        assert await cstore.credit_ledger(customer) == []

    aio.run(go())


def test_a_reservation_paid_in_credits_settles_in_credits(
    aio: asyncio.Runner, cstore: Store
) -> None:
    async def settle(customer: str, request_id: str, real: int) -> None:
        await cstore.record_usage(
            customer,
            meter="",
            quantity=real,
            at=0,
            idempotency=f"settle:{request_id}",
            dedupe_window=86400,
            request_id=request_id,
        )

    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g", credits=10)
        assert await spend(cstore, customer, cost=2, request_id="r1") is OutcomeCode.OK
        await settle(customer, "r1", 5)  # it cost more: 3 more burn
        assert (await cstore.credit_balance(customer)).balance == 5
        assert await spend(cstore, customer, cost=4, request_id="r2") is OutcomeCode.OK
        await settle(customer, "r2", 0)  # a refund: all 4 come back
        assert (await cstore.credit_balance(customer)).balance == 5
        assert await spend(cstore, customer, cost=5, request_id="r3") is OutcomeCode.OK
        await settle(customer, "r3", 9)  # 4 above the balance: a debt
        balance = await cstore.credit_balance(customer)
        assert (balance.balance, balance.debt) == (-4, 4)
        assert await spend(cstore, customer) is OutcomeCode.CREDITS
        granted = await cstore.grant_credits(customer, grant_id="g2", credits=10)
        assert granted.balance == 6  # the debt is paid first
        assert await ledger_sum(cstore, customer) == 6
        # Nothing of it is metered usage: credits were paid in advance.
        assert await cstore.usage_totals(customer, 0) == {}
        # the quota followed the real costs: 5 + 0 + 9
        assert (await cstore.usage(customer))[1] == 14

    aio.run(go())


def test_bill_mode_meters_only_what_credits_do_not_cover(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    plan = CATALOG.plans["prepaid_bill"]

    async def go() -> None:
        customer = await account(cstore, "prepaid_bill")
        await cstore.grant_credits(customer, grant_id="g", credits=3)
        codes = [await spend(cstore, customer, plan=plan) for _ in range(5)]
        assert codes == [OutcomeCode.OK] * 5
        assert (await cstore.credit_balance(customer)).balance == 0
        totals = await cstore.usage_totals(customer, _month_of(clock.s))
        assert totals == {"calls": (2, 0)}  # the 2 the balance could not cover

    aio.run(go())


def test_low_balance_marks_notify_once_per_fall(aio: asyncio.Runner, cstore: Store) -> None:
    async def marks(customer: str, cost: int = 1) -> tuple[int, ...]:
        outcome = await cstore.admit(
            customer,
            admission(PREPAID, cost=cost, feature_ok=True, key_expires_at_us=0, low_balance=(5, 0)),
        )
        assert outcome.code is OutcomeCode.OK
        return outcome.low_balance

    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g1", credits=8)
        reached = [await marks(customer) for _ in range(8)]
        assert reached == [(), (), (5,), (), (), (), (), (0,)]
        await cstore.grant_credits(customer, grant_id="g2", credits=3)  # 3: above 0, not 5
        assert [await marks(customer) for _ in range(3)] == [(), (), (0,)]
        await cstore.grant_credits(customer, grant_id="g3", credits=10)  # above 5 again
        assert [await marks(customer, 5) for _ in range(2)] == [(5,), (0,)]

    aio.run(go())


def test_a_fall_to_the_top_up_mark_is_reported_once_until_a_grant(
    aio: asyncio.Runner, cstore: Store
) -> None:
    async def due(customer: str, cost: int = 1) -> str:
        outcome = await cstore.admit(
            customer,
            admission(PREPAID, cost=cost, feature_ok=True, key_expires_at_us=0, top_up_at=3),
        )
        return outcome.top_up

    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g1", credits=6)
        falls = [await due(customer) for _ in range(5)]
        assert [bool(f) for f in falls] == [False, False, True, False, False]
        await cstore.grant_credits(customer, grant_id="g2", credits=1)  # still below: no fall
        assert not await due(customer)
        await cstore.grant_credits(customer, grant_id="g3", credits=10)
        second = [await due(customer, 4) for _ in range(3)]  # 11 -> 7 -> 3, then 3 is denied
        assert [bool(f) for f in second] == [False, True, False]
        assert second[1] != falls[2]  # each fall has its own id

        await cstore.set_auto_top_up(customer, "off")
        await cstore.grant_credits(customer, grant_id="g4", credits=10)
        assert not any([await due(customer, 4) for _ in range(3)])
        assert await cstore.auto_top_up(customer) == "off"
        await cstore.set_auto_top_up(customer, 20)  # the account's own mark wins
        await cstore.grant_credits(customer, grant_id="g5", credits=30)
        assert await due(customer, 20)

    aio.run(go())


def test_concurrent_burns_never_take_a_balance_below_zero(
    aio: asyncio.Runner, redis_url: str
) -> None:
    async def go() -> None:
        stores = [Store(connect(redis_url, timeout=2.0), timeout=2.0) for _ in range(3)]
        try:
            customer = await account(stores[0])
            await stores[0].grant_credits(customer, grant_id="g", credits=150)
            codes = await asyncio.gather(
                *(spend(stores[i % 3], customer, cost=1 + i % 2) for i in range(200))
            )
            spent = sum(1 + i % 2 for i, code in enumerate(codes) if code is OutcomeCode.OK)
            assert spent == 150 - (await stores[0].credit_balance(customer)).balance
            assert (await stores[0].credit_balance(customer)).balance in (0, 1)
            assert await ledger_sum(stores[0], customer) == 150 - spent
        finally:
            for store in stores:
                await store.close()

    aio.run(go())


def test_the_ledger_adds_up_to_the_balance_through_any_mix_of_changes(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    rng = random.Random(15)

    async def go() -> None:
        customer = await account(cstore)
        for step in range(300):
            roll = rng.random()
            if roll < 0.15:
                expires = clock.s + rng.choice([0, 30, 90, 400])
                await cstore.grant_credits(
                    customer, grant_id=f"g{step}", credits=rng.randint(1, 20), expires_at=expires
                )
            elif roll < 0.75:
                await spend(cstore, customer, cost=rng.randint(1, 4))
            else:
                request = f"r{step}"
                if await spend(cstore, customer, rng.randint(1, 4), request_id=request) is (
                    OutcomeCode.OK
                ):
                    await cstore.record_usage(
                        customer,
                        meter="",
                        quantity=rng.randint(0, 6),
                        at=0,
                        idempotency=request,
                        dedupe_window=86400,
                        request_id=request,
                    )
            clock.advance(rng.choice([0.5, 3, 20]))
            balance = await cstore.credit_balance(customer)
            assert balance.balance == await ledger_sum(cstore, customer), f"step {step}"
            assert all(g.remaining > 0 for g in balance.grants)
            assert balance.debt >= 0

    aio.run(go())


def test_a_plan_without_credits_never_touches_a_balance(aio: asyncio.Runner, cstore: Store) -> None:
    plain = Plan("plain", Rate(1000, 1), 1000, meter="calls")

    async def go() -> None:
        customer = await account(cstore, "plain")
        await cstore.grant_credits(customer, grant_id="g", credits=5)
        codes = [await spend(cstore, customer, plan=plain) for _ in range(8)]
        assert codes == [OutcomeCode.OK] * 8
        assert (await cstore.credit_balance(customer)).balance == 5

    aio.run(go())


def _month_of(stamp: int) -> int:
    from sidecar.periods import month_start

    return month_start(stamp)


def test_the_ledger_adds_up_when_connections_are_cut_mid_burn(
    aio: asyncio.Runner, redis_url: str
) -> None:
    """Connections reset under concurrent burns and settlements: some calls fail
    (an answer lost is not a burn undone), yet nothing is half-applied: the
    balance never goes below zero and the ledger always adds up to it."""
    import urllib.parse

    from sidecar.errors import StoreUnavailable
    from tests.tcpproxy import TcpProxy

    parts = urllib.parse.urlsplit(redis_url)

    async def go(proxy: TcpProxy) -> None:
        direct = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        cut = Store(
            connect(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5), timeout=0.5, pipelined=False
        )
        try:
            customer = await account(direct)
            await direct.grant_credits(customer, grant_id="g", credits=400)
            failures = 0

            async def one(i: int) -> None:
                nonlocal failures
                request = f"r{i}" if i % 3 == 0 else ""
                try:
                    code = await spend(cut, customer, cost=1 + i % 3, request_id=request)
                    if request and code is OutcomeCode.OK:
                        await cut.record_usage(
                            customer,
                            meter="",
                            quantity=i % 5,
                            at=0,
                            idempotency=request,
                            dedupe_window=86400,
                            request_id=request,
                        )
                except StoreUnavailable:
                    failures += 1

            loop = asyncio.get_running_loop()

            def cut_soon() -> None:
                time.sleep(0.003 * (1 + batch % 4))
                proxy.drop()

            for batch in range(10):
                cutting = loop.run_in_executor(None, cut_soon)  # while the batch is in flight
                await asyncio.gather(*(one(batch * 30 + i) for i in range(30)))
                await cutting
                balance = await direct.credit_balance(customer)
                assert balance.balance >= 0 or balance.debt > 0
                assert balance.balance == await ledger_sum(direct, customer)
            assert failures > 0, "the proxy cut nothing: the test tested nothing"
        finally:
            await cut.close()
            await direct.close()

    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        aio.run(go(proxy))


# -- auto top-up: settlements, lost reports, grants that leave the balance low ----------


async def settle(
    store: Store,
    customer: str,
    request_id: str,
    real: int,
    *,
    low: tuple[int, ...] = (),
    top_up_at: int | None = None,
) -> Recorded:
    return await store.record_usage(
        customer,
        meter="",
        quantity=real,
        at=0,
        idempotency=f"settle:{request_id}",
        dedupe_window=86400,
        request_id=request_id,
        low_balance=low,
        top_up_at=top_up_at,
    )


async def burn_for_top_up(store: Store, customer: str, cost: int = 1, *, at: int = 3) -> str:
    """One admission with the auto top-up mark at `at`: the fall it reports ("" for none)."""
    request = admission(PREPAID, cost=cost, feature_ok=True, key_expires_at_us=0, top_up_at=at)
    outcome = await store.admit(customer, request)
    assert outcome.code is OutcomeCode.OK
    return outcome.top_up


def test_a_settled_cost_reports_the_low_balance_and_top_up_marks_its_burn_reaches(
    aio: asyncio.Runner, cstore: Store
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g", credits=10)
        assert await spend(cstore, customer, request_id="r1", low=(5, 0), top_up_at=3) is (
            OutcomeCode.OK
        )
        # The upstream says 7, not 1: 6 more burn, 9 -> 3, past the marks 5 and 3.
        settled = await settle(cstore, customer, "r1", 7, low=(5, 0), top_up_at=3)
        assert (settled.credits, settled.low_balance) == (3, (5,))
        assert settled.top_up and settled.top_up == await cstore.due_top_up(customer)
        again = await settle(cstore, customer, "r1", 7, low=(5, 0), top_up_at=3)
        assert again.duplicate
        assert (again.credits, again.low_balance, again.top_up) == (None, (), "")
        # The next fall, past 0, is reported once too; the top-up is due already.
        assert await spend(cstore, customer, request_id="r2", low=(5, 0), top_up_at=3) is (
            OutcomeCode.OK
        )
        last = await settle(cstore, customer, "r2", 3, low=(5, 0), top_up_at=3)
        assert (last.credits, last.low_balance, last.top_up) == (0, (0,), "")

    aio.run(go())


def test_a_settlement_not_paid_from_credits_reports_no_balance(
    aio: asyncio.Runner, cstore: Store
) -> None:
    plain = CATALOG.plans["plain"]

    async def go() -> None:
        customer = await account(cstore, "plain")
        assert await spend(cstore, customer, plan=plain, request_id="r") is OutcomeCode.OK
        settled = await settle(cstore, customer, "r", 4, low=(5, 0), top_up_at=3)
        assert (settled.credits, settled.low_balance, settled.top_up) == (None, (), "")

    aio.run(go())


def test_a_due_top_up_is_reported_again_once_a_minute_until_a_grant(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    """Its report may have been lost (a Redis blip, a sidecar killed): every burn or
    settlement a minute after the last report reports the same fall again."""

    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g", credits=50)
        for request in ("r1", "r2"):
            assert await spend(cstore, customer, request_id=request) is OutcomeCode.OK
        fall = await burn_for_top_up(cstore, customer, 45)  # 48 -> 3: the fall
        assert fall
        clock.advance(59)
        assert await burn_for_top_up(cstore, customer) == ""  # 2: not a minute yet
        clock.advance(1)
        assert await burn_for_top_up(cstore, customer) == fall  # 1: the same fall, again
        assert await burn_for_top_up(cstore, customer) == ""  # 0: once a minute at most
        clock.advance(30)
        assert (await settle(cstore, customer, "r1", 0, top_up_at=3)).top_up == ""
        clock.advance(30)
        # A settlement reports it too (here a refund: 1 -> 2).
        assert (await settle(cstore, customer, "r2", 0, top_up_at=3)).top_up == fall
        assert await cstore.due_top_up(customer) == fall
        # The top-up lands: nothing is due, nothing reported again.
        granted = await cstore.grant_credits(customer, grant_id="pi_1", credits=20, top_up_at=3)
        assert (granted.balance, granted.top_up) == (22, "")
        assert await cstore.due_top_up(customer) is None
        clock.advance(61)
        assert await burn_for_top_up(cstore, customer) == ""

    aio.run(go())


def test_a_due_top_up_is_not_reported_again_for_an_account_that_turned_it_off(
    aio: asyncio.Runner, cstore: Store, clock: Clock
) -> None:
    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g", credits=10)
        assert await burn_for_top_up(cstore, customer, 7)
        await cstore.set_auto_top_up(customer, "off")
        clock.advance(120)
        assert await burn_for_top_up(cstore, customer) == ""

    aio.run(go())


DUE_AGAIN = """
local cr = credits_lib()
local c = cr.load(KEYS[1])
local due = cr.due_again(c, tonumber(ARGV[1]))
cr.save(c)
return {due, redis.call("HGET", KEYS[1], "tr") or ""}
"""


def test_due_again_gives_a_due_fall_once_a_minute_whoever_calls_it(
    aio: asyncio.Runner, cstore: Store
) -> None:
    """cr.due_again, for a script with nothing to burn (a 402 at zero), run against
    the real Valkey from shared/credits.lua as the loader inlines it."""
    source = resources.files("sidecar.store").joinpath("shared/credits.lua").read_text()
    script = cstore.redis.register_script(source + DUE_AGAIN)
    began = START_US  # the fall's id says when it began; no report noted yet

    async def due_again(customer: str, at_us: int) -> tuple[str, str]:
        raw = await script(keys=[credits_key(customer)], args=[at_us])
        return text(raw[0]), text(raw[1])

    async def go() -> None:
        customer = new_customer()
        assert await due_again(customer, began) == ("", "")  # nothing due
        await cstore.redis.hset(credits_key(customer), "tu", f"{began}-1")
        assert await due_again(customer, began + 59_999_999) == ("", "")
        at = began + 60_000_000
        assert await due_again(customer, at) == (f"{began}-1", str(at // 1_000_000))
        assert await due_again(customer, at + 59_000_000) == ("", str(at // 1_000_000))
        assert (await due_again(customer, at + 60_000_000))[0] == f"{began}-1"

    aio.run(go())


def test_a_grant_that_leaves_the_balance_at_the_mark_starts_a_new_fall(
    aio: asyncio.Runner, cstore: Store
) -> None:
    """The balance fell further while a top-up was on its way, and the pack does not
    lift it above the mark: no burn could make a fall any more, so the grant does."""

    async def go() -> None:
        customer = await account(cstore)
        await cstore.grant_credits(customer, grant_id="g", credits=6)
        first = await burn_for_top_up(cstore, customer, 3)  # 3: the fall
        assert first and await burn_for_top_up(cstore, customer, 3) == ""  # 0, still due
        landed = await cstore.grant_credits(customer, grant_id="pi_1", credits=2, top_up_at=3)
        assert landed.result == "granted" and landed.balance == 2
        assert landed.top_up and landed.top_up != first  # a fall of its own
        assert await cstore.due_top_up(customer) == landed.top_up
        again = await cstore.grant_credits(customer, grant_id="pi_1", credits=2, top_up_at=3)
        assert (again.result, again.top_up) == ("duplicate", "")  # counted once
        # A grant that lifts the balance above the mark starts none; the next burn
        # past the mark does, as ever.
        above = await cstore.grant_credits(customer, grant_id="pi_2", credits=10, top_up_at=3)
        assert (above.balance, above.top_up) == (12, "")
        assert await cstore.due_top_up(customer) is None
        assert await burn_for_top_up(cstore, customer, 9)
        # The account's own setting decides, over the plan's mark.
        await cstore.set_auto_top_up(customer, "off")
        off = await cstore.grant_credits(customer, grant_id="pi_3", credits=1, top_up_at=3)
        assert (off.balance, off.top_up) == (4, "")
        await cstore.set_auto_top_up(customer, 10)
        own = await cstore.grant_credits(customer, grant_id="pi_4", credits=1)
        assert (own.balance, bool(own.top_up)) == (5, True)
        # Without a mark there is no fall.
        await cstore.set_auto_top_up(customer, None)
        none = await cstore.grant_credits(customer, grant_id="pi_5", credits=1)
        assert (none.balance, none.top_up) == (6, "")

    aio.run(go())


def test_a_plans_own_auto_top_up_mark_wins_over_the_default(
    aio: asyncio.Runner, cstore: Store
) -> None:
    own = parse_catalog(
        {
            "plans": [
                {
                    "name": "prepaid_own",
                    "rate": "1000/s",
                    "credits": True,
                    "auto_top_up_at": 20,
                    "auto_top_up_pack": "big",
                }
            ],
            "credit_packs": [{"name": "big", "credits": 1000}],
        }
    ).plans["prepaid_own"]

    async def fall(customer: str, plan: Plan, cost: int) -> str:
        request = admission(plan, cost=cost, feature_ok=True, key_expires_at_us=0, top_up_at=3)
        return (await cstore.admit(customer, request)).top_up

    async def go() -> None:
        customer = await account(cstore, "prepaid_own")
        await cstore.grant_credits(customer, grant_id="g", credits=25)
        assert await fall(customer, own, 5)  # 20: the plan's mark, not the default's 3
        other = await account(cstore)
        await cstore.grant_credits(other, grant_id="g", credits=25)
        assert not await fall(other, PREPAID, 5)  # 20 is nothing on a plan without its own
        assert await fall(other, PREPAID, 17)  # 3 is

    aio.run(go())
