"""The request path's shared Redis connection: every caller gets its own reply,
and a Redis that forgets scripts, drops the connection or stops answering
costs failed calls, never a hang or a mixed-up reply."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar.store.pipelining import PipelinedConnection


def _connection(redis_url: str, **options: object) -> PipelinedConnection:
    parts = urlsplit(redis_url)
    return PipelinedConnection(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        db=int(parts.path.strip("/") or 0),
        connect_timeout=2.0,
        stale_after=2.0,
        **options,  # type: ignore[arg-type]
    )


def test_concurrent_callers_each_get_their_own_reply(aio: asyncio.Runner, redis_url: str) -> None:
    async def run() -> list[object]:
        connection = _connection(redis_url)
        try:
            replies = [connection.execute("ECHO", f"n{n}") for n in range(500)]
            return list(await asyncio.gather(*replies))
        finally:
            await connection.close()

    assert aio.run(run()) == [f"n{n}".encode() for n in range(500)]


def test_a_script_redis_forgot_is_loaded_again_and_run(aio: asyncio.Runner, redis_url: str) -> None:
    script = "return ARGV[1] .. KEYS[1]"
    sha = redis.Redis.from_url(redis_url).script_load(script)

    async def run() -> tuple[object, object]:
        connection = _connection(redis_url)
        try:
            before = await connection.evalsha(sha, script, ["k"], ["v"])
            await connection.execute("SCRIPT", "FLUSH")  # as after a restart
            return before, await connection.evalsha(sha, script, ["k"], ["w"])
        finally:
            await connection.close()

    assert aio.run(run()) == (b"vk", b"wk")


def test_a_redis_error_is_raised_to_its_caller_only(aio: asyncio.Runner, redis_url: str) -> None:
    async def run() -> list[object]:
        connection = _connection(redis_url)
        try:
            calls = ("ECHO", "a"), ("NOSUCHCOMMAND",), ("ECHO", "b")
            replies = [connection.execute(*call) for call in calls]
            return list(await asyncio.gather(*replies, return_exceptions=True))
        finally:
            await connection.close()

    first, error, last = aio.run(run())
    assert (first, last) == (b"a", b"b")
    assert isinstance(error, ResponseError) and "NOSUCHCOMMAND" in str(error).upper()


def test_a_dropped_connection_fails_calls_in_flight_at_once_and_the_next_call_reconnects(
    aio: asyncio.Runner, redis_url: str
) -> None:
    name = "tw-test-" + uuid.uuid4().hex[:8]
    admin = redis.Redis.from_url(redis_url)

    async def run() -> tuple[BaseException | None, float, object]:
        connection = _connection(redis_url, name=name)
        try:
            waiting = asyncio.ensure_future(connection.execute("BLPOP", f"tw:test:{name}", 10))
            await asyncio.sleep(0.2)  # the BLPOP is now held by the server
            started = asyncio.get_running_loop().time()
            client_id = _client_id(admin, name)
            killed = await asyncio.to_thread(admin.client_kill_filter, _id=client_id)
            assert killed == 1
            try:
                await asyncio.wait_for(waiting, 5)
                error: BaseException | None = None
            except RedisConnectionError as exc:
                error = exc
            took = asyncio.get_running_loop().time() - started
            return error, took, await connection.execute("ECHO", "again")
        finally:
            await connection.close()

    error, took, again = aio.run(run())
    assert isinstance(error, RedisConnectionError)
    assert took < 2.0  # not the BLPOP's 10 s
    assert again == b"again"


def _client_id(admin: redis.Redis, name: str) -> str:
    for client in admin.client_list():
        if client.get("name") == name:
            return str(client["id"])
    raise AssertionError(f"no Redis client named {name}")


def test_a_server_that_stops_answering_is_given_up_on_and_a_new_connection_made(
    aio: asyncio.Runner,
) -> None:
    # A peer that answers the connection's first command (CLIENT SETNAME), then
    # reads but never replies: a Redis paused, or behind a dead network path.
    async def run() -> int:
        connections = 0

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            try:
                await reader.read(65536)
                writer.write(b"+OK\r\n")
                while await reader.read(65536):
                    pass
            finally:
                writer.close()

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = PipelinedConnection(
            "127.0.0.1", port, name="t", connect_timeout=1.0, stale_after=0.3
        )
        try:
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await connection.execute("PING")
                await asyncio.sleep(0.2)
            return connections
        finally:
            await connection.close()
            server.close()
            await asyncio.sleep(0.1)  # the handlers see their connections end

    # The first call connects; each later one finds the oldest call unanswered
    # for longer than stale_after and starts over on a new connection.
    assert aio.run(run()) == 3


def test_user_password_and_database_from_the_url_are_used_and_a_wrong_password_is_not_echoed(
    aio: asyncio.Runner, redis_url: str
) -> None:
    admin = redis.Redis.from_url(redis_url)
    user, password = "tw_pipe_" + uuid.uuid4().hex[:6], uuid.uuid4().hex
    admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"]
    )
    key = "tw:test:" + uuid.uuid4().hex
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379

    async def run(secret: str) -> object:
        connection = PipelinedConnection(
            host, port, db=5, username=user, password=secret, connect_timeout=2.0, stale_after=2.0
        )
        try:
            return await connection.execute("SET", key, "in-db-5")
        finally:
            await connection.close()

    try:
        assert aio.run(run(password)) == b"OK"
        assert redis.Redis(host=host, port=port, db=5).get(key) == b"in-db-5"
        wrong = "wrong-" + uuid.uuid4().hex
        with pytest.raises(RedisConnectionError) as refused:
            aio.run(run(wrong))
        assert "AUTH" in str(refused.value) and wrong not in str(refused.value)
    finally:
        admin.acl_deluser(user)
        redis.Redis(host=host, port=port, db=5).delete(key)
