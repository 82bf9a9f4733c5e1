"""Body codec: round trips, structure preservation, and hostile PayloadMeta / buffer inputs."""

from __future__ import annotations

import math
import time

import blosc2
import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, WireError, WireLimits, decode_body, encode_body

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def rand_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def roundtrip(body, compression=None, limits=None, buffer_type=bytearray, **kw):
    meta, buffers = encode_body(body, compression)
    region = b"".join(bytes(b) for b in buffers)
    return decode_body(meta, buffer_type(region), limits, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor (exact comparison, NaN-safe, bf16-safe)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t.to(torch.uint8)


def assert_same(a, b) -> None:
    """Exact equality including container types, dtype, shape and bit patterns."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert not b.requires_grad
        assert torch.equal(bits(a), bits(b))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 3), (2, 3, 4, 5)])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    t = rand_tensor(dtype, shape)
    out = roundtrip({"t": t})
    assert_same({"t": t}, out)


def test_bf16_bits_exact_including_specials():
    t = torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3.0e38]).bfloat16()
    out = roundtrip(t)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("make", [
    lambda x: x.t(),
    lambda x: x[:, ::2],
    lambda x: x[1:, 1:],
    lambda x: x[:1].expand(5, 6),
    lambda x: x.unsqueeze(0).transpose(0, 2),
])
def test_non_contiguous(make):
    x = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    t = make(x)
    assert not t.is_contiguous() or t.stride() != x.stride()
    out = roundtrip([t])
    assert out[0].is_contiguous()
    assert torch.equal(out[0], t)


def test_requires_grad_dropped_and_parameter_ok():
    p = torch.nn.Parameter(torch.randn(3, 3))
    out = roundtrip((p, p * 2))
    assert type(out[0]) is torch.Tensor and not out[0].requires_grad
    assert torch.equal(out[0], p.detach()) and torch.equal(out[1], (p * 2).detach())


def test_sparse_tensor_sent_dense():
    s = torch.eye(4).to_sparse()
    assert torch.equal(roundtrip(s), torch.eye(4))


def test_nested_structure_preserved():
    body = {
        "z": (1, [2, (3,)], ()),
        "a": [],
        "m": {"inner": {"k": None}, "": True},
        "ints": [0, -1, 2**63 - 1, -(2**63), True, False],
        "floats": [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e-300],
        "s": "héllo ✓ \x00 end",
        "b": b"\x00\xffbytes",
        "empty": ("", b"", {}, [], ()),
        "t": (torch.ones(2), [torch.zeros(3, dtype=torch.int64)]),
    }
    out = roundtrip(body)
    assert_same(body, out)
    assert list(out) == ["z", "a", "m", "ints", "floats", "s", "b", "empty", "t"]


@pytest.mark.parametrize("body", [None, 0, 1.0, True, "x", b"y", (), [], {}, torch.tensor(1.0)])
def test_top_level_scalars_and_empty(body):
    assert_same(body, roundtrip(body))


def test_none_body_is_empty():
    meta, buffers = encode_body(None)
    assert meta == b"" and buffers == []
    assert decode_body(b"", b"") is None


def test_raw_tensors_are_zero_copy_views_of_the_buffer():
    t = torch.randn(1000)
    meta, buffers = encode_body([t, torch.randn(17), t.double()])
    region = torch.frombuffer(bytearray(b"".join(bytes(b) for b in buffers)), dtype=torch.uint8)
    out = decode_body(meta, region)
    lo, hi = region.data_ptr(), region.data_ptr() + len(region)
    for x in out:
        assert lo <= x.data_ptr() < hi
        assert x.data_ptr() % x.element_size() == 0
    assert torch.equal(out[0], t)


def test_buffer_types_accepted():
    t = torch.randn(100)
    meta, buffers = encode_body({"t": t})
    region = b"".join(bytes(b) for b in buffers)
    for buf in (region, bytearray(region), memoryview(bytearray(region)),
                torch.frombuffer(bytearray(region), dtype=torch.uint8)):
        assert torch.equal(decode_body(meta, buf)["t"], t)
    # a bytes region is copied: decoded tensors never alias immutable memory
    out = decode_body(meta, region)["t"]
    out.add_(1)
    assert torch.equal(decode_body(meta, region)["t"], t)


def test_misaligned_region_still_decodes():
    t = torch.randn(64, dtype=torch.float64)
    meta, buffers = encode_body([t])
    raw = bytearray(1) + bytearray(b"".join(bytes(b) for b in buffers))
    out = decode_body(meta, memoryview(raw)[1:])
    assert torch.equal(out[0], t)


def test_device_argument_cpu():
    out = roundtrip({"t": torch.randn(4)}, device="cpu")
    assert out["t"].device.type == "cpu"


def test_offsets_are_aligned():
    meta, _ = encode_body([torch.randn(3), torch.randn(5), torch.ones(1, dtype=torch.int8), torch.randn(2)])
    m = pb.PayloadMeta.FromString(meta)
    offsets = [v.tensor.offset for v in m.value.list.items]
    assert all(o % 64 == 0 for o in offsets)


# ----------------------------------------------------------------------------- sender errors


@pytest.mark.parametrize("bad", [
    torch.zeros(2, dtype=torch.complex64),
    torch.zeros(2, dtype=torch.uint16),
    {1: "non-str key"},
    {"x": {1, 2}},
    object(),
    [2**63],
    -(2**63) - 1,
    "\ud800",  # lone surrogate: not UTF-8 encodable
    torch.empty(2, device="meta"),
])
def test_encode_rejects_unsupported(bad):
    with pytest.raises(WireError) as ei:
        encode_body(bad)
    assert ei.value.code == INVALID


def test_encode_rejects_deep_and_cyclic_bodies():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(WireError) as ei:
        encode_body(deep)
    assert ei.value.code == EXHAUSTED
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(WireError):
        encode_body(cyc)


# ----------------------------------------------------------------------------- hostile input


def tensor_meta_bytes(**fields) -> bytes:
    shape = fields.pop("shape", [4])
    m = pb.PayloadMeta()
    tm = m.value.tensor
    tm.dtype = fields.pop("dtype", pb.FLOAT32)
    tm.shape.extend(shape)
    for k, v in fields.items():
        setattr(tm, k, v)
    return m.SerializeToString()


def expect(code, meta, buffer=b"", limits=None, match=None, **kw):
    with pytest.raises(WireError, match=match) as ei:
        decode_body(meta, bytearray(buffer), limits, **kw)
    assert ei.value.code == code, ei.value
    return ei.value


def test_hostile_nbytes_mismatch():
    expect(INVALID, tensor_meta_bytes(shape=[4], nbytes=17), bytes(64), match="nbytes")
    expect(INVALID, tensor_meta_bytes(shape=[4], nbytes=15), bytes(64), match="nbytes")
    # right nbytes but the buffer region is too short
    expect(INVALID, tensor_meta_bytes(shape=[4], nbytes=16), bytes(8), match="outside")


@pytest.mark.parametrize("dtype", [0, 11, 99, 2**31 - 1])
def test_hostile_unknown_dtype(dtype):
    expect(INVALID, tensor_meta_bytes(dtype=dtype, nbytes=16), bytes(16), match="dtype")


@pytest.mark.parametrize("encoding", [5, 77])
def test_hostile_unknown_encoding(encoding):
    """Values past the last Encoding (FP8_BLOCK = 4) are refused before anything is read."""
    expect(INVALID, tensor_meta_bytes(encoding=encoding, nbytes=16), bytes(16), match="encoding")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62, 2**62, 2**62, 2**62], [2**31 + 1],
                                   [2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1, 2**63 - 1]])
def test_hostile_enormous_shape_fails_fast(shape, monkeypatch):
    def no_alloc(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("allocated for a hostile shape")

    monkeypatch.setattr(torch, "empty", no_alloc)
    t0 = time.perf_counter()
    expect(EXHAUSTED, tensor_meta_bytes(shape=shape, nbytes=16), bytes(16), match="elements")
    assert time.perf_counter() - t0 < 0.5


def test_hostile_negative_dim_and_rank():
    expect(INVALID, tensor_meta_bytes(shape=[-1, 4], nbytes=0), match="negative")
    expect(INVALID, tensor_meta_bytes(shape=[2, -2], nbytes=16), bytes(16), match="negative")
    expect(EXHAUSTED, tensor_meta_bytes(shape=[1] * 100, nbytes=4), bytes(4), match="rank")
    assert decode_body(tensor_meta_bytes(shape=[1] * 8, nbytes=4), bytearray(4)).shape == (1,) * 8


def test_hostile_offsets():
    expect(INVALID, tensor_meta_bytes(shape=[4], nbytes=16, offset=64), bytes(64), match="outside")
    expect(INVALID, tensor_meta_bytes(shape=[4], nbytes=16, offset=2**64 - 1), bytes(64), match="outside")
    expect(INVALID, tensor_meta_bytes(shape=[0], nbytes=0, offset=65), bytes(64), match="outside")
    # two tensors sharing bytes
    m = pb.PayloadMeta()
    for off in (0, 8):
        tm = m.value.list.items.add().tensor
        tm.dtype, tm.offset, tm.nbytes = pb.FLOAT32, off, 16
        tm.shape.append(4)
    expect(INVALID, m.SerializeToString(), bytes(64), match="overlap")


def test_hostile_encoding_dtype_combinations():
    expect(INVALID, tensor_meta_bytes(dtype=pb.INT32, encoding=pb.CAST_BF16, nbytes=8), bytes(8),
           match="floating")
    expect(INVALID, tensor_meta_bytes(encoding=pb.INT8_BLOCK, block_size=0, nbytes=4), bytes(8),
           match="block_size")
    # INT8_BLOCK with a huge block size is fine (no padding allocation): 1 scale + 4 values
    out = decode_body(tensor_meta_bytes(encoding=pb.INT8_BLOCK, block_size=2**32 - 1, nbytes=8),
                      bytearray(np.array([1.0], np.float32).tobytes() + bytes([1, 2, 255, 0])))
    assert out.tolist() == [1.0, 2.0, -1.0, 0.0]


def blosc_meta(shape, chunk: bytes, dtype=pb.FLOAT32, encoding=pb.RAW) -> bytes:
    return tensor_meta_bytes(shape=shape, dtype=dtype, encoding=encoding, blosc2=True, nbytes=len(chunk))


def test_hostile_blosc2_size_mismatch():
    x = np.arange(1000, dtype=np.float32)
    chunk = blosc2.compress2(x, typesize=4)
    assert torch.equal(decode_body(blosc_meta([1000], chunk), bytearray(chunk)), torch.from_numpy(x))
    # header claims 4000 bytes, meta says shape [2000] (8000 bytes) or [10]
    expect(INVALID, blosc_meta([2000], chunk), chunk, match="declares 4000")
    expect(INVALID, blosc_meta([10], chunk), chunk, match="declares 4000")
    # header cbytes != bytes on the wire (trailing garbage)
    padded = chunk + b"\0" * 8
    expect(INVALID, blosc_meta([1000], padded), padded, match="compressed bytes")
    # shorter than a header
    expect(INVALID, blosc_meta([1000], b"\x05" * 20), b"\x05" * 20, match="shorter")


def test_hostile_blosc2_corrupt_chunk():
    x = (np.arange(100000) % 977).astype(np.int64)
    chunk = bytearray(blosc2.compress2(x, typesize=8, codec=blosc2.Codec.LZ4))
    rng = np.random.default_rng(0)
    for _ in range(5):
        bad = bytes(chunk[:32]) + rng.integers(0, 256, len(chunk) - 32, dtype=np.uint8).tobytes()
        expect(INVALID, blosc_meta([100000], bad, dtype=pb.INT64), bad, match="blosc2")
    garbage = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    expect(INVALID, blosc_meta([100000], garbage, dtype=pb.INT64), garbage, match="blosc2")


def test_hostile_blosc2_disallowed_filter_and_uninit_special():
    x = np.linspace(0, 1, 1000, dtype=np.float32)
    lossy = blosc2.compress2(x, typesize=4, filters=[blosc2.Filter.TRUNC_PREC], filters_meta=[8])
    expect(INVALID, blosc_meta([1000], lossy), lossy, match="filter")
    zeros = bytearray(blosc2.compress2(np.zeros(1000, np.float32), typesize=4))
    assert len(zeros) == 32 and (zeros[31] >> 4) & 7 == 1  # a 'special zeros' chunk
    assert torch.equal(decode_body(blosc_meta([1000], bytes(zeros)), zeros.copy()), torch.zeros(1000))
    zeros[31] = (zeros[31] & 0x8F) | (4 << 4)  # BLOSC2_SPECIAL_UNINIT
    expect(INVALID, blosc_meta([1000], bytes(zeros)), zeros, match="uninitialized")


def test_hostile_zip_bomb_limited_by_decoded_bytes():
    chunk = blosc2.compress2(np.zeros(1 << 20, np.float32), typesize=4)  # 4 MiB of zeros in 32 bytes
    m = pb.PayloadMeta()
    for _ in range(10):
        tm = m.value.list.items.add().tensor
        tm.dtype, tm.blosc2, tm.nbytes, tm.offset = pb.FLOAT32, True, len(chunk), 0
        tm.shape.append(1 << 20)
    lim = WireLimits(max_decoded_bytes=16 << 20)
    # (the overlap check would also catch reuse; give each its own copy)
    for i, item in enumerate(m.value.list.items):
        item.tensor.offset = 64 * i
    region = b"".join(chunk + bytes(64 - len(chunk)) for _ in range(10))
    expect(EXHAUSTED, m.SerializeToString(), region, lim, match="max_decoded_bytes")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_hostile_structure_limits():
    deep = pb.PayloadMeta()
    v = deep.value
    for _ in range(40):
        v = v.list.items.add()
    v.none = True
    expect(EXHAUSTED, deep.SerializeToString(), match="nesting")
    # much deeper than protobuf's own recursion limit: a parse error, still a WireError
    value = b""
    for _ in range(300):
        items = b"\x0a" + varint(len(value)) + value  # ValueList.items
        value = b"\x12" + varint(len(items)) + items  # Value.list
    with pytest.raises(WireError):
        decode_body(b"\x0a" + varint(len(value)) + value, b"")

    many = pb.PayloadMeta()
    for i in range(101):
        many.value.list.items.add().int_value = i
    expect(EXHAUSTED, many.SerializeToString(), limits=WireLimits(max_values=100), match="values")
    assert len(decode_body(many.SerializeToString(), b"", WireLimits(max_values=102))) == 101

    s = pb.PayloadMeta()
    s.value.string_value = "x" * 11
    expect(EXHAUSTED, s.SerializeToString(), limits=WireLimits(max_string_bytes=10))
    s.value.string_value = "é" * 6  # 12 UTF-8 bytes in 6 characters
    expect(EXHAUSTED, s.SerializeToString(), limits=WireLimits(max_string_bytes=10))
    b = pb.PayloadMeta()
    b.value.bytes_value = b"x" * 11
    expect(EXHAUSTED, b.SerializeToString(), limits=WireLimits(max_string_bytes=10))
    expect(EXHAUSTED, b.SerializeToString(), limits=WireLimits(max_meta_bytes=10), match="max_meta_bytes")


def test_hostile_malformed_values():
    expect(INVALID, b"\xff\xff\xff", match="parse")
    unset = pb.PayloadMeta()
    unset.value.list.items.add()  # a Value with no kind
    expect(INVALID, unset.SerializeToString(), match="kind")
    d = pb.PayloadMeta()
    d.value.dict.keys.extend(["a", "b"])
    d.value.dict.values.add().none = True
    expect(INVALID, d.SerializeToString(), match="keys")
    d.value.dict.values.add().none = True
    d.value.dict.keys[1] = "a"
    expect(INVALID, d.SerializeToString(), match="duplicates")


def test_receiver_allowed_encodings():
    t = torch.randn(4096)
    meta, bufs = encode_body(t, CompressionConfig(lossy="bf16", lossless="blosc2", codec="ZSTD", min_bytes=0))
    region = bytearray(b"".join(bytes(b) for b in bufs))
    with pytest.raises(WireError, match="not accepted"):
        decode_body(meta, region, allowed=CompressionConfig())
    with pytest.raises(WireError, match="not accepted"):
        decode_body(meta, region, allowed=CompressionConfig(lossy="bf16"))
    out = decode_body(meta, region, allowed=CompressionConfig(lossy="bf16", lossless="blosc2"))
    assert torch.equal(out, t.bfloat16().float())


# ----------------------------------------------------------------------------- property-based

_dtypes = st.sampled_from(ALL_DTYPES)
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def _tensors(draw):
    return rand_tensor(draw(_dtypes), draw(_shapes), seed=draw(st.integers(0, 2**16)))


_leaves = st.one_of(
    _tensors(), st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
)
_bodies = st.recursive(
    _leaves,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.lists(kids, max_size=4).map(tuple),
                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, lossless=st.booleans())
def test_property_codec_roundtrip(body, lossless):
    cfg = CompressionConfig(lossless="blosc2" if lossless else "none", min_bytes=0)
    assert_same(body, roundtrip(body, cfg))


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), region=st.binary(max_size=64))
def test_property_garbage_meta_never_crashes(data, region):
    try:
        decode_body(data, bytearray(region))
    except WireError:
        pass
