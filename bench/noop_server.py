"""The floor: a gRPC server set up exactly like the sidecar that does no work.

Same grpcio setup as sidecar/server.py (grpc.aio, the same server options,
generated servicers, so every request is parsed and every response
serialized), answering tollway.v1.Tollway/Authorize and
envoy.service.auth.v3.Authorization/Check with a constant allow shaped like
the sidecar's own (identity and rate-limit headers, bucket and quota state),
and Envoy's ext_proc stream (envoy.service.ext_proc.v3.ExternalProcessor,
when deploy/envoy.yaml runs that filter) with a constant "continue".
Whatever the sidecar costs above this server is Tollway's own work.

    python -m bench.noop_server --listen 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Final

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.rpc import code_pb2, status_pb2

from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc as pb_grpc

__all__ = ["ALLOW_AUTHORIZE", "ALLOW_CHECK", "CONTINUE_RESPONSE", "SERVER_OPTIONS", "serve"]

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


def _headers(pairs: list[tuple[str, str]]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(
            header=HeaderValue(key=key, value=value),
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for key, value in pairs
    ]


ALLOW_CHECK: Final = ext_authz.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=ext_authz.OkHttpResponse(
        headers=_headers(
            [("x-tollway-customer", "cus_00000000000000"), ("x-tollway-plan", "bench")]
        ),
        headers_to_remove=["x-api-key"],
        response_headers_to_add=_headers(
            [
                ("ratelimit-policy", '"rate";q=10000;w=2'),
                ("ratelimit", '"rate";r=9999;t=1'),
                ("x-ratelimit-limit", "10000"),
                ("x-ratelimit-remaining", "9999"),
                ("x-ratelimit-reset", "1"),
            ]
        ),
    ),
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


class NoopTollway(pb_grpc.TollwayServicer):
    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeResponse:
        return ALLOW_AUTHORIZE


class NoopCheck(ext_authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: ext_authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> ext_authz.CheckResponse:
        return ALLOW_CHECK


class NoopExtProc(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self,
        requests: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        async for request in requests:
            yield _PASS[request.WhichOneof("request")]


async def serve(listen: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_TollwayServicer_to_server(NoopTollway(), server)  # type: ignore[no-untyped-call]
    ext_authz_grpc.add_AuthorizationServicer_to_server(NoopCheck(), server)
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopExtProc(), server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"noop_server: cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"noop server listening on {listen}", flush=True)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50052")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
