"""The developer portal: pages for the merchant's own customers, served by the
companion (pricing, sign-in, a dashboard of usage, keys and billing).

    routes.py    the handlers, on the admin operations
    views.py     the pages as HTML, from plain data (no I/O)
    chart.py     the dashboard's inline SVG
    prices.py    plan prices from Stripe, cached
    security.py  signed cookies, CSRF checks, the headers every page carries
    static/      the one stylesheet and the one script
"""

from webhook.portal.routes import Portal

__all__ = ["Portal"]
