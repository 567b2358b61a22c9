"""The few HTML pages the companion shows people, escaped, with no assets."""

from __future__ import annotations

from html import escape

from starlette.responses import HTMLResponse

__all__ = ["page"]

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}}
code{{background:#f3f3f3;padding:.4rem;display:block;word-break:break-all}}</style>
</head><body><h1>{title}</h1>{body}</body></html>"""


def page(
    title: str, paragraphs: list[str], *, code: str | None = None, status: int = 200
) -> HTMLResponse:
    body = "".join(f"<p>{escape(p)}</p>" for p in paragraphs)
    if code is not None:
        body += f"<code>{escape(code)}</code>"
    # A page that may hold a key is never cached, by the browser or a proxy.
    headers = {"cache-control": "no-store", "referrer-policy": "no-referrer"}
    return HTMLResponse(_TEMPLATE.format(title=escape(title), body=body), status, headers)
