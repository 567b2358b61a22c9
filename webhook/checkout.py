"""What a checkout that cannot start answers (webhook/app.py starts them; the
portal's pages start them too)."""

from __future__ import annotations

__all__ = ["CheckoutRefused"]


class CheckoutRefused(Exception):
    """A checkout that cannot start: the HTTP status, code and message to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
