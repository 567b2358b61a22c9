"""The admin API over gRPC (tollway.admin.v1.AdminService) on a real sidecar:
scopes, authentication and its per-host rate limit (which never refuses a
valid token), idempotent creates, keys that work through Authorize until
revoked or rotated out (a rotated key keeps its policy and expiry), paging,
usage and credits, and no admin token in any log.

Tests that fail authentication on purpose reach the session's sidecar through
a forwarder from a loopback address of their own (FromHost): to the sidecar, a
host of its own, so their failures spend no other test's budget."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar import keys
from sidecar.admin.grpc_api import peer_host, presented_token
from sidecar.admin.scopes import SCOPES
from sidecar.gen.tollway.admin.v1 import admin_pb2 as pb
from sidecar.gen.tollway.admin.v1 import admin_pb2_grpc
from sidecar.gen.tollway.v1 import tollway_pb2 as tw
from sidecar.gen.tollway.v1 import tollway_pb2_grpc
from sidecar.store import Store
from tests.conftest import Customer, eventually, with_store

pytestmark = pytest.mark.servers

SERVICE = "tollway.admin.v1.AdminService"
TOKEN_RE = re.compile(r"twadm_[0-9A-Za-z]{49}")
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The call's gRPC status (OK when it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def issue_token(redis_url: str, *scopes: str, name: str = "test") -> tuple[str, str]:
    """A new admin token with these scopes, issued through the store: (token, token id)."""

    async def work(store: Store) -> tuple[str, str]:
        token, record = await store.issue_admin_token(name, frozenset(scopes))
        return token, record.token_id

    result: tuple[str, str] = with_store(redis_url, work)
    return result


@pytest.fixture(scope="module")
def token_for(redis_url: str) -> Callable[..., str]:
    """A token with exactly these scopes (one per scope set, issued on first use)."""
    issued: dict[frozenset[str], str] = {}

    def get(*scopes: str) -> str:
        wanted = frozenset(scopes)
        if wanted not in issued:
            issued[wanted] = issue_token(redis_url, *scopes, name="admin-grpc-test")[0]
        return issued[wanted]

    return get


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class FromHost:
    """A TCP forwarder on 127.0.0.1 whose connections reach `target` from
    another loopback address, `host` (Linux answers all of 127/8): what the
    sidecar sees as a host of its own."""

    def __init__(self, target: str, host: str) -> None:
        name, _, port = target.rpartition(":")
        self._target = (name, int(port))
        self._host = host
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._closing = threading.Event()
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(self._target, source_address=(self._host, 0))
            self._sockets += [client, upstream]
            for ends in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=_pump, args=ends, daemon=True)
                pump.start()
                self._pumps.append(pump)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(ch).result(timeout=10)
        return ch

    def close(self) -> None:
        self._closing.set()
        self._acceptor.join()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for pump in self._pumps:
            pump.join(timeout=5)
        for sock in self._sockets:
            sock.close()


# Loopback addresses no other test uses: 127.10.0.1, 127.10.0.2, ...
_HOSTS = (f"127.10.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture
def own_host(sidecar: str) -> Iterator[FromHost]:
    """The session's sidecar, reached from a host of this test's own."""
    forwarder = FromHost(sidecar, next(_HOSTS))
    try:
        yield forwarder
    finally:
        forwarder.close()


@pytest.fixture
def auth_admin(own_host: FromHost) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    """The admin service, from a host of this test's own: for tests whose
    failed authentications must not count against anyone else's host."""
    with own_host.channel() as ch:
        yield admin_pb2_grpc.AdminServiceStub(ch)


@pytest.fixture(scope="module")
def revoked_token(redis_url: str) -> str:
    """A token with every scope, revoked before it was ever used."""
    token, token_id = issue_token(redis_url, "admin", name="admin-grpc-revoked")

    async def revoke(store: Store) -> None:
        await store.revoke_admin_token(token_id)

    with_store(redis_url, revoke)
    return token


def own_id(prefix: str = "adm") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:14]}"


# -- every operation, with and without its scope ---------------------------------------


@dataclass(frozen=True)
class Op:
    """An RPC, the scope it needs, a request for a fresh customer, and what a
    success must show (given the response and the customer)."""

    rpc: str
    scope: str
    request: Callable[[Customer], Any]
    check: Callable[[Any, Customer], None]
    writes: bool


def _check_created(r: Any, c: Customer) -> None:
    assert r.account.customer_id == c.id + "_new" and r.account.plan == "basic"
    assert r.account.status == "active" and r.account.created_at > 0


def _check_listed(r: Any, c: Customer) -> None:
    assert len(r.accounts) == 1 and r.next_page_token == r.accounts[0].customer_id


def _check_status(r: Any, c: Customer) -> None:
    assert r.account.status == "past_due"
    assert abs(r.account.grace_until - (time.time() + 60)) < 5


def _check_issued(r: Any, c: Customer) -> None:
    assert r.api_key.startswith("tw_test_") and not r.replayed
    assert r.key.customer_id == c.id and r.key.environment == "test" and r.key.state == "active"


def _check_rotated(r: Any, c: Customer) -> None:
    assert r.api_key.startswith("tw_") and r.key.key_id != c.key_id
    assert r.replaces == c.key_id and abs(r.old_key_expires_at - (time.time() + 60)) < 5


def _check_usage(r: Any, c: Customer) -> None:
    assert r.customer_id == c.id and r.plan == "prepaid" and r.quota_limit == 100000
    assert r.HasField("credits") and r.credits == 0


def _check_granted(r: Any, c: Customer) -> None:
    assert r.balance == 5 and r.result == "granted" and r.grant_id.startswith("admin_")


OPS = [
    Op(
        "CreateAccount",
        "accounts:write",
        lambda c: pb.CreateAccountRequest(customer_id=c.id + "_new", plan="basic"),
        _check_created,
        True,
    ),
    Op(
        "GetAccount",
        "accounts:read",
        lambda c: pb.GetAccountRequest(customer_id=c.id),
        lambda r, c: (r.account.customer_id, r.account.plan) == (c.id, "prepaid") or _fail(r),
        False,
    ),
    Op(
        "ListAccounts",
        "accounts:read",
        lambda c: pb.ListAccountsRequest(page_size=1),
        _check_listed,
        False,
    ),
    Op(
        "SetAccountPlan",
        "accounts:write",
        lambda c: pb.SetAccountPlanRequest(customer_id=c.id, plan="pro"),
        lambda r, c: r.account.plan == "pro" or _fail(r),
        True,
    ),
    Op(
        "SetAccountStatus",
        "accounts:write",
        lambda c: pb.SetAccountStatusRequest(customer_id=c.id, status="past_due", grace_seconds=60),
        _check_status,
        True,
    ),
    Op(
        "IssueKey",
        "keys:write",
        lambda c: pb.IssueKeyRequest(customer_id=c.id, environment="test"),
        _check_issued,
        True,
    ),
    Op(
        "GetKey",
        "keys:read",
        lambda c: pb.GetKeyRequest(customer_id=c.id, key_id=c.key_id),
        lambda r, c: (r.key.key_id, r.key.state) == (c.key_id, "active") or _fail(r),
        False,
    ),
    Op(
        "ListKeys",
        "keys:read",
        lambda c: pb.ListKeysRequest(customer_id=c.id),
        lambda r, c: [k.key_id for k in r.keys] == [c.key_id] or _fail(r),
        False,
    ),
    Op(
        "RevokeKey",
        "keys:write",
        lambda c: pb.RevokeKeyRequest(customer_id=c.id, key_id=c.key_id),
        lambda r, c: (r.key.state, r.key.revoked_reason) == ("revoked", "admin") or _fail(r),
        True,
    ),
    Op(
        "UpdateKey",
        "keys:write",
        lambda c: pb.UpdateKeyRequest(
            customer_id=c.id,
            key_id=c.key_id,
            policy=pb.KeyPolicy(name="ci", has_scope_features=True, scope_features=["search"]),
        ),
        lambda r, c: (
            (r.key.policy.name, list(r.key.policy.scope_features)) == ("ci", ["search"]) or _fail(r)
        ),
        True,
    ),
    Op(
        "RotateKey",
        "keys:write",
        lambda c: pb.RotateKeyRequest(customer_id=c.id, key_id=c.key_id, overlap_seconds=60),
        _check_rotated,
        True,
    ),
    Op(
        "GetUsage",
        "usage:read",
        lambda c: pb.GetUsageRequest(customer_id=c.id),
        _check_usage,
        False,
    ),
    Op(
        "GetCredits",
        "credits:read",
        lambda c: pb.GetCreditsRequest(customer_id=c.id),
        lambda r, c: (r.customer_id, r.balance) == (c.id, 0) or _fail(r),
        False,
    ),
    Op(
        "GrantCredits",
        "credits:write",
        lambda c: pb.GrantCreditsRequest(customer_id=c.id, credits=5, reason="test"),
        _check_granted,
        True,
    ),
]


def _fail(response: Any) -> None:
    raise AssertionError(f"unexpected response: {response}")


def test_every_rpc_of_the_service_is_covered() -> None:
    rpcs = pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name
    assert set(rpcs) == {op.rpc for op in OPS}


def snapshot(redis_url: str, customer: Customer) -> tuple[Any, ...]:
    """What a write could change about the customer (and the account a create would make)."""

    async def work(store: Store) -> tuple[Any, ...]:
        return (
            await store.get_account(customer.id),
            await store.list_keys(customer.id),
            (await store.credit_balance(customer.id)).balance,
            await store.get_account(customer.id + "_new"),
        )

    result: tuple[Any, ...] = with_store(redis_url, work)
    return result


@pytest.mark.parametrize("op", OPS, ids=[op.rpc for op in OPS])
def test_every_operation_works_with_a_token_that_has_its_scope(
    op: Op,
    admin: admin_pb2_grpc.AdminServiceStub,
    token_for: Callable[..., str],
    make_customer: Callable[..., Customer],
    redis_url: str,
) -> None:
    customer = make_customer("prepaid")
    before = snapshot(redis_url, customer)
    method = getattr(admin, op.rpc)
    response = method(op.request(customer), metadata=bearer(token_for(op.scope)), timeout=5)
    op.check(response, customer)
    assert (snapshot(redis_url, customer) != before) == op.writes


@pytest.mark.parametrize("op", OPS, ids=[op.rpc for op in OPS])
def test_a_token_without_the_scope_is_denied_and_changes_nothing(
    op: Op,
    admin: admin_pb2_grpc.AdminServiceStub,
    token_for: Callable[..., str],
    make_customer: Callable[..., Customer],
    redis_url: str,
) -> None:
    resource = op.scope.partition(":")[0]
    # Every scope but admin and those that grant this one (write implies read).
    lacking = SCOPES - {"admin", op.scope, f"{resource}:write"}
    customer = make_customer("prepaid")
    before = snapshot(redis_url, customer)
    token = token_for(*sorted(lacking))
    error = failure(
        lambda: getattr(admin, op.rpc)(op.request(customer), metadata=bearer(token), timeout=5)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert op.scope in error.details() and token not in error.details()
    assert snapshot(redis_url, customer) == before


@pytest.mark.parametrize("credential", ["revoked", "none"])
@pytest.mark.parametrize("op", OPS, ids=[op.rpc for op in OPS])
def test_every_operation_refuses_a_revoked_token_or_none_and_changes_nothing(
    op: Op,
    credential: str,
    auth_admin: admin_pb2_grpc.AdminServiceStub,
    revoked_token: str,
    make_customer: Callable[..., Customer],
    redis_url: str,
) -> None:
    customer = make_customer("prepaid")
    before = snapshot(redis_url, customer)
    metadata = bearer(revoked_token) if credential == "revoked" else ()
    error = failure(
        lambda: getattr(auth_admin, op.rpc)(op.request(customer), metadata=metadata, timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("revoked" if credential == "revoked" else "token required") in error.details()
    assert revoked_token not in error.details()
    assert snapshot(redis_url, customer) == before


def test_write_implies_read(
    admin: admin_pb2_grpc.AdminServiceStub,
    token_for: Callable[..., str],
    make_customer: Callable[..., Customer],
) -> None:
    customer = make_customer("prepaid")
    request = pb.ListKeysRequest(customer_id=customer.id)
    listed = admin.ListKeys(request, metadata=bearer(token_for("keys:write")), timeout=5)
    assert [k.key_id for k in listed.keys] == [customer.key_id]
    everything = bearer(token_for("admin"))
    assert admin.GetCredits(pb.GetCreditsRequest(customer_id=customer.id), metadata=everything)


# -- authentication ---------------------------------------------------------------------


def test_no_token_and_a_malformed_or_unknown_token_are_unauthenticated(
    auth_admin: admin_pb2_grpc.AdminServiceStub, redis_url: str
) -> None:
    request = pb.ListAccountsRequest(page_size=1)
    unknown = keys.generate_token()  # well formed, never issued
    forged = issue_token(redis_url, "accounts:read")[0][:-4] + "AAAA"  # a bad checksum
    for metadata in [
        (),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer not-a-token"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        bearer("twadm_" + "A" * 49),
        bearer(unknown),
        bearer(forged),
        (("x-tollway-admin-token", "twadm_short"),),
    ]:
        error = failure(lambda m=metadata: auth_admin.ListAccounts(request, metadata=m, timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert not TOKEN_RE.search(error.details()), error.details()


def test_the_token_may_come_as_x_tollway_admin_token(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    metadata = (("x-tollway-admin-token", token_for("accounts:read")),)
    page = admin.ListAccounts(pb.ListAccountsRequest(page_size=1), metadata=metadata)
    assert len(page.accounts) == 1
    lowercase = (("authorization", f"bearer {token_for('accounts:read')}"),)
    assert admin.ListAccounts(pb.ListAccountsRequest(page_size=1), metadata=lowercase)


def test_a_revoked_token_is_refused_within_a_second(
    auth_admin: admin_pb2_grpc.AdminServiceStub,
    cli: Callable[..., Any],
) -> None:
    issued = cli(
        "admin-tokens", "issue", "--name", "revoke-me", "--scope", "accounts:read", "--json"
    )
    assert issued.returncode == 0, issued.stderr
    record = json.loads(issued.stdout)
    token = record["token"]
    assert TOKEN_RE.fullmatch(token) and record["scopes"] == ["accounts:read"]
    request = pb.ListAccountsRequest(page_size=1)
    assert auth_admin.ListAccounts(request, metadata=bearer(token), timeout=5)  # now cached
    revoked = cli("admin-tokens", "revoke", record["token_id"], "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert token not in revoked.stdout + revoked.stderr
    began = time.monotonic()
    took = eventually(
        lambda: (
            status_of(lambda: auth_admin.ListAccounts(request, metadata=bearer(token)))
            == grpc.StatusCode.UNAUTHENTICATED
        ),
        within=2.0,
        every=0.05,
    )
    assert took < 1.0 + 0.3, f"refused after {time.monotonic() - began:.2f} s"
    error = failure(lambda: auth_admin.ListAccounts(request, metadata=bearer(token), timeout=5))
    assert "revoked" in error.details() and token not in error.details()


def test_failed_authentications_exhaust_the_host_but_a_valid_token_still_works(
    own_host: FromHost, token_for: Callable[..., str], revoked_token: str
) -> None:
    good = bearer(token_for("accounts:read"))
    request = pb.ListAccountsRequest(page_size=1)
    # Each attempt on a connection of its own: the peer's port is not its identity.
    for attempt in range(10):
        with own_host.channel() as ch:
            stub = admin_pb2_grpc.AdminServiceStub(ch)
            bad = bearer("twadm_" + f"{attempt:049d}")
            code = status_of(lambda s=stub, b=bad: s.ListAccounts(request, metadata=b))
            assert code == grpc.StatusCode.UNAUTHENTICATED, attempt
    with own_host.channel() as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        for metadata in (bearer("twadm_" + "9" * 49), (), bearer(revoked_token)):
            error = failure(lambda s=stub, m=metadata: s.ListAccounts(request, metadata=m))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, metadata
        # Behind an ingress this host is every caller: the merchant's backend goes on.
        assert len(stub.ListAccounts(request, metadata=good, timeout=5).accounts) == 1
        assert status_of(lambda: stub.ListAccounts(request, metadata=bearer("twadm_x"))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED  # and serving it gave no failure back
        )
    # (The recovery, one attempt back every 6 s, is held with a clock of its
    # own in tests/test_admin_operations.py, without the wait.)


def test_a_token_issued_without_a_scope_is_announced_as_full_admin(
    cli: Callable[..., Any],
) -> None:
    plain = cli("admin-tokens", "issue", "--name", "no-scope-given")
    assert plain.returncode == 0, plain.stderr
    assert TOKEN_RE.fullmatch(plain.stdout.splitlines()[0])
    assert "full admin scope" in plain.stderr and "--scope" in plain.stderr
    as_json = cli("admin-tokens", "issue", "--name", "no-scope-given", "--json")
    assert json.loads(as_json.stdout)["scopes"] == ["admin"]  # stdout stays JSON
    assert "full admin scope" in as_json.stderr
    scoped = cli("admin-tokens", "issue", "--name", "scoped", "--scope", "admin")
    assert scoped.returncode == 0 and scoped.stderr == ""  # asked for: nothing to point out


# -- idempotent creates -----------------------------------------------------------------


def test_create_account_retried_with_its_key_returns_the_same_account(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    md = bearer(token_for("accounts:write"))
    customer = own_id()
    request = pb.CreateAccountRequest(customer_id=customer, plan="basic", idempotency_key="k-1")
    first = admin.CreateAccount(request, metadata=md, timeout=5)
    again = admin.CreateAccount(request, metadata=md, timeout=5)
    assert first.account.customer_id == customer and again == first
    other = pb.CreateAccountRequest(customer_id=customer, plan="basic", idempotency_key="k-2")
    error = failure(lambda: admin.CreateAccount(other, metadata=md, timeout=5))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    bare = pb.CreateAccountRequest(customer_id=customer, plan="basic")
    assert status_of(lambda: admin.CreateAccount(bare, metadata=md)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    bad_plan = pb.CreateAccountRequest(customer_id=own_id(), plan="nope")
    assert status_of(lambda: admin.CreateAccount(bad_plan, metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_an_idempotency_key_reused_for_another_request_is_refused(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    md = bearer(token_for("accounts:write"))
    first = pb.CreateAccountRequest(customer_id=own_id(), plan="basic", idempotency_key="same")
    admin.CreateAccount(first, metadata=md, timeout=5)
    other = pb.CreateAccountRequest(customer_id=own_id(), plan="basic", idempotency_key="same")
    error = failure(lambda: admin.CreateAccount(other, metadata=md, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "different request" in (error.details() or "")
    missing = pb.GetAccountRequest(customer_id=other.customer_id)
    reader = bearer(token_for("accounts:read"))
    assert status_of(lambda: admin.GetAccount(missing, metadata=reader)) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_concurrent_creates_of_one_account_make_one_and_refuse_the_rest(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    md = bearer(token_for("accounts:write"))
    request = pb.CreateAccountRequest(customer_id=own_id(), plan="basic")
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda _: status_of(lambda: admin.CreateAccount(request, metadata=md)), range(8)
            )
        )
    assert sorted(c.name for c in codes) == ["ALREADY_EXISTS"] * 7 + ["OK"]


def test_issue_key_retried_with_its_key_returns_the_same_key_without_its_plaintext(
    admin: admin_pb2_grpc.AdminServiceStub,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    token_for: Callable[..., str],
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    request = pb.IssueKeyRequest(customer_id=customer, idempotency_key="issue-1")
    first = admin.IssueKey(request, metadata=md, timeout=5)
    again = admin.IssueKey(request, metadata=md, timeout=5)
    assert first.api_key.startswith("tw_live_") and not first.replayed
    assert again.replayed and again.api_key == "" and again.key == first.key
    listed = admin.ListKeys(pb.ListKeysRequest(customer_id=customer), metadata=md, timeout=5)
    assert [k.key_id for k in listed.keys] == [first.key.key_id]
    allowed = tollway_stub.Authorize(
        tw.AuthorizeRequest(api_key=first.api_key, method="GET", path="/v1/x"), timeout=5
    )
    assert allowed.allowed and allowed.customer_id == customer


# -- keys through Authorize -------------------------------------------------------------


def authorize(stub: tollway_pb2_grpc.TollwayStub, key: str) -> tw.AuthorizeResponse:
    request = tw.AuthorizeRequest(api_key=key, method="GET", path="/v1/items")
    response: tw.AuthorizeResponse = stub.Authorize(request, timeout=5)
    return response


def test_an_issued_key_authorizes_and_is_refused_within_a_second_of_revoke_key(
    admin: admin_pb2_grpc.AdminServiceStub,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    token_for: Callable[..., str],
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    issued = admin.IssueKey(pb.IssueKeyRequest(customer_id=customer), metadata=md, timeout=5)
    first = authorize(tollway_stub, issued.api_key)
    assert first.allowed and first.customer_id == customer and first.plan == "basic"
    revoke = pb.RevokeKeyRequest(customer_id=customer, key_id=issued.key.key_id)
    revoked = admin.RevokeKey(revoke, metadata=md, timeout=5)
    assert revoked.key.state == "revoked"
    took = eventually(
        lambda: authorize(tollway_stub, issued.api_key).reason == tw.REASON_KEY_REVOKED,
        within=2.0,
    )
    assert took < 1.0
    got = admin.GetKey(
        pb.GetKeyRequest(customer_id=customer, key_id=issued.key.key_id), metadata=md
    )
    assert got.key.state == "revoked" and got.key.revoked_reason == "admin"
    missing = pb.GetKeyRequest(customer_id=customer, key_id="key_0000000000000000")
    assert status_of(lambda: admin.GetKey(missing, metadata=md)) == grpc.StatusCode.NOT_FOUND


def test_rotate_key_returns_a_new_key_and_when_the_old_one_stops(
    admin: admin_pb2_grpc.AdminServiceStub,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    token_for: Callable[..., str],
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    old = admin.IssueKey(pb.IssueKeyRequest(customer_id=customer), metadata=md, timeout=5)
    rotate = pb.RotateKeyRequest(
        customer_id=customer, key_id=old.key.key_id, overlap_seconds=3600, idempotency_key="r-1"
    )
    new = admin.RotateKey(rotate, metadata=md, timeout=5)
    assert new.api_key.startswith("tw_live_") and new.api_key != old.api_key
    assert new.key.key_id != old.key.key_id and new.replaces == old.key.key_id
    assert not new.replayed and abs(new.old_key_expires_at - (time.time() + 3600)) < 5
    replay = admin.RotateKey(rotate, metadata=md, timeout=5)
    assert replay.replayed and replay.api_key == "" and replay.key == new.key
    assert replay.old_key_expires_at == new.old_key_expires_at
    got = admin.GetKey(pb.GetKeyRequest(customer_id=customer, key_id=old.key.key_id), metadata=md)
    assert got.key.expires_at == new.old_key_expires_at
    # Both work during the overlap.
    assert authorize(tollway_stub, old.api_key).allowed
    assert authorize(tollway_stub, new.api_key).allowed
    listed = admin.ListKeys(pb.ListKeysRequest(customer_id=customer), metadata=md)
    assert {k.key_id for k in listed.keys} == {old.key.key_id, new.key.key_id}
    # Unset overlap_seconds is a day; 0 ends the old key now.
    default = admin.RotateKey(
        pb.RotateKeyRequest(customer_id=customer, key_id=new.key.key_id), metadata=md
    )
    assert abs(default.old_key_expires_at - (time.time() + 86400)) < 5
    now = admin.RotateKey(
        pb.RotateKeyRequest(customer_id=customer, key_id=default.key.key_id, overlap_seconds=0),
        metadata=md,
    )
    assert abs(now.old_key_expires_at - time.time()) < 5
    eventually(
        lambda: authorize(tollway_stub, default.api_key).reason == tw.REASON_KEY_EXPIRED,
        within=2.0,
    )
    assert authorize(tollway_stub, now.api_key).allowed


def test_a_rotated_scoped_key_is_still_refused_outside_its_scope(
    admin: admin_pb2_grpc.AdminServiceStub,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    token_for: Callable[..., str],
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    policy = pb.KeyPolicy(
        name="ci",
        metadata_json='{"team": "data"}',
        has_scope_features=True,
        scope_features=["search"],
        scope_routes=["GET /v1/search/*"],
        rate="5/s",
        quota="100/day",
        uses=10,
    )
    old = admin.IssueKey(pb.IssueKeyRequest(customer_id=customer, policy=policy), metadata=md)
    rotate = pb.RotateKeyRequest(customer_id=customer, key_id=old.key.key_id, overlap_seconds=60)
    new = admin.RotateKey(rotate, metadata=md, timeout=5)
    assert new.key.policy == old.key.policy  # name, metadata, scope, limits, uses (none spent)
    outside = tollway_stub.Authorize(
        tw.AuthorizeRequest(api_key=new.api_key, method="GET", path="/v1/items"), timeout=5
    )
    assert not outside.allowed and outside.reason == tw.REASON_KEY_SCOPE
    inside = tollway_stub.Authorize(
        tw.AuthorizeRequest(api_key=new.api_key, method="GET", path="/v1/search/books"), timeout=5
    )
    assert inside.allowed and inside.customer_id == customer


def test_a_rotated_key_keeps_its_expiry_and_the_old_one_stops_no_later_than_its_own(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    issue = pb.IssueKeyRequest(customer_id=customer, environment="test", expires_in_seconds=600)
    old = admin.IssueKey(issue, metadata=md, timeout=5)
    assert abs(old.key.expires_at - (time.time() + 600)) < 5
    rotate = pb.RotateKeyRequest(customer_id=customer, key_id=old.key.key_id, overlap_seconds=3600)
    new = admin.RotateKey(rotate, metadata=md, timeout=5)
    assert new.api_key.startswith("tw_test_") and new.key.expires_at == old.key.expires_at
    assert new.old_key_expires_at == old.key.expires_at  # sooner than now + the overlap
    got = admin.GetKey(pb.GetKeyRequest(customer_id=customer, key_id=old.key.key_id), metadata=md)
    assert got.key.expires_at == old.key.expires_at


def test_an_expired_or_revoked_key_cannot_be_rotated(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    md = bearer(token_for("accounts:write", "keys:write"))
    customer = own_id()
    admin.CreateAccount(pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md)
    old = admin.IssueKey(pb.IssueKeyRequest(customer_id=customer), metadata=md, timeout=5)
    now = pb.RotateKeyRequest(customer_id=customer, key_id=old.key.key_id, overlap_seconds=0)
    admin.RotateKey(now, metadata=md, timeout=5)  # the old key stops at once
    again = failure(lambda: admin.RotateKey(now, metadata=md, timeout=5))
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT and "expired" in again.details()
    key = admin.IssueKey(pb.IssueKeyRequest(customer_id=customer), metadata=md, timeout=5)
    admin.RevokeKey(pb.RevokeKeyRequest(customer_id=customer, key_id=key.key.key_id), metadata=md)
    revoked = failure(
        lambda: admin.RotateKey(
            pb.RotateKeyRequest(customer_id=customer, key_id=key.key.key_id), metadata=md
        )
    )
    assert revoked.code() == grpc.StatusCode.INVALID_ARGUMENT and "revoked" in revoked.details()
    listed = admin.ListKeys(pb.ListKeysRequest(customer_id=customer), metadata=md)
    assert len(listed.keys) == 3  # the two refusals made no key


# -- paging, usage, credits -------------------------------------------------------------


def test_list_accounts_pages_through_every_account_once(
    admin: admin_pb2_grpc.AdminServiceStub, token_for: Callable[..., str]
) -> None:
    md = bearer(token_for("accounts:write"))
    prefix = own_id("page")
    mine = [f"{prefix}_{i}" for i in range(5)]
    for customer in mine:
        admin.CreateAccount(
            pb.CreateAccountRequest(customer_id=customer, plan="basic"), metadata=md
        )
    seen: list[str] = []
    token = ""
    for _ in range(100_000):
        page = admin.ListAccounts(
            pb.ListAccountsRequest(page_size=2, page_token=token), metadata=md, timeout=5
        )
        assert len(page.accounts) == 2 if page.next_page_token else len(page.accounts) <= 2
        seen.extend(a.customer_id for a in page.accounts)
        token = page.next_page_token
        if not token:
            break
    assert not token, "paging did not end"
    assert len(seen) == len(set(seen)), "an account repeated across pages"
    assert seen == sorted(seen)
    assert [c for c in seen if c.startswith(prefix)] == mine
    bad = pb.ListAccountsRequest(page_size=2, page_token="not a token!")
    assert status_of(lambda: admin.ListAccounts(bad, metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    too_big = pb.ListAccountsRequest(page_size=1001)
    assert status_of(lambda: admin.ListAccounts(too_big, metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_get_usage_reports_meters_quota_and_the_credit_balance(
    admin: admin_pb2_grpc.AdminServiceStub,
    tollway_stub: tollway_pb2_grpc.TollwayStub,
    token_for: Callable[..., str],
    make_customer: Callable[..., Customer],
) -> None:
    md = bearer(token_for("usage:read", "credits:write"))
    prepaid = make_customer("prepaid")
    grant = pb.GrantCreditsRequest(customer_id=prepaid.id, credits=50)
    assert admin.GrantCredits(grant, metadata=md, timeout=5).balance == 50
    assert authorize(tollway_stub, prepaid.key).allowed  # burns one credit
    tollway_stub.RecordUsage(
        tw.RecordUsageRequest(
            api_key=prepaid.key, meter="api_calls", quantity=3, idempotency_key=uuid.uuid4().hex
        ),
        timeout=5,
    )
    usage = admin.GetUsage(pb.GetUsageRequest(customer_id=prepaid.id), metadata=md, timeout=5)
    assert usage.customer_id == prepaid.id and usage.plan == "prepaid"
    assert usage.quota_limit == 100000 and usage.quota_used == 1
    assert usage.HasField("credits") and usage.credits == 49
    assert usage.period_start <= time.time()
    meters = {m.meter: m for m in usage.meters}
    assert meters["api_calls"].used == 3
    assert meters["api_calls"].pending == 3 - meters["api_calls"].reported
    basic = make_customer("basic")  # a plan without credits, never granted any
    plain = admin.GetUsage(pb.GetUsageRequest(customer_id=basic.id), metadata=md, timeout=5)
    assert not plain.HasField("credits") and plain.quota_limit == 1000
    nobody = pb.GetUsageRequest(customer_id=own_id())
    assert status_of(lambda: admin.GetUsage(nobody, metadata=md)) == grpc.StatusCode.NOT_FOUND


def test_grant_credits_once_per_idempotency_key_and_get_credits(
    admin: admin_pb2_grpc.AdminServiceStub,
    token_for: Callable[..., str],
    make_customer: Callable[..., Customer],
) -> None:
    md = bearer(token_for("credits:write"))
    customer = make_customer("prepaid")
    grant = pb.GrantCreditsRequest(
        customer_id=customer.id, credits=7, reason="welcome", idempotency_key="welcome-1"
    )
    first = admin.GrantCredits(grant, metadata=md, timeout=5)
    assert (first.result, first.balance, first.customer_id) == ("granted", 7, customer.id)
    again = admin.GrantCredits(grant, metadata=md, timeout=5)
    assert (again.result, again.balance, again.grant_id) == ("duplicate", 7, first.grant_id)
    more = pb.GrantCreditsRequest(customer_id=customer.id, credits=3, expires_in_seconds=3600)
    assert admin.GrantCredits(more, metadata=md, timeout=5).balance == 10
    read = bearer(token_for("credits:read"))
    got = admin.GetCredits(pb.GetCreditsRequest(customer_id=customer.id), metadata=read)
    assert (got.customer_id, got.balance) == (customer.id, 10)
    zero = pb.GrantCreditsRequest(customer_id=customer.id, credits=0)
    assert status_of(lambda: admin.GrantCredits(zero, metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# -- the server ---------------------------------------------------------------------------


def test_health_and_reflection_name_the_admin_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert SERVICE in names


def test_the_token_and_the_peer_are_read_as_documented() -> None:
    token = "twadm_" + "x" * 49
    assert presented_token([("authorization", f"Bearer {token}")]) == token
    assert presented_token([("authorization", f"BEARER  {token} ")]) == token
    assert presented_token([("x-tollway-admin-token", token)]) == token
    assert presented_token([("x-other", "y"), ("authorization-bin", b"\0")]) == ""
    assert presented_token(None) == ""
    assert peer_host("ipv4:127.0.0.1:50123") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:50123") == "ipv6:[::1]"
    assert peer_host("ipv6:%5B::1%5D:50123") == "ipv6:%5B::1%5D"
    assert peer_host("unix:/tmp/s.sock") == "unix:/tmp/s.sock"


def test_no_admin_token_appears_in_any_log(
    tmp_path_factory: pytest.TempPathFactory,
    admin: admin_pb2_grpc.AdminServiceStub,
    token_for: Callable[..., str],
) -> None:
    # Runs after this module's other tests (file order): every token they sent
    # (good, bad, revoked) went to the sidecar whose log is read here. The
    # session's check (conftest's no_secrets_in_logs: tests/secretscan.py knows
    # twadm_ too) runs only at the very end; this one names the module that
    # leaked, right after it ran.
    admin.ListAccounts(
        pb.ListAccountsRequest(page_size=1), metadata=bearer(token_for("accounts:read"))
    )
    time.sleep(0.2)  # let the sidecars' log lines reach their files
    logs = list(tmp_path_factory.getbasetemp().rglob("*.log"))
    assert any(p.name == "sidecar.log" for p in logs)
    leaks = {
        str(p): [m[:10] + "…" for m in TOKEN_RE.findall(p.read_text(errors="replace"))]
        for p in logs
    }
    assert not {p: hits for p, hits in leaks.items() if hits}
