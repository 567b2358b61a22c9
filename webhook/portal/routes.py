"""The developer portal's pages: pricing, sign-in, the dashboard and its forms.

Built on the admin operations (sidecar/admin/operations.py) with a caller of
its own whose scopes cover what a customer may do to their own account; the
customer always comes from the session, never from the form, so a session
can only ever see and change its own account.

    GET  /pricing                 plans and packs, prices from Stripe
    POST /pricing/checkout        {plan, email} -> 303 to Stripe Checkout
    GET  /sign-in  POST /sign-in  an API key -> a session cookie
    GET  /sign-in/link  POST      a one-time link from `tollway portal link`
    POST /sign-out
    GET  /dashboard               plan, limits, usage, credits, keys, billing
    POST /dashboard/keys          a new key, shown once
    POST /dashboard/keys/rotate   {key_id, overlap}
    POST /dashboard/keys/revoke   {key_id}
    POST /dashboard/credits       {pack} -> 303 to Stripe Checkout
    POST /dashboard/billing       -> 303 to the Stripe Billing Portal

Every POST carries a CSRF token; sign-in attempts are limited per address and
per key prefix; no page that shows account data may be stored.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import stripe
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from sidecar.admin.operations import Admin, AdminError, IssuedKey
from sidecar.errors import StoreUnavailable
from sidecar.periods import period_at
from sidecar.store import PortalSession, TokenRecord
from webhook.bodies import read_limited
from webhook.checkout import CheckoutRefused
from webhook.portal import views
from webhook.portal.prices import Prices
from webhook.portal.security import (
    COOKIE,
    CSRF_COOKIE,
    cookie_attributes,
    page_headers,
    same_token,
    sign,
    unsign,
)

if TYPE_CHECKING:
    from webhook.app import Companion

__all__ = ["PORTAL_CALLER", "Portal"]

log = logging.getLogger("tollway.portal")

# What a signed-in customer may do, through the admin operations, to their own account.
PORTAL_CALLER: Final = TokenRecord(
    token_id="portal",  # noqa: S106 (a caller's name for logs, not a token)
    name="developer portal",
    scopes=frozenset({"accounts:read", "keys:write", "usage:read", "credits:read"}),
    state="active",
    created_at=0,
)
_ATTEMPT_WINDOW: Final = 60
_ATTEMPTS_PER_ADDRESS: Final = 10
_ATTEMPTS_PER_KEY_PREFIX: Final = 5
_OVERLAPS: Final = frozenset({0, 3600, 86400, 604800})
_NOTICES: Final = {
    "revoked": "The key is revoked: requests using it are refused within a second.",
    "signed_out": "You are signed out.",
    "ended": "Your session ended (it expired, or the key you signed in with was revoked).",
}

Handler = Callable[[Request, str, PortalSession], Awaitable[Response]]


def _html(content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status, page_headers())


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=page_headers())


async def _form(request: Request) -> dict[str, str] | None:
    """An urlencoded form (the only kind the portal's pages send), or None."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    body = await read_limited(request, 16 * 1024)
    if body is None:
        return None
    pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(pairs)


class Portal:
    def __init__(self, companion: Companion, admin: Admin) -> None:
        self._companion = companion
        self._admin = admin
        self._store = companion.store
        self._settings = companion.settings
        self._portal = companion.settings.portal
        self._secret: bytes | None = (
            self._portal.secret.encode() if self._portal.secret is not None else None
        )
        self._prices = Prices(companion.client, companion.price_for)

    def routes(self) -> list[BaseRoute]:
        static = StaticFiles(directory=str(resources.files("webhook.portal") / "static"))
        signed_in = self._signed_in
        return [
            Route("/pricing", self.pricing, methods=["GET"]),
            Route("/pricing/checkout", self.pricing_checkout, methods=["POST"]),
            Route("/sign-in", self.sign_in_page, methods=["GET"]),
            Route("/sign-in", self.sign_in, methods=["POST"]),
            Route("/sign-in/link", self.link_page, methods=["GET"]),
            Route("/sign-in/link", self.link_sign_in, methods=["POST"]),
            Route("/sign-out", signed_in(self.sign_out), methods=["POST"]),
            Route("/dashboard", self.dashboard, methods=["GET"]),
            Route("/dashboard/keys", signed_in(self.create_key), methods=["POST"]),
            Route("/dashboard/keys/rotate", signed_in(self.rotate_key), methods=["POST"]),
            Route("/dashboard/keys/revoke", signed_in(self.revoke_key), methods=["POST"]),
            Route("/dashboard/credits", signed_in(self.buy_credits), methods=["POST"]),
            Route("/dashboard/billing", signed_in(self.billing), methods=["POST"]),
            Mount("/portal/static", app=static, name="portal-static"),
        ]

    # -- sessions and tokens -------------------------------------------------------------

    async def secret(self) -> bytes:
        if self._secret is None:
            self._secret = await self._store.portal_secret()
        return self._secret

    async def session_of(self, request: Request) -> tuple[str, PortalSession] | None:
        """The request's live session: signed, known, unexpired, and (if a key opened
        it) that key still usable. A session whose key was revoked ends here."""
        cookie = request.cookies.get(COOKIE)
        session_id = unsign(await self.secret(), cookie) if cookie else None
        if session_id is None:
            return None
        session = await self._store.portal_session(session_id)
        if session is None:
            return None
        if session.expires_at <= time.time():
            await self._store.end_portal_session(session_id)
            return None
        if session.key_id:
            record = await self._store.key_record(session.customer_id, session.key_id)
            if record is None or not record.usable():
                await self._store.end_portal_session(session_id)
                return None
        return session_id, session

    async def open_session(
        self, response: Response, customer_id: str, key_id: str
    ) -> PortalSession:
        """Signs the browser in: a new session's cookie on response."""
        session_id, session = await self._store.open_portal_session(
            customer_id, key_id=key_id, ttl=self._portal.session_ttl
        )
        self._set_cookie(response, await self.secret(), session_id)
        return session

    def _set_cookie(self, response: Response, secret: bytes, session_id: str) -> None:
        response.set_cookie(
            COOKIE,
            sign(secret, session_id),
            **cookie_attributes(self._settings.stripe.public_url, self._portal.session_ttl),  # type: ignore[arg-type]
        )

    def _pre_token(self, request: Request) -> tuple[str, bool]:
        """The double-submit token of a visitor not signed in, and whether it is new."""
        token = request.cookies.get(CSRF_COOKIE, "")
        if (
            20 <= len(token) <= 64
            and token.isascii()
            and token.replace("-", "").replace("_", "").isalnum()
        ):
            return token, False
        return secrets.token_urlsafe(24), True

    def _with_pre_token(self, response: Response, token: str, new: bool) -> Response:
        if new:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                **cookie_attributes(self._settings.stripe.public_url, None),  # type: ignore[arg-type]
            )
        return response

    def _pre_token_ok(self, request: Request, form: Mapping[str, str]) -> bool:
        return same_token(request.cookies.get(CSRF_COOKIE, ""), form.get("csrf"))

    async def _pre_form(self, request: Request) -> dict[str, str] | Response:
        """A sign-in form with its double-submit token, or the page saying it expired."""
        form = await _form(request)
        if form is None or not self._pre_token_ok(request, form):
            return await self.sign_in_page(
                request, error="This form expired; try again.", status=403
            )
        return form

    def _signed_in(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A POST that needs a session and its CSRF token; the form goes to handler."""

        async def guarded(request: Request) -> Response:
            try:
                found = await self.session_of(request)
                if found is None:
                    return _redirect("/sign-in?notice=ended")
                session_id, session = found
                form = await _form(request)
                if form is None:
                    return self._message("Bad request", ["That form could not be read."], 400)
                if not same_token(session.csrf, form.get("csrf")):
                    log.warning("portal: a form for %s without its CSRF token", session.customer_id)
                    return self._message(
                        "Bad request", ["This form expired; reload the page and try again."], 403
                    )
                request.state.form = form
                return await handler(request, session_id, session)
            except StoreUnavailable:
                return self._unavailable()
            except AdminError as exc:  # the account itself is unreadable, or gone
                return self._account_error(exc)

        return guarded

    def _message(self, title: str, lines: list[str], status: int) -> HTMLResponse:
        return _html(views.message_page(title, lines, portal=self._portal.name), status)

    def _account_error(self, exc: AdminError) -> Response:
        if exc.kind == "unavailable":
            return self._unavailable()
        log.warning("portal: a session's account is unreadable: %s", exc.message)
        return self._message("Account unavailable", ["We cannot show this account."], 404)

    def _unavailable(self) -> HTMLResponse:
        return self._message(
            "Unavailable", ["We cannot reach our database right now; try again in a moment."], 503
        )

    # -- pricing ---------------------------------------------------------------------------

    async def pricing(self, request: Request) -> Response:
        catalog = self._settings.core.catalog
        cards = []
        stripe_on = self._companion.client is not None
        for plan in catalog.plans.values():
            price = await self._prices.of_plan(plan.name)
            cards.append(
                views.PlanCard(
                    name=plan.name,
                    rate=str(plan.rate),
                    burst=plan.burst,
                    quota=f"{plan.quota.limit:,} per {plan.quota.period}" if plan.quota else "",
                    features=tuple(sorted(plan.features)),
                    price=price or ("Not sold online" if stripe_on else "Contact us"),
                    for_sale=price is not None,
                    credits=plan.credits,
                )
            )
        packs = [
            views.PackCard(
                p.name,
                p.credits,
                await self._prices.of_price(p.stripe_price) if p.stripe_price else "—",
                p.description,
            )
            for p in catalog.credit_packs.values()
        ]
        token, new = self._pre_token(request)
        note = "" if stripe_on else "Sign-up is not open here: this deployment has no Stripe."
        page = views.pricing_page(cards, packs, portal=self._portal.name, csrf=token, note=note)
        return self._with_pre_token(_html(page), token, new)

    async def pricing_checkout(self, request: Request) -> Response:
        form = await _form(request)
        if form is None or not self._pre_token_ok(request, form):
            return self._message("Bad request", ["Reload the pricing page and try again."], 403)
        if self._companion.client is None:
            return self._message("Unavailable", ["Sign-up is not open here."], 503)
        try:
            session = await self._companion.subscription_checkout(
                form.get("plan"), None, form.get("email")
            )
        except CheckoutRefused as refused:
            return self._message("Checkout", [refused.message], refused.status)
        return _redirect(session.url or "/pricing")

    # -- signing in and out ------------------------------------------------------------------

    async def sign_in_page(
        self, request: Request, *, error: str = "", status: int = 200
    ) -> Response:
        try:
            if not error and await self.session_of(request) is not None:
                return _redirect("/dashboard")
        except StoreUnavailable:
            return self._unavailable()
        notice = _NOTICES.get(request.query_params.get("notice", ""), "")
        token, new = self._pre_token(request)
        page = views.sign_in_page(portal=self._portal.name, csrf=token, error=error or notice)
        return self._with_pre_token(_html(page, status), token, new)

    async def sign_in(self, request: Request) -> Response:
        form = await self._pre_form(request)
        if isinstance(form, Response):
            return form
        presented = form.get("api_key", "")
        address = request.client.host if request.client else "unknown"
        # Failures count, per address and per key prefix (a prefix, never the key: enough
        # to slow guessing at one customer's keys); past either limit nothing is checked.
        buckets = [(f"ip:{address}", _ATTEMPTS_PER_ADDRESS)]
        if presented.startswith("tw_"):
            buckets.append((f"key:{presented[:12]}", _ATTEMPTS_PER_KEY_PREFIX))
        try:
            for bucket, limit in buckets:
                if await self._store.attempts(bucket) >= limit:
                    log.warning("portal: sign-in attempts from %s over the limit", address)
                    return await self.sign_in_page(
                        request, error="Too many sign-in attempts; wait a minute.", status=429
                    )
            record = await self._store.usable_record(presented)
            if record is None:
                for bucket, _ in buckets:
                    await self._store.count_attempt(bucket, window=_ATTEMPT_WINDOW)
                log.info("portal: a sign-in with an unknown or revoked key from %s", address)
                return await self.sign_in_page(
                    request, error="That key is not valid (or was revoked).", status=401
                )
            response = _redirect("/dashboard")
            await self.open_session(response, record.customer_id, record.key_id)
        except StoreUnavailable:
            return self._unavailable()
        log.info("portal: %s signed in with key %s", record.customer_id, record.key_id)
        return response

    async def first_key(self, key: str, customer_id: str, key_id: str, plan: str) -> Response:
        """After Checkout: the new key, this once, and the buyer signed in with it. The
        key is shown even when the session cannot be opened: it can never be shown again."""
        opened: tuple[str, PortalSession] | None = None
        try:
            opened = await self._store.open_portal_session(
                customer_id, key_id=key_id, ttl=self._portal.session_ttl
            )
            secret = await self.secret()
        except StoreUnavailable:
            log.error("portal: key %s shown without a session: Redis unavailable", key_id)
            opened = None
        page = views.key_page(
            key,
            plan=plan,
            api_base_url=self._portal.api_base_url,
            portal=self._portal.name,
            csrf=opened[1].csrf if opened else None,
            heading=f"Welcome! You are subscribed to the {plan} plan.",
        )
        response = _html(page)
        if opened is not None:
            self._set_cookie(response, secret, opened[0])
        return response

    async def link_page(self, request: Request) -> Response:
        token, new = self._pre_token(request)
        page = views.link_page(portal=self._portal.name, csrf=token)
        return self._with_pre_token(_html(page), token, new)

    async def link_sign_in(self, request: Request) -> Response:
        form = await self._pre_form(request)
        if isinstance(form, Response):
            return form
        token = form.get("token", "")
        try:
            customer = await self._store.redeem_sign_in_link(token) if token else None
            if customer is None:
                return await self.sign_in_page(
                    request,
                    error="That sign-in link was used already or has expired; ask for a new one.",
                    status=400,
                )
            response = _redirect("/dashboard")
            await self.open_session(response, customer, "")
        except StoreUnavailable:
            return self._unavailable()
        log.info("portal: %s signed in with a sign-in link", customer)
        return response

    async def sign_out(self, request: Request, session_id: str, session: PortalSession) -> Response:
        await self._store.end_portal_session(session_id)
        response = _redirect("/sign-in?notice=signed_out")
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- the dashboard -----------------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        try:
            found = await self.session_of(request)
            if found is None:
                return _redirect("/sign-in")
            _, session = found
            notice = _NOTICES.get(request.query_params.get("notice", ""), "")
            return await self._render(session, notice=notice)
        except StoreUnavailable:
            return self._unavailable()
        except AdminError as exc:
            return self._account_error(exc)

    async def _render(
        self,
        session: PortalSession,
        *,
        new_key: str = "",
        notice: str = "",
        errors: tuple[str, ...] = (),
        status: int = 200,
    ) -> Response:
        data = await self._dashboard(session, new_key=new_key, notice=notice, errors=errors)
        return _html(
            views.dashboard_page(data, portal=self._portal.name, csrf=session.csrf), status
        )

    async def _dashboard(self, session: PortalSession, **extra: Any) -> views.Dashboard:
        caller, customer = PORTAL_CALLER, session.customer_id
        catalog = self._settings.core.catalog
        account = await self._admin.get_account(caller, customer)
        usage = await self._admin.get_usage(caller, customer)
        plan = catalog.plans.get(account.plan)
        now = int(time.time())
        rate = plan.rate.per_second if plan else 0.0
        burst = plan.burst if plan else 0
        tokens = float(burst)
        limits = await self._store.limits_state(customer)
        if limits.tokens is not None:
            elapsed_us = max(0, time.time_ns() // 1000 - limits.written_us)
            tokens = min(burst, limits.tokens + elapsed_us * rate / 1_000_000)
        kind = plan.quota.period if plan and plan.quota else "month"
        start, end, month = period_at(kind, now)
        # A counter of another period, or of another kind of period, counts nothing now.
        current = (limits.period_kind, limits.period_start) == (kind, start)
        used = limits.used if current else 0
        meters = {m.meter: m for m in usage.meters}
        if plan and plan.meter and plan.meter not in meters:
            meters[plan.meter] = None  # type: ignore[assignment]
        # The whole month, days to come included: the chart's scale is the month's.
        _, month_end, _ = period_at("month", now)
        days = list(range(month, month_end, 86400))
        meter_rows = []
        for name in sorted(meters):
            view = meters[name]
            daily = await self._store.daily_usage(customer, name, days)
            meter_rows.append(
                views.MeterUsage(
                    meter=name,
                    used=view.used if view else 0,
                    billed=view.reported if view else 0,
                    pending=view.pending if view else 0,
                    days=tuple(zip(days, daily, strict=True)),
                )
            )
        keys = await self._admin.list_keys(caller, customer)
        packs: tuple[views.PackCard, ...] = ()
        if usage.credits is not None and self._companion.client is not None:
            packs = tuple(
                [
                    views.PackCard(p.name, p.credits, await self._prices.of_price(p.stripe_price))
                    for p in catalog.credit_packs.values()
                    if p.stripe_price
                ]
            )
        return views.Dashboard(
            customer_id=customer,
            plan=account.plan,
            status=account.status,
            grace_until=account.grace_until,
            now=now,
            rate=str(plan.rate) if plan else "",
            burst=burst,
            tokens=tokens,
            quota_limit=usage.quota_limit,
            quota_used=used,
            quota_period=kind,
            quota_resets=end,
            meters=tuple(meter_rows),
            keys=tuple(
                views.KeyRow(
                    key_id=k.key_id,
                    name=k.name,
                    state=k.state
                    if k.state == "revoked" or not k.expires_at or k.expires_at > now
                    else "expired",
                    created_at=k.created_at,
                    last_used=k.last_used,
                    expires_at=k.expires_at,
                    current=k.key_id == session.key_id,
                )
                for k in keys
            ),
            credits=usage.credits,
            packs=packs,
            billing_portal=self._companion.client is not None,
            nonce=secrets.token_urlsafe(12),
            **extra,
        )

    # -- what a signed-in customer can do ----------------------------------------------------

    async def create_key(
        self, request: Request, session_id: str, session: PortalSession
    ) -> Response:
        form: dict[str, str] = request.state.form
        try:
            issued = await self._admin.issue_key(
                PORTAL_CALLER,
                session.customer_id,
                environment=self._companion.key_environment,
                idempotency_key=_nonce(form, session),
            )
        except AdminError as exc:
            return await self._render(session, errors=(exc.message,), status=400)
        return await self._shown_once(session, issued, "A new key is ready.")

    async def rotate_key(
        self, request: Request, session_id: str, session: PortalSession
    ) -> Response:
        form: dict[str, str] = request.state.form
        key_id = form.get("key_id", "")
        try:
            overlap = int(form.get("overlap", "86400"))
        except ValueError:
            overlap = -1
        if overlap not in _OVERLAPS:
            return await self._render(
                session, errors=("Choose how long the old key works.",), status=400
            )
        try:
            issued = await self._admin.rotate_key(
                PORTAL_CALLER,
                session.customer_id,
                key_id,
                overlap=overlap,
                idempotency_key=_nonce(form, session),
            )
        except AdminError as exc:
            return await self._render(session, errors=(exc.message,), status=400)
        if key_id == session.key_id and issued.api_key:
            # The session follows its key to the new one, or rotating would sign it out.
            session = (
                await self._store.move_portal_session(session_id, issued.key.key_id) or session
            )
        until = (
            "now"
            if overlap == 0
            else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(issued.old_key_expires_at))
        )
        return await self._shown_once(session, issued, f"Key {key_id} works until {until}.")

    async def _shown_once(self, session: PortalSession, issued: IssuedKey, notice: str) -> Response:
        if not issued.api_key:  # the same form sent twice: the key was shown the first time
            return await self._render(
                session, notice="That key was already created and shown; it is listed below."
            )
        log.info("portal: %s made key %s", session.customer_id, issued.key.key_id)
        return await self._render(session, new_key=issued.api_key, notice=notice)

    async def revoke_key(
        self, request: Request, session_id: str, session: PortalSession
    ) -> Response:
        form: dict[str, str] = request.state.form
        key_id = form.get("key_id", "")
        try:
            await self._admin.revoke_key(PORTAL_CALLER, session.customer_id, key_id)
        except AdminError as exc:
            return await self._render(session, errors=(exc.message,), status=400)
        log.info("portal: %s revoked key %s", session.customer_id, key_id)
        if key_id == session.key_id:
            await self._store.end_portal_session(session_id)
            return _redirect("/sign-in?notice=ended")
        return _redirect("/dashboard?notice=revoked")

    async def buy_credits(
        self, request: Request, session_id: str, session: PortalSession
    ) -> Response:
        form: dict[str, str] = request.state.form
        if self._companion.client is None:
            return await self._render(
                session, errors=("Buying credits is not open here.",), status=503
            )
        try:
            checkout = await self._companion.pack_checkout(form.get("pack"), session.customer_id)
        except CheckoutRefused as refused:
            return await self._render(session, errors=(refused.message,), status=refused.status)
        return _redirect(checkout.url or "/dashboard")

    async def billing(self, request: Request, session_id: str, session: PortalSession) -> Response:
        client = self._companion.client
        if client is None:
            return await self._render(session, errors=("Billing is not set up here.",), status=503)
        try:
            portal = await client.v1.billing_portal.sessions.create_async(
                {
                    "customer": session.customer_id,
                    "return_url": f"{self._settings.stripe.public_url}/dashboard",
                }
            )
        except stripe.StripeError as exc:
            message = exc.user_message or "Stripe could not open the billing portal; try again."
            return await self._render(session, errors=(message,), status=502)
        return _redirect(portal.url)


def _nonce(form: Mapping[str, str], session: PortalSession) -> str:
    """The idempotency key of a create: the form's own nonce, so sending one form
    twice (a double click, a reload) makes one key."""
    nonce = form.get("nonce", "")
    return f"portal:{session.csrf}:{nonce}" if nonce and len(nonce) <= 64 else ""
