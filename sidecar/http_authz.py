"""Envoy's ext_authz in HTTP service mode (`http_service`): a raw ASGI app on
uvicorn (httptools), served beside the gRPC port in the same event loop.

Why it exists: through one Envoy on 2 cores, a no-op raw ASGI app on uvicorn
answered ~3x the req/s of a no-op grpc.aio Check. With real decisions (ext_authz
only, h2load), the HTTP mode served ~1.9x the req/s of gRPC Check (deploy/envoy-grpc.yaml),
the sidecar spending ~430 us of CPU per request against ~1,060 us for Check.

Envoy sends the client's method and path (path_prefix must stay empty: the path
is priced exactly as Envoy hands it, like Check's) and only its allowed_headers.
Each request is one decision through metrics.counted_decision, as Check's is.
The answer:

  allowed   200, no body: the identity headers (Envoy's allowed_upstream_headers
            copy them upstream, overwriting client values), x-envoy-auth-headers-
            to-remove naming the header that carried the key, the rate-limit
            headers (allowed_client_headers_on_success), x-request-id when
            Tollway made one, and what ext_proc settles with: customer, plan,
            request_id, lease_id and bill_only_success (only when true) under
            those very names, for dynamic_metadata_from_headers, plus the
            reserved cost as x-tollway-estimate, which deploy/envoy.yaml's
            header_to_metadata filter turns into the number `cost` (metadata
            made from headers is always a string).
  denied    envoy.denial(): the status, headers and JSON body Check's
            DeniedHttpResponse carries.
  outage    StoreUnavailable is a 503: Envoy takes any 5xx answer for an error,
            so failure_mode_allow / status_on_error decide, as with UNAVAILABLE.
  a bug     any other exception propagates; uvicorn logs it and answers 500
            (an error to Envoy, never an allow), as grpc answers INTERNAL.
  too big   a request head (request line and headers) over 1 MiB, Check's gRPC
            message limit, is a 431 and the connection closes; httptools alone
            buffers any header however long. A malformed request is uvicorn's 400.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.decision import Decision
from sidecar.envoy import (
    client_headers,
    denial,
    extract_key,
    settlement_fields,
)
from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.logs import bind_request_id
from sidecar.metrics import counted_decision
from sidecar.settings import HeaderNames, Settings
from sidecar.tls import TlsFiles, uvicorn_options

if TYPE_CHECKING:
    from sidecar.authorizer import Authorizer

__all__ = [
    "ESTIMATE_HEADER",
    "MAX_HEAD_BYTES",
    "HeadLimitedHttpTools",
    "HttpAuthz",
    "View",
    "answer",
    "http_server",
    "listen_socket",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_HEAD_BYTES: Final = 1 << 20  # as Check's gRPC max message
ESTIMATE_HEADER: Final = "x-tollway-estimate"
_REMOVE: Final = b"x-envoy-auth-headers-to-remove"
_NO_BODY: Final = (b"content-length", b"0")
_UNAVAILABLE_BODY: Final = b"store unavailable\n"
_UNAVAILABLE: Final = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_UNAVAILABLE_BODY)).encode()),
]
_TOO_LARGE_BODY: Final = b"request head over 1 MiB\n"
_HEAD_TOO_LARGE: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
)
_BACKLOG: Final = 2048


@dataclass(frozen=True, slots=True)
class View:
    """What a request needs from the settings, encoded once per Settings object."""

    names: HeaderNames
    ext_proc: bool  # reserve under the request id, for ext_proc to settle
    read: dict[bytes, str]  # the request headers read (key headers, x-request-id)
    customer: bytes
    plan: bytes
    remove: dict[str, tuple[bytes, bytes]]  # key header -> x-envoy-auth-headers-to-remove

    @classmethod
    def of(cls, settings: Settings) -> View:
        names = settings.headers
        carriers = [*names.api_key, *(["authorization"] if names.bearer else [])]
        return cls(
            names=names,
            ext_proc=settings.envoy.ext_proc,
            read={name.encode(): name for name in [*carriers, "x-request-id"]},
            customer=names.customer.encode(),
            plan=names.plan.encode(),
            remove={name: (_REMOVE, name.encode()) for name in carriers},
        )


def _encoded(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def _settlement(decision: Decision) -> list[tuple[bytes, bytes]]:
    fields = settlement_fields(decision)
    if fields is None:
        return []
    headers = []
    for name, value in fields.items():
        if name == "cost":
            headers.append((ESTIMATE_HEADER.encode(), str(value).encode()))
        elif value is True:
            headers.append((name.encode(), b"true"))
        elif isinstance(value, str) and value:
            headers.append((name.encode(), value.encode()))
        # False and "" stay absent: ext_proc reads a missing field as either.
    return headers


def answer(
    decision: Decision, *, key_header: str | None, view: View, made_request_id: str = ""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A decision as the HTTP answer Envoy reads: (status, headers, body). Pure."""
    if not decision.allowed:
        status, pairs, text = denial(decision)
        body = text.encode()
        return status, [*_encoded(pairs), (b"content-length", str(len(body)).encode())], body
    headers = [(view.customer, decision.customer_id.encode()), (view.plan, decision.plan.encode())]
    if key_header:
        headers.append(view.remove.get(key_header) or (_REMOVE, key_header.encode()))
    if made_request_id:
        headers.append((b"x-request-id", made_request_id.encode()))
    headers += _encoded(client_headers(decision))
    headers += _settlement(decision)
    headers.append(_NO_BODY)
    return 200, headers, b""


class HttpAuthz:
    """The ASGI app: one request, one decision, one answer."""

    def __init__(self, authorizer: Authorizer, settings: Callable[[], Settings]) -> None:
        self._authorizer = authorizer
        self._settings = settings
        self._seen: Settings | None = None
        self._view: View | None = None

    def view(self) -> View:
        settings = self._settings()
        if settings is not self._seen or self._view is None:  # a SIGHUP swaps the object
            self._view, self._seen = View.of(settings), settings
        return self._view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await _not_http(scope, receive, send)
            return
        view = self.view()
        read = view.read
        found: dict[str, str] = {}
        for name, value in scope["headers"]:
            header = read.get(name)
            if header is not None:  # repeated: joined, as Envoy joins them for Check
                text = value.decode("latin-1")
                found[header] = f"{found[header]},{text}" if header in found else text
        key, key_header = extract_key(found, view.names)
        # As in Check: Envoy's x-request-id names the lease (and reservation),
        # else one is made here and sent upstream.
        lease_id = found.get("x-request-id", "")
        made = "" if lease_id else uuid.uuid4().hex
        lease_id = lease_id or made
        bind_request_id(lease_id)
        path = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            path += b"?" + scope["query_string"]
        try:
            decision = await counted_decision(
                self._authorizer,
                key,
                method=scope["method"],
                path=path.decode("latin-1"),
                request_id=lease_id if view.ext_proc else "",
                lease_id=lease_id,
                reservation_optional=True,  # for the upstream's cost header only
            )
        except StoreUnavailable:
            await _respond(send, 503, _UNAVAILABLE, _UNAVAILABLE_BODY)
            return
        status, headers, body = answer(
            decision, key_header=key_header, view=view, made_request_id=made
        )
        await _respond(send, status, headers, body)


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _not_http(scope: Scope, receive: Receive, send: Send) -> None:
    """Lifespan is answered (nothing to start); a WebSocket is refused (403)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
    else:
        raise ValueError(f"unsupported ASGI scope type {scope['type']!r}")


class HeadLimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bound on each request head: httptools
    itself buffers a header however long it grows (tried: one 128 MiB header was
    buffered, then answered), so the bytes fed to the parser before the end of
    the headers are counted here, and the byte past the limit is never fed."""

    max_head = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests or inside one's head
        self._head = 0  # bytes of the current head fed so far

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head = True, 0

    def data_received(self, data: bytes) -> None:
        if not self._in_head or len(data) <= self.max_head - self._head:
            if self._in_head:
                self._head += len(data)
            super().data_received(data)
            return
        room = self.max_head - self._head
        self._head = self.max_head
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._in_head and self._head >= self.max_head:  # the head did not end in time
            self.logger.warning("Request head over %d bytes: 431.", self.max_head)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()
            return
        self.data_received(data[room:])  # the head ended: body, or the next request


class _Server(uvicorn.Server):
    """serve() in server.py owns SIGTERM and SIGINT; uvicorn's handlers would
    replace its handlers for as long as this server runs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_server(
    app: HttpAuthz, *, drain_seconds: int, tls: TlsFiles | None = None
) -> uvicorn.Server:
    """uvicorn for the app; stop it with `server.should_exit = True`, which drains
    in-flight requests for up to drain_seconds. With tls, HTTPS (and mutual TLS
    with a client CA)."""
    config = uvicorn.Config(
        app,
        http=HeadLimitedHttpTools,
        ws="none",
        lifespan="off",
        interface="asgi3",
        access_log=False,
        log_config=None,  # our handler (JSON, request ids)
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        # Longer than Envoy's idle_timeout for this cluster (deploy/envoy.yaml):
        # Envoy closes an idle connection first, never sends on one closing here.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=drain_seconds,
        **(uvicorn_options(tls) if tls else {}),
    )
    return _Server(config)


def listen_socket(address: str, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on host:port; reuse_port for `serve --workers N`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server(
            (host, int(port)), family=family, backlog=_BACKLOG, reuse_port=reuse_port
        )
    except OSError as exc:
        raise ConfigError(f"[sidecar] http_listen: cannot bind {address}: {exc}") from None
