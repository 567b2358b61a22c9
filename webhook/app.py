"""The companion's HTTP app (Starlette). Today: /healthz, which reports whether
the store answers, so orchestrators can restart a companion that lost Redis."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sidecar.errors import StoreUnavailable
from sidecar.store import Store

__all__ = ["create_app"]


def create_app(store: Store) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        try:
            await store.ping()
        except StoreUnavailable:
            return JSONResponse({"status": "unavailable", "redis": "down"}, status_code=503)
        return JSONResponse({"status": "ok", "redis": "up"})

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])
