import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_OK: _ClassVar[Reason]
    REASON_MISSING_KEY: _ClassVar[Reason]
    REASON_INVALID_KEY: _ClassVar[Reason]
    REASON_KEY_REVOKED: _ClassVar[Reason]
    REASON_KEY_EXPIRED: _ClassVar[Reason]
    REASON_SUBSCRIPTION_INACTIVE: _ClassVar[Reason]
    REASON_FEATURE_NOT_IN_PLAN: _ClassVar[Reason]
    REASON_RATE_LIMITED: _ClassVar[Reason]
    REASON_QUOTA_EXCEEDED: _ClassVar[Reason]
    REASON_CONCURRENCY_LIMITED: _ClassVar[Reason]
    REASON_CREDITS_EXHAUSTED: _ClassVar[Reason]
    REASON_KEY_SCOPE: _ClassVar[Reason]
    REASON_KEY_USES_EXHAUSTED: _ClassVar[Reason]
REASON_UNSPECIFIED: Reason
REASON_OK: Reason
REASON_MISSING_KEY: Reason
REASON_INVALID_KEY: Reason
REASON_KEY_REVOKED: Reason
REASON_KEY_EXPIRED: Reason
REASON_SUBSCRIPTION_INACTIVE: Reason
REASON_FEATURE_NOT_IN_PLAN: Reason
REASON_RATE_LIMITED: Reason
REASON_QUOTA_EXCEEDED: Reason
REASON_CONCURRENCY_LIMITED: Reason
REASON_CREDITS_EXHAUSTED: Reason
REASON_KEY_SCOPE: Reason
REASON_KEY_USES_EXHAUSTED: Reason

class AuthorizeRequest(_message.Message):
    __slots__ = ("api_key", "method", "path", "cost", "feature", "request_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    method: str
    path: str
    cost: int
    feature: str
    request_id: str
    def __init__(self, api_key: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., cost: _Optional[int] = ..., feature: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RateLimitState(_message.Message):
    __slots__ = ("limit", "remaining", "reset_seconds", "rate_per_second")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    limit: int
    remaining: int
    reset_seconds: int
    rate_per_second: float
    def __init__(self, limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_seconds: _Optional[int] = ..., rate_per_second: _Optional[float] = ...) -> None: ...

class QuotaState(_message.Message):
    __slots__ = ("limit", "used", "remaining", "period_end")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    limit: int
    used: int
    remaining: int
    period_end: int
    def __init__(self, limit: _Optional[int] = ..., used: _Optional[int] = ..., remaining: _Optional[int] = ..., period_end: _Optional[int] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("allowed", "reason", "customer_id", "plan", "rate_limit", "quota", "retry_after_seconds", "message", "lease_id", "credits")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: Reason
    customer_id: str
    plan: str
    rate_limit: RateLimitState
    quota: QuotaState
    retry_after_seconds: int
    message: str
    lease_id: str
    credits: CreditState
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., rate_limit: _Optional[_Union[RateLimitState, _Mapping]] = ..., quota: _Optional[_Union[QuotaState, _Mapping]] = ..., retry_after_seconds: _Optional[int] = ..., message: _Optional[str] = ..., lease_id: _Optional[str] = ..., credits: _Optional[_Union[CreditState, _Mapping]] = ...) -> None: ...

class CreditState(_message.Message):
    __slots__ = ("balance",)
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    balance: int
    def __init__(self, balance: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("api_key", "lease_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    lease_id: str
    def __init__(self, api_key: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class RecordUsageRequest(_message.Message):
    __slots__ = ("api_key", "customer_id", "meter", "quantity", "idempotency_key", "timestamp", "request_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    customer_id: str
    meter: str
    quantity: int
    idempotency_key: str
    timestamp: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, api_key: _Optional[str] = ..., customer_id: _Optional[str] = ..., meter: _Optional[str] = ..., quantity: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("duplicate", "customer_id", "record_id")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    customer_id: str
    record_id: str
    def __init__(self, duplicate: _Optional[bool] = ..., customer_id: _Optional[str] = ..., record_id: _Optional[str] = ...) -> None: ...

class RecordUsageBatchRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RecordUsageRequest]
    def __init__(self, events: _Optional[_Iterable[_Union[RecordUsageRequest, _Mapping]]] = ...) -> None: ...

class RecordUsageResult(_message.Message):
    __slots__ = ("code", "message", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    response: RecordUsageResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[RecordUsageResponse, _Mapping]] = ...) -> None: ...

class RecordUsageBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordUsageResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RecordUsageResult, _Mapping]]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("api_key", "customer_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    customer_id: str
    def __init__(self, api_key: _Optional[str] = ..., customer_id: _Optional[str] = ...) -> None: ...

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

class GetUsageResponse(_message.Message):
    __slots__ = ("customer_id", "plan", "period_start", "meters", "quota", "credits")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    period_start: int
    meters: _containers.RepeatedCompositeFieldContainer[MeterUsage]
    quota: QuotaState
    credits: CreditState
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., period_start: _Optional[int] = ..., meters: _Optional[_Iterable[_Union[MeterUsage, _Mapping]]] = ..., quota: _Optional[_Union[QuotaState, _Mapping]] = ..., credits: _Optional[_Union[CreditState, _Mapping]] = ...) -> None: ...
