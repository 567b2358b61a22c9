"""The administration commands: usage, report, plans check, accounts, keys."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import asdict
from typing import Any

from sidecar import keys
from sidecar.cli.common import (
    Output,
    admin_store,
    key_view,
    policy_from,
    settings_from,
    with_store,
)
from sidecar.errors import TollwayError
from sidecar.settings import Settings
from sidecar.store import KeyRecord, Store


def cmd_usage_show(args: argparse.Namespace, out: Output) -> None:
    from sidecar.report import usage_report

    async def work(store: Store, settings: Settings) -> None:
        report = await usage_report(store, settings, args.customer)
        lines = [
            f"{report.customer_id} on plan {report.plan}, this month "
            f"(since {time.strftime('%Y-%m-%d', time.gmtime(report.period_start))} UTC):"
        ]
        lines += [
            f"  {m.meter}: used {m.used}, billed {m.reported}, pending {m.pending}"
            for m in report.meters
        ] or ["  no metered usage"]
        if report.quota_limit:
            left = max(0, report.quota_limit - report.quota_used)
            lines.append(f"  quota: {report.quota_used} of {report.quota_limit} used, {left} left")
        if report.credits is not None:
            lines.append(f"  credits: balance {report.credits} (tollway credits show)")
        if report.refused:
            lines.append(f"  {report.refused} events refused by Stripe (see the logs)")
        out.emit(asdict(report), "\n".join(lines))

    with_store(args, work)


def cmd_report(args: argparse.Namespace, out: Output) -> None:
    from webhook.config import load_companion_settings
    from webhook.reporter import Reporter
    from webhook.sync import make_client

    settings = load_companion_settings(args.config, os.environ)
    client, http = make_client(settings.stripe)

    async def run() -> None:
        store = admin_store(settings.core)
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


def cmd_plans_check(args: argparse.Namespace, out: Output) -> None:
    settings = settings_from(args)
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
            "credits": p.credits,
            # block, bill, or the plan enforced while the balance is short
            "credits_exhausted": (p.credits_fallback or p.credits_exhausted) if p.credits else None,
        }
        for p in settings.catalog.plans.values()
    ]
    packs = [
        {
            "name": k.name,
            "credits": k.credits,
            "stripe_price": k.stripe_price,
            "expires_in": k.expires_in or None,
        }
        for k in settings.catalog.credit_packs.values()
    ]
    lines = [
        f"{settings.config_path}: OK, {len(plans)} plans, {len(settings.catalog.routes)} routes"
        + (f", {len(packs)} credit packs" if packs else "")
    ]
    lines += [
        f"  {p['name']}: {p['rate']}, burst {p['burst']}, quota {p['quota'] or 'none'}"
        + (f", prepaid credits (when short: {p['credits_exhausted']})" if p["credits"] else "")
        for p in plans
    ]
    lines += [f"  pack {k['name']}: {k['credits']} credits" for k in packs]
    data = {
        "ok": True,
        "plans": plans,
        "credit_packs": packs,
        "routes": len(settings.catalog.routes),
    }
    out.emit(data, "\n".join(lines))


def cmd_accounts_create(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        if args.plan not in settings.catalog.plans:
            raise TollwayError(
                f"plan {args.plan!r} is not in {settings.config_path} "
                f"(plans: {', '.join(settings.catalog.plans)})"
            )
        account = await store.create_account(args.customer, args.plan, args.status)
        out.emit(
            asdict(account),
            f"created account {account.customer_id} on plan {account.plan} ({account.status})",
        )

    with_store(args, work)


def cmd_accounts_show(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        account = await store.require_account(args.customer)
        _tokens, used, period = await store.usage(args.customer)
        key_list = await store.list_keys(args.customer)
        data = {
            **asdict(account),
            "quota_used": used,
            "period_start": period or None,
            "keys": [key_view(r) for r in key_list],
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

    with_store(args, work)


def cmd_accounts_set_status(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        grace_until = 0
        if args.grace is not None:
            if args.status != "past_due":
                raise TollwayError("--grace applies only to status past_due")
            grace_until = int(time.time()) + args.grace
        account = await store.set_status(args.customer, args.status, grace_until=grace_until)
        out.emit(asdict(account), f"account {account.customer_id} is now {account.status}")

    with_store(args, work)


def cmd_accounts_set_plan(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        if args.plan not in settings.catalog.plans:
            raise TollwayError(f"plan {args.plan!r} is not in {settings.config_path}")
        account = await store.set_plan(args.customer, args.plan)
        out.emit(asdict(account), f"account {account.customer_id} is now on plan {account.plan}")

    with_store(args, work)


def _show_new_key(out: Output, key: str, record: KeyRecord, extra: dict[str, Any]) -> None:
    data = {"key": key, **key_view(record), **extra}
    text = (
        f"{key}\n\nkey id {record.key_id} for {record.customer_id}. "
        "This is the only time the key is shown: store it now."
    )
    out.emit(data, text)


def cmd_keys_issue(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        environment: keys.Environment = "test" if args.test else "live"
        key, record = await store.issue_key(
            args.customer,
            environment=environment,
            expires_in=args.expires_in,
            policy=policy_from(args),
        )
        _show_new_key(out, key, record, {})

    with_store(args, work)


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
            used = f", last used {time.ctime(r.last_used)}" if r.last_used else ""
            name = f"  {r.policy.name}" if r.policy.name else ""
            lines.append(f"{r.key_id}  tw_{r.environment}_…  {state}{when}{used}{name}")
        out.emit([key_view(r) for r in records], "\n".join(lines) or "no keys")

    with_store(args, work)


def cmd_keys_update(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        record = await store.update_key(args.customer, args.key_id, policy_from(args))
        out.emit(key_view(record), f"updated {args.key_id} (sidecars apply it within a second)")

    with_store(args, work)


def cmd_keys_revoke(args: argparse.Namespace, out: Output) -> None:
    async def work(store: Store, settings: Settings) -> None:
        await store.revoke_key(args.customer, args.key_id)
        out.emit({"key_id": args.key_id, "state": "revoked"}, f"revoked {args.key_id}")

    with_store(args, work)


def cmd_keys_rotate(args: argparse.Namespace, out: Output) -> None:
    """As the admin API's RotateKey: the new key has the old one's policy and
    expiry (its uses left move to it); an expired or revoked key is refused."""

    async def work(store: Store, settings: Settings) -> None:
        rotation = await store.rotate_key(args.customer, args.key_id, overlap=args.overlap)
        until = rotation.old_expires_at_us // 1_000_000
        _show_new_key(
            out,
            rotation.key,
            rotation.record,
            {"replaces": args.key_id, "old_key_expires_at": until},
        )
        if not out.as_json:
            print(f"{args.key_id} keeps working until {time.ctime(until)}")
            if rotation.uses_moved:
                print(
                    f"its {rotation.uses_moved} uses left moved to the new key: "
                    f"{args.key_id} answers no more requests"
                )

    with_store(args, work)
