"""What the commands share: output, settings and the admin Store, duration
arguments, the JSON view of a key."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from sidecar.errors import ConfigError
from sidecar.key_policy import KeyPolicy, parse_policy
from sidecar.settings import Settings, load_settings, parse_duration
from sidecar.store import KeyRecord, Store, connect


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


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, os.environ)


def admin_store(settings: Settings) -> Store:
    if not settings.redis_url:
        raise ConfigError("[redis] url: not set (set TOLLWAY_REDIS_URL or [redis] url)")
    # Administration tolerates a slower Redis than the request path does.
    timeout = max(settings.redis_timeout, 2.0)
    return Store(connect(settings.redis_url, timeout=timeout), timeout=timeout)


def with_store(
    args: argparse.Namespace, work: Callable[[Store, Settings], Awaitable[None]]
) -> None:
    settings = settings_from(args)

    async def run() -> None:
        store = admin_store(settings)
        try:
            await work(store, settings)
        finally:
            await store.close()

    asyncio.run(run())


def key_view(record: KeyRecord) -> dict[str, Any]:
    view = asdict(record)
    view["expires_at"] = record.expires_at_us // 1_000_000 if record.expires_at_us else None
    del view["expires_at_us"]
    view.update(record.policy.view())
    del view["policy"]
    return view


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """The options of a key's own policy (sidecar/key_policy.py)."""
    parser.add_argument("--name", default="", help="for people: what the key is for")
    parser.add_argument("--metadata", default="", help='a JSON object, e.g. \'{"team": "data"}\'')
    parser.add_argument(
        "--feature",
        action="append",
        dest="features",
        help="scope: only these of the plan's features (repeat)",
    )
    parser.add_argument(
        "--route", action="append", default=[], help="scope: only paths like 'GET /v1/search/*'"
    )
    parser.add_argument("--rate", default="", help="the key's own rate, e.g. 5/s (tightens only)")
    parser.add_argument(
        "--burst", type=int, default=0, help="its bucket size (default: the rate's)"
    )
    parser.add_argument("--quota", default="", help="the key's own quota, e.g. 1000/day")
    parser.add_argument("--uses", type=int, default=0, help="requests the key answers in all")


def policy_from(args: argparse.Namespace) -> KeyPolicy:
    return parse_policy(
        name=args.name,
        metadata=args.metadata,
        features=args.features,
        routes=args.route,
        rate=args.rate,
        burst=args.burst,
        quota=args.quota,
        uses=args.uses,
    )
