"""The companion's HTTP app (Starlette): where all Stripe I/O lives.

    GET  /healthz                 Redis reachable? Stripe sync on?
    POST /webhooks/stripe         signed Stripe events → account state, credits granted
    POST /checkout                {email | customer, plan} → Checkout Session URL
                                  {customer, pack} → a credit pack's (webhook/credits.py)
    GET  /checkout/complete       ?session_id=… → the new API key, shown once; for a
                                  pack: the credits granted and the new balance
    POST /portal                  API key → Billing Portal session URL
    GET|POST /credits/auto-top-up API key → the account's auto top-up setting;
                                  POST {"enabled": false} or {"enabled": true, "at": N}
    GET  /metrics                 Prometheus metrics
    POST /secret-scanning/github  GitHub leak alerts → keys revoked (webhook/secret_scanning.py)
    /admin/v1/...                 the admin API as JSON, for admin tokens (webhook/admin_api.py)

Forms and JSON are both accepted where a body is read; a form's answer is a
303 redirect. /checkout takes a plan or a pack, not both (400).

In the background: the usage reporter (webhook/reporter.py), the relay of the
notification stream (webhook/outbox.py: notifications to notify_url, and
auto top-ups, webhook/top_up.py), and periodic reconciliation.

Webhook answers: 200 once applied (or a duplicate, or an event Tollway does not
act on); 400 for a missing or bad signature or a malformed body (nothing
changes); 413 over max_body_bytes; 503 when Redis or Stripe cannot be reached,
so Stripe delivers the event again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Literal

import stripe
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sidecar import keys
from sidecar.admin.operations import Admin
from sidecar.envoy import extract_key
from sidecar.errors import StoreUnavailable, TollwayError
from sidecar.plans import CreditPack
from sidecar.store import Store
from webhook.admin_api import admin_routes
from webhook.bodies import error, read_limited
from webhook.checkout import CheckoutRefused
from webhook.config import CompanionSettings
from webhook.credits import PackGrants, checkout_params
from webhook.metrics import WEBHOOK_EVENTS
from webhook.notify import Notifier
from webhook.outbox import Handler, Outbox, Relay
from webhook.pages import page
from webhook.portal import Portal
from webhook.reconcile import reconcile
from webhook.reporter import Reporter
from webhook.secret_scanning import LeakedKeys, PublicKeys
from webhook.sync import StripeUnavailable, Syncer, make_client, stripe_failure
from webhook.top_up import TopUps

__all__ = ["Companion", "create_app", "signature_ok"]

log = logging.getLogger("tollway.webhook")

_SESSION_RE: Final = re.compile(r"cs_[A-Za-z0-9_]{1,200}")
_CUSTOMER_RE: Final = re.compile(r"cus_[A-Za-z0-9]{1,100}")


def signature_ok(
    payload: bytes, header: str, secrets: tuple[str, ...], *, tolerance: int, now: float
) -> bool:
    """Stripe's signature over the raw body, by the SDK, for any configured secret.
    The SDK refuses stale timestamps; ones from the future are refused here too."""
    if not header.isascii():  # Stripe's header is ASCII; hmac refuses to compare others
        return False
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
        except (stripe.SignatureVerificationError, ValueError):  # UnicodeError is one
            continue
        stamps = [p[2:] for p in header.split(",") if p.startswith("t=")]
        return bool(stamps) and stamps[0].isdigit() and int(stamps[0]) <= now + tolerance
    return False


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def _fields(request: Request, limit: int) -> tuple[Mapping[str, Any] | None, bool]:
    """A JSON object or an urlencoded form, and whether it was a form."""
    body = await read_limited(request, limit)
    if body is None:
        return None, False
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        return {k: v[0] for k, v in form.items()}, True
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None, False
    return (data if isinstance(data, dict) else None), False


class Companion:
    def __init__(self, settings: CompanionSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.notifier = Notifier(settings.stripe.notify_url)
        self.outbox = Outbox(store)
        self.client: stripe.StripeClient | None = None
        self.http: stripe.HTTPXClient | None = None
        self.syncer: Syncer | None = None
        self.reporter: Reporter | None = None
        self.grants: PackGrants | None = None
        self.top_ups: TopUps | None = None
        handlers: dict[str, Handler] = {}
        if settings.stripe.secret_key:
            self.client, self.http = make_client(settings.stripe)
            self.syncer = Syncer(store, self.client, settings, self.outbox)
            self.reporter = Reporter(store, self.client, settings)
            self.grants = PackGrants(store, self.client, settings, self.outbox)
            self.top_ups = TopUps(store, self.client, settings, self.outbox, self.grants)
            if self.top_ups.offered:
                handlers["auto_top_up_due"] = self.top_ups.handle_due
        self.relay = Relay(store, self.notifier, settings.stripe, handlers=handlers)
        self._price_ids: dict[str, str] = {}
        self.developer_portal: Portal | None = None  # create_app's, when [portal] is enabled

    @property
    def key_environment(self) -> keys.Environment:
        secret = self.settings.stripe.secret_key or ""
        return "live" if secret.startswith(("sk_live_", "rk_live_")) else "test"

    def _stripe_off(self) -> JSONResponse:
        return error(503, "stripe_not_configured", "Stripe sync is off: STRIPE_SECRET_KEY unset")

    async def healthz(self, request: Request) -> JSONResponse:
        stripe_sync = "on" if self.syncer else "off"
        try:
            await self.store.ping()
        except StoreUnavailable:
            return JSONResponse(
                {"status": "unavailable", "redis": "down", "stripe_sync": stripe_sync}, 503
            )
        return JSONResponse({"status": "ok", "redis": "up", "stripe_sync": stripe_sync})

    async def webhook(self, request: Request) -> Response:
        stripe_settings = self.settings.stripe
        if self.syncer is None or not stripe_settings.webhook_secrets:
            return error(
                503, "stripe_not_configured", "set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET"
            )
        body = await read_limited(request, stripe_settings.max_body_bytes)
        if body is None:
            return error(413, "too_large", f"body over {stripe_settings.max_body_bytes} bytes")
        header = request.headers.get("stripe-signature")
        if not header:
            return error(400, "missing_signature", "Stripe-Signature header required")
        if not signature_ok(
            body,
            header,
            stripe_settings.webhook_secrets,
            tolerance=stripe_settings.webhook_tolerance,
            now=time.time(),
        ):
            log.warning("webhook: rejected a request with an invalid or stale signature")
            return error(400, "invalid_signature", "signature does not verify")
        try:
            event = json.loads(body)
        except ValueError:
            return error(400, "malformed", "body is not JSON")
        if not (
            isinstance(event, dict)
            and isinstance(event.get("id"), str)
            and isinstance(event.get("type"), str)
        ):
            return error(400, "malformed", "not a Stripe event")
        try:
            result = None
            if self.grants is not None:
                result = await self.grants.handle_event(event)
            if result is None:
                result = await self.syncer.handle_event(event)
        except (StoreUnavailable, StripeUnavailable) as exc:
            log.error("webhook: event %s not applied, Stripe will retry: %s", event["id"], exc)
            return error(503, "unavailable", "try again later")
        log.info("webhook: event %s (%s): %s", event["id"], event["type"], result)
        WEBHOOK_EVENTS.labels(event["type"], result).inc()
        return JSONResponse({"received": True, "result": result})

    async def price_for(self, plan_name: str) -> str | None:
        """The Stripe price id a plan is sold at (its price, or its lookup key's)."""
        plan = self.settings.core.catalog.plans[plan_name]
        if plan.stripe_price:
            return plan.stripe_price
        if not plan.stripe_lookup_key or self.client is None:
            return None
        if plan.stripe_lookup_key not in self._price_ids:
            prices = await self.client.v1.prices.list_async(
                {"lookup_keys": [plan.stripe_lookup_key], "active": True, "limit": 1}
            )
            if not prices.data:
                return None
            self._price_ids[plan.stripe_lookup_key] = prices.data[0].id
        return self._price_ids[plan.stripe_lookup_key]

    async def checkout(self, request: Request) -> Response:
        if self.client is None:
            return self._stripe_off()
        data, is_form = await _fields(request, 64 * 1024)
        if data is None:
            return error(400, "malformed", "send JSON or a form: {email or customer, plan}")
        if data.get("pack") is not None and data.get("plan") is not None:
            return error(400, "plan_or_pack", "send a plan or a pack, not both")
        customer, email = data.get("customer"), data.get("email")
        try:
            if data.get("pack") is not None:
                session = await self.pack_checkout(data.get("pack"), customer, email)
            else:
                session = await self.subscription_checkout(data.get("plan"), customer, email)
        except CheckoutRefused as refused:
            return error(refused.status, refused.code, refused.message)
        if is_form:
            return RedirectResponse(session.url or "/", status_code=303)
        return JSONResponse({"id": session.id, "url": session.url})

    async def subscription_checkout(
        self, plan: object, customer: object, email: object
    ) -> stripe.checkout.Session:
        """A Checkout Session subscribing to plan (for a customer id or an email)."""
        assert self.client is not None
        if not isinstance(plan, str) or plan not in self.settings.core.catalog.plans:
            names = ", ".join(self.settings.core.catalog.plans)
            raise CheckoutRefused(400, "unknown_plan", f"plan must be one of: {names}")
        params: dict[str, Any] = {
            "mode": "subscription",
            "success_url": self.settings.stripe.success_url,
            "cancel_url": self.settings.stripe.cancel_url,
            "metadata": {"tollway_plan": plan},
            "subscription_data": {"metadata": {"tollway_plan": plan}},
        }
        if isinstance(customer, str) and _CUSTOMER_RE.fullmatch(customer):
            params["customer"] = customer
        elif isinstance(email, str) and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
            params["customer_email"] = email
        else:
            raise CheckoutRefused(400, "missing_customer", "give an email or a Stripe customer id")
        try:
            price = await self.price_for(plan)
            if price is None:
                raise CheckoutRefused(400, "plan_not_for_sale", f"plan {plan} has no Stripe price")
            params["line_items"] = [{"price": price, "quantity": 1}]
            return await self.client.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            log.error("checkout for plan %s failed: %s", plan, type(exc).__name__)
            message = exc.user_message or "Stripe could not start the checkout; try again"
            raise CheckoutRefused(502, "stripe_error", message) from None

    async def pack_checkout(
        self, name: object, customer: object, email: object = None
    ) -> stripe.checkout.Session:
        """A Checkout Session (mode=payment) buying a credit pack for an account."""
        assert self.client is not None
        packs = self.settings.core.catalog.credit_packs
        if not isinstance(name, str) or name not in packs:
            names = ", ".join(packs) or "(none are configured)"
            raise CheckoutRefused(400, "unknown_pack", f"pack must be one of: {names}")
        if packs[name].stripe_price is None:
            raise CheckoutRefused(400, "pack_not_for_sale", f"pack {name} has no Stripe price")
        if not (isinstance(customer, str) and _CUSTOMER_RE.fullmatch(customer)):
            if isinstance(email, str) and email:
                raise CheckoutRefused(
                    400,
                    "account_required",
                    "credits belong to a Tollway account: buy a pack with the account's "
                    "Stripe customer id (customer), after subscribing",
                )
            raise CheckoutRefused(
                400, "missing_customer", "give the Stripe customer id of an account"
            )
        try:
            account = await self.store.get_account(customer)
        except StoreUnavailable:
            raise CheckoutRefused(503, "unavailable", "try again later") from None
        if account is None:
            raise CheckoutRefused(
                400,
                "account_required",
                f"customer {customer} has no Tollway account: credits belong to one; "
                "subscribe first",
            )
        plan = self.settings.core.catalog.plans.get(account.plan)
        if plan is None or not plan.credits:
            raise CheckoutRefused(
                400,
                "plan_without_credits",
                f"the account's plan {account.plan} does not use credits",
            )
        params = checkout_params(self.settings, name, customer)
        try:
            return await self.client.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            log.error("checkout for pack %s failed: %s", name, type(exc).__name__)
            message = exc.user_message or "Stripe could not start the checkout; try again"
            raise CheckoutRefused(502, "stripe_error", message) from None

    async def _pack_complete(
        self, as_json: bool, session_id: str, session: dict[str, Any]
    ) -> Response:
        assert self.grants is not None
        try:
            # The browser may come back before the webhook: grant now (same grant id).
            granted = await self.grants.grant_session(session_id, session)
        except (StoreUnavailable, StripeUnavailable):
            return self._complete_error(
                as_json, 503, "unavailable", "Please reload this page in a moment."
            )
        if granted is None:
            return self._complete_error(
                as_json, 404, "unknown_session", "This checkout sold nothing we know of."
            )
        if granted.result == "unpaid":
            return self._complete_error(
                as_json, 409, "not_complete", "This checkout is not paid yet."
            )
        data = {
            "customer_id": granted.customer_id,
            "pack": granted.pack,
            "credits": granted.credits,
            "balance": granted.balance,
        }
        if as_json:
            return JSONResponse(data, headers={"cache-control": "no-store"})
        return page(
            "Credits added",
            [
                f"Thank you! {granted.credits} credits ({granted.pack}) are on your account.",
                f"Your balance is now {granted.balance} credits; they work at once.",
            ],
        )

    async def checkout_complete(self, request: Request) -> Response:
        as_json = _wants_json(request)
        session_id = request.query_params.get("session_id", "")
        if self.client is None or self.syncer is None:
            return self._stripe_off()
        if not _SESSION_RE.fullmatch(session_id):
            return self._complete_error(as_json, 400, "bad_session", "That link is incomplete.")
        try:
            session = await self.client.v1.checkout.sessions.retrieve_async(session_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return self._complete_error(
                    as_json, 404, "unknown_session", "We know of no such checkout."
                )
            return self._complete_error(as_json, 502, "stripe_error", "Stripe is unavailable.")
        except stripe.StripeError:
            return self._complete_error(as_json, 502, "stripe_error", "Stripe is unavailable.")
        if session.mode == "payment":
            return await self._pack_complete(as_json, session_id, session.to_dict())
        customer, sub_id = session.customer, session.subscription
        if session.status != "complete" or not isinstance(customer, str) or not sub_id:
            return self._complete_error(
                as_json, 409, "not_complete", "This checkout is not complete yet."
            )
        try:
            # The browser may come back before the webhook: provision now.
            change = await self.syncer.sync(customer, str(sub_id))
            if change is None:
                return self._complete_error(
                    as_json, 502, "stripe_error", "Stripe has no subscription for this checkout."
                )
            key, record = await self.store.issue_key(customer, environment=self.key_environment)
            if not await self.store.claim_checkout(customer, session_id, record.key_id):
                await self.store.revoke_key(customer, record.key_id)
                return self._complete_error(
                    as_json,
                    410,
                    "key_already_shown",
                    "The API key for this checkout was already shown, and is shown only once. "
                    "Lost it? Sign in to the billing portal or ask support for a new key.",
                )
        except (StoreUnavailable, StripeUnavailable):
            return self._complete_error(
                as_json, 503, "unavailable", "Please reload this page in a moment."
            )
        log.info("checkout %s complete: key %s issued to %s", session_id, record.key_id, customer)
        data = {
            "api_key": key,
            "key_id": record.key_id,
            "customer_id": customer,
            "plan": change.new_plan,
            "status": change.new_status,
        }
        if as_json:
            return JSONResponse(data, headers={"cache-control": "no-store"})
        if self.developer_portal is not None:  # the key once, and the buyer signed in
            return await self.developer_portal.first_key(
                key, customer, record.key_id, change.new_plan
            )
        return page(
            "Your API key",
            [
                f"Welcome! You are subscribed to the {change.new_plan} plan.",
                "Copy your key now: this page shows it once, and it is stored only as a hash.",
                "Send it in the x-api-key header (or Authorization: Bearer).",
            ],
            code=key,
        )

    def _complete_error(self, as_json: bool, status: int, code: str, message: str) -> Response:
        if as_json:
            return error(status, code, message)
        return page("Checkout", [message], status=status)

    async def portal(self, request: Request) -> Response:
        if self.client is None:
            return self._stripe_off()
        key, _ = extract_key(request.headers, self.settings.core.headers)
        if not key:
            return error(401, "missing_key", "send your API key in the x-api-key header")
        try:
            record = await self.store.usable_record(key)
            if record is None:
                return error(401, "invalid_key", "API key is not valid")
            session = await self.client.v1.billing_portal.sessions.create_async(
                {
                    "customer": record.customer_id,
                    "return_url": self.settings.stripe.portal_return_url,
                }
            )
        except StoreUnavailable:
            return error(503, "unavailable", "try again later")
        except stripe.StripeError as exc:
            message = exc.user_message or "Stripe could not open the billing portal; try again"
            return error(502, "stripe_error", message)
        if request.headers.get("content-type", "").startswith("application/x-www-form"):
            return RedirectResponse(session.url, status_code=303)
        return JSONResponse({"url": session.url})

    async def auto_top_up(self, request: Request) -> Response:
        key, _ = extract_key(request.headers, self.settings.core.headers)
        if not key:
            return error(401, "missing_key", "send your API key in the x-api-key header")
        data: Mapping[str, Any] | None = {}
        if request.method == "POST":
            data, _ = await _fields(request, 4096)
            if data is None:
                return error(400, "malformed", 'send JSON: {"enabled": true, "at": 100}')
        try:
            record = await self.store.usable_record(key)
            if record is None:
                return error(401, "invalid_key", "API key is not valid")
            customer = record.customer_id
            account = await self.store.get_account(customer)
            plan = self.settings.core.catalog.plans.get(account.plan) if account else None
            # The plan's own auto top-up, else [credits]' (an account may set its own mark).
            default = self.settings.core.credits.top_up_at_for(plan)
            pack = self.top_ups.pack_for(plan) if self.top_ups else None
            if request.method == "POST":
                setting = self._top_up_setting(data or {}, default=default, pack=pack)
                if isinstance(setting, Response):
                    return setting
                await self.store.set_auto_top_up(customer, setting)
                log.info("auto top-up for %s set to %s", customer, setting or "the default")
            current = await self.store.auto_top_up(customer)
        except StoreUnavailable:
            return error(503, "unavailable", "try again later")
        at = None if current == "off" else (default if current is None else current)
        return JSONResponse(
            {
                "customer_id": customer,
                "enabled": at is not None and pack is not None,
                "at": at,
                "pack": pack.name if pack else None,
                "credits": pack.credits if pack else None,
                "own_setting": current is not None,
            }
        )

    def _top_up_setting(
        self, data: Mapping[str, Any], *, default: int | None, pack: CreditPack | None
    ) -> int | Literal["off"] | Response | None:
        """The setting a request asks for, or the 400 that refuses it; default and
        pack: the mark and the pack of the account's plan."""
        enabled = {"true": True, "false": False}.get(str(data.get("enabled")).lower())
        if enabled is None:
            return error(400, "bad_setting", "enabled: true or false")
        if not enabled:
            return "off"
        if pack is None:
            return error(
                400, "auto_top_up_unavailable", "auto top-up is not offered: no pack is set for it"
            )
        at = data.get("at")
        if at is None:
            if default is None:
                return error(400, "bad_setting", "at: the balance to top up at is required")
            return None  # the default mark
        if isinstance(at, str) and at.isdigit():
            at = int(at)
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= 10**12:
            return error(400, "bad_setting", "at: a balance, a whole number >= 0")
        return at

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def relay_notifications(self, *, interval: float = 0.5) -> None:
        """Delivers the notification stream and runs its auto top-ups (webhook/outbox.py)."""
        while True:
            try:
                if not await self.relay.round():
                    await asyncio.sleep(interval)
            except StoreUnavailable as exc:
                log.error("notifications paused, Redis unavailable: %s", exc)
                self.relay.reset()
                await asyncio.sleep(interval)

    async def reconcile_forever(self) -> None:
        interval = self.settings.stripe.reconcile_interval
        while self.client is not None and interval > 0:
            await asyncio.sleep(interval)
            try:
                summary = await reconcile(self.store, self.client, self.settings, self.notifier)
                log.info("reconcile: %s", summary.line())
            except (StoreUnavailable, StripeUnavailable, TollwayError) as exc:
                log.error("reconcile failed, next try in %ss: %s", interval, exc)
            except stripe.StripeError as exc:
                log.error("reconcile failed: %s", stripe_failure(exc))


def create_app(settings: CompanionSettings, store: Store) -> Starlette:
    companion = Companion(settings, store)
    admin = Admin(store, lambda: settings.core)
    leaked_keys = LeakedKeys(store, companion.outbox, PublicKeys.from_settings(settings.stripe))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if companion.syncer is None:
            log.warning("STRIPE_SECRET_KEY unset: Stripe sync is off; serving /healthz only")
        tasks = [
            asyncio.create_task(companion.reconcile_forever()),
            asyncio.create_task(companion.relay_notifications()),
        ]
        interval = settings.stripe.report_interval
        if companion.reporter is not None and interval > 0:
            tasks.append(asyncio.create_task(companion.reporter.run_forever(interval=interval)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if companion.http is not None:
                await companion.http.close_async()  # type: ignore[no-untyped-call]
            await store.close()

    routes = [
        Route("/healthz", companion.healthz, methods=["GET"]),
        Route("/webhooks/stripe", companion.webhook, methods=["POST"]),
        Route("/checkout", companion.checkout, methods=["POST"]),
        Route("/checkout/complete", companion.checkout_complete, methods=["GET"]),
        Route("/portal", companion.portal, methods=["POST"]),
        Route("/credits/auto-top-up", companion.auto_top_up, methods=["GET", "POST"]),
        Route("/metrics", companion.metrics, methods=["GET"]),
        Route("/secret-scanning/github", leaked_keys.alert, methods=["POST"]),
        *admin_routes(admin),
    ]
    if settings.portal.enabled:
        companion.developer_portal = Portal(companion, admin)
        routes += companion.developer_portal.routes()
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.companion = companion
    return app
