from herald.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_UNSPECIFIED: _ClassVar[Layer]
    LAYER_L1: _ClassVar[Layer]
    LAYER_L2: _ClassVar[Layer]
    LAYER_DATABASE: _ClassVar[Layer]
    LAYER_NONE: _ClassVar[Layer]
LAYER_UNSPECIFIED: Layer
LAYER_L1: Layer
LAYER_L2: Layer
LAYER_DATABASE: Layer
LAYER_NONE: Layer

class ResourceRef(_message.Message):
    __slots__ = ("resource", "params")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    resource: str
    params: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, resource: _Optional[str] = ..., params: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("tenant", "resource", "key", "min_commit_lsn")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    MIN_COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    resource: ResourceRef
    key: str
    min_commit_lsn: int
    def __init__(self, tenant: _Optional[str] = ..., resource: _Optional[_Union[ResourceRef, _Mapping]] = ..., key: _Optional[str] = ..., min_commit_lsn: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "layer", "fill_token", "tags", "expires_at_ms", "node_id", "generation", "pending")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FILL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    layer: Layer
    fill_token: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    expires_at_ms: int
    node_id: str
    generation: int
    pending: bool
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., layer: _Optional[_Union[Layer, str]] = ..., fill_token: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., expires_at_ms: _Optional[int] = ..., node_id: _Optional[str] = ..., generation: _Optional[int] = ..., pending: _Optional[bool] = ..., **kwargs) -> None: ...

class GetManyRequest(_message.Message):
    __slots__ = ("tenant", "items", "min_commit_lsn")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MIN_COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    items: _containers.RepeatedCompositeFieldContainer[GetItem]
    min_commit_lsn: int
    def __init__(self, tenant: _Optional[str] = ..., items: _Optional[_Iterable[_Union[GetItem, _Mapping]]] = ..., min_commit_lsn: _Optional[int] = ...) -> None: ...

class GetItem(_message.Message):
    __slots__ = ("resource", "key")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    resource: ResourceRef
    key: str
    def __init__(self, resource: _Optional[_Union[ResourceRef, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class GetManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResult]
    def __init__(self, results: _Optional[_Iterable[_Union[GetResult, _Mapping]]] = ...) -> None: ...

class GetResult(_message.Message):
    __slots__ = ("response", "code", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: GetResponse
    code: int
    error: str
    def __init__(self, response: _Optional[_Union[GetResponse, _Mapping]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("tenant", "key", "value", "ttl_ms", "tags", "fill_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    FILL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key: str
    value: bytes
    ttl_ms: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    fill_token: str
    def __init__(self, tenant: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., fill_token: _Optional[str] = ...) -> None: ...

class SetResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("tenant", "resource", "key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    resource: ResourceRef
    key: str
    def __init__(self, tenant: _Optional[str] = ..., resource: _Optional[_Union[ResourceRef, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class InvalidateTagsRequest(_message.Message):
    __slots__ = ("tenant", "tags")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class InvalidatePrefixRequest(_message.Message):
    __slots__ = ("tenant", "resource", "key_prefix", "all")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    resource: str
    key_prefix: str
    all: bool
    def __init__(self, tenant: _Optional[str] = ..., resource: _Optional[str] = ..., key_prefix: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("tenant", "tables", "tags", "tenants")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tables: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., tables: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchPosition(_message.Message):
    __slots__ = ("commit_lsn", "events", "staleness_ms")
    COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    commit_lsn: int
    events: int
    staleness_ms: int
    def __init__(self, commit_lsn: _Optional[int] = ..., events: _Optional[int] = ..., staleness_ms: _Optional[int] = ...) -> None: ...

class WatchMessage(_message.Message):
    __slots__ = ("ready", "events", "heartbeat")
    class Ready(_message.Message):
        __slots__ = ("node_id", "generation", "position", "heartbeat_ms")
        NODE_ID_FIELD_NUMBER: _ClassVar[int]
        GENERATION_FIELD_NUMBER: _ClassVar[int]
        POSITION_FIELD_NUMBER: _ClassVar[int]
        HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
        node_id: str
        generation: int
        position: WatchPosition
        heartbeat_ms: int
        def __init__(self, node_id: _Optional[str] = ..., generation: _Optional[int] = ..., position: _Optional[_Union[WatchPosition, _Mapping]] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...
    class Events(_message.Message):
        __slots__ = ("seq", "events")
        SEQ_FIELD_NUMBER: _ClassVar[int]
        EVENTS_FIELD_NUMBER: _ClassVar[int]
        seq: int
        events: _containers.RepeatedCompositeFieldContainer[_events_pb2.InvalidationEvent]
        def __init__(self, seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[_events_pb2.InvalidationEvent, _Mapping]]] = ...) -> None: ...
    class Heartbeat(_message.Message):
        __slots__ = ("generation", "seq", "position")
        GENERATION_FIELD_NUMBER: _ClassVar[int]
        SEQ_FIELD_NUMBER: _ClassVar[int]
        POSITION_FIELD_NUMBER: _ClassVar[int]
        generation: int
        seq: int
        position: WatchPosition
        def __init__(self, generation: _Optional[int] = ..., seq: _Optional[int] = ..., position: _Optional[_Union[WatchPosition, _Mapping]] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ready: WatchMessage.Ready
    events: WatchMessage.Events
    heartbeat: WatchMessage.Heartbeat
    def __init__(self, ready: _Optional[_Union[WatchMessage.Ready, _Mapping]] = ..., events: _Optional[_Union[WatchMessage.Events, _Mapping]] = ..., heartbeat: _Optional[_Union[WatchMessage.Heartbeat, _Mapping]] = ...) -> None: ...

class StoredEntry(_message.Message):
    __slots__ = ("value", "tags", "found", "expires_at_ms")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    tags: _containers.RepeatedScalarFieldContainer[str]
    found: bool
    expires_at_ms: int
    def __init__(self, value: _Optional[bytes] = ..., tags: _Optional[_Iterable[str]] = ..., found: _Optional[bool] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("tenant", "key", "value", "ttl_ms", "tags")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key: str
    value: bytes
    ttl_ms: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class IncrRequest(_message.Message):
    __slots__ = ("tenant", "key", "delta")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    key: str
    delta: int
    def __init__(self, tenant: _Optional[str] = ..., key: _Optional[str] = ..., delta: _Optional[int] = ...) -> None: ...

class IncrResponse(_message.Message):
    __slots__ = ("found", "value")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[int] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("tenant", "command", "params")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    command: str
    params: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenant: _Optional[str] = ..., command: _Optional[str] = ..., params: _Optional[_Iterable[str]] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("rows_affected", "commit_lsn", "wait_reached", "command_id", "pending")
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LSN_FIELD_NUMBER: _ClassVar[int]
    WAIT_REACHED_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    rows_affected: int
    commit_lsn: int
    wait_reached: bool
    command_id: str
    pending: bool
    def __init__(self, rows_affected: _Optional[int] = ..., commit_lsn: _Optional[int] = ..., wait_reached: _Optional[bool] = ..., command_id: _Optional[str] = ..., pending: _Optional[bool] = ...) -> None: ...
