"""`tollway credits`: grant prepaid credits by hand, and show a balance."""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any, Literal

from sidecar.cli.common import Output, with_store
from sidecar.errors import TollwayError
from sidecar.settings import Settings
from sidecar.store import Store

__all__ = ["cmd_credits_auto_top_up", "cmd_credits_grant", "cmd_credits_show"]


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp)) if stamp else "never"


def cmd_credits_grant(args: argparse.Namespace, out: Output) -> None:
    if args.credits <= 0:
        raise TollwayError("--credits: at least 1")

    async def work(store: Store, settings: Settings) -> None:
        await store.require_account(args.customer)
        # A grant id of one's own makes a scripted grant safe to retry.
        grant_id = args.grant_id or f"manual_{uuid.uuid4().hex[:16]}"
        expires_at = int(time.time()) + args.expires_in if args.expires_in else 0
        result = await store.grant_credits(
            args.customer,
            grant_id=grant_id,
            credits=args.credits,
            expires_at=expires_at,
            reason=args.reason,
        )
        data = {
            "customer_id": args.customer,
            "grant_id": grant_id,
            "credits": args.credits,
            "expires_at": expires_at or None,
            "result": result.result,
            "balance": result.balance,
        }
        if result.result == "duplicate":
            text = f"grant {grant_id} was already applied; balance {result.balance}"
        else:
            text = (
                f"granted {args.credits} credits to {args.customer} (grant {grant_id}, "
                f"expires {_when(expires_at)}); balance {result.balance}"
            )
        out.emit(data, text)

    with_store(args, work)


def cmd_credits_show(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.require_account(args.customer)
        balance = await store.credit_balance(args.customer)
        ledger = await store.credit_ledger(args.customer, count=args.recent)
        grants: list[dict[str, Any]] = [
            {"grant_id": g.grant_id, "remaining": g.remaining, "expires_at": g.expires_at or None}
            for g in balance.grants
        ]
        entries = [
            {"id": e.entry_id, "kind": e.kind, "credits": e.credits, **e.fields} for e in ledger
        ]
        data = {
            "customer_id": args.customer,
            "balance": balance.balance,
            "debt": balance.debt,
            "burned_unbatched": balance.open_burn,
            "grants": grants,
            "ledger": entries,
        }
        setting = await store.auto_top_up(args.customer)
        default = settings.credits.auto_top_up_at
        data["auto_top_up"] = _top_up_view(setting, default, settings.credits.auto_top_up_pack)
        lines = [f"{args.customer}: balance {balance.balance} credits"]
        if balance.debt:
            lines.append(f"  debt {balance.debt} (paid first by the next grant)")
        lines += [
            f"  grant {g.grant_id}: {g.remaining} left, expires {_when(g.expires_at)}"
            for g in balance.grants
        ] or ["  no live grants"]
        if balance.open_burn:
            lines.append(f"  burned in the current minute: {balance.open_burn}")
        for e in ledger:
            at = int(e.fields.get("at") or e.fields.get("from") or 0)
            what = f"{e.kind:6} {e.signed:+d}"
            detail = e.fields.get("grant", "")
            if e.fields.get("reason"):
                detail += f" ({e.fields['reason']})"
            lines.append(f"  {_when(at)}  {what}  {detail}".rstrip())
        out.emit(data, "\n".join(lines))

    with_store(args, work)


def _top_up_view(setting: int | str | None, default: int | None, pack: str | None) -> Any:
    if setting == "off" or (setting is None and default is None) or pack is None:
        return {"enabled": False}
    return {"enabled": True, "at": default if setting is None else setting, "pack": pack}


def cmd_credits_auto_top_up(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.require_account(args.customer)
        pack = settings.credits.auto_top_up_pack
        if args.at is not None and args.at < 0:
            raise TollwayError("--at: a balance of 0 or more")
        if args.at is not None and pack is None:
            raise TollwayError("[credits] auto_top_up_pack is not set: no pack to buy")
        choice: int | Literal["off"] | None = "off" if args.off else args.at
        await store.set_auto_top_up(args.customer, choice)
        view = _top_up_view(choice, settings.credits.auto_top_up_at, pack)
        if view["enabled"]:
            text = f"{args.customer}: buys pack {pack} when the balance falls to {view['at']}"
        else:
            text = f"{args.customer}: auto top-up off"
        out.emit({"customer_id": args.customer, "auto_top_up": view}, text)

    with_store(args, work)
