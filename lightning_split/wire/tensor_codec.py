"""Body codec: a nested Python value <-> (serialized ``pb.PayloadMeta``, tensor buffers).

The meta describes the structure (tuple/list/dict/scalars) and, per tensor, a ``TensorMeta``
whose ``offset``/``nbytes`` point into the *buffer region* that follows the meta in the data
part. Tensor bytes never go through protobuf. Buffers start at 64-byte aligned offsets (the
receiver aligns the region start too), so RAW tensors decode as zero-copy views.

Decoding never trusts the peer: a first pass over the meta checks every enum, rank, dim,
element count, byte count, offset, overlap, depth, node count and string length, and sums the
bytes the body will decode to; only then is anything allocated, decompressed or viewed.
No pickle, no ``torch.load``, no blosc2 ``unpack_tensor``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from google.protobuf.message import DecodeError

from lightning_split._proto import split_pb2 as pb

from . import typed_body
from .compression import (
    DTYPE_TO_PB,
    PB_TO_DTYPE,
    CompressionConfig,
    check_blosc2_header,
    check_blosc2_size,
    check_encoding,
    decode_tensor,
    encode_tensor,
    encoded_nbytes,
)
from .errors import exhausted, invalid
from .limits import WireLimits
from .markers import KV_CACHE, GradInputRef, KvCacheRef

__all__ = ["encode_body", "decode_body", "DTYPE_TO_PB", "PB_TO_DTYPE", "ALIGN"]

ALIGN = 64  # buffer alignment: a cache line, and enough for any dtype / SIMD load
_ZEROS = memoryview(bytes(ALIGN))
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DEFAULT_LIMITS = WireLimits()
_DEFAULT_COMPRESSION = CompressionConfig()


class _NodeCount:
    """The body's size and depth, counted node by node against the limits (both directions)."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.nodes = 0

    def count(self, depth: int, path: str = "") -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_values:
            raise exhausted(f"body has more than {self.limits.max_values} values")
        if depth > self.limits.max_depth:
            raise exhausted(f"body nesting deeper than {self.limits.max_depth}" + (f" at {path}" if path else ""))


class _Encoder(_NodeCount):
    def __init__(self, compression: CompressionConfig, limits: WireLimits, defer: bool) -> None:
        super().__init__(limits)
        self.cfg = compression
        self.defer = defer
        self.buffers: list[memoryview] = []  # each view keeps its staging tensor / bytes alive
        self.pending: list[Any] = []  # CUDA events of device->host copies still running
        self.offset = 0
        self.raw_bytes = 0

    def fill(self, v: pb.Value, x: Any, depth: int, path: str) -> None:
        self.count(depth, path)
        if isinstance(x, torch.Tensor):
            self.tensor(v.tensor, x)
        elif isinstance(x, KvCacheRef):
            v.marker.kv_cache = True
        elif isinstance(x, GradInputRef):
            if not 0 <= x.index < 2**32:
                raise invalid(f"grad-input marker index {x.index} at {path} is outside 0..2^32-1")
            v.marker.grad_input = x.index
        elif x is None:
            v.none = True
        elif isinstance(x, bool):  # before int: bool is an int subclass
            v.bool_value = x
        elif isinstance(x, int):
            if not _INT64_MIN <= x <= _INT64_MAX:
                raise invalid(f"int at {path} does not fit in 64 bits")
            v.int_value = x
        elif isinstance(x, float):
            v.float_value = x
        elif isinstance(x, str):
            try:
                n = len(x.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise invalid(f"str at {path} is not valid UTF-8: {e}") from e
            self.check_len(n, path)
            v.string_value = x
        elif isinstance(x, (bytes, bytearray, memoryview)):
            b = bytes(x)
            self.check_len(len(b), path)
            v.bytes_value = b
        elif isinstance(x, (tuple, list)):
            lst = v.tuple if isinstance(x, tuple) else v.list
            lst.SetInParent()  # an empty container must still be marked as set
            for i, item in enumerate(x):
                self.fill(lst.items.add(), item, depth + 1, f"{path}[{i}]")
        elif isinstance(x, dict):
            v.dict.SetInParent()
            for k, item in x.items():
                if not isinstance(k, str):
                    raise invalid(f"dict key {k!r} at {path} is not a str")
                self.check_len(len(k.encode("utf-8")), f"{path} key")
                v.dict.keys.append(k)
                self.fill(v.dict.values.add(), item, depth + 1, f"{path}[{k!r}]")
        else:
            raise invalid(f"cannot send a {type(x).__name__} at {path} (allowed: tensors, tuple, list, "
                          "dict with str keys, int, float, bool, str, bytes, None, markers)")

    def check_len(self, n: int, path: str) -> None:
        if n > self.limits.max_string_bytes:
            raise exhausted(f"string/bytes at {path} has {n} bytes > {self.limits.max_string_bytes}")

    def tensor(self, tm: pb.TensorMeta, t: torch.Tensor) -> None:
        et = encode_tensor(t, self.cfg, self.defer)
        if et.ready is not None:
            self.pending.append(et.ready)
        pad = -self.offset % ALIGN
        if pad:
            self.buffers.append(_ZEROS[:pad])
            self.offset += pad
        tm.dtype = DTYPE_TO_PB[et.dtype]
        tm.shape.extend(et.shape)
        tm.encoding = et.encoding
        tm.block_size = et.block_size
        tm.blosc2 = et.blosc2
        tm.offset = self.offset
        tm.nbytes = len(et.data)
        if len(et.data):
            self.buffers.append(et.data)
        self.offset += len(et.data)
        self.raw_bytes += et.raw_nbytes


def _encode(body: Any, compression: CompressionConfig | None, limits: WireLimits | None, defer: bool = False,
            case: str = typed_body.GENERIC) -> tuple[bytes, list[memoryview], int, list[Any]]:
    """(meta, buffers, raw bytes, pending): with ``defer``, the buffers of CUDA tensors may still be
    filling; ``pending`` holds the events to wait for before reading them. ``case``: the
    PayloadMeta.body message the body is written as (typed_body.body_case)."""
    enc = _Encoder(compression or _DEFAULT_COMPRESSION, limits or _DEFAULT_LIMITS, defer)
    if body is None:
        return b"", [], 0, []  # an empty PayloadMeta decodes to None: an empty body costs 0 bytes
    meta = pb.PayloadMeta()
    try:
        if case == typed_body.GENERIC:
            enc.fill(meta.value, body, 0, "body")
        else:
            typed_body.fill(enc, getattr(meta, case), body, 0, case)
    except RecursionError as e:  # pragma: no cover - only with a raised max_depth
        raise exhausted("body nested too deeply") from e
    except (ValueError, TypeError) as e:  # protobuf range/type errors
        raise invalid(f"cannot encode body: {e}") from e
    return meta.SerializeToString(deterministic=True), enc.buffers, enc.raw_bytes, enc.pending


def encode_body(body: Any, compression: CompressionConfig | None = None, *,
                limits: WireLimits | None = None, case: str = typed_body.GENERIC) -> tuple[bytes, list[memoryview]]:
    """Encode ``body`` into (serialized PayloadMeta, buffers).

    The buffers (memoryviews, some of them zero-copy views of CPU tensors; do not modify those
    tensors until the buffers are sent) laid back to back form the buffer region; each
    TensorMeta.offset is relative to its start. ``limits`` (default WireLimits()) is applied on the
    sending side too, so an over-deep or self-referencing body fails here and not at the peer.
    Raises WireError for anything not encodable.
    """
    meta, buffers, _, _ = _encode(body, compression, limits, case=case)
    return meta, buffers


class _Plan:
    """One checked tensor of a received body: its TensorMeta's fields, as read once by the validator."""

    __slots__ = ("dtype", "shape", "offset", "nbytes", "encoding", "block_size", "blosc2")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int, nbytes: int, encoding: int,
                 block_size: int, blosc2: bool) -> None:
        self.dtype, self.shape, self.offset, self.nbytes = dtype, shape, offset, nbytes
        self.encoding, self.block_size, self.blosc2 = encoding, block_size, blosc2


class _Validator(_NodeCount):
    """Pass 1: checks everything, allocates nothing but the plan list."""

    def __init__(self, limits: WireLimits, region: torch.Tensor, allowed: CompressionConfig | None) -> None:
        super().__init__(limits)
        self.allowed = allowed
        self.region_np = region.numpy()
        self.region_len = region.numel()
        self.decoded_bytes = 0
        self.alloc_bytes = 0  # what decoding allocates beyond the payload (RAW tensors are views)
        self.plans: list[_Plan] = []

    def walk(self, v: pb.Value, depth: int) -> None:
        self.count(depth)
        kind = v.WhichOneof("kind")
        if kind is None:
            raise invalid("Value.kind is not set")
        if kind == "tensor":
            self.tensor(v.tensor)
        elif kind in ("list", "tuple"):
            for item in getattr(v, kind).items:
                self.walk(item, depth + 1)
        elif kind == "dict":
            d = v.dict
            if len(d.keys) != len(d.values):
                raise invalid(f"ValueMap has {len(d.keys)} keys but {len(d.values)} values")
            for k in d.keys:
                self.string(k, "ValueMap.keys")
            if len(set(d.keys)) != len(d.keys):
                raise invalid("ValueMap.keys has duplicates")
            for item in d.values:
                self.walk(item, depth + 1)
        elif kind == "string_value":
            self.string(v.string_value, "Value.string_value")
        elif kind == "bytes_value":
            self.byte_string(v.bytes_value, "Value.bytes_value")
        elif kind == "marker" and v.marker.WhichOneof("kind") is None:
            raise invalid("Value.marker.kind is not set")

    def byte_string(self, b: bytes, field: str) -> None:
        if len(b) > self.limits.max_string_bytes:
            raise exhausted(f"{field} has {len(b)} bytes > {self.limits.max_string_bytes}")

    def string(self, s: str, field: str) -> None:
        limit = self.limits.max_string_bytes
        if len(s) > limit or (4 * len(s) > limit and len(s.encode("utf-8")) > limit):
            raise exhausted(f"{field} longer than {limit} bytes")

    def tensor(self, tm: pb.TensorMeta) -> None:
        lim = self.limits
        # Each field read once: a protobuf field read costs about what a check does, and this runs
        # for every tensor of every message (a decode step's request carries four).
        dtype = PB_TO_DTYPE.get(tm.dtype)
        if dtype is None:
            raise invalid(f"TensorMeta.dtype: unknown or disallowed value {tm.dtype}")
        encoding, block_size, blosc2, offset, nbytes = tm.encoding, tm.block_size, tm.blosc2, tm.offset, tm.nbytes
        check_encoding(encoding, dtype, block_size, blosc2, self.allowed)
        shape = tuple(tm.shape)
        if len(shape) > lim.max_rank:
            raise exhausted(f"TensorMeta.shape has rank {len(shape)} > {lim.max_rank}")
        numel = 1
        for d in shape:
            if d < 0:
                raise invalid(f"TensorMeta.shape has a negative dim {d}")
            numel *= d  # Python int: no overflow; bounded since each d < 2**63 and rank <= max_rank
        if numel > lim.max_tensor_elements:
            raise exhausted(f"tensor of {numel} elements > max_tensor_elements {lim.max_tensor_elements}")
        enc_bytes = encoded_nbytes(dtype, numel, encoding, block_size)
        if blosc2:
            check_blosc2_size(enc_bytes)
        elif nbytes != enc_bytes:
            raise invalid(f"TensorMeta.nbytes={nbytes}, but {dtype} {list(shape)} "
                          f"{pb.Encoding.Name(encoding)} needs {enc_bytes}")
        if offset > self.region_len or nbytes > self.region_len - offset:
            raise invalid(f"TensorMeta offset {offset} + nbytes {nbytes} outside the "
                          f"{self.region_len}-byte buffer region")
        if blosc2:  # header only (32 bytes): declared sizes must match before anything is allocated
            check_blosc2_header(self.region_np[offset : offset + nbytes].data, enc_bytes)
        self.decoded_bytes += numel * dtype.itemsize
        self.alloc_bytes += decode_alloc_bytes(dtype, numel, encoding, enc_bytes, blosc2, offset)
        if self.decoded_bytes > lim.max_decoded_bytes:
            raise exhausted(f"body decodes to more than max_decoded_bytes={lim.max_decoded_bytes}")
        self.plans.append(_Plan(dtype, shape, offset, nbytes, encoding, block_size, blosc2))

    def check_overlap(self) -> None:
        spans = sorted((p.offset, p.offset + p.nbytes) for p in self.plans if p.nbytes)
        end = 0
        for lo, hi in spans:
            if lo < end:
                raise invalid(f"tensor buffers overlap at offset {lo}")
            end = hi


def _build(v: pb.Value, tensors: list[torch.Tensor], pos: list[int]) -> Any:
    """Pass 2: rebuild Python values; tensors are taken in pass-1 order."""
    kind = v.WhichOneof("kind")
    if kind == "tensor":
        t = tensors[pos[0]]
        pos[0] += 1
        return t
    if kind == "list":
        return [_build(i, tensors, pos) for i in v.list.items]
    if kind == "tuple":
        return tuple(_build(i, tensors, pos) for i in v.tuple.items)
    if kind == "dict":
        return {k: _build(i, tensors, pos) for k, i in zip(v.dict.keys, v.dict.values, strict=True)}
    if kind == "none":
        return None
    if kind == "marker":
        return KV_CACHE if v.marker.WhichOneof("kind") == "kv_cache" else GradInputRef(v.marker.grad_input)
    return getattr(v, kind)  # int_value / float_value / bool_value / string_value / bytes_value


def _as_region(buffer: Any) -> torch.Tensor:
    """The buffer region as a 1-D uint8 CPU tensor; zero-copy for tensors and writable buffers."""
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.device.type != "cpu" \
                or not buffer.is_contiguous():
            raise TypeError("a tensor buffer region must be a contiguous 1-D uint8 CPU tensor")
        return buffer
    mv = memoryview(buffer).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8)
    if mv.readonly:  # torch would hand out writable tensors aliasing immutable bytes: copy instead
        return torch.frombuffer(bytearray(mv), dtype=torch.uint8)
    return torch.frombuffer(mv, dtype=torch.uint8)


def decode_alloc_bytes(dtype: torch.dtype, numel: int, encoding: int, enc_bytes: int, blosc2: bool,
                       offset: int) -> int:
    """Bytes decoding one tensor allocates: a blosc2 chunk's decompressed bytes, a lossy encoding's
    (or a bool's) rebuilt values, a copy of RAW bytes not aligned for their dtype; else none."""
    out = enc_bytes if blosc2 else 0
    if encoding != pb.RAW:
        out += numel * 4 + numel * dtype.itemsize  # the float32 (or half) stage, then the dtype
    elif dtype == torch.bool or (not blosc2 and offset % max(dtype.itemsize, 1)):
        out += numel * dtype.itemsize
    return out


# The dtypes whose RAW bytes numpy views directly (not bool: its bytes are normalised; not bf16: numpy has none)
_NUMPY_VIEWS = {dtype: torch.empty(0, dtype=dtype).numpy().dtype for dtype in (
    torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)}


def _decode(meta_bytes: bytes | memoryview, buffer: Any, limits: WireLimits | None,
            device: torch.device | str | None, allowed: CompressionConfig | None, nthreads: int,
            charge: Callable[[int], None] | None = None) -> tuple[Any, int, str | None]:
    """(body, decoded bytes, the PayloadMeta.body case it came as: None for an empty body)."""
    limits = limits or _DEFAULT_LIMITS
    if len(meta_bytes) > limits.max_meta_bytes:
        raise exhausted(f"PayloadMeta of {len(meta_bytes)} bytes > max_meta_bytes {limits.max_meta_bytes}")
    meta = pb.PayloadMeta()
    try:
        meta.ParseFromString(meta_bytes)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise invalid(f"PayloadMeta does not parse: {e}") from e
    case = meta.WhichOneof("body")
    if case is None:
        return None, 0, None
    root = getattr(meta, case)
    region = _as_region(buffer)
    val = _Validator(limits, region, allowed)
    try:
        if case == typed_body.GENERIC:
            val.walk(root, 0)
        else:
            typed_body.walk(val, root, 0)
    except RecursionError as e:  # pragma: no cover - protobuf's own nesting limit comes first
        raise exhausted("body nested too deeply") from e
    val.check_overlap()
    if charge is not None:  # the receiver's memory budget, asked before anything is allocated
        charge(val.alloc_bytes)
    dev = torch.device(device) if device is not None else None
    # Pinned payloads keep their own storage: PyTorch's pinned allocator tracks the asynchronous
    # copies out of a block through it (a numpy view would hide them from it). Only a process that
    # started CUDA has pinned memory, and asking any other would start it.
    pinned = torch.cuda.is_initialized() and region.is_pinned()
    numpy_views = (dev is None or dev.type == "cpu") and region.data_ptr() % ALIGN == 0 and not pinned
    tensors: list[torch.Tensor] = []
    for p in val.plans:
        np_dtype = _NUMPY_VIEWS.get(p.dtype)
        if (numpy_views and np_dtype is not None and p.offset % p.dtype.itemsize == 0 and p.encoding == pb.RAW
                and not p.blosc2):
            # A view of the payload as it came: numpy's slicing and views cost a tenth of torch's,
            # and a small message (a decode step's four tensors) is made of little else
            src = val.region_np[p.offset : p.offset + p.nbytes]
            tensors.append(torch.from_numpy(src.view(np_dtype).reshape(p.shape)))
            continue
        t = decode_tensor(region[p.offset : p.offset + p.nbytes], dtype=p.dtype, shape=p.shape, encoding=p.encoding,
                          block_size=p.block_size, use_blosc2=p.blosc2, device=dev, nthreads=nthreads)
        if dev is not None and t.device != dev:
            t = t.to(dev, non_blocking=True)  # async from pinned payloads; pageable ones are staged
        tensors.append(t)
    if case == typed_body.GENERIC:
        return _build(root, tensors, [0]), val.decoded_bytes, case
    return typed_body.build(root, tensors, [0], _build), val.decoded_bytes, case


def decode_body(meta_bytes: bytes | memoryview, buffer: Any, limits: WireLimits | None = None,
                device: torch.device | str | None = None, *, allowed: CompressionConfig | None = None,
                nthreads: int = 2) -> Any:
    """Decode a body from its serialized PayloadMeta and buffer region.

    ``buffer``: a 1-D uint8 CPU tensor, bytearray, writable memoryview (all zero-copy: RAW CPU
    tensors come back as views of it) or bytes (copied once, since tensors must not alias
    immutable memory). ``allowed``: if given, tensor encodings it does not accept are rejected.
    ``device``: tensors are moved there (lossy decoding happens on it). Raises WireError.
    """
    body, _, _ = _decode(meta_bytes, buffer, limits, device, allowed, nthreads)
    return body
