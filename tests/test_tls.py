"""TLS on the sidecar's listeners: with [sidecar] tls_cert and tls_key both the
gRPC port and HTTP ext_authz speak TLS only; with tls_client_ca they also
require a client certificate signed by it (mutual TLS)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import trustme

from sidecar.errors import ConfigError
from sidecar.gen.tollway.v1 import tollway_pb2 as pb
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.settings import settings_from_document
from tests import harness
from tests.conftest import TEST_CONFIG, Customer

pytestmark = pytest.mark.servers


@dataclass(frozen=True)
class Served:
    grpc_port: int
    http_port: int
    ca: trustme.CA
    client: trustme.LeafCert | None  # a certificate the sidecar accepts, under mTLS


def serve_tls(work: Path, redis_url: str, *, mutual: bool) -> tuple[Served, harness.Child]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(work / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
    lines = ['tls_cert = "cert.pem"', 'tls_key = "key.pem"']
    client = None
    if mutual:
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        lines.append('tls_client_ca = "ca.pem"')
        client = ca.issue_cert("backend.internal")
    config = work / "tollway.toml"
    config.write_text("[sidecar]\n" + "\n".join(lines) + "\n" + TEST_CONFIG)
    grpc_port, http_port = harness.free_port(), harness.free_port()
    child = harness.start_sidecar(
        config,
        redis_url=redis_url,
        port=grpc_port,
        http_port=http_port,
        log=work / "sidecar.log",
    )
    return Served(grpc_port, http_port, ca, client), child


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    served, child = serve_tls(tmp_path_factory.mktemp("tls"), redis_url, mutual=False)
    try:
        yield served
    finally:
        child.stop()


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Served]:
    served, child = serve_tls(tmp_path_factory.mktemp("mtls"), redis_url, mutual=True)
    try:
        yield served
    finally:
        child.stop()


def authorize(channel: grpc.Channel, key: str) -> pb.AuthorizeResponse:
    stub = tollway_pb2_grpc.TollwayStub(channel)  # type: ignore[no-untyped-call]
    response: pb.AuthorizeResponse = stub.Authorize(
        pb.AuthorizeRequest(api_key=key, method="GET", path="/v1/x"), timeout=5
    )
    return response


def secure(served: Served, *, with_client_cert: bool) -> grpc.Channel:
    chain = key = None
    if with_client_cert and served.client is not None:
        chain = served.client.cert_chain_pems[0].bytes()
        key = served.client.private_key_pem.bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=served.ca.cert_pem.bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(f"127.0.0.1:{served.grpc_port}", credentials)


def trusting(served: Served, *, with_client_cert: bool = False) -> ssl.SSLContext:
    """An HTTPS client context that trusts the test CA (and presents the client cert)."""
    context = ssl.create_default_context()
    served.ca.configure_trust(context)
    if with_client_cert:
        assert served.client is not None
        served.client.configure_cert(context)
    return context


def test_grpc_over_tls_decides_and_plaintext_is_refused(
    tls: Served, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    with secure(tls, with_client_cert=False) as channel:
        assert authorize(channel, customer.key).allowed
    with (
        grpc.insecure_channel(f"127.0.0.1:{tls.grpc_port}") as plain,
        pytest.raises(grpc.RpcError) as refused,
    ):
        authorize(plain, customer.key)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_http_ext_authz_over_tls_decides(
    tls: Served, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    with httpx.Client(verify=trusting(tls), timeout=5) as client:
        response = client.get(
            f"https://127.0.0.1:{tls.http_port}/v1/x", headers={"x-api-key": customer.key}
        )
    assert response.status_code == 200
    assert response.headers["x-tollway-customer"] == customer.id
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls.http_port}/v1/x", timeout=5)


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls: Served, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    with secure(mtls, with_client_cert=True) as channel:
        assert authorize(channel, customer.key).allowed
    with (
        secure(mtls, with_client_cert=False) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        authorize(channel, customer.key)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_on_http_ext_authz_needs_a_client_certificate(
    mtls: Served, make_customer: Callable[..., Customer]
) -> None:
    customer = make_customer("basic")
    assert mtls.client is not None
    url = f"https://127.0.0.1:{mtls.http_port}/v1/x"
    with httpx.Client(verify=trusting(mtls, with_client_cert=True), timeout=5) as client:
        assert client.get(url, headers={"x-api-key": customer.key}).status_code == 200
    with (
        httpx.Client(verify=trusting(mtls), timeout=5) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.get(url, headers={"x-api-key": customer.key})


def test_a_missing_certificate_file_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    doc = {
        "sidecar": {"tls_cert": "nope.pem", "tls_key": "nope.pem"},
        "plans": [{"name": "p", "rate": "1/s"}],
    }
    with pytest.raises(ConfigError, match=r"\[sidecar\] tls_cert: cannot read .*nope.pem"):
        settings_from_document(doc, {}, path=tmp_path / "tollway.toml")
    with pytest.raises(ConfigError, match="tls_cert and tls_key: set both"):
        settings_from_document(
            {"sidecar": {"tls_cert": "a.pem"}, "plans": doc["plans"]}, {}, path=tmp_path / "t"
        )
