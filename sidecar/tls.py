"""TLS (and mutual TLS) for the sidecar's listeners, from [sidecar] tls_cert,
tls_key and tls_client_ca: grpcio's own server credentials for the gRPC port,
uvicorn's for HTTP ext_authz. With a client CA, every client must present a
certificate it signed (Envoy's cluster then needs a transport_socket with one)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from sidecar.errors import ConfigError

__all__ = ["TlsFiles", "grpc_credentials", "uvicorn_options"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path  # PEM: the server's certificate chain
    key: Path  # PEM: its private key
    client_ca: Path | None = None  # PEM: clients must present a certificate it signed

    def check(self) -> None:
        """ConfigError naming the field of a file that cannot be read."""
        for field, path in (("tls_cert", self.cert), ("tls_key", self.key)):
            _readable(field, path)
        if self.client_ca is not None:
            _readable("tls_client_ca", self.client_ca)


def _readable(field: str, path: Path) -> None:
    try:
        path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[sidecar] {field}: cannot read {path}: {exc.strerror}") from None


def grpc_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def uvicorn_options(tls: TlsFiles) -> dict[str, Any]:
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
