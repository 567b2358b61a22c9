"""The allotment book (sidecar/allotments.py), without Redis: what a sidecar
admits from an allotment, how much it asks for, and when it hands one back."""

from __future__ import annotations

from dataclasses import replace

from sidecar.allotments import BURST_SHARE, MAX_AGE, QUOTA_SHARE, Allotment, Allotments
from sidecar.plans import Plan, Quota, Rate

PLAN = Plan(name="hot", rate=Rate(1000, 1), burst=400, enforcement="leased")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def granted(book: Allotments, units: int, customer: str = "cus_1") -> Allotment:
    allotment = Allotment(
        id=book.asking(customer),
        customer=customer,
        plan=PLAN,
        units=units,
        granted_at=1_900_000_000,
        deadline=book.deadline(),
        tokens=100.0,
        quota_used=0,
        period_end=1_900_003_600,
    )
    book.answered(customer, allotment)
    return allotment


def busy(book: Allotments, clock: Clock, per_second: int, seconds: float) -> None:
    """Notes admissions at per_second for seconds."""
    for _ in range(int(per_second * seconds)):
        book.note("cus_1", 1)
        clock.now += 1 / per_second


def test_a_quiet_account_is_asked_for_nothing_beyond_each_request() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    assert book.want("cus_1", PLAN) == 0  # never seen
    busy(book, clock, per_second=5, seconds=2)
    assert book.want("cus_1", PLAN) == 0  # 5/s: under two per quarter second


def test_a_busy_account_is_asked_for_a_quarter_second_of_its_traffic() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    busy(book, clock, per_second=500, seconds=1)
    assert 110 <= book.want("cus_1", replace(PLAN, burst=1000)) <= 140  # under burst / 4


def test_an_allotment_never_holds_more_than_its_share_of_burst_and_quota_left() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    busy(book, clock, per_second=20_000, seconds=0.6)
    assert book.want("cus_1", PLAN) == PLAN.burst // BURST_SHARE
    quota = replace(PLAN, quota=Quota(1000, "day"))
    book.note("cus_1", 1, quota_used=840)
    assert book.want("cus_1", quota) == 160 // QUOTA_SHARE
    book.note("cus_1", 1, quota_used=990)
    assert book.want("cus_1", quota) == 0  # too little left to share: exact
    assert book.want("cus_1", replace(quota, overage="bill")) == PLAN.burst // BURST_SHARE


def test_requests_are_admitted_from_an_allotment_until_it_cannot_cover_them() -> None:
    book = Allotments(clock=Clock())
    allotment = granted(book, 5)
    assert book.take("cus_1", PLAN, 3) is allotment
    assert book.take("cus_1", PLAN, 3) is None  # 2 left: this one asks Redis
    assert book.take("cus_1", PLAN, 2) is allotment  # a cheaper one still fits
    assert allotment.left == 0
    assert book.held("cus_1") is None  # spent: on its way back
    assert book.due() == [allotment]


def test_an_allotment_serves_only_its_plan_and_only_until_it_ages_out() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    first = granted(book, 50)
    assert book.take("cus_1", replace(PLAN, name="other"), 1) is None  # the account changed plans
    assert book.due() == [first]
    second = granted(book, 50)
    clock.now += MAX_AGE
    assert book.take("cus_1", PLAN, 1) is None
    assert book.due() == [second]
    assert MAX_AGE < 1.0  # spent within the one second Tollway promises


def test_a_new_allotment_sends_the_old_one_back_and_a_drop_sends_it_at_once() -> None:
    book = Allotments(clock=Clock())
    first = granted(book, 50)
    second = granted(book, 50)
    assert book.held("cus_1") is second and book.due() == [first]
    other = granted(book, 10, customer="cus_2")
    book.drop("cus_1")
    assert book.due() == [second]
    book.drop_all()
    assert book.due() == [other] and len(book) == 0


def test_others_wait_for_an_allotment_being_asked_for_and_go_on_when_none_came() -> None:
    book = Allotments(clock=Clock())
    book.asking("cus_1")
    pending = book.pending("cus_1")
    assert pending is not None and not pending.landed.is_set()
    book.answered("cus_1", None)
    assert pending.landed.is_set() and book.pending("cus_1") is None
    assert book.held("cus_1") is None


def test_no_new_allotment_is_asked_for_while_one_is_on_its_way_back() -> None:
    # So a crash loses at most two allotments' usage: the one in use, one returning.
    clock = Clock()
    book = Allotments(clock=clock)
    busy(book, clock, per_second=500, seconds=1)
    first = granted(book, 50)
    assert book.want("cus_1", PLAN) > 0  # the one in use is not on its way back yet
    second = granted(book, 50)  # the first is, now
    assert book.want("cus_1", PLAN) == 0
    assert book.due() == [first]
    book.returned(first)  # Redis took it back
    assert book.want("cus_1", PLAN) > 0
    book.drop("cus_1")
    assert book.want("cus_1", PLAN) == 0
    book.returned(second)
    assert book.want("cus_1", PLAN) > 0


def test_an_allotment_granted_while_the_account_changed_goes_straight_back() -> None:
    book = Allotments(clock=Clock())
    allotment_id = book.asking("cus_1")
    book.drop("cus_1")  # an invalidation lands while the ask is on its way
    late = Allotment(allotment_id, "cus_1", PLAN, 50, 1_900_000_000, book.deadline(), 0, 0, 0)
    book.answered("cus_1", late)
    assert book.held("cus_1") is None and book.due() == [late]


def test_an_ask_left_unanswered_is_handed_back_in_case_redis_granted_it() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    busy(book, clock, per_second=500, seconds=1)
    allotment_id = book.asking("cus_1")
    book.abandon("cus_1", allotment_id, PLAN)
    book.answered("cus_1", None)
    (lost,) = book.due()
    assert (lost.id, lost.used) == (allotment_id, 0)  # nothing admitted from it
    assert book.want("cus_1", PLAN) == 0  # and none asked for until it is back
    book.returned(lost)
    assert book.want("cus_1", PLAN) > 0


def test_an_allotment_is_done_when_its_period_ends_if_that_comes_first() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    assert book.deadline() == clock.now + MAX_AGE
    assert book.deadline(period_left=0.3) == clock.now + 0.3
    assert book.deadline(period_left=-1) == clock.now  # the period's last second: none


def test_the_last_of_an_allotment_is_kept_for_a_renewal_unless_redis_cannot_give_one() -> None:
    clock = Clock()
    book = Allotments(clock=clock)
    busy(book, clock, per_second=500, seconds=1)
    allotment = granted(book, 8)
    assert book.take("cus_1", PLAN, 7) is None  # 1 would be left: under a quarter
    assert book.take("cus_1", PLAN, 7, renew=False) is allotment  # Redis said no: spend it
