"""The portal's pages as HTML, from plain data: no I/O, every value escaped.

Forms that change anything carry the session's CSRF token (or, before
sign-in, the double-submit token); the handlers in routes.py check it. No
page holds inline script or style: behaviour and looks come from
/portal/static (the CSP allows nothing else).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Final

from webhook.portal.chart import daily_chart, gauge

__all__ = [
    "Dashboard",
    "KeyRow",
    "MeterUsage",
    "PackCard",
    "PlanCard",
    "dashboard_page",
    "key_page",
    "layout",
    "link_page",
    "message_page",
    "pricing_page",
    "sign_in_page",
]

_STATUS_TEXT: Final = {
    "active": "Active",
    "trialing": "Trial",
    "past_due": "Payment failed",
    "canceled": "Cancelled",
    "unpaid": "Unpaid",
    "incomplete": "Incomplete",
}


def _when(at: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)) if at else "never"


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def _form(action: str, csrf: str, button: str, *, fields: str = "", cls: str = "") -> str:
    klass = f' class="{escape(cls)}"' if cls else ""
    return (
        f'<form method="post" action="{escape(action)}"{klass}>{_hidden("csrf", csrf)}'
        f'{fields}<button type="submit">{escape(button)}</button></form>'
    )


def layout(title: str, body: str, *, portal: str, csrf: str | None = None) -> str:
    """The page around body; csrf: the visitor is signed in (a sign-out button)."""
    if csrf is not None:
        nav = '<a href="/pricing">Pricing</a><a href="/dashboard">Dashboard</a>' + _form(
            "/sign-out", csrf, "Sign out", cls="inline"
        )
    else:
        nav = '<a href="/pricing">Pricing</a><a href="/sign-in">Sign in</a>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} · {escape(portal)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/portal/static/portal.css">'
        '<script src="/portal/static/portal.js" defer></script></head><body>'
        f'<header><a class="brand" href="/pricing">{escape(portal)}</a><nav>{nav}</nav></header>'
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def message_page(title: str, lines: Sequence[str], *, portal: str, csrf: str | None = None) -> str:
    body = "".join(f"<p>{escape(line)}</p>" for line in lines)
    return layout(title, body, portal=portal, csrf=csrf)


# -- pricing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanCard:
    name: str
    rate: str  # "10 requests/s"
    burst: int
    quota: str  # "100000 per month", or "" for none
    features: tuple[str, ...]
    price: str  # "$29.00 / month", or why it is not shown
    for_sale: bool  # has a Stripe price: a button to Checkout
    credits: bool = False


@dataclass(frozen=True, slots=True)
class PackCard:
    name: str
    credits: int
    price: str
    description: str = ""


def pricing_page(
    plans: Sequence[PlanCard], packs: Sequence[PackCard], *, portal: str, csrf: str, note: str = ""
) -> str:
    cards = []
    for plan in plans:
        facts = [f"{escape(plan.rate)}, bursts of {plan.burst}"]
        if plan.quota:
            facts.append(f"{escape(plan.quota)} included")
        if plan.credits:
            facts.append("pay as you go from prepaid credits")
        facts += [f"{escape(f)}" for f in plan.features]
        action = (
            _form(
                "/pricing/checkout",
                csrf,
                f"Subscribe to {plan.name}",
                fields=_hidden("plan", plan.name)
                + '<label>Email <input type="email" name="email" required '
                'autocomplete="email"></label>',
            )
            if plan.for_sale
            else ""
        )
        cards.append(
            f'<section class="card plan" data-plan="{escape(plan.name)}">'
            f"<h2>{escape(plan.name)}</h2>"
            f'<p class="price">{escape(plan.price)}</p>'
            f"<ul>{''.join(f'<li>{fact}</li>' for fact in facts)}</ul>{action}</section>"
        )
    body = f'<div class="cards">{"".join(cards)}</div>'
    if packs:
        rows = "".join(
            f"<tr><td>{escape(p.name)}</td><td>{p.credits:,} credits</td>"
            f"<td>{escape(p.price)}</td><td>{escape(p.description)}</td></tr>"
            for p in packs
        )
        body += (
            "<h2>Credit packs</h2><p>Prepaid credits for plans that burn them; "
            "buy them from your dashboard.</p>"
            f"<table><thead><tr><th>Pack</th><th>Credits</th><th>Price</th><th></th></tr>"
            f"</thead><tbody>{rows}</tbody></table>"
        )
    if note:
        body = f'<p class="notice">{escape(note)}</p>' + body
    body += '<p class="muted">Already a customer? <a href="/sign-in">Sign in</a>.</p>'
    return layout("Pricing", body, portal=portal)


# -- the key, once ---------------------------------------------------------------------


def key_page(
    key: str, *, plan: str, api_base_url: str, portal: str, csrf: str | None, heading: str
) -> str:
    """A new key, shown this once, with a copy button and a request that works."""
    curl = f"curl -H 'x-api-key: {key}' {api_base_url}/"
    python = (
        "import httpx\n\n"
        f'api = httpx.Client(base_url="{api_base_url}", headers={{"x-api-key": "{key}"}})\n'
        'print(api.get("/").status_code)'
    )
    body = (
        f"<p>{escape(heading)}</p>"
        "<p><strong>Copy your key now.</strong> This page shows it once; we keep only "
        "a hash of it, so nobody can show it again.</p>"
        f'<div class="secret"><code id="api-key">{escape(key)}</code>'
        '<button type="button" class="copy" data-copy="api-key">Copy</button></div>'
        f'<h2>Try it</h2><pre><code id="curl">{escape(curl)}</code></pre>'
        '<button type="button" class="copy" data-copy="curl">Copy</button>'
        f'<p>From Python:</p><pre><code id="python">{escape(python)}</code></pre>'
        '<button type="button" class="copy" data-copy="python">Copy</button>'
        "<p>Send the key in the <code>x-api-key</code> header (or "
        "<code>Authorization: Bearer</code>) of every request.</p>"
        f"<p>Your plan: <strong>{escape(plan)}</strong>. "
        '<a href="/dashboard">Go to your dashboard</a> to watch your usage and manage keys.</p>'
    )
    return layout("Your API key", body, portal=portal, csrf=csrf)


# -- sign-in ---------------------------------------------------------------------------


def sign_in_page(*, portal: str, csrf: str, error: str = "") -> str:
    notice = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        notice
        + '<form method="post" action="/sign-in" class="stack">'
        + _hidden("csrf", csrf)
        + '<label>API key <input type="password" name="api_key" autocomplete="off" '
        'required spellcheck="false"></label>'
        '<button type="submit">Sign in</button></form>'
        '<p class="muted">Your key is checked once and never kept in your browser: '
        "you get a session that ends when you sign out, after a while, or when the key "
        "is revoked. Lost your key? Ask support for a sign-in link.</p>"
    )
    return layout("Sign in", body, portal=portal)


def link_page(*, portal: str, csrf: str) -> str:
    """A sign-in link's landing page: the token is in the URL's fragment (never sent
    to a server, never in a log); portal.js copies it into the form."""
    body = (
        '<form method="post" action="/sign-in/link" class="stack" id="link-form">'
        + _hidden("csrf", csrf)
        + '<input type="hidden" name="token" id="link-token" value="">'
        "<p>Someone from support sent you this link to sign in. It works once.</p>"
        '<button type="submit">Sign in</button></form>'
    )
    return layout("Sign in", body, portal=portal)


# -- the dashboard ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    name: str
    state: str  # active | revoked | expired
    created_at: int
    last_used: int
    expires_at: int  # 0: never
    current: bool  # the key this session signed in with


@dataclass(frozen=True, slots=True)
class MeterUsage:
    meter: str
    used: int
    billed: int
    pending: int
    days: tuple[tuple[int, int], ...]  # (UTC day start, units) this month


@dataclass(frozen=True, slots=True)
class Dashboard:
    customer_id: str
    plan: str
    status: str
    grace_until: int  # Unix s; past_due: access ends then
    now: int
    rate: str
    burst: int
    tokens: float  # the bucket now
    quota_limit: int
    quota_used: int
    quota_period: str
    quota_resets: int
    meters: tuple[MeterUsage, ...]
    keys: tuple[KeyRow, ...]
    credits: int | None  # None: the account has no balance
    packs: tuple[PackCard, ...] = ()
    billing_portal: bool = False  # Stripe is configured: a link into its portal
    new_key: str = ""  # a key made just now, shown this once
    nonce: str = ""  # this page's create forms' idempotency nonce (one key per form)
    notice: str = ""
    errors: tuple[str, ...] = field(default_factory=tuple)


def _countdown(until: int, now: int) -> str:
    left = max(0, until - now)
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days} d {hours} h {rest // 60} min"


def _status(d: Dashboard) -> str:
    text = _STATUS_TEXT.get(d.status, d.status)
    html = (
        f'<p>Account <code id="customer">{escape(d.customer_id)}</code> · '
        f"Plan <strong>{escape(d.plan)}</strong> · "
        f'<span class="status {escape(d.status)}">{escape(text)}</span></p>'
    )
    if d.status == "past_due" and d.grace_until > d.now:
        html += (
            '<p class="warning" role="alert">Your last payment failed. Access continues for '
            f'<strong class="countdown" data-until="{d.grace_until}">'
            f"{_countdown(d.grace_until, d.now)}</strong> (until {_when(d.grace_until)}); "
            "update your card in billing to keep it.</p>"
        )
    elif d.status == "past_due":
        html += (
            '<p class="warning" role="alert">Your last payment failed and the grace period '
            "is over.</p>"
        )
    return html


def _limits(d: Dashboard) -> str:
    tokens = int(d.tokens)
    html = (
        '<section class="card"><h2>Limits</h2>'
        f"<p>Rate: {escape(d.rate)}, bursts of {d.burst}. Room for "
        f'<strong id="bucket">{tokens:,}</strong> requests right now.</p>'
        + gauge(
            d.burst - d.tokens, d.burst, label=f"{d.burst - tokens} of a burst of {d.burst} in use"
        )
    )
    if d.quota_limit:
        html += (
            f'<p>Quota: <strong id="quota-used">{d.quota_used:,}</strong> of '
            f"{d.quota_limit:,} this {escape(d.quota_period)} (resets {_when(d.quota_resets)}).</p>"
            + gauge(d.quota_used, d.quota_limit, label=f"{d.quota_used} of {d.quota_limit} used")
        )
    else:
        html += (
            f"<p>Requests this {escape(d.quota_period)}: "
            f'<strong id="quota-used">{d.quota_used:,}</strong> (no quota).</p>'
        )
    return html + "</section>"


def _usage(d: Dashboard) -> str:
    if not d.meters:
        return (
            '<section class="card"><h2>Usage this month</h2>'
            "<p>Nothing metered this month yet.</p></section>"
        )
    parts = ['<section class="card"><h2>Usage this month</h2>']
    for m in d.meters:
        parts.append(
            f'<div class="meter" data-meter="{escape(m.meter)}"><h3>{escape(m.meter)}</h3>'
            f'<p><strong class="used">{m.used:,}</strong> units: '
            f'<span class="billed">{m.billed:,}</span> billed, '
            f'<span class="pending">{m.pending:,}</span> pending.</p>'
            + daily_chart(
                m.days, label=f"{m.meter} per day this month", today=d.now - d.now % 86400
            )
            + "</div>"
        )
    return "".join(parts) + "</section>"


def _credits(d: Dashboard, csrf: str) -> str:
    if d.credits is None:
        return ""
    html = (
        '<section class="card"><h2>Credits</h2>'
        f'<p>Balance: <strong id="credits">{d.credits:,}</strong> credits.</p>'
    )
    for pack in d.packs:
        html += _form(
            "/dashboard/credits",
            csrf,
            f"Buy {pack.name}: {pack.credits:,} credits ({pack.price})",
            fields=_hidden("pack", pack.name),
        )
    return html + "</section>"


def _keys(d: Dashboard, csrf: str) -> str:
    rows = []
    for k in d.keys:
        actions = ""
        if k.state == "active":
            overlap = (
                '<select name="overlap" aria-label="old key keeps working for">'
                '<option value="0">stop the old key now</option>'
                '<option value="3600">old key works 1 more hour</option>'
                '<option value="86400" selected>old key works 1 more day</option>'
                '<option value="604800">old key works 7 more days</option></select>'
            )
            actions = _form(
                "/dashboard/keys/rotate",
                csrf,
                "Rotate",
                fields=_hidden("key_id", k.key_id)
                + _hidden("nonce", f"{d.nonce}-{k.key_id}")
                + overlap,
                cls="inline",
            ) + _form(
                "/dashboard/keys/revoke",
                csrf,
                "Revoke",
                fields=_hidden("key_id", k.key_id),
                cls="inline confirm",
            )
        label = escape(k.name) + (" <em>(this session)</em>" if k.current else "")
        expiry = _when(k.expires_at) if k.expires_at else "never"
        rows.append(
            f'<tr data-key="{escape(k.key_id)}" data-state="{escape(k.state)}">'
            f"<td><code>{escape(k.key_id)}</code> {label}</td><td>{escape(k.state)}</td>"
            f"<td>{_when(k.created_at)}</td><td>{_when(k.last_used)}</td><td>{expiry}</td>"
            f"<td>{actions}</td></tr>"
        )
    return (
        '<section class="card"><h2>API keys</h2>'
        "<table><thead><tr><th>Key</th><th>State</th><th>Created</th><th>Last used</th>"
        f"<th>Expires</th><th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + _form("/dashboard/keys", csrf, "Create a new key", fields=_hidden("nonce", d.nonce))
        + "</section>"
    )


def dashboard_page(d: Dashboard, *, portal: str, csrf: str) -> str:
    body = ""
    if d.notice:
        body += f'<p class="notice" role="status">{escape(d.notice)}</p>'
    for message in d.errors:
        body += f'<p class="error" role="alert">{escape(message)}</p>'
    if d.new_key:
        body += (
            '<section class="card new-key"><h2>Your new key</h2>'
            "<p><strong>Copy it now</strong>: it is shown this once.</p>"
            f'<div class="secret"><code id="api-key">{escape(d.new_key)}</code>'
            '<button type="button" class="copy" data-copy="api-key">Copy</button></div></section>'
        )
    body += _status(d) + _limits(d) + _usage(d) + _credits(d, csrf) + _keys(d, csrf)
    if d.billing_portal:
        body += (
            '<section class="card"><h2>Billing</h2><p>Invoices, payment method and plan '
            "changes are handled by Stripe.</p>"
            + _form("/dashboard/billing", csrf, "Open the billing portal")
            + "</section>"
        )
    return layout("Dashboard", body, portal=portal, csrf=csrf)
