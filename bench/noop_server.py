"""The floors: the sidecar's two servers, set up exactly as it sets them up, doing no work.

gRPC: the same grpcio setup as sidecar/server.py (grpc.aio, the same server
options, generated servicers, so every request is parsed and every response
serialized), answering tollway.v1.Tollway/Authorize and
envoy.service.auth.v3.Authorization/Check with a constant allow shaped like
the sidecar's own (identity and rate-limit headers, bucket and quota state),
Envoy's ext_proc stream (envoy.service.ext_proc.v3.ExternalProcessor) with a
constant "continue", and Envoy's access-log stream
(envoy.service.accesslog.v3.AccessLogService) by reading every entry and
counting it.

HTTP (--http-listen): Envoy's ext_authz in HTTP service mode, as the sidecar
serves it (sidecar/http_authz.py): a raw ASGI app on the sidecar's own uvicorn
setup (http_server: httptools, the same options) in the same event loop as the
gRPC server, answering every request 200 with an empty body and the headers of
the sidecar's allow.

The constant allows are the sidecar's own encoders (sidecar.envoy.check_response,
sidecar.http_authz.answer) applied once, at start, to one allowed decision.
--settles: answer as a sidecar whose `[envoy] settlement` is not "none" does,
with what a settlement needs (Check's dynamic metadata; the HTTP answer's
customer, plan, request_id and x-tollway-estimate headers). Envoy's
access logger only logs requests carrying that metadata, so the floor of an
access-log row must answer with it, or Envoy would send it nothing.

Whatever the sidecar costs above this server is Tollway's own work.

    python -m bench.noop_server --listen 127.0.0.1:50052 [--http-listen 127.0.0.1:50053] [--settles]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.accesslog.v3 import als_pb2 as als
from envoy.service.accesslog.v3 import als_pb2_grpc as als_grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from sidecar.decision import Decision, QuotaState, RateState, Reason
from sidecar.envoy import check_response
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc
from sidecar.http_authz import View, answer, http_server, listen_socket
from sidecar.settings import load_settings

__all__ = [
    "ACCESS_LOG_LINE",
    "ALLOWED",
    "ALLOW_AUTHORIZE",
    "CONTINUE_RESPONSE",
    "SERVER_OPTIONS",
    "SETTLING",
    "Answers",
    "NoopHttp",
    "answers",
    "serve",
]

BENCH_CONFIG: Final = Path(__file__).with_name("tollway-bench.toml")  # its [headers]
KEY_HEADER: Final = "x-api-key"  # the header the bench's Envoy configs carry the key in
# What the server prints, at the end of each access-log stream (bench/run.py reads it).
ACCESS_LOG_LINE: Final = "access log stream ended: {entries} entries"

# Keep in step with grpc.aio.server(options=...) in sidecar/server.py
# (tests/test_bench.py checks the option names match).
MAX_MESSAGE_BYTES: Final = 1 << 20
SERVER_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]

ALLOW_AUTHORIZE: Final = pb.AuthorizeResponse(
    allowed=True,
    reason=pb.REASON_OK,
    customer_id="cus_00000000000000",
    plan="bench",
    rate_limit=pb.RateLimitState(
        limit=10000, remaining=9999, reset_seconds=1, rate_per_second=5000.0
    ),
    quota=pb.QuotaState(
        limit=1_000_000_000, used=1, remaining=999_999_999, period_end=1_798_761_600
    ),
)


# One allowed decision on plan "bench", as admit.lua would have it decided...
ALLOWED: Final = Decision(
    allowed=True,
    reason=Reason.OK,
    message="",
    customer_id="cus_00000000000000",
    plan="bench",
    rate=RateState(
        limit=40_000, remaining=39_999, reset_seconds=1, rate_per_second=20_000.0, window_seconds=2
    ),
    quota=QuotaState(
        limit=1_000_000_000,
        used=1,
        remaining=999_999_999,
        period_end=1_798_761_600,
        reset_seconds=86_400,
        window_seconds=2_678_400,
    ),
)
# ...and the same one reserved for a settlement, under Envoy's x-request-id (no
# lease: plan "bench" has no concurrency limit).
SETTLING: Final = dataclasses.replace(
    ALLOWED, reserved="5f0c6a4e-0b7a-4c1e-9a53-6f1d2e3c4b5a", cost=1
)


# The response phase as the sidecar answers it: drop the cost header, say what was charged.
CONTINUE_RESPONSE: Final = ext_proc.ProcessingResponse(
    response_headers=ext_proc.HeadersResponse(
        response=ext_proc.CommonResponse(
            header_mutation=ext_proc.HeaderMutation(
                remove_headers=["x-tollway-cost"],
                set_headers=[
                    HeaderValueOption(
                        header=HeaderValue(key="x-tollway-charged", raw_value=b"1"),
                        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        )
    )
)
_PASS: Final = {
    "request_headers": ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse()),
    "request_body": ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse()),
    "request_trailers": ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse()),
    "response_headers": CONTINUE_RESPONSE,
    "response_body": ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse()),
    "response_trailers": ext_proc.ProcessingResponse(response_trailers=ext_proc.TrailersResponse()),
}


@dataclasses.dataclass(frozen=True)
class Answers:
    """What the no-op answers Check and HTTP ext_authz with."""

    check: ext_authz.CheckResponse
    http_status: int
    http_headers: list[tuple[bytes, bytes]]
    http_body: bytes


def answers(*, settles: bool) -> Answers:
    """The sidecar's own answers to one allowed decision (reserved when settles)."""
    settings = load_settings(BENCH_CONFIG, {})
    decision = SETTLING if settles else ALLOWED
    status, headers, body = answer(decision, key_header=KEY_HEADER, view=View.of(settings))
    check = check_response(decision, key_header=KEY_HEADER, names=settings.headers)
    return Answers(check, status, headers, body)


class NoopTollway(pb_grpc.TollwayServicer):
    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeResponse:
        return ALLOW_AUTHORIZE


class NoopCheck(ext_authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, response: ext_authz.CheckResponse) -> None:
        self._response = response

    async def Check(
        self, request: ext_authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> ext_authz.CheckResponse:
        return self._response


class NoopExtProc(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self,
        requests: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        async for request in requests:
            yield _PASS[request.WhichOneof("request")]


class NoopAccessLog(als_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Reads every entry Envoy streams, settles nothing; says how many at the stream's end."""

    async def StreamAccessLogs(
        self,
        requests: AsyncIterator[als.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als.StreamAccessLogsResponse:
        entries = 0
        try:
            async for message in requests:
                entries += len(message.http_logs.log_entry)
        finally:  # Envoy stopping cancels the stream rather than ending it
            print(ACCESS_LOG_LINE.format(entries=entries), flush=True)
        return als.StreamAccessLogsResponse()


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class NoopHttp:
    """The raw ASGI app: every HTTP request answered with the same allow."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self._start = {"type": "http.response.start", "status": status, "headers": headers}
        self._body = {"type": "http.response.body", "body": body}

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":  # lifespan is off; nothing else is served
            raise ValueError(f"unsupported ASGI scope type {scope['type']!r}")
        await send(self._start)
        await send(self._body)


async def serve(listen: str, *, http_listen: str | None = None, settles: bool = False) -> None:
    """Serves until SIGTERM or SIGINT."""
    answered = answers(settles=settles)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_TollwayServicer_to_server(NoopTollway(), server)  # type: ignore[no-untyped-call]
    ext_authz_grpc.add_AuthorizationServicer_to_server(NoopCheck(answered.check), server)
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopExtProc(), server)
    als_grpc.add_AccessLogServiceServicer_to_server(NoopAccessLog(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"noop_server: cannot bind {listen}")
    http = http_task = None
    if http_listen:
        # As sidecar/server.py runs it: the sidecar's uvicorn setup, a socket of
        # its own, served in this loop beside grpc.aio.
        sock = listen_socket(http_listen, reuse_port=False)
        app = NoopHttp(answered.http_status, answered.http_headers, answered.http_body)
        http = http_server(app, drain_seconds=1)  # type: ignore[arg-type]  # any ASGI app
    await server.start()
    if http is not None:
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if http_task is not None:
        http_task.add_done_callback(lambda _: stop.set())  # ended on its own: it failed
    print(
        f"noop server listening on {listen}"
        + (f", HTTP ext_authz on {http_listen}" if http_listen else "")
        + (" (answers with settlement fields)" if settles else ""),
        flush=True,
    )
    await stop.wait()
    if http is not None:
        http.should_exit = True
    await asyncio.gather(server.stop(grace=1), *([http_task] if http_task else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50052", help="gRPC host:port")
    parser.add_argument("--http-listen", help="HTTP ext_authz host:port (off when not given)")
    parser.add_argument(
        "--settles", action="store_true", help="answer with what a settlement needs"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.listen, http_listen=args.http_listen, settles=args.settles))


if __name__ == "__main__":
    main()
