"""The demo upstream: a tiny HTTP API that answers with what reached it.
`tollway dev` puts it behind Envoy; the tests use it too."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["EchoUpstream"]


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with what reached it: method, path and headers.

    Query parameters make it act like a real API for the demo and the tests:
    ?sleep=0.5 answers late, ?status=503 answers that status, ?cost=7 reports
    the request's real cost in x-tollway-cost (which Tollway removes)."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        sleep = min(10.0, float(query.get("sleep", ["0"])[0] or 0))
        status = int(query.get("status", ["200"])[0] or 200)
        if sleep > 0:
            time.sleep(sleep)
        body = json.dumps(
            {
                "message": "Hello from the demo upstream: Tollway let this request through.",
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            },
            indent=2,
        ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if "cost" in query:
            self.send_header("x-tollway-cost", query["cost"][0])
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines would carry nothing Envoy's logs do not


class EchoUpstream:
    """A tiny upstream API for the demo and the tests, on a thread."""

    def __init__(self, port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _EchoHandler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
