"""Receiving frames as raw bytes: framing.split_frame (field 7 cut out as a memoryview, the rest
parsed by protobuf) must agree with protobuf's own parse on every input, valid or hostile.

Frames of up to ``SMALL_FRAME_BYTES`` are parsed whole by protobuf; the tests here set it to 0 so
that the scanner meets every input, however small (``test_small_frames_are_parsed_whole`` keeps
the default)."""

from __future__ import annotations

import zlib

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelClient, ChannelConfig, client_tls, framing
from lightning_split.channel.framing import encode_frames, identity, passthrough, split_frame
from lightning_split.channel.server import EXCHANGE_METHOD
from lightning_split.wire import PROTOCOL_VERSION, Message, Reassembler, WireError, WireLimits
from tests.channel_util import EchoHandler, secure_channel

S = grpc.StatusCode


@pytest.fixture(autouse=True)
def scan_every_frame(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if "parsed_whole" not in request.node.name:
        monkeypatch.setattr(framing, "SMALL_FRAME_BYTES", 0)


def header(**kw: object) -> pb.Header:
    fields = dict(protocol_version=PROTOCOL_VERSION, type=pb.FORWARD, node_id="alice", session_id="s" * 32, step=3,
                  sequence=9)
    fields.update(kw)
    return pb.Header(**fields)


def sample_frame(data: bytes = b"hello world", **kw: object) -> pb.Frame:
    fields = dict(header=header(), fragment_index=0, fragment_count=1, payload_bytes=len(data),
                  meta_bytes=0, crc32=zlib.crc32(data), data=data)
    fields.update(kw)
    return pb.Frame(**fields)


def protobuf_view(raw: bytes) -> tuple[pb.Frame, bytes] | None:
    """What protobuf makes of ``raw``: (frame without data, data), or None if it refuses it."""
    try:
        f = pb.Frame.FromString(raw)
    except Exception:
        return None
    data = f.data
    f.ClearField("data")
    return f, data


def split_view(raw: bytes) -> tuple[pb.Frame, bytes] | None:
    try:
        f, data = split_frame(raw)
    except WireError as e:
        assert e.code == S.INVALID_ARGUMENT and "malformed Frame" in str(e)
        return None
    assert not f.data
    return f, bytes(data)


def agree(raw: bytes) -> tuple[pb.Frame, bytes] | None:
    want, got = protobuf_view(raw), split_view(raw)
    assert (want is None) == (got is None), raw[:80]
    if want is not None:
        assert got is not None
        assert want[0] == got[0] and want[1] == got[1]
        assert want[0].SerializeToString(deterministic=True) == got[0].SerializeToString(deterministic=True)
    return got


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 300])
def test_round_trip_is_zero_copy(data: bytes) -> None:
    raw = sample_frame(data).SerializeToString()
    frame, got = split_frame(raw)
    assert bytes(got) == data and frame == sample_frame(b"", payload_bytes=len(data), crc32=zlib.crc32(data))
    if data:
        assert isinstance(got, memoryview) and got.obj is raw  # a slice of the received bytes


def test_small_frames_are_parsed_whole() -> None:
    """A decode step's frame (a few hundred bytes) costs less copied by protobuf than scanned; a
    large one's data is still a slice of the received bytes."""
    for data in (b"x", bytes(range(256)) * 60):
        raw = sample_frame(data).SerializeToString()
        assert len(raw) <= framing.SMALL_FRAME_BYTES
        frame, got = split_frame(raw)
        assert got == data and frame == sample_frame(b"", payload_bytes=len(data), crc32=zlib.crc32(data))
    raw = sample_frame(bytes(range(256)) * 100).SerializeToString()
    frame, got = split_frame(raw)
    assert isinstance(got, memoryview) and got.obj is raw


def test_encoded_frames_split_back() -> None:
    msg = Message(type=pb.FORWARD, body={"x": torch.randn(40_000)}, session_id="s", node_id="alice")
    r = Reassembler(WireLimits())
    raws = list(encode_frames(msg, None, 16_384, True))
    assert len(raws) >= 3
    out = [r.add(*split_frame(raw)) for raw in raws]
    assert all(o is None for o in out[:-1])
    assert torch.equal(out[-1].body["x"], msg.body["x"])
    for raw in raws:
        agree(raw)


def test_data_not_last_and_unusual_encodings() -> None:
    f = sample_frame(b"abcdef")
    data_rec = b"\x3a\x06abcdef"
    rest = sample_frame(b"").SerializeToString()
    # field 7 first / in the middle: the other fields are still found
    assert agree(data_rec + rest) is not None
    h = len(header().SerializeToString()) + 2  # the header record
    assert agree(rest[:h] + data_rec + rest[h:]) is not None
    assert agree(rest[:5] + data_rec + rest[5:]) is None  # inside the header: malformed
    # field 7 twice: protobuf's last-one-wins applies
    got = agree(rest + b"\x3a\x03xyz" + data_rec)
    assert got is not None and got[1] == b"abcdef"
    # field 7 with the wrong wire type (an unknown field for protobuf) and an unknown group
    assert agree(rest + b"\x38\x05") is not None
    assert agree(rest + b"\x43\x08\x01\x44") is not None  # group 8 holding field 1 = 1
    assert agree(f.SerializeToString() + b"\x98\x06\x01") is not None  # unknown varint field 99


HOSTILE = [
    b"\xff", b"\x3a", b"\x3a\x80", b"\x3a\x05ab",  # truncated tag, length, data
    b"\x3a" + b"\xff" * 11 + b"\x01",  # over-long varint length
    b"\x3a\xff\xff\xff\xff\x0f" + b"x" * 10,  # length of 4 GiB
    b"\x00\x01",  # field number 0
    b"\x0f",  # wire type 7
    b"\x0b\x3a\x01x",  # unterminated group
    b"\x0c",  # end-group without a start
    b"\x0a\x02\x1a\xff",  # header.node_id: bad UTF-8 and truncated
    b"\x0a\x03\x1a\x01\xff" + b"\x3a\x01x",  # header.node_id: invalid UTF-8
    b"\x0a\x05\x1a\x03abc\x3a\x01x",  # header length too long for its contents
    b"\x31" + b"\x00" * 7,  # fixed64 truncated
    b"\x35\x00\x00",  # fixed32 (crc32) truncated
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_bytes(raw: bytes) -> None:
    agree(raw)


def test_mutations_of_a_valid_frame() -> None:
    raw = sample_frame(bytes(range(200))).SerializeToString()
    for cut in range(len(raw)):
        agree(raw[:cut])
    for i in range(len(raw)):
        for v in (0x00, 0x3A, 0x7F, 0x80, 0xFF):
            agree(raw[:i] + bytes([v]) + raw[i + 1 :])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    agree(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=40), st.integers(0, 80))
def test_random_splices(data: bytes, junk: bytes, at: int) -> None:
    raw = sample_frame(data).SerializeToString()
    agree(raw[:at] + junk + raw[at:])


def test_split_frame_rejects_non_bytes() -> None:
    with pytest.raises(WireError):
        split_frame(bytearray(b"\x08\x01"))  # type: ignore[arg-type]


def test_reassembler_data_given_separately() -> None:
    payload = bytes(range(256)) * 40
    msg = Message(type=pb.FORWARD, body="some text", session_id="s", node_id="a")
    raws = list(encode_frames(msg, None, 1024, True))
    parsed = [split_frame(r) for r in raws]
    # frame.data and separate data must not both be given
    f, d = parsed[0]
    f2 = pb.Frame()
    f2.CopyFrom(f)
    f2.data = bytes(d)
    with pytest.raises(ValueError):
        Reassembler().add(f2, d)
    # a CRC mismatch is caught on separately given data too
    bad = sample_frame(payload, crc32=zlib.crc32(payload) ^ 1)
    frame, data = split_frame(bad.SerializeToString())
    r = Reassembler()
    with pytest.raises(WireError) as ei:
        r.add(frame, data)
    assert ei.value.code == S.DATA_LOSS and not r.in_progress
    # overflow of payload_bytes through separate data
    frame, data = split_frame(sample_frame(payload, payload_bytes=10).SerializeToString())
    with pytest.raises(WireError) as ei:
        Reassembler(checksum=True).add(frame, data)
    assert ei.value.code == S.INVALID_ARGUMENT


# -- through a live server ----------------------------------------------------------------------
def test_server_rejects_malformed_bytes_and_keeps_serving(start_server, pki) -> None:
    server = start_server(EchoHandler())
    for garbage in (b"\x3a\x80", b"\x0a\x03\x1a\x01\xff", b"\xff" * 64):
        channel = secure_channel(server.port, client_tls(pki, "alice"))
        call = channel.stream_stream(EXCHANGE_METHOD, request_serializer=passthrough,
                                     response_deserializer=identity)(iter([garbage]), timeout=20)
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == S.INVALID_ARGUMENT, ei.value
        assert "malformed Frame" in (ei.value.details() or "")
        channel.close()
    with ChannelClient(f"127.0.0.1:{server.port}", "bob", tls=client_tls(pki, "bob"),
                       config=ChannelConfig(chunk_size=64 * 1024)) as bob:
        x = torch.randn(3, 50_000)
        assert torch.equal(bob.request(pb.FORWARD, {"x": x}).body["x"], x)
