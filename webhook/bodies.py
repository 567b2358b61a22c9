"""What every companion endpoint shares about requests and errors: a body read
no further than its limit, and the JSON error every refusal is."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = ["error", "read_limited"]


def error(status: int, code: str, message: str) -> JSONResponse:
    """A refusal: {"code", "message"} with its status."""
    return JSONResponse({"code": code, "message": message}, status_code=status)


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds limit (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
