"""The long-running and probe commands: serve (and its worker supervisor),
webhook, reconcile, dev, health."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import asdict

from sidecar.cli.common import Output, admin_store, settings_from
from sidecar.errors import TollwayError
from sidecar.settings import Settings

log = logging.getLogger("tollway")


def cmd_serve(args: argparse.Namespace, out: Output) -> None:
    from sidecar.server import serve

    settings = settings_from(args)
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
    app = create_app(settings, admin_store(settings.core))
    # log_config=None: uvicorn logs through our handler (JSON, request ids).
    # loop="asyncio", not uvloop when it happens to be installed: uvloop raises
    # RuntimeError (not ConnectionError) writing to a Redis connection the network
    # has reset, so a Redis outage answered 500 instead of 503 (uvloop issue #506).
    uvicorn.run(
        app,
        host=host.strip("[]"),
        port=int(port),
        access_log=False,
        log_config=None,
        loop="asyncio",
    )


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
        store = admin_store(settings.core)
        try:
            summary = await reconcile(
                store, client, settings, Notifier(None), dry_run=args.dry_run, progress=progress
            )
        finally:
            await http.close_async()  # type: ignore[no-untyped-call]
            await store.close()
        lines = [summary.line()]
        lines += [
            f"  {c.customer_id} ({c.subscription_id}): {c.before} -> {c.after}"
            for c in summary.changes
        ]
        lines += [f"  skipped {s}" for s in summary.skipped]
        out.emit(
            {
                "dry_run": summary.dry_run,
                "subscriptions": summary.subscriptions,
                "customers": summary.customers,
                "changes": [asdict(c) for c in summary.changes],
                "skipped": summary.skipped,
            },
            "\n".join(lines),
        )

    asyncio.run(run())


def cmd_dev(args: argparse.Namespace, out: Output) -> None:
    from sidecar.demo.command import run_dev

    run_dev(args, out)


def cmd_health(args: argparse.Namespace, out: Output) -> None:
    """Healthy when the local sidecar (gRPC health) or companion (/healthz) says so.

    One image runs either role, so the container HEALTHCHECK asks both ports."""
    import urllib.error
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = settings_from(args)
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
    out.emit({"healthy": healthy, **results}, ", ".join(f"{k}: {v}" for k, v in results.items()))
    if not healthy:
        raise SystemExit(1)
