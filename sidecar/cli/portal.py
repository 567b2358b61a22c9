"""`tollway portal link`: a one-time sign-in link to the developer portal, for
support staff to hand to a customer who lost their key (by their own mail)."""

from __future__ import annotations

import argparse
import os

from sidecar.cli.common import Output, with_store
from sidecar.settings import Settings
from sidecar.store import Store

__all__ = ["cmd_portal_link"]


def cmd_portal_link(args: argparse.Namespace, out: Output) -> None:
    from webhook.config import load_companion_settings  # the companion's [stripe] and [portal]

    async def work(store: Store, settings: Settings) -> None:
        companion = load_companion_settings(settings.config_path, os.environ)
        ttl = companion.portal.link_ttl
        token = await store.create_sign_in_link(args.customer, ttl=ttl)
        # The token rides in the fragment: browsers never send it, so no server or
        # proxy logs it; the page moves it into a form and then off the address bar.
        url = f"{companion.stripe.public_url}/sign-in/link#token={token}"
        minutes = ttl // 60
        out.emit(
            {"customer_id": args.customer, "url": url, "expires_in": ttl},
            f"{url}\n(works once, for {minutes} min; anyone holding it can sign in as "
            f"{args.customer})",
        )

    with_store(args, work)
