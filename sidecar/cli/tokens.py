"""`tollway admin-tokens`: the admin API's credentials (shown once, stored hashed)."""

from __future__ import annotations

import argparse
import sys
import time

from sidecar.admin.scopes import parse_scopes
from sidecar.cli.common import Output, with_store
from sidecar.settings import Settings
from sidecar.store import Store, TokenRecord

__all__ = ["cmd_tokens_issue", "cmd_tokens_list", "cmd_tokens_revoke"]


def _view(record: TokenRecord) -> dict[str, object]:
    return {
        "token_id": record.token_id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "state": record.state,
        "created_at": record.created_at,
    }


def cmd_tokens_issue(args: argparse.Namespace, out: Output) -> None:
    """Without --scope the token is `admin` (every scope, other tokens too), as
    the help says; so the CLI says so on stderr, where a script still sees it
    and the token on stdout stays the only thing there."""
    scopes = parse_scopes(args.scope or ["admin"])

    async def work(store: Store, settings: Settings) -> None:
        token, record = await store.issue_admin_token(args.name, scopes)
        text = "\n".join(
            [
                token,
                f"admin token {record.token_id} ({record.name}), scopes: "
                f"{', '.join(sorted(scopes))}",
                "Shown once and stored only as a hash: keep it in your secret store.",
            ]
        )
        out.emit({"token": token, **_view(record)}, text)
        if not args.scope:
            print(
                "tollway: note: no --scope given, so this token has full admin scope "
                "(every account, key, usage and credit operation). For a backend, issue "
                "one with only what it needs, e.g. --scope accounts:write,keys:write",
                file=sys.stderr,
            )

    with_store(args, work)


def cmd_tokens_list(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        records = await store.list_admin_tokens()
        lines = [
            f"{r.token_id}  {r.state:7}  {time.strftime('%Y-%m-%d', time.gmtime(r.created_at))}"
            f"  {r.name}  [{', '.join(sorted(r.scopes))}]"
            for r in records
        ] or ["no admin tokens"]
        out.emit([_view(r) for r in records], "\n".join(lines))

    with_store(args, work)


def cmd_tokens_revoke(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.revoke_admin_token(args.token_id)
        out.emit(
            {"token_id": args.token_id, "state": "revoked"},
            f"admin token {args.token_id} revoked (every process refuses it within a second)",
        )

    with_store(args, work)
