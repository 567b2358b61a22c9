"""What every part of the store shares: the client, the deadline, the clock and
the scripts.

Scripts are the .lua files beside the module that drives them, each headed by
its KEYS / ARGV / return contract. A line ``-- #include shared/<name>.lua``
inlines a chunk written once for several scripts (the usage stream's fields);
the loader does that, so every script still runs as one EVALSHA, atomically.

Time: the decision script reads Redis TIME, so every sidecar shares one clock.
Tests may pass a clock in (microseconds); nothing else does.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from sidecar.store.connection import Client, pipelined_to, translate_errors
from sidecar.store.pipelining import PipelinedConnection

__all__ = ["StoreBase", "lua_source"]

_INCLUDE = re.compile(r"^-- #include (shared/[a-z_]+\.lua)$", re.MULTILINE)


@functools.cache
def lua_source(name: str) -> str:
    """The script's source as Redis runs it, shared chunks inlined."""

    def read(path: str) -> str:
        return resources.files("sidecar.store").joinpath(path).read_text()

    return _INCLUDE.sub(lambda match: read(match[1]).rstrip("\n"), read(name))


class StoreBase:
    """Tollway's state in Redis. One instance per process, shared by all requests."""

    def __init__(
        self,
        client: Client,
        *,
        timeout: float = 0.05,
        clock_us: Callable[[], int] | None = None,
        pipelined: bool = True,
    ) -> None:
        self._redis = client
        # Twice the socket timeout leaves room for one connect plus one call.
        self._deadline = timeout * 2
        self._clock_us = clock_us
        # The request path's commands share one pipelined connection where the
        # deployment allows it (store/pipelining.py says why).
        self._fast: PipelinedConnection | None = (
            pipelined_to(client, timeout) if pipelined else None
        )
        self._scripts: dict[str, AsyncScript] = {}

    @property
    def redis(self) -> Client:
        return self._redis

    def _guard(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        return translate_errors(self._redis, what, deadline=self._deadline)

    def _script(self, name: str) -> AsyncScript:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._redis.register_script(lua_source(name))
        return script

    async def _run(self, name: str, keys: list[str], args: list[Any], *, fast: bool = False) -> Any:
        """Runs a script; fast: on the pipelined connection, when there is one
        (the request path only: other callers need redis-py's own connections)."""
        script = self._script(name)
        if fast and self._fast is not None:
            return await self._fast.evalsha(script.sha, lua_source(name), keys, args)
        return await script(keys=keys, args=args)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._redis.ping()

    async def now_us(self) -> int:
        """The store's clock: the injected one, else Redis TIME."""
        if self._clock_us is not None:
            return self._clock_us()
        async with self._guard("time"):
            seconds, micros = await self._redis.time()
        return int(seconds) * 1_000_000 + int(micros)

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._redis.aclose()
