"""`tollway`: run the sidecar, the companion or the local demo; manage accounts,
keys and plans. Every command takes --json; errors are one line and exit 1.

This module holds the parser and main(); the commands live in processes.py
(serve, webhook, reconcile, dev, health), admin.py (usage, report, plans,
accounts, keys), credits.py (credits), portal.py (portal) and tokens.py
(admin-tokens)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from sidecar import __version__
from sidecar.cli.admin import (
    cmd_accounts_create,
    cmd_accounts_set_plan,
    cmd_accounts_set_status,
    cmd_accounts_show,
    cmd_keys_issue,
    cmd_keys_list,
    cmd_keys_revoke,
    cmd_keys_rotate,
    cmd_keys_update,
    cmd_plans_check,
    cmd_report,
    cmd_usage_show,
)
from sidecar.cli.common import Output, add_policy_options, duration_arg
from sidecar.cli.credits import cmd_credits_auto_top_up, cmd_credits_grant, cmd_credits_show
from sidecar.cli.portal import cmd_portal_link
from sidecar.cli.processes import cmd_dev, cmd_health, cmd_reconcile, cmd_serve, cmd_webhook
from sidecar.cli.tokens import cmd_tokens_issue, cmd_tokens_list, cmd_tokens_revoke
from sidecar.decision import STATUSES
from sidecar.errors import TollwayError
from sidecar.logs import configure

__all__ = ["main"]


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
        prog="tollway",
        description="Sell access to an API: Envoy ext_authz backed by Redis.",
        parents=[common],
    )
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
    p = add(
        sub,
        "webhook",
        cmd_webhook,
        "run the Stripe companion: signed webhooks, checkout, billing portal, periodic "
        "reconciliation; GET /healthz only while STRIPE_SECRET_KEY is unset",
    )
    p.add_argument("--listen", help="host:port (default: [webhook] listen or 127.0.0.1:8000)")
    p = add(
        sub,
        "dev",
        cmd_dev,
        "the local demo: embedded Valkey, sidecar, companion, and a real Envoy on "
        "127.0.0.1:10000 in front of a demo upstream; prints a key and a curl",
    )
    p.add_argument("--port", type=int, default=10000, help="Envoy's listener port (10000)")
    p.add_argument("--data-dir", default=".tollway", help="Valkey data and logs (.tollway/)")
    p.add_argument("--plan", default="demo", help="the demo customer's plan (demo)")

    usage = add(sub, "usage", lambda a, o: None, "metered usage")
    usage_sub = usage.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(
        usage_sub,
        "show",
        cmd_usage_show,
        "usage this month per meter, quota used and left, billed and pending",
    )
    p.add_argument("--customer", required=True)
    p = add(
        sub, "report", cmd_report, "send recorded usage to Stripe (the companion does this itself)"
    )
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
    add_policy_options(p)
    p = add(ks, "update", cmd_keys_update, "replace a key's name, metadata, scope and limits")
    p.add_argument("--customer", required=True)
    p.add_argument("key_id")
    add_policy_options(p)
    p = add(ks, "list", cmd_keys_list, "list a customer's keys (ids and states, never keys)")
    p.add_argument("--customer", required=True)
    p = add(ks, "revoke", cmd_keys_revoke, "revoke a key at once")
    p.add_argument("--customer", required=True)
    p.add_argument("key_id")
    p = add(
        ks,
        "rotate",
        cmd_keys_rotate,
        "issue a replacement key; the old one works for --overlap, then stops",
    )
    p.add_argument("--customer", required=True)
    p.add_argument("key_id")
    p.add_argument("--overlap", type=duration_arg, default=86400, help="default 24h")

    portal = add(sub, "portal", lambda a, o: None, "the developer portal")
    po = portal.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(po, "link", cmd_portal_link, "a one-time sign-in link for a customer (support)")
    p.add_argument("--customer", required=True)

    credits = add(sub, "credits", lambda a, o: None, "prepaid credits")
    cr = credits.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(cr, "grant", cmd_credits_grant, "grant credits by hand (support, promotions)")
    p.add_argument("--customer", required=True)
    p.add_argument("--credits", type=int, required=True, help="how many")
    p.add_argument("--expires-in", type=duration_arg, help="e.g. 30d; default: never")
    p.add_argument("--reason", default="manual", help="kept on the ledger for people")
    p.add_argument("--grant-id", help="an id of your own: the same grant applied twice counts once")
    p = add(cr, "show", cmd_credits_show, "the balance, live grants and recent ledger entries")
    p.add_argument("--customer", required=True)
    p.add_argument("--recent", type=int, default=20, help="ledger entries to show (20)")
    p = add(
        cr,
        "auto-top-up",
        cmd_credits_auto_top_up,
        "an account's auto top-up: its own mark, off, or the [credits] default",
    )
    p.add_argument("--customer", required=True)
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--at", type=int, help="buy the pack when the balance falls to this")
    choice.add_argument("--off", action="store_true", help="never buy for this account")
    choice.add_argument(
        "--default", action="store_true", help="follow [credits] auto_top_up_at again"
    )

    tokens = add(sub, "admin-tokens", lambda a, o: None, "credentials for the admin API")
    tk = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(tk, "issue", cmd_tokens_issue, "issue a token; it is printed once and never stored")
    p.add_argument("--name", required=True, help="who or what uses it, e.g. signup-service")
    p.add_argument(
        "--scope",
        action="append",
        help="admin (the default), or <accounts|keys|usage|credits>:<read|write>; "
        "repeat or comma-separate",
    )
    add(tk, "list", cmd_tokens_list, "list admin tokens (ids, names, scopes; never tokens)")
    p = add(tk, "revoke", cmd_tokens_revoke, "revoke a token at once")
    p.add_argument("token_id")
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
