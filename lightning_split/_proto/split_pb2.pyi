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
    __slots__ = ("tensor", "list", "tuple", "dict", "int_value", "float_value", "bool_value", "string_value", "none", "bytes_value", "marker")
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
    MARKER_FIELD_NUMBER: _ClassVar[int]
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
    marker: Marker
    def __init__(self, tensor: _Optional[_Union[TensorMeta, _Mapping]] = ..., list: _Optional[_Union[ValueList, _Mapping]] = ..., tuple: _Optional[_Union[ValueList, _Mapping]] = ..., dict: _Optional[_Union[ValueMap, _Mapping]] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., none: _Optional[bool] = ..., bytes_value: _Optional[bytes] = ..., marker: _Optional[_Union[Marker, _Mapping]] = ...) -> None: ...

class Marker(_message.Message):
    __slots__ = ("kv_cache", "grad_input")
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    kv_cache: bool
    grad_input: int
    def __init__(self, kv_cache: _Optional[bool] = ..., grad_input: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("value", "hello", "welcome", "error", "split", "split_description", "load", "load_reply", "forward", "forward_reply", "backward", "backward_reply", "optimizer_step", "optimizer_step_reply", "state", "state_reply", "cache", "cache_reply", "close_reply")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_REPLY_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_REPLY_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_REPLY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_REPLY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REPLY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    CACHE_REPLY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REPLY_FIELD_NUMBER: _ClassVar[int]
    value: Value
    hello: Hello
    welcome: Welcome
    error: ErrorBody
    split: SplitRequest
    split_description: SplitDescription
    load: LoadRequest
    load_reply: LoadReply
    forward: ForwardRequest
    forward_reply: ForwardReply
    backward: BackwardRequest
    backward_reply: BackwardReply
    optimizer_step: OptimizerStepRequest
    optimizer_step_reply: OptimizerStepReply
    state: StateRequest
    state_reply: StateReply
    cache: CacheRequest
    cache_reply: CacheReply
    close_reply: CloseReply
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., error: _Optional[_Union[ErrorBody, _Mapping]] = ..., split: _Optional[_Union[SplitRequest, _Mapping]] = ..., split_description: _Optional[_Union[SplitDescription, _Mapping]] = ..., load: _Optional[_Union[LoadRequest, _Mapping]] = ..., load_reply: _Optional[_Union[LoadReply, _Mapping]] = ..., forward: _Optional[_Union[ForwardRequest, _Mapping]] = ..., forward_reply: _Optional[_Union[ForwardReply, _Mapping]] = ..., backward: _Optional[_Union[BackwardRequest, _Mapping]] = ..., backward_reply: _Optional[_Union[BackwardReply, _Mapping]] = ..., optimizer_step: _Optional[_Union[OptimizerStepRequest, _Mapping]] = ..., optimizer_step_reply: _Optional[_Union[OptimizerStepReply, _Mapping]] = ..., state: _Optional[_Union[StateRequest, _Mapping]] = ..., state_reply: _Optional[_Union[StateReply, _Mapping]] = ..., cache: _Optional[_Union[CacheRequest, _Mapping]] = ..., cache_reply: _Optional[_Union[CacheReply, _Mapping]] = ..., close_reply: _Optional[_Union[CloseReply, _Mapping]] = ...) -> None: ...

class CompressionSettings(_message.Message):
    __slots__ = ("lossless", "lossy", "codec", "level", "filter", "nthreads", "int8_block_size", "min_bytes", "error_feedback")
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    NTHREADS_FIELD_NUMBER: _ClassVar[int]
    INT8_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    lossless: str
    lossy: str
    codec: str
    level: int
    filter: str
    nthreads: int
    int8_block_size: int
    min_bytes: int
    error_feedback: bool
    def __init__(self, lossless: _Optional[str] = ..., lossy: _Optional[str] = ..., codec: _Optional[str] = ..., level: _Optional[int] = ..., filter: _Optional[str] = ..., nthreads: _Optional[int] = ..., int8_block_size: _Optional[int] = ..., min_bytes: _Optional[int] = ..., error_feedback: _Optional[bool] = ...) -> None: ...

class CompressionPair(_message.Message):
    __slots__ = ("client_to_server", "server_to_client")
    CLIENT_TO_SERVER_FIELD_NUMBER: _ClassVar[int]
    SERVER_TO_CLIENT_FIELD_NUMBER: _ClassVar[int]
    client_to_server: CompressionSettings
    server_to_client: CompressionSettings
    def __init__(self, client_to_server: _Optional[_Union[CompressionSettings, _Mapping]] = ..., server_to_client: _Optional[_Union[CompressionSettings, _Mapping]] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("lossless", "lossy", "chunk_size", "max_payload_bytes", "checksum", "connections")
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    lossless: _containers.RepeatedScalarFieldContainer[str]
    lossy: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    max_payload_bytes: int
    checksum: bool
    connections: int
    def __init__(self, lossless: _Optional[_Iterable[str]] = ..., lossy: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ..., max_payload_bytes: _Optional[int] = ..., checksum: _Optional[bool] = ..., connections: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_payload_bytes", "max_fragments", "max_tensor_elements", "max_rank", "max_values", "max_depth", "max_string_bytes", "max_meta_bytes", "max_decoded_bytes")
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_STRING_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_META_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_payload_bytes: int
    max_fragments: int
    max_tensor_elements: int
    max_rank: int
    max_values: int
    max_depth: int
    max_string_bytes: int
    max_meta_bytes: int
    max_decoded_bytes: int
    def __init__(self, max_payload_bytes: _Optional[int] = ..., max_fragments: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ..., max_rank: _Optional[int] = ..., max_values: _Optional[int] = ..., max_depth: _Optional[int] = ..., max_string_bytes: _Optional[int] = ..., max_meta_bytes: _Optional[int] = ..., max_decoded_bytes: _Optional[int] = ...) -> None: ...

class TailConfig(_message.Message):
    __slots__ = ("mode", "optimizer", "lora", "train_graphs", "fast_decode")
    MODE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    FAST_DECODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    optimizer: Value
    lora: Value
    train_graphs: bool
    fast_decode: bool
    def __init__(self, mode: _Optional[str] = ..., optimizer: _Optional[_Union[Value, _Mapping]] = ..., lora: _Optional[_Union[Value, _Mapping]] = ..., train_graphs: _Optional[bool] = ..., fast_decode: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "node_id", "capabilities", "compression", "session_id", "tail", "fingerprint", "join", "index", "extensions")
    class ExtensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    capabilities: Capabilities
    compression: CompressionPair
    session_id: str
    tail: TailConfig
    fingerprint: str
    join: str
    index: int
    extensions: _containers.MessageMap[str, Value]
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., compression: _Optional[_Union[CompressionPair, _Mapping]] = ..., session_id: _Optional[str] = ..., tail: _Optional[_Union[TailConfig, _Mapping]] = ..., fingerprint: _Optional[str] = ..., join: _Optional[str] = ..., index: _Optional[int] = ..., extensions: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "protocol_version", "chunk_size", "checksum", "compression", "limits", "resumed", "lossy_modes", "connections", "bond_token", "typed_bodies", "split", "fingerprint", "last_step", "restored", "trains", "joined", "extensions")
    class ExtensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    LOSSY_MODES_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    BOND_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TYPED_BODIES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    TRAINS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol_version: int
    chunk_size: int
    checksum: bool
    compression: CompressionPair
    limits: Limits
    resumed: bool
    lossy_modes: _containers.RepeatedScalarFieldContainer[str]
    connections: int
    bond_token: str
    typed_bodies: bool
    split: ResolvedSplit
    fingerprint: str
    last_step: int
    restored: bool
    trains: bool
    joined: int
    extensions: _containers.MessageMap[str, Value]
    def __init__(self, session_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., chunk_size: _Optional[int] = ..., checksum: _Optional[bool] = ..., compression: _Optional[_Union[CompressionPair, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., resumed: _Optional[bool] = ..., lossy_modes: _Optional[_Iterable[str]] = ..., connections: _Optional[int] = ..., bond_token: _Optional[str] = ..., typed_bodies: _Optional[bool] = ..., split: _Optional[_Union[ResolvedSplit, _Mapping]] = ..., fingerprint: _Optional[str] = ..., last_step: _Optional[int] = ..., restored: _Optional[bool] = ..., trains: _Optional[bool] = ..., joined: _Optional[int] = ..., extensions: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class ErrorBody(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class SplitSpec(_message.Message):
    __slots__ = ("cut", "shape", "end", "blocks", "tail", "causal_lm", "extra")
    CUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_LM_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    cut: int
    shape: str
    end: int
    blocks: str
    tail: _containers.RepeatedScalarFieldContainer[str]
    causal_lm: bool
    extra: Value
    def __init__(self, cut: _Optional[int] = ..., shape: _Optional[str] = ..., end: _Optional[int] = ..., blocks: _Optional[str] = ..., tail: _Optional[_Iterable[str]] = ..., causal_lm: _Optional[bool] = ..., extra: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ResolvedSplit(_message.Message):
    __slots__ = ("shape", "blocks", "cut", "end", "num_blocks", "tail", "causal_lm")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_LM_FIELD_NUMBER: _ClassVar[int]
    shape: str
    blocks: str
    cut: int
    end: int
    num_blocks: int
    tail: _containers.RepeatedScalarFieldContainer[str]
    causal_lm: bool
    def __init__(self, shape: _Optional[str] = ..., blocks: _Optional[str] = ..., cut: _Optional[int] = ..., end: _Optional[int] = ..., num_blocks: _Optional[int] = ..., tail: _Optional[_Iterable[str]] = ..., causal_lm: _Optional[bool] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("target", "dtype", "config_json")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    target: str
    dtype: str
    config_json: str
    def __init__(self, target: _Optional[str] = ..., dtype: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class SplitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitDescription(_message.Message):
    __slots__ = ("model", "split", "resolved", "fingerprint", "weights_sha256", "weights_bytes", "tail_modes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAIL_MODES_FIELD_NUMBER: _ClassVar[int]
    model: ModelDescription
    split: SplitSpec
    resolved: ResolvedSplit
    fingerprint: str
    weights_sha256: str
    weights_bytes: int
    tail_modes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelDescription, _Mapping]] = ..., split: _Optional[_Union[SplitSpec, _Mapping]] = ..., resolved: _Optional[_Union[ResolvedSplit, _Mapping]] = ..., fingerprint: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., tail_modes: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("weights", "sha256")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    weights: TensorMeta
    sha256: str
    def __init__(self, weights: _Optional[_Union[TensorMeta, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class CacheStep(_message.Message):
    __slots__ = ("past", "new", "crop", "reorder")
    PAST_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    REORDER_FIELD_NUMBER: _ClassVar[int]
    past: int
    new: int
    crop: bool
    reorder: TensorMeta
    def __init__(self, past: _Optional[int] = ..., new: _Optional[int] = ..., crop: _Optional[bool] = ..., reorder: _Optional[_Union[TensorMeta, _Mapping]] = ...) -> None: ...

class FusedCall(_message.Message):
    __slots__ = ("call", "weight")
    CALL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    call: int
    weight: Value
    def __init__(self, call: _Optional[int] = ..., weight: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class BlockArguments(_message.Message):
    __slots__ = ("attention_mask", "position_ids", "rotary", "cache_position", "kv_cache", "use_cache", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ROTARY_FIELD_NUMBER: _ClassVar[int]
    CACHE_POSITION_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    USE_CACHE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    attention_mask: Value
    position_ids: Value
    rotary: Value
    cache_position: Value
    kv_cache: bool
    use_cache: bool
    extra: _containers.MessageMap[str, Value]
    def __init__(self, attention_mask: _Optional[_Union[Value, _Mapping]] = ..., position_ids: _Optional[_Union[Value, _Mapping]] = ..., rotary: _Optional[_Union[Value, _Mapping]] = ..., cache_position: _Optional[_Union[Value, _Mapping]] = ..., kv_cache: _Optional[bool] = ..., use_cache: _Optional[bool] = ..., extra: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("hidden", "block", "grad_inputs", "training", "autocast", "result", "labels", "top_k", "logits_to_keep", "keep_last", "id", "input_grad", "fused", "cache")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LOGITS_TO_KEEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    hidden: TensorMeta
    block: BlockArguments
    grad_inputs: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    training: bool
    autocast: str
    result: str
    labels: TensorMeta
    top_k: int
    logits_to_keep: int
    keep_last: int
    id: int
    input_grad: bool
    fused: FusedCall
    cache: CacheStep
    def __init__(self, hidden: _Optional[_Union[TensorMeta, _Mapping]] = ..., block: _Optional[_Union[BlockArguments, _Mapping]] = ..., grad_inputs: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., training: _Optional[bool] = ..., autocast: _Optional[str] = ..., result: _Optional[str] = ..., labels: _Optional[_Union[TensorMeta, _Mapping]] = ..., top_k: _Optional[int] = ..., logits_to_keep: _Optional[int] = ..., keep_last: _Optional[int] = ..., id: _Optional[int] = ..., input_grad: _Optional[bool] = ..., fused: _Optional[_Union[FusedCall, _Mapping]] = ..., cache: _Optional[_Union[CacheStep, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("output", "hidden_states", "logits", "loss", "topk_scores", "topk_ids", "grad_input", "grad_extra")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOPK_SCORES_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_EXTRA_FIELD_NUMBER: _ClassVar[int]
    output: TensorMeta
    hidden_states: TensorMeta
    logits: TensorMeta
    loss: TensorMeta
    topk_scores: TensorMeta
    topk_ids: TensorMeta
    grad_input: TensorMeta
    grad_extra: Value
    def __init__(self, output: _Optional[_Union[TensorMeta, _Mapping]] = ..., hidden_states: _Optional[_Union[TensorMeta, _Mapping]] = ..., logits: _Optional[_Union[TensorMeta, _Mapping]] = ..., loss: _Optional[_Union[TensorMeta, _Mapping]] = ..., topk_scores: _Optional[_Union[TensorMeta, _Mapping]] = ..., topk_ids: _Optional[_Union[TensorMeta, _Mapping]] = ..., grad_input: _Optional[_Union[TensorMeta, _Mapping]] = ..., grad_extra: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ThenStep(_message.Message):
    __slots__ = ("step", "lr", "clip_coef")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    step: int
    lr: float
    clip_coef: float
    def __init__(self, step: _Optional[int] = ..., lr: _Optional[float] = ..., clip_coef: _Optional[float] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("id", "grads", "call", "scale", "then_step")
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TensorMeta
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TensorMeta, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    THEN_STEP_FIELD_NUMBER: _ClassVar[int]
    id: int
    grads: _containers.MessageMap[str, TensorMeta]
    call: int
    scale: Value
    then_step: ThenStep
    def __init__(self, id: _Optional[int] = ..., grads: _Optional[_Mapping[str, TensorMeta]] = ..., call: _Optional[int] = ..., scale: _Optional[_Union[Value, _Mapping]] = ..., then_step: _Optional[_Union[ThenStep, _Mapping]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_input", "grad_extra", "stepped")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_EXTRA_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    grad_input: TensorMeta
    grad_extra: Value
    stepped: bool
    def __init__(self, grad_input: _Optional[_Union[TensorMeta, _Mapping]] = ..., grad_extra: _Optional[_Union[Value, _Mapping]] = ..., stepped: _Optional[bool] = ...) -> None: ...

class OptimizerStepRequest(_message.Message):
    __slots__ = ("op", "lr", "clip_coef", "optimizer")
    OP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    op: str
    lr: float
    clip_coef: float
    optimizer: Value
    def __init__(self, op: _Optional[str] = ..., lr: _Optional[float] = ..., clip_coef: _Optional[float] = ..., optimizer: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class OptimizerStepReply(_message.Message):
    __slots__ = ("applied", "last_step", "sq_norm", "optimizer")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    last_step: int
    sq_norm: float
    optimizer: str
    def __init__(self, applied: _Optional[bool] = ..., last_step: _Optional[int] = ..., sq_norm: _Optional[float] = ..., optimizer: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("op", "tag")
    OP_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    op: str
    tag: str
    def __init__(self, op: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class StateReply(_message.Message):
    __slots__ = ("tag", "last_step", "deleted")
    TAG_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    tag: str
    last_step: int
    deleted: bool
    def __init__(self, tag: _Optional[str] = ..., last_step: _Optional[int] = ..., deleted: _Optional[bool] = ...) -> None: ...

class CacheRequest(_message.Message):
    __slots__ = ("op", "beam_idx", "held")
    OP_FIELD_NUMBER: _ClassVar[int]
    BEAM_IDX_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    op: str
    beam_idx: TensorMeta
    held: bool
    def __init__(self, op: _Optional[str] = ..., beam_idx: _Optional[_Union[TensorMeta, _Mapping]] = ..., held: _Optional[bool] = ...) -> None: ...

class CacheHeld(_message.Message):
    __slots__ = ("graphs", "kv_cache", "tail")
    GRAPHS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    graphs: int
    kv_cache: int
    tail: int
    def __init__(self, graphs: _Optional[int] = ..., kv_cache: _Optional[int] = ..., tail: _Optional[int] = ...) -> None: ...

class CacheReply(_message.Message):
    __slots__ = ("tokens", "bytes", "held")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    bytes: int
    held: CacheHeld
    def __init__(self, tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., held: _Optional[_Union[CacheHeld, _Mapping]] = ...) -> None: ...
