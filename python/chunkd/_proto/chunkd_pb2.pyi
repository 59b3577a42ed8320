from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Delivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_UNSPECIFIED: _ClassVar[Delivery]
    DELIVERY_INLINE: _ClassVar[Delivery]
    DELIVERY_SHM: _ClassVar[Delivery]
    DELIVERY_CUDA_IPC: _ClassVar[Delivery]
DELIVERY_UNSPECIFIED: Delivery
DELIVERY_INLINE: Delivery
DELIVERY_SHM: Delivery
DELIVERY_CUDA_IPC: Delivery

class ByteRange(_message.Message):
    __slots__ = ("bounded", "offset", "suffix")
    class Bounded(_message.Message):
        __slots__ = ("start", "end")
        START_FIELD_NUMBER: _ClassVar[int]
        END_FIELD_NUMBER: _ClassVar[int]
        start: int
        end: int
        def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...
    BOUNDED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    bounded: ByteRange.Bounded
    offset: int
    suffix: int
    def __init__(self, bounded: _Optional[_Union[ByteRange.Bounded, _Mapping]] = ..., offset: _Optional[int] = ..., suffix: _Optional[int] = ...) -> None: ...

class Conditions(_message.Message):
    __slots__ = ("if_generation_match", "if_generation_not_match")
    IF_GENERATION_MATCH_FIELD_NUMBER: _ClassVar[int]
    IF_GENERATION_NOT_MATCH_FIELD_NUMBER: _ClassVar[int]
    if_generation_match: int
    if_generation_not_match: int
    def __init__(self, if_generation_match: _Optional[int] = ..., if_generation_not_match: _Optional[int] = ...) -> None: ...

class ClientIdentity(_message.Message):
    __slots__ = ("boot_id", "ipc_namespace", "mount_namespace", "shm_dir", "shm_dir_dev", "shm_dir_ino", "gpu_uuids")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_DEV_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_INO_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    ipc_namespace: int
    mount_namespace: int
    shm_dir: str
    shm_dir_dev: int
    shm_dir_ino: int
    gpu_uuids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, boot_id: _Optional[str] = ..., ipc_namespace: _Optional[int] = ..., mount_namespace: _Optional[int] = ..., shm_dir: _Optional[str] = ..., shm_dir_dev: _Optional[int] = ..., shm_dir_ino: _Optional[int] = ..., gpu_uuids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "range", "conditions", "accept", "client", "gpu_uuid")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    range: ByteRange
    conditions: Conditions
    accept: _containers.RepeatedScalarFieldContainer[Delivery]
    client: ClientIdentity
    gpu_uuid: bytes
    def __init__(self, key: _Optional[bytes] = ..., range: _Optional[_Union[ByteRange, _Mapping]] = ..., conditions: _Optional[_Union[Conditions, _Mapping]] = ..., accept: _Optional[_Iterable[_Union[Delivery, str]]] = ..., client: _Optional[_Union[ClientIdentity, _Mapping]] = ..., gpu_uuid: _Optional[bytes] = ...) -> None: ...

class GetManyRequest(_message.Message):
    __slots__ = ("items", "accept", "client")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[GetRequest]
    accept: _containers.RepeatedScalarFieldContainer[Delivery]
    client: ClientIdentity
    def __init__(self, items: _Optional[_Iterable[_Union[GetRequest, _Mapping]]] = ..., accept: _Optional[_Iterable[_Union[Delivery, str]]] = ..., client: _Optional[_Union[ClientIdentity, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class GetManyPart(_message.Message):
    __slots__ = ("index", "header", "error", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    header: GetHeader
    error: ItemError
    data: bytes
    def __init__(self, index: _Optional[int] = ..., header: _Optional[_Union[GetHeader, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetManyResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[GetManyPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[GetManyPart, _Mapping]]] = ...) -> None: ...

class ShmHandle(_message.Message):
    __slots__ = ("segment", "segment_size", "offset", "length")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    segment_size: int
    offset: int
    length: int
    def __init__(self, segment: _Optional[str] = ..., segment_size: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("ipc_handle", "segment", "offset", "length", "device_uuid")
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    ipc_handle: bytes
    segment: str
    offset: int
    length: int
    device_uuid: bytes
    def __init__(self, ipc_handle: _Optional[bytes] = ..., segment: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., device_uuid: _Optional[bytes] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("id", "ttl_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    ttl_ms: int
    def __init__(self, id: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("total_size", "generation", "range_start", "length", "delivery", "shm", "cuda", "lease")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANGE_START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    generation: int
    range_start: int
    length: int
    delivery: Delivery
    shm: ShmHandle
    cuda: CudaIpcHandle
    lease: Lease
    def __init__(self, total_size: _Optional[int] = ..., generation: _Optional[int] = ..., range_start: _Optional[int] = ..., length: _Optional[int] = ..., delivery: _Optional[_Union[Delivery, str]] = ..., shm: _Optional[_Union[ShmHandle, _Mapping]] = ..., cuda: _Optional[_Union[CudaIpcHandle, _Mapping]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("key", "size", "conditions")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    conditions: Conditions
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ..., conditions: _Optional[_Union[Conditions, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("generation", "size")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    size: int
    def __init__(self, generation: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "conditions")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    conditions: Conditions
    def __init__(self, key: _Optional[bytes] = ..., conditions: _Optional[_Union[Conditions, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    def __init__(self, key: _Optional[bytes] = ...) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("exists", "size", "generation")
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    size: int
    generation: int
    def __init__(self, exists: _Optional[bool] = ..., size: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("prefix", "directory")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    prefix: bytes
    directory: bool
    def __init__(self, prefix: _Optional[bytes] = ..., directory: _Optional[bool] = ...) -> None: ...

class ListEntry(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "prefixes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ListEntry]
    prefixes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, entries: _Optional[_Iterable[_Union[ListEntry, _Mapping]]] = ..., prefixes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheTierInfo(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "entries")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    capacity_bytes: int
    used_bytes: int
    entries: int
    def __init__(self, tier: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("version", "backend", "store", "read_only", "max_value_bytes", "tiers", "features", "deliveries", "counters", "leases_active", "leased_bytes", "host")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    LEASES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    store: str
    read_only: bool
    max_value_bytes: int
    tiers: _containers.RepeatedCompositeFieldContainer[CacheTierInfo]
    features: _containers.RepeatedScalarFieldContainer[str]
    deliveries: _containers.RepeatedScalarFieldContainer[Delivery]
    counters: _containers.ScalarMap[str, int]
    leases_active: int
    leased_bytes: int
    host: ClientIdentity
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., store: _Optional[str] = ..., read_only: _Optional[bool] = ..., max_value_bytes: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[CacheTierInfo, _Mapping]]] = ..., features: _Optional[_Iterable[str]] = ..., deliveries: _Optional[_Iterable[_Union[Delivery, str]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., leases_active: _Optional[int] = ..., leased_bytes: _Optional[int] = ..., host: _Optional[_Union[ClientIdentity, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("unknown_lease_ids",)
    UNKNOWN_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    unknown_lease_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, unknown_lease_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("unknown_lease_ids", "ttl_ms")
    UNKNOWN_LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    unknown_lease_ids: _containers.RepeatedScalarFieldContainer[int]
    ttl_ms: int
    def __init__(self, unknown_lease_ids: _Optional[_Iterable[int]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("keys", "prefix")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    prefix: bytes
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., prefix: _Optional[bytes] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("keys_done", "bytes_loaded", "keys_failed", "errors")
    KEYS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    keys_done: int
    bytes_loaded: int
    keys_failed: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys_done: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., keys_failed: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...
