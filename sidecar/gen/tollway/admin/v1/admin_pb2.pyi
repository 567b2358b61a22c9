from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("customer_id", "plan", "status", "grace_until", "created_at", "subscription_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GRACE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    status: str
    grace_until: int
    created_at: int
    subscription_id: str
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., status: _Optional[str] = ..., grace_until: _Optional[int] = ..., created_at: _Optional[int] = ..., subscription_id: _Optional[str] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("key_id", "customer_id", "state", "environment", "created_at", "expires_at", "revoked_reason", "last_used", "policy")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    customer_id: str
    state: str
    environment: str
    created_at: int
    expires_at: int
    revoked_reason: str
    last_used: int
    policy: KeyPolicy
    def __init__(self, key_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., state: _Optional[str] = ..., environment: _Optional[str] = ..., created_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., revoked_reason: _Optional[str] = ..., last_used: _Optional[int] = ..., policy: _Optional[_Union[KeyPolicy, _Mapping]] = ...) -> None: ...

class KeyPolicy(_message.Message):
    __slots__ = ("name", "metadata_json", "has_scope_features", "scope_features", "scope_routes", "rate", "burst", "quota", "uses")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_SCOPE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ROUTES_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    name: str
    metadata_json: str
    has_scope_features: bool
    scope_features: _containers.RepeatedScalarFieldContainer[str]
    scope_routes: _containers.RepeatedScalarFieldContainer[str]
    rate: str
    burst: int
    quota: str
    uses: int
    def __init__(self, name: _Optional[str] = ..., metadata_json: _Optional[str] = ..., has_scope_features: _Optional[bool] = ..., scope_features: _Optional[_Iterable[str]] = ..., scope_routes: _Optional[_Iterable[str]] = ..., rate: _Optional[str] = ..., burst: _Optional[int] = ..., quota: _Optional[str] = ..., uses: _Optional[int] = ...) -> None: ...

class MeterUsage(_message.Message):
    __slots__ = ("meter", "used", "reported", "pending")
    METER_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    meter: str
    used: int
    reported: int
    pending: int
    def __init__(self, meter: _Optional[str] = ..., used: _Optional[int] = ..., reported: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("customer_id", "plan", "status", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    status: str
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., status: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAccountsResponse(_message.Message):
    __slots__ = ("accounts", "next_page_token")
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    accounts: _containers.RepeatedCompositeFieldContainer[Account]
    next_page_token: str
    def __init__(self, accounts: _Optional[_Iterable[_Union[Account, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetAccountPlanRequest(_message.Message):
    __slots__ = ("customer_id", "plan")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class SetAccountPlanResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class SetAccountStatusRequest(_message.Message):
    __slots__ = ("customer_id", "status", "grace_seconds")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    status: str
    grace_seconds: int
    def __init__(self, customer_id: _Optional[str] = ..., status: _Optional[str] = ..., grace_seconds: _Optional[int] = ...) -> None: ...

class SetAccountStatusResponse(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: Account
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ...) -> None: ...

class IssueKeyRequest(_message.Message):
    __slots__ = ("customer_id", "environment", "expires_in_seconds", "idempotency_key", "policy")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    environment: str
    expires_in_seconds: int
    idempotency_key: str
    policy: KeyPolicy
    def __init__(self, customer_id: _Optional[str] = ..., environment: _Optional[str] = ..., expires_in_seconds: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., policy: _Optional[_Union[KeyPolicy, _Mapping]] = ...) -> None: ...

class IssueKeyResponse(_message.Message):
    __slots__ = ("api_key", "key", "replayed")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key: Key
    replayed: bool
    def __init__(self, api_key: _Optional[str] = ..., key: _Optional[_Union[Key, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("customer_id", "key_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    key_id: str
    def __init__(self, customer_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("customer_id", "key_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    key_id: str
    def __init__(self, customer_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("customer_id", "key_id", "overlap_seconds", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    key_id: str
    overlap_seconds: int
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., key_id: _Optional[str] = ..., overlap_seconds: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("api_key", "key", "replayed", "replaces", "old_key_expires_at")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    OLD_KEY_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key: Key
    replayed: bool
    replaces: str
    old_key_expires_at: int
    def __init__(self, api_key: _Optional[str] = ..., key: _Optional[_Union[Key, _Mapping]] = ..., replayed: _Optional[bool] = ..., replaces: _Optional[str] = ..., old_key_expires_at: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("customer_id", "plan", "period_start", "meters", "quota_limit", "quota_used", "credits")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_LIMIT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_USED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    period_start: int
    meters: _containers.RepeatedCompositeFieldContainer[MeterUsage]
    quota_limit: int
    quota_used: int
    credits: int
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., period_start: _Optional[int] = ..., meters: _Optional[_Iterable[_Union[MeterUsage, _Mapping]]] = ..., quota_limit: _Optional[int] = ..., quota_used: _Optional[int] = ..., credits: _Optional[int] = ...) -> None: ...

class GetCreditsRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetCreditsResponse(_message.Message):
    __slots__ = ("customer_id", "balance")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    balance: int
    def __init__(self, customer_id: _Optional[str] = ..., balance: _Optional[int] = ...) -> None: ...

class GrantCreditsRequest(_message.Message):
    __slots__ = ("customer_id", "credits", "expires_in_seconds", "reason", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    credits: int
    expires_in_seconds: int
    reason: str
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., credits: _Optional[int] = ..., expires_in_seconds: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GrantCreditsResponse(_message.Message):
    __slots__ = ("customer_id", "balance", "grant_id", "result")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    balance: int
    grant_id: str
    result: str
    def __init__(self, customer_id: _Optional[str] = ..., balance: _Optional[int] = ..., grant_id: _Optional[str] = ..., result: _Optional[str] = ...) -> None: ...

class UpdateKeyRequest(_message.Message):
    __slots__ = ("customer_id", "key_id", "policy")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    key_id: str
    policy: KeyPolicy
    def __init__(self, customer_id: _Optional[str] = ..., key_id: _Optional[str] = ..., policy: _Optional[_Union[KeyPolicy, _Mapping]] = ...) -> None: ...

class UpdateKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: Key
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...
