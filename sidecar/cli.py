"""`tollway`: run the sidecar, the companion or the local demo; manage accounts,
keys and plans. Every command takes --json; errors are one line and exit 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, NoReturn

from sidecar import __version__, keys
from sidecar.decide import STATUSES
from sidecar.errors import ConfigError, TollwayError
from sidecar.logs import configure
from sidecar.settings import Settings, load_settings, parse_duration
from sidecar.store import KeyRecord, Store, connect

__all__ = ["main"]

log = logging.getLogger("tollway")


def duration_arg(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, os.environ)


def _store(settings: Settings) -> Store:
    if not settings.redis_url:
        raise ConfigError("[redis] url: not set (set TOLLWAY_REDIS_URL or [redis] url)")
    # Administration tolerates a slower Redis than the request path does.
    timeout = max(settings.redis_timeout, 2.0)
    return Store(connect(settings.redis_url, timeout=timeout), timeout=timeout)


def _with_store(
    args: argparse.Namespace, work: Callable[[Store, Settings], Awaitable[None]]
) -> None:
    settings = _settings(args)

    async def run() -> None:
        store = _store(settings)
        try:
            await work(store, settings)
        finally:
            await store.close()

    asyncio.run(run())


def _key_view(record: KeyRecord) -> dict[str, Any]:
    view = asdict(record)
    view["expires_at"] = record.expires_at_us // 1_000_000 if record.expires_at_us else None
    del view["expires_at_us"]
    return view


# -- commands ---------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, out: Output) -> None:
    from sidecar.server import serve

    settings = _settings(args)
    if args.workers > 1:
        _supervise_workers(args, settings)
        return
    asyncio.run(
        serve(settings, environ=dict(os.environ), listen=args.listen, worker=args.worker_index)
    )


def _supervise_workers(args: argparse.Namespace, settings: Settings) -> None:
    """N sidecar processes on one port (SO_REUSEPORT): the kernel spreads
    connections across them. Signals are passed on; if one worker dies, all
    stop and the exit status says so, for the process manager to restart."""
    import signal
    import subprocess

    listen = args.listen or settings.listen
    base = [sys.executable, "-m", "sidecar", "serve", "--listen", listen]
    if args.config:
        base += ["--config", args.config]
    workers = [subprocess.Popen([*base, "--worker-index", str(i)]) for i in range(args.workers)]

    asked_to_stop = []

    def forward(signum: int, frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            asked_to_stop.append(signum)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("serving on %s with %d workers", listen, args.workers)
    while all(w.poll() is None for w in workers):
        time.sleep(0.2)
    stopping = bool(asked_to_stop)
    forward(signal.SIGTERM, None)
    codes = [w.wait() for w in workers]
    # A worker still starting when asked to stop dies of the signal itself: that
    # is a stop, not a failure.
    stopped_by_signal = (-signal.SIGTERM, -signal.SIGINT)
    failures = [c for c in codes if c and not (stopping and c in stopped_by_signal)]
    if failures:
        failed = failures[0]
        raise TollwayError(f"a worker exited (status {failed}); all stopped")


def cmd_webhook(args: argparse.Namespace, out: Output) -> None:
    import uvicorn

    from webhook.app import create_app
    from webhook.config import load_companion_settings

    settings = load_companion_settings(args.config, os.environ)
    host, _, port = (args.listen or settings.core.webhook_listen).rpartition(":")
    app = create_app(settings, _store(settings.core))
    # log_config=None: uvicorn logs through our handler (JSON, request ids).
    # loop="asyncio", not uvloop when it happens to be installed: uvloop raises
    # RuntimeError (not ConnectionError) writing to a Redis connection the network
    # has reset, so a Redis outage answered 500 instead of 503 (uvloop issue #506).
    uvicorn.run(app, host=host.strip("[]"), port=int(port), access_log=False, log_config=None,
                loop="asyncio")  # fmt: skip


def cmd_reconcile(args: argparse.Namespace, out: Output) -> None:
    from webhook.config import load_companion_settings
    from webhook.notify import Notifier
    from webhook.reconcile import reconcile
    from webhook.sync import make_client

    settings = load_companion_settings(args.config, os.environ)
    client, http = make_client(settings.stripe)

    def progress(count: int) -> None:
        print(f"… {count} subscriptions read", file=sys.stderr, flush=True)

    async def run() -> None:
        store = _store(settings.core)
        try:
            summary = await reconcile(store, client, settings, Notifier(None),
                                      dry_run=args.dry_run, progress=progress)  # fmt: skip
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
            await store.close()
        lines = [summary.line()]
        lines += [f"  {c.customer_id} ({c.subscription_id}): {c.before} -> {c.after}"
                  for c in summary.changes]  # fmt: skip
        lines += [f"  skipped {s}" for s in summary.skipped]
        out.emit({"dry_run": summary.dry_run, "subscriptions": summary.subscriptions,
                  "customers": summary.customers, "changes": [asdict(c) for c in summary.changes],
                  "skipped": summary.skipped}, "\n".join(lines))  # fmt: skip

    asyncio.run(run())


def cmd_dev(args: argparse.Namespace, out: Output) -> None:
    from sidecar.devrun import run_dev

    run_dev(args, out)


def cmd_usage_show(args: argparse.Namespace, out: Output) -> None:
    from sidecar.report import usage_report

    async def work(store: Store, settings: Settings) -> None:
        report = await usage_report(store, settings, args.customer)
        lines = [
            f"{report.customer_id} on plan {report.plan}, this month "
            f"(since {time.strftime('%Y-%m-%d', time.gmtime(report.period_start))} UTC):"
        ]
        lines += [f"  {m.meter}: used {m.used}, billed {m.reported}, pending {m.pending}"
                  for m in report.meters] or ["  no metered usage"]  # fmt: skip
        if report.quota_limit:
            left = max(0, report.quota_limit - report.quota_used)
            lines.append(f"  quota: {report.quota_used} of {report.quota_limit} used, {left} left")
        if report.refused:
            lines.append(f"  {report.refused} events refused by Stripe (see the logs)")
        out.emit(asdict(report), "\n".join(lines))

    _with_store(args, work)


def cmd_report(args: argparse.Namespace, out: Output) -> None:
    from webhook.config import load_companion_settings
    from webhook.reporter import Reporter
    from webhook.sync import make_client

    settings = load_companion_settings(args.config, os.environ)
    client, http = make_client(settings.stripe)

    async def run() -> None:
        store = _store(settings.core)
        reporter = Reporter(store, client, settings)
        try:
            if args.once:
                await store.mark_dirty(await store.find_usage_streams())
                accepted = 0
                while sent := await reporter.round():
                    accepted += sent
                out.emit({"accepted": accepted}, f"Stripe accepted {accepted} meter events")
            else:
                await reporter.run_forever()
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
            await store.close()

    asyncio.run(run())


def cmd_health(args: argparse.Namespace, out: Output) -> None:
    """Healthy when the local sidecar (gRPC health) or companion (/healthz) says so.

    One image runs either role, so the container HEALTHCHECK asks both ports."""
    import urllib.error
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = _settings(args)
    results: dict[str, str] = {}
    grpc_port = settings.listen.rpartition(":")[2]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            results["sidecar"] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as exc:
            results["sidecar"] = exc.code().name
    http_port = settings.webhook_listen.rpartition(":")[2]
    try:
        url = f"http://127.0.0.1:{http_port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as response:
            results["companion"] = "SERVING" if response.status == 200 else str(response.status)
    except urllib.error.HTTPError as exc:
        results["companion"] = str(exc.code)  # it answered: 503 while Redis is away
    except OSError as exc:
        results["companion"] = type(exc).__name__
    # --live (a liveness probe): the process answers at all. Without Redis it
    # answers NOT_SERVING / 503, and restarting it would not bring Redis back.
    alive = {"SERVING", "NOT_SERVING", "503"}
    healthy = bool(alive & set(results.values())) if args.live else "SERVING" in results.values()
    out.emit({"healthy": healthy, **results},
             ", ".join(f"{k}: {v}" for k, v in results.items()))  # fmt: skip
    if not healthy:
        raise SystemExit(1)


def cmd_plans_check(args: argparse.Namespace, out: Output) -> None:
    settings = _settings(args)
    plans = [
        {
            "name": p.name,
            "rate": str(p.rate),
            "burst": p.burst,
            "quota": str(p.quota) if p.quota else None,
            "overage": p.overage,
            "features": sorted(p.features),
            "stripe_price": p.stripe_price,
            "stripe_lookup_key": p.stripe_lookup_key,
        }
        for p in settings.catalog.plans.values()
    ]
    lines = [f"{settings.config_path}: OK, {len(plans)} plans, "
             f"{len(settings.catalog.routes)} routes"]  # fmt: skip
    lines += [f"  {p['name']}: {p['rate']}, burst {p['burst']}, quota {p['quota'] or 'none'}"
              for p in plans]  # fmt: skip
    out.emit({"ok": True, "plans": plans, "routes": len(settings.catalog.routes)},
             "\n".join(lines))  # fmt: skip


def cmd_accounts_create(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        if args.plan not in settings.catalog.plans:
            raise TollwayError(
                f"plan {args.plan!r} is not in {settings.config_path} "
                f"(plans: {', '.join(settings.catalog.plans)})"
            )
        account = await store.create_account(args.customer, args.plan, args.status)
        out.emit(asdict(account), f"created account {account.customer_id} on plan "
                 f"{account.plan} ({account.status})")  # fmt: skip

    _with_store(args, work)


def cmd_accounts_show(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        account = await store.require_account(args.customer)
        _tokens, used, period = await store.usage(args.customer)
        key_list = await store.list_keys(args.customer)
        data = {
            **asdict(account),
            "quota_used": used,
            "period_start": period or None,
            "keys": [_key_view(r) for r in key_list],
        }
        plan = settings.catalog.plans.get(account.plan)
        lines = [
            f"account {account.customer_id}",
            f"  plan:   {account.plan}" + ("" if plan else " (not configured!)"),
            f"  status: {account.status}"
            + (f" (grace until {time.ctime(account.grace_until)})" if account.grace_until else ""),
            f"  quota used this period: {used}"
            + (f" of {plan.quota.limit}" if plan and plan.quota else ""),
            f"  keys:   {sum(not r.revoked for r in key_list)} active, "
            f"{sum(r.revoked for r in key_list)} revoked",
        ]
        out.emit(data, "\n".join(lines))

    _with_store(args, work)


def cmd_accounts_set_status(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        grace_until = 0
        if args.grace is not None:
            if args.status != "past_due":
                raise TollwayError("--grace applies only to status past_due")
            grace_until = int(time.time()) + args.grace
        account = await store.set_status(args.customer, args.status, grace_until=grace_until)
        out.emit(asdict(account), f"account {account.customer_id} is now {account.status}")

    _with_store(args, work)


def cmd_accounts_set_plan(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        if args.plan not in settings.catalog.plans:
            raise TollwayError(f"plan {args.plan!r} is not in {settings.config_path}")
        account = await store.set_plan(args.customer, args.plan)
        out.emit(asdict(account), f"account {account.customer_id} is now on plan {account.plan}")

    _with_store(args, work)


def _show_new_key(out: Output, key: str, record: KeyRecord, extra: dict[str, Any]) -> None:
    data = {"key": key, **_key_view(record), **extra}
    text = (
        f"{key}\n\nkey id {record.key_id} for {record.customer_id}. "
        "This is the only time the key is shown: store it now."
    )
    out.emit(data, text)


def cmd_keys_issue(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        environment: keys.Environment = "test" if args.test else "live"
        key, record = await store.issue_key(
            args.customer, environment=environment, expires_in=args.expires_in
        )
        _show_new_key(out, key, record, {})

    _with_store(args, work)


def cmd_keys_list(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.require_account(args.customer)
        records = await store.list_keys(args.customer)
        now = int(time.time())
        lines = []
        for r in records:
            expiry = r.expires_at_us // 1_000_000
            state = r.state
            if state == "active" and expiry and expiry <= now:
                state = "expired"
            when = f", expires {time.ctime(expiry)}" if expiry else ""
            lines.append(f"{r.key_id}  tw_{r.environment}_…  {state}{when}")
        out.emit([_key_view(r) for r in records], "\n".join(lines) or "no keys")

    _with_store(args, work)


def cmd_keys_revoke(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.revoke_key(args.customer, args.key_id)
        out.emit({"key_id": args.key_id, "state": "revoked"}, f"revoked {args.key_id}")

    _with_store(args, work)


def cmd_keys_rotate(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        records = {r.key_id: r for r in await store.list_keys(args.customer)}
        old = records.get(args.key_id)
        if old is None:
            raise TollwayError(f"key {args.key_id} of {args.customer} does not exist")
        if old.revoked:
            raise TollwayError(f"key {args.key_id} is revoked; issue a new key instead")
        environment: keys.Environment = "test" if old.environment == "test" else "live"
        key, record = await store.issue_key(args.customer, environment=environment)
        old_until = await store.now_us() + args.overlap * 1_000_000
        await store.expire_key(args.customer, args.key_id, old_until)
        _show_new_key(
            out,
            key,
            record,
            {"replaces": args.key_id, "old_key_expires_at": old_until // 1_000_000},
        )
        if not out.as_json:
            print(f"{args.key_id} keeps working until {time.ctime(old_until // 1_000_000)}")

    _with_store(args, work)


# -- parser -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: options accepted at every level without a deeper level's default
    # overwriting what an outer level parsed.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="tollway.toml (default: $TOLLWAY_CONFIG or ./tollway.toml)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    parser = argparse.ArgumentParser(
        prog="tollway", description="Sell access to an API: Envoy ext_authz backed by Redis.",
        parents=[common],
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"tollway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        group: Any, name: str, handler: Callable[..., None], help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(handler=handler)
        return p

    p = add(sub, "serve", cmd_serve, "run the sidecar (gRPC Authorize + Envoy ext_authz Check)")
    p.add_argument("--listen", help="host:port (default: [sidecar] listen or 127.0.0.1:50051)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); e.g. the core count",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p = add(sub, "webhook", cmd_webhook,
            "run the Stripe companion: signed webhooks, checkout, billing portal, periodic "
            "reconciliation; GET /healthz only while STRIPE_SECRET_KEY is unset")  # fmt: skip
    p.add_argument("--listen", help="host:port (default: [webhook] listen or 127.0.0.1:8000)")
    p = add(sub, "dev", cmd_dev,
            "the local demo: embedded Valkey, sidecar, companion, and a real Envoy on "
            "127.0.0.1:10000 in front of a demo upstream; prints a key and a curl")  # fmt: skip
    p.add_argument("--port", type=int, default=10000, help="Envoy's listener port (10000)")
    p.add_argument("--data-dir", default=".tollway", help="Valkey data and logs (.tollway/)")
    p.add_argument("--plan", default="demo", help="the demo customer's plan (demo)")

    usage = add(sub, "usage", lambda a, o: None, "metered usage")
    usage_sub = usage.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(usage_sub, "show", cmd_usage_show,
            "usage this month per meter, quota used and left, billed and pending")  # fmt: skip
    p.add_argument("--customer", required=True)
    p = add(sub, "report", cmd_report,
            "send recorded usage to Stripe (the companion does this itself)")  # fmt: skip
    p.add_argument("--once", action="store_true", help="bill everything pending, then exit")
    p = add(
        sub,
        "reconcile",
        cmd_reconcile,
        "list Stripe subscriptions and repair accounts that differ (missed webhooks)",
    )
    p.add_argument("--dry-run", action="store_true", help="show the changes, make none")
    p = add(
        sub,
        "health",
        cmd_health,
        "exit 0 when the local sidecar or companion reports healthy (container probes)",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="exit 0 when either answers at all, Redis or not (a liveness probe)",
    )
    plans = add(sub, "plans", lambda a, o: None, "plan catalog")
    plans_sub = plans.add_subparsers(dest="action", required=True, metavar="ACTION")
    add(plans_sub, "check", cmd_plans_check, "validate the config file and list its plans")

    accounts = add(sub, "accounts", lambda a, o: None, "customer accounts")
    acc = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(acc, "create", cmd_accounts_create, "create an account on a plan")
    p.add_argument("--customer", required=True, help="customer id, e.g. cus_123")
    p.add_argument("--plan", required=True, help="plan name from the config")
    p.add_argument("--status", default="active", choices=STATUSES)
    p = add(acc, "show", cmd_accounts_show, "show an account, its usage and keys")
    p.add_argument("--customer", required=True)
    p = add(acc, "set-status", cmd_accounts_set_status, "set the subscription status")
    p.add_argument("--customer", required=True)
    p.add_argument("status", choices=STATUSES)
    p.add_argument("--grace", type=duration_arg, help="with past_due: access continues this long")
    p = add(acc, "set-plan", cmd_accounts_set_plan, "move an account to another plan")
    p.add_argument("--customer", required=True)
    p.add_argument("plan")

    keys_p = add(sub, "keys", lambda a, o: None, "API keys")
    ks = keys_p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(ks, "issue", cmd_keys_issue, "issue a key; it is printed once and never stored")
    p.add_argument("--customer", required=True)
    p.add_argument("--test", action="store_true", help="a tw_test_ key instead of tw_live_")
    p.add_argument("--expires-in", type=duration_arg, help="e.g. 30d; default: never")
    p = add(ks, "list", cmd_keys_list, "list a customer's keys (ids and states, never keys)")
    p.add_argument("--customer", required=True)
    p = add(ks, "revoke", cmd_keys_revoke, "revoke a key at once")
    p.add_argument("--customer", required=True)
    p.add_argument("key_id")
    p = add(ks, "rotate", cmd_keys_rotate,
            "issue a replacement key; the old one works for --overlap, then stops")  # fmt: skip
    p.add_argument("--customer", required=True)
    p.add_argument("key_id")
    p.add_argument("--overlap", type=duration_arg, default=86400, help="default 24h")
    return parser


def fail(message: str) -> NoReturn:
    print(f"tollway: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    configure(
        level=os.environ.get("TOLLWAY_LOG_LEVEL", "INFO"),
        fmt=os.environ.get("TOLLWAY_LOG_FORMAT", "json"),
    )
    out = Output(args.json)
    try:
        args.handler(args, out)
    except TollwayError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
