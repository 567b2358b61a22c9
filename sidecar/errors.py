"""The errors Tollway reports to people: each carries one clear line."""

from __future__ import annotations


class TollwayError(Exception):
    """An error whose message is fit to show a user as-is."""


class ConfigError(TollwayError):
    """The configuration file or environment is wrong; the message names the field."""


class StoreUnavailable(TollwayError):
    """Redis could not answer in time. Never a decision: the caller fails the request.

    cause, for metrics: "timeout" (no answer in time), "connection" (refused,
    reset, closed) or "error" (an answer that was not the one needed)."""

    def __init__(self, message: str, *, cause: str = "error") -> None:
        super().__init__(message)
        self.cause = cause


class NotFound(TollwayError):
    """A named account or key does not exist."""


class AlreadyExists(TollwayError):
    """What was to be created exists already (an account id in use)."""


class Busy(StoreUnavailable):
    """Another process holds the account's lock for longer than we wait."""
