"""Hostile peers: hand-made frames on a raw mTLS stream. Each one gets a clear gRPC status, and the
same server then serves well-formed requests (and keeps the sessions it had)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import blosc2
import grpc
import numpy as np
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelClient, ChannelConfig, client_tls
from lightning_split.channel.handshake import build_hello
from lightning_split.wire import (
    PROTOCOL_VERSION,
    CompressionConfig,
    Message,
    WireLimits,
    message_to_frames,
)
from tests.channel_util import EchoHandler, RawStream, open_raw, secure_channel, wait_for

CHUNK = 64 * 1024
LIMITS = WireLimits(max_fragments=16, max_payload_bytes=1 << 20)
# int8 is not allowed here: a client that sends it anyway is refused (the others may switch modes).
SERVER_CFG = ChannelConfig(chunk_size=CHUNK, limits=LIMITS, handshake_timeout_s=2.0, checksum=True,
                           client_to_server=CompressionConfig(), allow_lossy=("none", "bf16", "fp16"))
BLOSC = CompressionConfig(lossless="blosc2")
S = grpc.StatusCode


def frame(meta: bytes, buffers: bytes = b"", *, sid: str, node: str = "alice", seq: int = 2,
          type: int = pb.FORWARD, index: int = 0, count: int = 1, payload_bytes: int | None = None,
          crc: int | None = None, version: int = PROTOCOL_VERSION) -> pb.Frame:
    data = meta + buffers
    return pb.Frame(
        header=pb.Header(protocol_version=version, type=type, node_id=node, session_id=sid, sequence=seq),
        fragment_index=index, fragment_count=count,
        payload_bytes=len(data) if payload_bytes is None else payload_bytes, meta_bytes=len(meta),
        crc32=zlib.crc32(data) if crc is None else crc, data=data)


def tensor_meta(**fields: object) -> bytes:
    return pb.PayloadMeta(value=pb.Value(tensor=pb.TensorMeta(**fields))).SerializeToString()


def valid_frames(sid: str, body: object, chunk: int = CHUNK, comp: CompressionConfig | None = None,
                 seq: int = 2) -> list[pb.Frame]:
    msg = Message(type=pb.FORWARD, body=body, session_id=sid, node_id="alice", sequence=seq)
    return list(message_to_frames(msg, comp, chunk_size=chunk))


def blosc_chunk(n: int = 20000) -> bytes:
    return blosc2.compress2(np.arange(n, dtype=np.float32).tobytes(), typesize=4, codec=blosc2.Codec.LZ4,
                            filters=[blosc2.Filter.BITSHUFFLE], filters_meta=[0])


def _corrupt_body(c: bytes) -> bytes:
    rng = np.random.default_rng(0)
    return c[:32] + rng.integers(0, 256, len(c) - 32, dtype=np.uint8).tobytes()


def _lying_header(c: bytes) -> bytes:
    b = bytearray(c)
    b[4:8] = (10**6).to_bytes(4, "little")  # declared decompressed size: not what the meta implies
    return bytes(b)


# Each case: (frames to send after a good handshake, expected status, a word of the message).
Case = Callable[[str], list[pb.Frame]]
CASES: dict[str, tuple[Case, S, str]] = {
    "payload_larger_than_data": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[4], nbytes=16), bytes(16), sid=sid,
                           payload_bytes=200)], S.INVALID_ARGUMENT, "payload"),
    "unknown_dtype": (
        lambda sid: [frame(tensor_meta(dtype=77, shape=[4], nbytes=16), bytes(16), sid=sid)],
        S.INVALID_ARGUMENT, "dtype"),
    "enormous_shape": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[2**31, 2**31, 2**31], nbytes=16),
                           bytes(16), sid=sid)], S.RESOURCE_EXHAUSTED, "elements"),
    "nbytes_lie": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[1000], nbytes=16), bytes(16), sid=sid)],
        S.INVALID_ARGUMENT, "nbytes"),
    "corrupt_blosc2_body": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[20000], blosc2=True,
                                       nbytes=len(blosc_chunk())), _corrupt_body(blosc_chunk()), sid=sid)],
        S.INVALID_ARGUMENT, "blosc2"),
    "lying_blosc2_header": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[20000], blosc2=True,
                                       nbytes=len(blosc_chunk())), _lying_header(blosc_chunk()), sid=sid)],
        S.INVALID_ARGUMENT, "blosc2"),
    "fragment_flood": (
        lambda sid: [frame(b"", bytes(100), sid=sid, index=i, count=10_000, payload_bytes=10_000 * 100)
                     for i in range(50)], S.RESOURCE_EXHAUSTED, "fragment"),
    "payload_over_limit": (
        lambda sid: [frame(b"", bytes(100), sid=sid, count=2, payload_bytes=1 << 40)],
        S.RESOURCE_EXHAUSTED, "max_payload_bytes"),
    "garbage_meta": (lambda sid: [frame(b"\xff" * 40, sid=sid)], S.INVALID_ARGUMENT, "PayloadMeta"),
    "wrong_fragment_order": (
        lambda sid: (lambda f: [f[0], f[2], f[1], f[3]])(
            valid_frames(sid, torch.zeros(40_000), chunk=40_000)),
        S.INVALID_ARGUMENT, "fragment"),
    "starts_mid_message": (
        lambda sid: valid_frames(sid, torch.zeros(40_000), chunk=40_000)[1:], S.INVALID_ARGUMENT, "fragment"),
    "crc_mismatch": (
        lambda sid: [frame(tensor_meta(dtype=pb.FLOAT32, shape=[4], nbytes=16), bytes(16), sid=sid, crc=1)],
        S.DATA_LOSS, "CRC"),
    "node_id_not_the_certificate": (
        lambda sid: [frame(b"", sid=sid, node="bob")], S.PERMISSION_DENIED, "authenticated"),
    "compression_not_allowed": (
        lambda sid: valid_frames(sid, torch.randn(10_000), comp=CompressionConfig(lossy="int8")),
        S.INVALID_ARGUMENT, "not accepted"),
    "other_session_on_bound_stream": (
        lambda sid: [frame(b"", sid="ab" * 16)], S.INVALID_ARGUMENT, "one session"),
    "second_handshake": (
        lambda sid: [frame(b"", sid=sid, type=pb.HANDSHAKE)], S.FAILED_PRECONDITION, "already"),
    "unknown_message_type": (lambda sid: [frame(b"", sid=sid, type=99)], S.INVALID_ARGUMENT, "type"),
    "protocol_version": (lambda sid: [frame(b"", sid=sid, version=7)], S.FAILED_PRECONDITION, "version"),
    "frame_over_grpc_max_message": (
        lambda sid: [frame(b"", bytes(CHUNK + 128 * 1024), sid=sid)], S.RESOURCE_EXHAUSTED, ""),
}


@pytest.fixture
def server(start_server):
    handler = EchoHandler()
    srv = start_server(handler, config=SERVER_CFG)
    srv.handler_under_test = handler
    return srv


def assert_still_serves(server, pki, alice_sid: str | None = None) -> None:
    with ChannelClient(f"127.0.0.1:{server.port}", "bob", tls=client_tls(pki, "bob"),
                       config=ChannelConfig(chunk_size=CHUNK)) as bob:
        x = torch.randn(3, 50_000)  # 600 kB: ten fragments
        assert torch.equal(bob.request(pb.FORWARD, {"x": x}).body["x"], x)
    if alice_sid is not None:  # the broken stream's session is still there, usable by its owner
        assert alice_sid in server.sessions
        alice = ChannelClient(f"127.0.0.1:{server.port}", "alice", tls=client_tls(pki, "alice"),
                              config=ChannelConfig(chunk_size=CHUNK))
        alice.session_id = alice_sid
        try:
            assert alice.request(pb.FORWARD, "resumed").body == "resumed"
        finally:
            alice.close()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_frames_after_handshake(server, pki, name: str) -> None:
    make, code, word = CASES[name]
    raw = open_raw(server.port, pki)
    # The session is granted blosc2 (so corrupt chunks reach the decompressor), nothing lossy.
    sid = raw.handshake(config=ChannelConfig(chunk_size=CHUNK, client_to_server=BLOSC))["session_id"]
    raw.send(*make(sid))
    got, details = raw.finish()
    raw.close()
    assert got == code, (got, details)
    assert details and word.lower() in details.lower(), details
    assert_still_serves(server, pki, sid)


def test_first_message_must_be_handshake(server, pki) -> None:
    raw = open_raw(server.port, pki)
    raw.send(frame(b"", sid=""))
    got, details = raw.finish()
    raw.close()
    assert got == S.FAILED_PRECONDITION and "HANDSHAKE" in details
    assert len(server.sessions) == 0
    assert_still_serves(server, pki)


@pytest.mark.parametrize("hello", [
    None, [1, 2], {"protocol_version": PROTOCOL_VERSION, "capabilities": "x"},
    {"protocol_version": PROTOCOL_VERSION, "capabilities": {"chunk_size": 10}},
    {"protocol_version": PROTOCOL_VERSION, "compression": {"client_to_server": {"codec": "EVIL"}}},
])
def test_malformed_hello(server, pki, hello) -> None:
    raw = open_raw(server.port, pki)
    raw.send_any(Message(type=pb.HANDSHAKE, body=hello, node_id="alice"))
    got, details = raw.finish()
    raw.close()
    assert got in (S.INVALID_ARGUMENT, S.FAILED_PRECONDITION), (got, details)
    assert "HANDSHAKE" in details or "version" in details
    assert len(server.sessions) == 0
    assert_still_serves(server, pki)


def test_hello_for_another_node(server, pki) -> None:
    raw = open_raw(server.port, pki)
    raw.send_message(Message(type=pb.HANDSHAKE, body=build_hello(ChannelConfig(), "bob"), node_id="alice"))
    got, details = raw.finish()
    raw.close()
    assert got == S.PERMISSION_DENIED and "certificate" in details


def test_silent_client_is_dropped_after_handshake_timeout(server, pki) -> None:
    raw = RawStream(secure_channel(server.port, client_tls(pki, "alice")))  # never says anything
    raw._reader.join(timeout=10)
    assert raw.code == S.DEADLINE_EXCEEDED and "no HANDSHAKE" in raw.details
    raw.close()
    assert_still_serves(server, pki)


def test_server_survives_many_bad_streams(server, pki) -> None:
    for name in ("garbage_meta", "crc_mismatch", "fragment_flood") * 2:
        raw = open_raw(server.port, pki)
        sid = raw.handshake()["session_id"]
        raw.send(*CASES[name][0](sid))
        raw.finish()
        raw.close()
    assert_still_serves(server, pki)
    assert len(server.sessions) == 6  # one per bad stream: sessions outlive their streams


@pytest.mark.parametrize("then", ["partial_message", "answered_request", "more_fragments", "long_reply"])
def test_half_closed_bond_that_never_joins_ends_at_once(start_server, pki, then: str) -> None:
    """A client granted a bond of two connections sends on its first one only, then half-closes:
    the next fragment is due on connection 1, which never joins. The stream ends at once, or
    after bond.JOIN_GRACE_S when more fragments (or a reply) wait for that join, with UNAVAILABLE;
    not after the join timeout (here 30 s, the default handshake timeout), and it does not keep a
    worker (fuzz cases 60906 and 5156: they hung until that timeout)."""
    server = start_server(EchoHandler(), config=SERVER_CFG.replace(handshake_timeout_s=30.0, max_connections=4))
    raw = open_raw(server.port, pki, "alice")
    # long_reply: replies in 4 KiB fragments, so an echo's fragment 1 is due on connection 1
    chunk = 4096 if then == "long_reply" else CHUNK
    welcome = raw.handshake("alice", ChannelConfig(chunk_size=chunk, connections=2))
    assert welcome["connections"] == 2
    sid = welcome["session_id"]
    frames = valid_frames(sid, torch.zeros(40_000), chunk=40_000)  # four fragments
    if then == "partial_message":
        raw.send(frames[0])  # fragment 0 of the bonded stream; the message is unfinished
    elif then == "more_fragments":  # fragment 1 belongs on connection 1; it came on connection 0
        raw.send(frames[0], frames[1])
    elif then == "long_reply":  # one 40 kB fragment in, ten 4 KiB fragments out
        raw.send(*valid_frames(sid, torch.zeros(10_000), chunk=CHUNK))
    else:
        raw.send_message(Message(type=pb.FORWARD, body="hi", session_id=sid, node_id="alice", sequence=2))
        assert raw.reply().body == "hi"  # answered on connection 0: fragment 0 each way
    t0 = time.monotonic()
    code, details = raw.finish(timeout=20)
    took = time.monotonic() - t0
    raw.close()
    assert code == S.UNAVAILABLE and "never joined" in details, (code, details)
    assert took < 5.0, f"the stream ended {took:.1f} s after the half-close"
    assert wait_for(lambda: not server.streams.counts())  # its worker is free
    assert sid in server.sessions  # the session outlives the stream
    assert_still_serves(server, pki)
