"""`tollway dev`: start the whole pipe locally and print a key and a curl.

Its config is the packaged copy of deploy/tollway.toml unless --config or
TOLLWAY_CONFIG names another."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

from sidecar.demo.processes import (
    DEMO_CONFIG,
    Child,
    free_port,
    port_is_free,
    start_companion,
    start_envoy,
    start_sidecar,
    start_valkey,
    stopping,
)
from sidecar.demo.upstream import EchoUpstream
from sidecar.errors import ConfigError, NotFound, TollwayError
from sidecar.settings import load_settings

DEMO_CUSTOMER = "cus_demo"


def run_dev(args: Any, out: Any) -> None:
    config = Path(args.config or os.environ.get("TOLLWAY_CONFIG") or DEMO_CONFIG)
    if config == DEMO_CONFIG and not config.is_file():
        raise TollwayError(f"{config} is missing: this install does not carry the demo")
    settings = load_settings(config, os.environ)
    if args.plan not in settings.catalog.plans:
        raise ConfigError(f"--plan {args.plan!r} is not in {config}")
    if not port_is_free(args.port):
        raise TollwayError(f"port {args.port} is in use; pass --port to pick another")
    data_dir = Path(args.data_dir).resolve()
    logs = data_dir / "logs"

    valkey = None
    redis_url = os.environ.get("TOLLWAY_REDIS_URL")
    if not redis_url:
        valkey = start_valkey(data_dir / "valkey")
        redis_url = valkey.connection_url
    assert redis_url is not None
    env = {**os.environ, "TOLLWAY_REDIS_URL": redis_url}
    children: list[Child] = []
    try:
        with EchoUpstream() as upstream, stopping(children):
            # deploy/envoy.yaml asks over HTTP (ext_authz) and settles over
            # gRPC (the access log): the sidecar listens on both.
            sidecar_port, http_port = free_port(), free_port()
            children.append(
                start_sidecar(
                    config,
                    redis_url=redis_url,
                    port=sidecar_port,
                    log=logs / "sidecar.log",
                    env=env,
                    http_port=http_port,
                )
            )
            companion_port = int(settings.webhook_listen.rpartition(":")[2])
            if not port_is_free(companion_port):
                companion_port = free_port()
            children.append(
                start_companion(
                    config,
                    redis_url=redis_url,
                    port=companion_port,
                    log=logs / "companion.log",
                    env=env,
                )
            )
            children.append(
                start_envoy(
                    workdir=data_dir,
                    log=logs / "envoy.log",
                    listen=args.port,
                    admin=free_port(),
                    sidecar=sidecar_port,
                    http=http_port,
                    upstream=upstream.port,
                )
            )
            key, link = asyncio.run(_demo_key(redis_url, args.plan))
            _announce(
                out,
                key=key,
                link=link,
                port=args.port,
                companion=companion_port,
                plan=args.plan,
                logs=logs,
                settings_plan=settings.catalog.plans[args.plan],
            )
            _wait_for_signal(children)
    finally:
        if valkey is not None:
            valkey.stop()


async def _demo_key(redis_url: str, plan: str) -> tuple[str, str]:
    """The demo customer's new key, and a one-time sign-in link token to its dashboard."""
    from sidecar.store import Store, connect

    store = Store(connect(redis_url, timeout=2.0), timeout=2.0)
    try:
        try:
            account = await store.require_account(DEMO_CUSTOMER)
            if account.plan != plan or account.status != "active":
                await store.set_plan(DEMO_CUSTOMER, plan)
                await store.set_status(DEMO_CUSTOMER, "active")
        except NotFound:
            await store.create_account(DEMO_CUSTOMER, plan)
        key, _ = await store.issue_key(DEMO_CUSTOMER, environment="test")
        return key, await store.create_sign_in_link(DEMO_CUSTOMER, ttl=3600)
    finally:
        await store.close()


def _announce(
    out: Any,
    *,
    key: str,
    link: str,
    port: int,
    companion: int,
    plan: str,
    logs: Path,
    settings_plan: Any,
) -> None:
    curl = f"curl -i -H 'x-api-key: {key}' http://127.0.0.1:{port}/hello"
    portal = f"http://127.0.0.1:{companion}"
    sign_in = f"{portal}/sign-in/link#token={link}"
    text = f"""
Tollway is running: Envoy on 127.0.0.1:{port} asks the sidecar about every request.

  customer  {DEMO_CUSTOMER} on plan {plan} ({settings_plan.rate}, burst {settings_plan.burst})
  API key   {key}
            (shown once; `tollway keys issue --customer {DEMO_CUSTOMER}` makes another)

Try it:

  {curl}

Repeat it quickly and the plan's limit answers 429 with Retry-After and RateLimit headers.
Without the header it is a 401.

The customer's portal (usage, keys, billing): open this one-time sign-in link

  {sign_in}

or sign in at {portal}/sign-in with the key. Pricing: {portal}/pricing
Logs: {logs}/. Ctrl-C stops everything.
"""
    out.emit(
        {
            "api_key": key,
            "curl": curl,
            "customer": DEMO_CUSTOMER,
            "plan": plan,
            "envoy": f"http://127.0.0.1:{port}",
            "companion": portal,
            "portal": f"{portal}/dashboard",
            "sign_in_link": sign_in,
        },
        text,
    )


def _wait_for_signal(children: list[Child]) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        for child in children:
            if child.process.poll() is not None:
                raise TollwayError(f"{child.name} exited; see {child.log}")
    print("\nstopping…", flush=True)
