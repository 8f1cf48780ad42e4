from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_INSERT: _ClassVar[Operation]
    OPERATION_UPDATE: _ClassVar[Operation]
    OPERATION_DELETE: _ClassVar[Operation]
    OPERATION_TRUNCATE: _ClassVar[Operation]
OPERATION_UNSPECIFIED: Operation
OPERATION_INSERT: Operation
OPERATION_UPDATE: Operation
OPERATION_DELETE: Operation
OPERATION_TRUNCATE: Operation

class InvalidationEvent(_message.Message):
    __slots__ = ("event_id", "tenant", "table", "operation", "ids", "tags", "teams", "txid", "commit_lsn", "commit_time_us", "captured_time_us", "traceparent", "widened", "all_tenants", "key_prefixes")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    TXID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    WIDENED_FIELD_NUMBER: _ClassVar[int]
    ALL_TENANTS_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    tenant: str
    table: str
    operation: Operation
    ids: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    teams: _containers.RepeatedScalarFieldContainer[str]
    txid: int
    commit_lsn: int
    commit_time_us: int
    captured_time_us: int
    traceparent: str
    widened: bool
    all_tenants: bool
    key_prefixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[str] = ..., tenant: _Optional[str] = ..., table: _Optional[str] = ..., operation: _Optional[_Union[Operation, str]] = ..., ids: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., teams: _Optional[_Iterable[str]] = ..., txid: _Optional[int] = ..., commit_lsn: _Optional[int] = ..., commit_time_us: _Optional[int] = ..., captured_time_us: _Optional[int] = ..., traceparent: _Optional[str] = ..., widened: _Optional[bool] = ..., all_tenants: _Optional[bool] = ..., key_prefixes: _Optional[_Iterable[str]] = ...) -> None: ...

class InvalidationBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[InvalidationEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[InvalidationEvent, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("instance", "sent_time_us")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SENT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    instance: str
    sent_time_us: int
    def __init__(self, instance: _Optional[str] = ..., sent_time_us: _Optional[int] = ...) -> None: ...

class Watermark(_message.Message):
    __slots__ = ("lsn", "pg_time_us")
    LSN_FIELD_NUMBER: _ClassVar[int]
    PG_TIME_US_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    pg_time_us: int
    def __init__(self, lsn: _Optional[int] = ..., pg_time_us: _Optional[int] = ...) -> None: ...

class L1Message(_message.Message):
    __slots__ = ("invalidations", "heartbeat", "watermark")
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    invalidations: InvalidationBatch
    heartbeat: Heartbeat
    watermark: Watermark
    def __init__(self, invalidations: _Optional[_Union[InvalidationBatch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., watermark: _Optional[_Union[Watermark, _Mapping]] = ...) -> None: ...
