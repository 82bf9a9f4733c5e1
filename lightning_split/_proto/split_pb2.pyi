from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_UNSPECIFIED: _ClassVar[MessageType]
    HANDSHAKE: _ClassVar[MessageType]
    SPLIT: _ClassVar[MessageType]
    LOAD: _ClassVar[MessageType]
    FORWARD: _ClassVar[MessageType]
    BACKWARD: _ClassVar[MessageType]
    OPTIMIZER_STEP: _ClassVar[MessageType]
    INFER: _ClassVar[MessageType]
    RESULT: _ClassVar[MessageType]
    ERROR: _ClassVar[MessageType]
    CLOSE: _ClassVar[MessageType]
    STATE: _ClassVar[MessageType]
    CACHE: _ClassVar[MessageType]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAW: _ClassVar[Encoding]
    CAST_BF16: _ClassVar[Encoding]
    CAST_FP16: _ClassVar[Encoding]
    INT8_BLOCK: _ClassVar[Encoding]
    FP8_BLOCK: _ClassVar[Encoding]
MESSAGE_TYPE_UNSPECIFIED: MessageType
HANDSHAKE: MessageType
SPLIT: MessageType
LOAD: MessageType
FORWARD: MessageType
BACKWARD: MessageType
OPTIMIZER_STEP: MessageType
INFER: MessageType
RESULT: MessageType
ERROR: MessageType
CLOSE: MessageType
STATE: MessageType
CACHE: MessageType
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
RAW: Encoding
CAST_BF16: Encoding
CAST_FP16: Encoding
INT8_BLOCK: Encoding
FP8_BLOCK: Encoding

class Header(_message.Message):
    __slots__ = ("protocol_version", "type", "node_id", "code", "session_id", "step", "sequence", "acked", "reply_encoding", "server_us")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    REPLY_ENCODING_FIELD_NUMBER: _ClassVar[int]
    SERVER_US_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    type: MessageType
    node_id: str
    code: int
    session_id: str
    step: int
    sequence: int
    acked: int
    reply_encoding: Encoding
    server_us: int
    def __init__(self, protocol_version: _Optional[int] = ..., type: _Optional[_Union[MessageType, str]] = ..., node_id: _Optional[str] = ..., code: _Optional[int] = ..., session_id: _Optional[str] = ..., step: _Optional[int] = ..., sequence: _Optional[int] = ..., acked: _Optional[int] = ..., reply_encoding: _Optional[_Union[Encoding, str]] = ..., server_us: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "fragment_index", "fragment_count", "payload_bytes", "meta_bytes", "crc32", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Header
    fragment_index: int
    fragment_count: int
    payload_bytes: int
    meta_bytes: int
    crc32: int
    data: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., fragment_index: _Optional[int] = ..., fragment_count: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., meta_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "encoding", "block_size", "blosc2", "offset", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOSC2_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    block_size: int
    blosc2: bool
    offset: int
    nbytes: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., block_size: _Optional[int] = ..., blosc2: _Optional[bool] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "list", "tuple", "dict", "int_value", "float_value", "bool_value", "string_value", "none", "bytes_value")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    DICT_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorMeta
    list: ValueList
    tuple: ValueList
    dict: ValueMap
    int_value: int
    float_value: float
    bool_value: bool
    string_value: str
    none: bool
    bytes_value: bytes
    def __init__(self, tensor: _Optional[_Union[TensorMeta, _Mapping]] = ..., list: _Optional[_Union[ValueList, _Mapping]] = ..., tuple: _Optional[_Union[ValueList, _Mapping]] = ..., dict: _Optional[_Union[ValueMap, _Mapping]] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., none: _Optional[bool] = ..., bytes_value: _Optional[bytes] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("keys", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class PayloadMeta(_message.Message):
    __slots__ = ("body",)
    BODY_FIELD_NUMBER: _ClassVar[int]
    body: Value
    def __init__(self, body: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
