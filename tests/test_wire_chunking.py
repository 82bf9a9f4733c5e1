"""Fragmenting messages into Frames and reassembling them, including hostile fragment streams."""

from __future__ import annotations

import zlib

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import (
    PROTOCOL_VERSION,
    CompressionConfig,
    Message,
    MessageType,
    Reassembler,
    WireError,
    WireLimits,
    encode_message,
    message_to_frames,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MANY_FRAGMENTS = WireLimits(max_fragments=1 << 20)  # property tests use chunk sizes down to 1 byte
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def make_msg(body=None, **kw) -> Message:
    fields = dict(type=MessageType.FORWARD, session_id="sess-1", step=7, sequence=3, code=0,
                  node_id="client-a")
    fields.update(kw)
    return Message(body=body, **fields)


def body_of(n: int = 5000):
    return {"x": torch.randn(n), "ids": torch.arange(n // 10), "meta": ("tag", 1, None)}


def frames_of(msg: Message, chunk_size: int = 4096, checksum: bool = True, cfg=None) -> list[pb.Frame]:
    return list(message_to_frames(msg, cfg or CompressionConfig(), chunk_size=chunk_size, checksum=checksum))


def feed(frames, r: Reassembler | None = None):
    r = r or Reassembler(WireLimits())
    out = [r.add(f) for f in frames]
    assert all(o is None for o in out[:-1])
    return out[-1]


def with_crc(f: pb.Frame) -> pb.Frame:
    f.crc32 = zlib.crc32(f.data)
    return f


def expect_error(frames, code=INVALID, match=None, r=None) -> WireError:
    r = r or Reassembler(WireLimits())
    with pytest.raises(WireError, match=match) as ei:
        for f in frames:
            r.add(f)
    assert ei.value.code == code, ei.value
    assert not r.in_progress  # a failed message is dropped
    return ei.value


# ----------------------------------------------------------------------------- happy paths


def test_roundtrip_header_and_body():
    msg = make_msg(body_of())
    frames = frames_of(msg)
    assert len(frames) > 1
    for i, f in enumerate(frames):
        assert f.fragment_index == i and f.fragment_count == len(frames)
        assert len(f.data) <= 4096 and f.crc32 == zlib.crc32(f.data)
        assert f.header.session_id == "sess-1" and f.header.type == MessageType.FORWARD
        assert f.header.protocol_version == PROTOCOL_VERSION
    assert sum(len(f.data) for f in frames) == frames[0].payload_bytes
    out = feed(frames)
    assert (out.type, out.session_id, out.step, out.sequence, out.code, out.node_id) == (
        MessageType.FORWARD, "sess-1", 7, 3, 0, "client-a")
    assert torch.equal(out.body["x"], msg.body["x"]) and torch.equal(out.body["ids"], msg.body["ids"])
    assert out.body["meta"] == ("tag", 1, None)
    assert out.wire_bytes == frames[0].payload_bytes
    assert out.raw_bytes == msg.body["x"].nbytes + msg.body["ids"].nbytes


def test_sender_statistics():
    msg = make_msg(body_of(20000))
    cfg = CompressionConfig(lossy="bf16")
    it = message_to_frames(msg, cfg, chunk_size=1000)
    enc = encode_message(msg, cfg, chunk_size=1000)
    assert it.raw_bytes == enc.raw_bytes == 20000 * 4 + 2000 * 8
    assert it.wire_bytes == enc.wire_bytes == enc.payload_bytes < it.raw_bytes
    frames = list(it)
    assert len(frames) == it.fragment_count == len(it)
    out = feed(frames, Reassembler(WireLimits(), compression_allowed=cfg))
    assert out.wire_bytes == it.wire_bytes and out.raw_bytes == it.raw_bytes
    # frames() can be called again (e.g. to resend) and yields the same bytes
    assert [f.SerializeToString() for f in enc.frames()] == [f.SerializeToString() for f in enc.frames()]


def test_empty_body_is_one_frame():
    for body in (None,):
        frames = frames_of(make_msg(body, type=MessageType.CLOSE))
        assert len(frames) == 1 and frames[0].payload_bytes == 0 and frames[0].data == b""
        out = feed(frames)
        assert out.body is None and out.type == MessageType.CLOSE and out.wire_bytes == 0
    frames = frames_of(make_msg({}))
    assert len(frames) == 1 and feed(frames).body == {}


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 63, 64, 65, 4096, 1 << 20])
def test_chunk_sizes_and_boundaries(chunk_size):
    msg = make_msg([torch.arange(37, dtype=torch.int16), b"xyz", torch.ones(3, 3)])
    frames = frames_of(msg, chunk_size=chunk_size)
    payload = frames[0].payload_bytes
    assert len(frames) == -(-payload // chunk_size)
    assert all(len(f.data) == chunk_size for f in frames[:-1]) and 0 < len(frames[-1].data) <= chunk_size
    out = feed(frames)
    assert torch.equal(out.body[0], msg.body[0]) and out.body[1] == b"xyz"


@pytest.mark.parametrize("stripes,n_floats,fragments", [(4, 100_000, 4), (4, 1_000_000, 4), (4, 10_000, 1),
                                                        (4, 600_000, 4), (1, 1_000_000, 4), (4, 3_000_000, 12)])
def test_a_message_is_cut_into_stripes_for_a_bond(stripes: int, n_floats: int, fragments: int):
    """Over K bonded connections a message goes as at least K fragments (of 64 KiB or more, 1 MiB at
    most), so that it rides on every connection; it decodes the same."""
    from lightning_split.wire.chunking import MIN_STRIPE_BYTES

    msg = make_msg({"x": torch.randn(n_floats)})
    frames = list(encode_message(msg, CompressionConfig(), chunk_size=1 << 20, stripes=stripes).frames())
    assert len(frames) == fragments
    assert all(MIN_STRIPE_BYTES <= len(f.data) <= 1 << 20 for f in frames[:-1])
    assert torch.equal(feed(frames).body["x"], msg.body["x"])


def test_checksum_off():
    frames = frames_of(make_msg(body_of()), checksum=False)
    assert all(f.crc32 == 0 for f in frames)
    assert feed(frames, Reassembler(WireLimits(), checksum=False)).body["meta"] == ("tag", 1, None)
    expect_error(frames, grpc.StatusCode.DATA_LOSS, "corrupt")  # the two sides must agree


def test_consecutive_messages_and_recovery_after_error():
    r = Reassembler(WireLimits())
    a, b = frames_of(make_msg(body_of(), sequence=1)), frames_of(make_msg(body_of(), sequence=2))
    assert feed(a, r).sequence == 1 and feed(b, r).sequence == 2
    expect_error(a[1:], match="no message", r=r)
    assert feed(a, r).sequence == 1  # the stream can go on after a rejected message


def test_received_tensors_are_aligned_views():
    frames = frames_of(make_msg([torch.randn(1000), torch.randn(3).double()]), chunk_size=333)
    out = feed(frames)
    assert all(t.data_ptr() % 64 == 0 for t in out.body)


def test_payload_buffer_reused_only_when_no_tensor_refers_to_it():
    r = Reassembler(WireLimits())
    x = torch.randn(1 << 16)

    def send(v: torch.Tensor) -> torch.Tensor:
        return feed(frames_of(make_msg({"x": v, "y": v[:10].clone()}), chunk_size=1 << 14), r).body["x"]

    a = send(x)
    b = send(x * 2)  # `a` is alive: its buffer must not be overwritten
    assert torch.equal(a, x) and torch.equal(b, x * 2)
    y = b[5:7]  # a view of a view keeps the buffer busy too
    del b
    c = send(x * 3)
    assert torch.equal(y, (x * 2)[5:7]) and torch.equal(c, x * 3) and torch.equal(a, x)
    ptr = c.data_ptr()
    del c
    d = send(x * 4)
    assert torch.equal(d, x * 4)
    if hasattr(torch._C, "_storage_Use_Count"):
        assert d.data_ptr() == ptr  # idle buffer reused: no fresh pages to fault in


def test_large_tensor_with_compression():
    x = torch.randn(1 << 18)
    x[::2] = 0
    for cfg in (CompressionConfig(lossless="blosc2"), CompressionConfig(lossless="blosc2", lossy="int8")):
        it = message_to_frames(make_msg({"x": x}), cfg, chunk_size=1 << 16)
        out = feed(list(it), Reassembler(WireLimits(), compression_allowed=cfg))
        assert it.wire_bytes < x.nbytes * 0.8
        assert out.raw_bytes == x.nbytes
        assert (out.body["x"] - x).abs().max().item() <= x.abs().max().item() / 254 + 1e-6


# ----------------------------------------------------------------------------- hostile fragment streams


def test_out_of_order_and_shuffled():
    frames = frames_of(make_msg(body_of()))
    expect_error([frames[0], frames[2], frames[1]], match="out of order")
    expect_error(list(reversed(frames)), match="no message")


def test_gap_missing_and_short():
    frames = frames_of(make_msg(body_of()))
    expect_error(frames[:2] + frames[3:], match="out of order, or a gap")
    # last fragment never arrives; the next message starts
    expect_error(frames[:-1] + frames_of(make_msg(body_of())), match="new message started")
    # last fragment arrives but shorter: payload short
    short = pb.Frame()
    short.CopyFrom(frames[-1])
    short.data = short.data[:-1]
    expect_error(frames[:-1] + [with_crc(short)], match="short")


def test_duplicate():
    frames = frames_of(make_msg(body_of()))
    expect_error([frames[0], frames[1], frames[1]], match="duplicate")


def test_overflow():
    frames = frames_of(make_msg(body_of()))
    big = pb.Frame()
    big.CopyFrom(frames[1])
    big.data = big.data + b"\0" * big.payload_bytes
    expect_error([frames[0], with_crc(big)], match="overflows")


@pytest.mark.parametrize("where", [0, 1, -1])
def test_corrupted_fragment_detected(where):
    frames = frames_of(make_msg(body_of()))
    bad = pb.Frame()
    bad.CopyFrom(frames[where])
    data = bytearray(bad.data)
    data[len(data) // 2] ^= 0x01
    bad.data = bytes(data)
    frames[where] = bad
    expect_error(frames, grpc.StatusCode.DATA_LOSS, "corrupt fragment", Reassembler(MANY_FRAGMENTS))


@pytest.mark.parametrize("field,value", [("session_id", "other"), ("step", 8), ("sequence", 4), ("type", 5),
                                         ("node_id", "mallory"), ("code", 13)])
def test_header_mismatch_between_fragments(field, value):
    frames = frames_of(make_msg(body_of()))
    setattr(frames[2].header, field, value)
    expect_error(frames, match="header differs")


@pytest.mark.parametrize("field,value", [("fragment_count", 99), ("payload_bytes", 10**6), ("meta_bytes", 1)])
def test_size_fields_mismatch_between_fragments(field, value):
    frames = frames_of(make_msg(body_of()))
    setattr(frames[1], field, value)
    expect_error(frames, match="differ from fragment 0")


def test_limits_on_first_fragment_before_allocation(monkeypatch):
    lim = WireLimits(max_payload_bytes=1000, max_fragments=8)

    def first(**kw) -> pb.Frame:
        f = pb.Frame(header=pb.Header(protocol_version=PROTOCOL_VERSION, type=MessageType.FORWARD), fragment_index=0,
                     fragment_count=1, payload_bytes=10, meta_bytes=0, data=b"")
        for k, v in kw.items():
            if k == "header":
                f.header.CopyFrom(v)
            else:
                setattr(f, k, v)
        return with_crc(f)

    real_empty = torch.empty

    def guarded_empty(*a, **k):
        if a and isinstance(a[0], int):
            assert a[0] <= 2000, "allocated before checking limits"
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    r = Reassembler(lim)
    expect_error([first(payload_bytes=1001)], EXHAUSTED, "max_payload_bytes", r)
    expect_error([first(payload_bytes=2**64 - 1)], EXHAUSTED, "max_payload_bytes", r)
    expect_error([first(fragment_count=9, payload_bytes=100)], EXHAUSTED, "max_fragments", r)
    expect_error([first(fragment_count=0)], INVALID, "fragment_count", r)
    expect_error([first(fragment_count=5, payload_bytes=3)], INVALID, "fragment_count", r)
    expect_error([first(meta_bytes=11)], INVALID, "meta_bytes", r)
    expect_error([first(header=pb.Header(protocol_version=PROTOCOL_VERSION, type=0))], INVALID, "Header.type", r)
    expect_error([first(header=pb.Header(protocol_version=PROTOCOL_VERSION, type=42))], INVALID, "Header.type", r)
    newer = pb.Header(protocol_version=PROTOCOL_VERSION + 1, type=4)
    expect_error([first(header=newer)], grpc.StatusCode.FAILED_PRECONDITION, "protocol version", r)


def test_fragment_flood_over_max_fragments():
    msg = make_msg(torch.randn(1000))
    frames = frames_of(msg, chunk_size=16)  # 250+ fragments
    expect_error(frames, EXHAUSTED, "max_fragments", Reassembler(WireLimits(max_fragments=100)))
    assert feed(frames, Reassembler(WireLimits(max_fragments=1000))).body.shape == (1000,)


def test_payload_over_limit():
    frames = frames_of(make_msg(torch.randn(10000)))
    expect_error(frames, EXHAUSTED, "max_payload_bytes", Reassembler(WireLimits(max_payload_bytes=30000)))


def test_body_errors_surface_from_reassembler():
    msg = make_msg(torch.randn(100, 100))
    expect_error(frames_of(msg), EXHAUSTED, "elements", Reassembler(WireLimits(max_tensor_elements=9999)))
    cfg = CompressionConfig(lossy="int8")
    expect_error(frames_of(msg, cfg=cfg), INVALID, "not accepted",
                 Reassembler(WireLimits(), compression_allowed=CompressionConfig()))


def test_sender_rejects_bad_header_fields():
    with pytest.raises(WireError, match="Header.type"):
        message_to_frames(Message(type=0), CompressionConfig())
    with pytest.raises(WireError, match="out of range"):
        message_to_frames(make_msg(step=-1), CompressionConfig())
    with pytest.raises(ValueError):
        message_to_frames(make_msg(), CompressionConfig(), chunk_size=0)


# ----------------------------------------------------------------------------- property-based

_bodies = st.recursive(
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=30), st.binary(max_size=300),
              st.integers(0, 3000).map(lambda n: torch.arange(n, dtype=torch.float32))),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.text(max_size=5), kids, max_size=4)),
    max_leaves=8,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=120, deadline=None)
@given(body=_bodies, chunk_size=st.integers(1, 5000), lossless=st.booleans())
def test_property_reassembly_roundtrip(body, chunk_size, lossless):
    cfg = CompressionConfig(lossless="blosc2" if lossless else "none", min_bytes=64)
    it = message_to_frames(make_msg(body), cfg, chunk_size=chunk_size)
    frames = list(it)
    assert all(len(f.data) <= chunk_size for f in frames)
    out = feed(frames, Reassembler(MANY_FRAGMENTS))
    assert _same(body, out.body)
    assert out.wire_bytes == it.wire_bytes and out.raw_bytes == it.raw_bytes


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 2000), chunk_size=st.integers(1, 3000), data=st.data())
def test_property_single_byte_corruption_always_detected(n, chunk_size, data):
    msg = make_msg({"x": torch.arange(n, dtype=torch.float32), "s": "abc"})
    frames = frames_of(msg, chunk_size=chunk_size)
    i = data.draw(st.integers(0, len(frames) - 1))
    f = frames[i]
    assert len(f.data) > 0
    pos = data.draw(st.integers(0, len(f.data) - 1))
    flip = data.draw(st.integers(1, 255))
    corrupted = bytearray(f.data)
    corrupted[pos] ^= flip
    f.data = bytes(corrupted)
    expect_error(frames, grpc.StatusCode.DATA_LOSS, "corrupt fragment", Reassembler(MANY_FRAGMENTS))
