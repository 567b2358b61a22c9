"""Soak: steady load at a fixed rate with key churn (issue, revoke, rotate) and
plan changes through signed webhooks. No request errors, flat sidecar memory,
no key admitted past its plan, no revoked key admitted a second later.

`make test` runs it for SOAK_SECONDS=40 at 150 requests/s; `make soak` for
30 minutes. Both stop by themselves.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store, connect
from tests.conftest import COMPANION_CONFIG, Stack
from tests.fakestripe import FakeStripe, make_event

SECONDS = float(os.environ.get("SOAK_SECONDS", "40"))
RATE = float(os.environ.get("SOAK_RATE", "150"))  # requests per second, all keys together
BASIC_RATE, BASIC_BURST = 10.0, 5  # plan "basic" in tests/conftest.py


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Ledger:
    """What the load saw, per key: when it was allowed."""

    allowed: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    revoked_at: dict[str, float] = field(default_factory=dict)
    plan_of: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    requests: int = 0


def test_soak(
    stack_factory: Callable[[str], Stack], fake_stripe: FakeStripe, redis_url: str
) -> None:
    stack = stack_factory(COMPANION_CONFIG)
    rng = random.Random(1127)
    ledger = Ledger()

    async def run() -> tuple[int, int]:
        store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
        channel = grpc.aio.insecure_channel(stack.sidecar)
        stub = tollway_pb2_grpc.TollwayStub(channel)
        try:
            subs: dict[str, dict[str, Any]] = {}
            live: list[tuple[str, str]] = []  # (customer, key)
            key_ids: dict[str, str] = {}
            for _ in range(8):
                sub = fake_stripe.create_subscription(fake_stripe.create_customer(), "price_basic")
                stack.deliver(make_event("customer.subscription.created", sub))
                subs[sub["customer"]] = sub
                key, record = await store.issue_key(sub["customer"], environment="test")
                live.append((sub["customer"], key))
                key_ids[key] = record.key_id
                ledger.plan_of[key] = "basic"

            async def one(customer: str, key: str) -> None:
                ledger.requests += 1
                try:
                    answer = await stub.Authorize(pb.AuthorizeRequest(api_key=key), timeout=2)
                except grpc.aio.AioRpcError as exc:
                    ledger.errors.append(exc.code().name)
                    return
                if answer.allowed:
                    ledger.allowed[key].append(time.monotonic())

            async def churn() -> None:
                """Every second: a new key, a revocation, a rotation or a plan change."""
                while True:
                    await asyncio.sleep(1.0)
                    action = rng.choice(["issue", "revoke", "rotate", "plan"])
                    customer, key = rng.choice(live)
                    if action == "issue":
                        new, record = await store.issue_key(customer, environment="test")
                        live.append((customer, new))
                        key_ids[new] = record.key_id
                        ledger.plan_of[new] = ledger.plan_of[key]
                    elif action == "revoke" and len(live) > 4:
                        await store.revoke_key(customer, key_ids[key])
                        ledger.revoked_at[key] = time.monotonic()
                        live.remove((customer, key))
                    elif action == "rotate":
                        new, record = await store.issue_key(customer, environment="test")
                        await store.expire_key(customer, key_ids[key], await store.now_us())
                        ledger.revoked_at[key] = time.monotonic()
                        live.remove((customer, key))
                        live.append((customer, new))
                        key_ids[new] = record.key_id
                        ledger.plan_of[new] = ledger.plan_of[key]
                    elif action == "plan":
                        price = rng.choice(["price_basic", "price_pro"])
                        changed = fake_stripe.update_subscription(subs[customer]["id"], price=price)
                        await asyncio.to_thread(
                            stack.deliver, make_event("customer.subscription.updated", changed)
                        )
                        for owner, owned in live:
                            if owner == customer:  # the bound is per plan: skip these keys
                                ledger.plan_of[owned] = "changing"

            churner = asyncio.create_task(churn())
            pending: set[asyncio.Task[None]] = set()
            started = time.monotonic()
            warm_rss = 0
            sent = 0
            while (elapsed := time.monotonic() - started) < SECONDS:
                if not warm_rss and elapsed > min(20.0, SECONDS / 4):
                    warm_rss = rss_kib(stack.sidecar_pid)
                due = int(elapsed * RATE)
                while sent < due:
                    customer, key = rng.choice(live)
                    task = asyncio.create_task(one(customer, key))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                # Revoked keys keep knocking, a little.
                if ledger.revoked_at and rng.random() < 0.2:
                    gone = rng.choice(list(ledger.revoked_at))
                    task = asyncio.create_task(one("", gone))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.sleep(0.005)
            churner.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return warm_rss, rss_kib(stack.sidecar_pid)
        finally:
            await channel.close()
            await store.close()

    warm, end = asyncio.run(run())
    assert ledger.requests >= SECONDS * RATE * 0.9
    assert ledger.errors == [], f"{len(ledger.errors)} errors: {sorted(set(ledger.errors))}"
    assert end < warm * 1.10, f"sidecar RSS grew from {warm} KiB to {end} KiB"
    after_revoke: list[float] = []  # seconds from a key's revocation to each later allow
    tightest = float("-inf")
    for key, stamps in ledger.allowed.items():
        revoked = ledger.revoked_at.get(key)
        if revoked is not None:
            late = [t for t in stamps if t > revoked + 1.0]
            assert not late, f"a revoked key was allowed {late[0] - revoked:.2f}s after"
            after_revoke += [t - revoked for t in stamps if t > revoked]
        if ledger.plan_of.get(key) != "basic":
            continue
        # Over any window [t_i, t_j]: allowed <= burst + rate * window (per key; the
        # bucket is per customer, which only makes the true bound tighter). With
        # f(k) = k - rate * t_k that is max_j (f(j) - min_{i<=j} f(i)) + 1 <= burst.
        lowest, worst = float("inf"), float("-inf")
        for k, stamp in enumerate(stamps):
            f = k - BASIC_RATE * stamp
            lowest = min(lowest, f)
            worst = max(worst, f - lowest + 1)
        assert worst <= BASIC_BURST + BASIC_RATE * 0.05 + 1, (key[:12], worst)
        tightest = max(tightest, worst)
    print(
        f"soak {SECONDS:.0f} s at {RATE:.0f}/s: {ledger.requests} requests, "
        f"{len(ledger.errors)} errors; sidecar RSS {warm} KiB warm, {end} KiB at the end "
        f"({(end - warm) / warm * 100:+.1f} %); {len(ledger.allowed)} keys admitted, "
        f"{len(ledger.revoked_at)} revoked or rotated out, {len(after_revoke)} allows after "
        f"a revocation (latest {max(after_revoke, default=0):.2f} s after it); the most a "
        f"basic key was admitted in any window beyond rate x window: {tightest:.2f} "
        f"(bound: burst {BASIC_BURST} + 1.5 for client-side timing)"
    )
