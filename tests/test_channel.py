"""The secured channel end to end: real gRPC servers on loopback, real certificates."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import (
    ChannelClient,
    ChannelConfig,
    ChannelServer,
    RemoteError,
    TLSFiles,
    TransportStats,
    client_tls,
    make_certs,
    server_tls,
)
from lightning_split.channel.certs import make_client_cert
from lightning_split.channel.framing import encode_frames, fragment_plan
from lightning_split.channel.handshake import build_hello
from lightning_split.wire import PROTOCOL_VERSION, CompressionConfig, Message, WireLimits, message_to_frames
from tests.channel_util import EchoHandler, RawStream, open_raw, sample_body, secure_channel, wait_for

FORWARD, STATE = pb.FORWARD, pb.STATE


def assert_same(a: Any, b: Any, atol: float = 0.0) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        if atol:
            torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=0)
        else:
            assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, atol)
    else:
        assert a == b and type(a) is type(b)


MODES = {
    "none": (CompressionConfig(), 0.0),
    "blosc2": (CompressionConfig(lossless="blosc2"), 0.0),
    "bf16": (CompressionConfig(lossy="bf16"), 0.05),
    "fp16": (CompressionConfig(lossy="fp16"), 0.01),
    "int8+blosc2": (CompressionConfig(lossy="int8", lossless="blosc2"), 0.05),
    "fp8": (CompressionConfig(lossy="fp8"), 0.3),  # 2**-4 of |x| <= ~4.5 (randn)
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk_size", [16 * 1024, 1 << 20])
def test_round_trip_each_compression(start_server, connect, mode: str, chunk_size: int) -> None:
    comp, atol = MODES[mode]
    server = start_server(EchoHandler(), config=ChannelConfig(chunk_size=chunk_size))
    cfg = ChannelConfig(chunk_size=chunk_size, client_to_server=comp, server_to_client=comp)
    client = connect(server.port, config=cfg)
    assert client.welcome["compression"]["client_to_server"]["lossy"] == comp.lossy
    body = sample_body()
    reply = client.request(FORWARD, body, step=7)
    assert reply.type == pb.RESULT and reply.step == 7
    # Lossy modes only touch floating tensors of >= min_bytes: ids, mask, small ones stay exact.
    assert_same(body, reply.body, atol)
    assert_same(body["ids"], reply.body["ids"])
    stats = client.stats
    raw = 4 * 64 * 1024 + 8 * 1000 + 300 + 2 * 8 * 16
    assert stats.raw_bytes_sent == raw and stats.raw_bytes_received == raw
    if mode == "none":
        assert stats.bytes_sent >= raw
    else:
        assert stats.bytes_sent < raw
    assert stats.messages == 2 and stats.last_rtt_s > 0  # handshake + request


@pytest.mark.parametrize("body", [None, "x", sample_body()])
@pytest.mark.parametrize("chunk_size", [4096, 100_000, 1 << 20])
@pytest.mark.parametrize("checksum", [True, False])
def test_hand_serialized_frames_equal_protobuf(body: Any, chunk_size: int, checksum: bool) -> None:
    msg = Message(type=FORWARD, body=body, session_id="s" * 32, step=3, sequence=9, node_id="alice")
    comp = CompressionConfig(lossy="bf16")  # deterministic (blosc2 output is not, across runs)
    frames = encode_frames(msg, comp, chunk_size, checksum)
    assert chunk_size // 2 < frames.fragment_size <= chunk_size + 32 * 1024 or frames.fragment_count == 1
    ours = list(frames)
    assert len(ours) == frames.fragment_count
    ref = message_to_frames(msg, comp, chunk_size=frames.fragment_size, checksum=checksum)
    assert ours == [f.SerializeToString() for f in ref]  # byte for byte what protobuf would write


@pytest.mark.parametrize(("payload", "chunk", "plan"), [
    (0, 1 << 20, (1, 1)), (100, 1 << 20, (100, 1)), ((1 << 20) + 60, 1 << 20, ((1 << 20) + 60, 1)),
    ((16 << 20) + 80, 1 << 20, ((1 << 20) + 5, 16)), ((1 << 20) + (40 << 10), 1 << 20, (544768, 2)),
])
def test_fragment_plan_avoids_stragglers(payload: int, chunk: int, plan: tuple[int, int]) -> None:
    assert fragment_plan(payload, chunk) == plan


@pytest.mark.parametrize(("client_crc", "server_crc", "agreed"),
                         [(None, None, False), (True, None, True), (None, True, True), (False, False, False)])
def test_checksum_negotiation(start_server, connect, client_crc, server_crc, agreed) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(checksum=server_crc, chunk_size=64 * 1024))
    client = connect(server.port, config=ChannelConfig(checksum=client_crc, chunk_size=64 * 1024))
    assert client.welcome["checksum"] is agreed  # under TLS the default (None) means off
    x = torch.randn(100_000)
    assert torch.equal(client.request(FORWARD, x).body, x)


def test_many_fragments_and_stats_deltas(start_server, connect) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(chunk_size=64 * 1024))
    client = connect(server.port, config=ChannelConfig(chunk_size=1 << 20))
    assert client.welcome["chunk_size"] == 64 * 1024  # the smaller of the two
    x = torch.randn(3, 1000, 700)  # 8.4 MB: ~130 fragments each way
    before = client.stats.snapshot()
    out = client.request(FORWARD, {"x": x}).body["x"]
    assert torch.equal(out, x)
    delta = client.stats - before
    assert isinstance(delta, TransportStats)
    assert delta.messages == 1 and delta.raw_bytes_sent == x.numel() * 4
    assert delta.bytes_received >= x.numel() * 4
    old = client.stats.reset()
    assert old.messages == 2 and client.stats.messages == 0 and old.mean_rtt_s > 0


def test_handshake_negotiation_and_extras(start_server, connect) -> None:
    handler = EchoHandler()
    server_cfg = ChannelConfig(allow_lossless=("none",), allow_lossy=("none", "bf16"), chunk_size=256 * 1024)
    server = start_server(handler, config=server_cfg)
    cfg = ChannelConfig(client_to_server=CompressionConfig(lossless="blosc2", lossy="int8"),
                        server_to_client=CompressionConfig(lossy="bf16", nthreads=200, level=9))
    client = connect(server.port, config=cfg, hello_extra={"tail": {"mode": "lora"}})
    w = client.welcome
    assert w["protocol_version"] == PROTOCOL_VERSION and len(w["session_id"]) == 32 and w["resumed"] is False
    assert w["chunk_size"] == 256 * 1024
    assert w["compression"]["client_to_server"]["lossless"] == "none"  # not allowed by the server
    assert w["compression"]["client_to_server"]["lossy"] == "none"
    assert w["compression"]["server_to_client"]["lossy"] == "bf16"
    assert w["compression"]["server_to_client"]["nthreads"] <= 16  # clamped by the server
    assert w["limits"]["max_payload_bytes"] == WireLimits().max_payload_bytes
    assert w["echo"] is True and w["greeting"] == "hello alice"
    assert handler.hellos[0]["tail"] == {"mode": "lora"}
    assert handler.hellos[0]["node_id"] == "alice"
    # What the server granted is what the client now sends: a request still round-trips.
    x = torch.randn(64, 64)
    torch.testing.assert_close(client.request(FORWARD, x).body, x, atol=0.05, rtol=0)
    # The handler may refuse a client in open_session.
    with pytest.raises(RemoteError) as e:
        connect(server.port, "bob", hello_extra={"refuse": True})
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "refuses" in e.value.message
    assert len(server.sessions) == 1


def test_unsupported_protocol_version_is_failed_precondition(start_server, pki) -> None:
    server = start_server(EchoHandler())
    raw = open_raw(server.port, pki)
    hello = build_hello(ChannelConfig(), "alice")
    hello["protocol_version"] = 99
    raw.send_message(Message(type=pb.HANDSHAKE, body=hello, node_id="alice"))
    code, details = raw.finish()
    raw.close()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "99" in details


def test_session_isolation(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler)
    alice = connect(server.port, "alice")
    alice.request(FORWARD, {"x": 1})
    # bob names alice's session: on a fresh stream (a "reconnect") and in a resuming handshake.
    bob = connect(server.port, "bob", handshake=False)
    bob.session_id = alice.session_id
    with pytest.raises(RemoteError) as e:
        bob.request(STATE, {"count": True})
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(RemoteError) as e:
        bob.connect()
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    # Alice's state was never touched by bob.
    assert alice.request(STATE, {"count": True}).body == {"count": 2, "node": "alice"}
    # An unknown id is NOT_FOUND.
    bob.session_id = "00" * 16
    with pytest.raises(RemoteError) as e:
        bob.request(STATE, {})
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_max_sessions(start_server, connect) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(max_sessions=2))
    a, _ = connect(server.port, "alice"), connect(server.port, "bob")
    with pytest.raises(RemoteError) as e:
        connect(server.port, "client")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    a.close()  # CLOSE frees a slot
    c = connect(server.port, "client")
    assert c.request(FORWARD, 5).body == 5


def test_idle_sessions_expire(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler, config=ChannelConfig(session_ttl_s=0.3))
    client = connect(server.port)
    sid = client.session_id
    assert client.request(FORWARD, {"sleep": 0.5}).body == {"sleep": 0.5}  # busy != idle
    assert wait_for(lambda: sid in handler.closed, timeout=5)
    assert len(server.sessions) == 0
    with pytest.raises(RemoteError) as e:
        client.request(FORWARD, 1)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_session_whose_streams_ended_without_close_is_freed_after_its_grace(start_server, pki) -> None:
    """A crashed client (its stream cut, no CLOSE) holds its session only for the grace period, not
    the TTL: then the handler frees it and its node's budget is given back; a stream that resumes
    it within the grace keeps it."""
    handler = EchoHandler()
    server = start_server(handler, config=ChannelConfig(session_ttl_s=600, session_orphan_grace_s=0.5))
    kept = open_raw(server.port, pki, "alice")
    sid = kept.handshake("alice")["session_id"]
    kept.close()  # the stream is cut; a new one resumes the session within the grace
    time.sleep(0.2)
    resumed = open_raw(server.port, pki, "alice")
    assert resumed.handshake("alice", session_id=sid)["resumed"]
    time.sleep(1.0)
    assert sid in server.sessions  # a stream carries it: no orphan
    crashed = open_raw(server.port, pki, "bob")
    lost = crashed.handshake("bob")["session_id"]
    crashed.close()
    assert wait_for(lambda: lost in handler.closed, timeout=5)
    assert lost not in server.sessions and sid in server.sessions
    assert "bob" not in server.budget.usage()
    resumed.close()


def test_a_client_back_after_a_crash_gets_the_slot_of_its_orphan(start_server, pki, connect) -> None:
    """At its cap, a node whose old session lost all its streams (the client process died) opens a
    new one at once: the orphan of the same certificate is closed for it. Live sessions, and other
    nodes' orphans, are never taken."""
    handler = EchoHandler()
    server = start_server(handler, config=ChannelConfig(max_sessions=3, max_sessions_per_node=2))
    live = connect(server.port, "alice")
    crashed = open_raw(server.port, pki, "alice")
    orphan = crashed.handshake("alice")["session_id"]
    bobs = open_raw(server.port, pki, "bob")
    bobs_orphan = bobs.handshake("bob")["session_id"]
    crashed.close()
    bobs.close()
    assert wait_for(lambda: server.sessions.snapshot()[orphan]._orphaned is not None)
    back = connect(server.port, "alice")  # alice at her cap of 2: her orphan makes room
    assert orphan in handler.closed and orphan not in server.sessions
    assert {live.session_id, back.session_id, bobs_orphan} == set(server.sessions.snapshot())
    with pytest.raises(RemoteError) as e:  # no orphan of hers left; the server is full too
        connect(server.port, "alice")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert back.request(FORWARD, 1).body == 1 and live.request(FORWARD, 2).body == 2


def test_handler_errors_become_error_replies(start_server, connect, caplog) -> None:
    server = start_server(EchoHandler())
    client = connect(server.port)
    stream = client._stream
    with pytest.raises(RemoteError) as e:
        client.request(FORWARD, {"fail": "boom"})
    # The peer gets no Python internals, only a reference; the server's log has the details.
    assert e.value.code == grpc.StatusCode.INTERNAL and "boom" not in e.value.message
    ref = e.value.message.rsplit("ref ", 1)[1].rstrip(")")
    assert any(ref in r.getMessage() and "ValueError: boom" in r.getMessage() and "alice" in r.getMessage()
               for r in caplog.records)
    assert not any(r.exc_info and r.levelno >= logging.INFO for r in caplog.records)  # no traceback
    with pytest.raises(RemoteError) as e:
        client.request(FORWARD, {"fail": "handler"})
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.message == "asked to fail"
    assert client.request(STATE, {"count": True}).body["count"] == 3
    assert client._stream is stream  # the same stream carried on


def test_pipelined_submits_resolve_in_order(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler, config=ChannelConfig(chunk_size=32 * 1024))
    client = connect(server.port)
    tensors = [torch.full((100 * (i + 1),), float(i)) for i in range(24)]
    futures = [client.submit(FORWARD, {"i": i, "t": t}, step=i) for i, t in enumerate(tensors)]
    futures.insert(5, client.submit(FORWARD, {"fail": "handler"}))
    replies = [f.exception() or f.result() for f in futures]
    assert isinstance(replies.pop(5), RemoteError)
    for i, (reply, t) in enumerate(zip(replies, tensors, strict=True)):
        assert reply.body["i"] == i and reply.step == i and torch.equal(reply.body["t"], t)
    seqs = [seq for _, seq, _ in handler.seen]
    assert seqs == sorted(seqs) and len(seqs) == 25


def test_broken_stream_fails_pending_and_resumes_session(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler)
    client = connect(server.port)
    sid = client.session_id
    slow = client.submit(FORWARD, {"sleep": 0.5})
    time.sleep(0.1)
    client._stream.calls[0].cancel()  # the connection "drops" mid-request
    with pytest.raises(RemoteError) as e:
        slow.result(timeout=5)
    assert e.value.code == grpc.StatusCode.CANCELLED
    # The next request reopens a stream on the same session: its state survived.
    assert client.request(STATE, {"count": True}).body["count"] == 2
    assert client.session_id == sid and handler.opened == [sid] and handler.closed == []
    # A resuming handshake also works and says so.
    assert client.connect()["resumed"] is True
    # close() after another break still reaches the server: the session is freed now, not at its TTL.
    client._stream.calls[0].cancel()
    client.close()
    assert handler.closed == [sid]


def test_close_with_server_gone_returns_promptly(start_server, connect) -> None:
    server = start_server(EchoHandler())
    client = connect(server.port)
    server.stop(grace=0)
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 6


def test_deadline_exceeded_then_recovers(start_server, connect) -> None:
    server = start_server(EchoHandler())
    client = connect(server.port)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        client.request(FORWARD, {"sleep": 1.0}, timeout=0.2)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 0.9
    assert client.request(FORWARD, "again").body == "again"


def test_close_ends_session(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler)
    client = connect(server.port)
    sid = client.session_id
    client.close()
    client.close()  # idempotent
    assert handler.closed == [sid] and len(server.sessions) == 0
    with pytest.raises(RemoteError):
        client.request(FORWARD, 1)


def test_server_stop_closes_sessions(pki) -> None:
    handler = EchoHandler()
    with ChannelServer(handler, tls=server_tls(pki)) as server:
        with ChannelClient(f"localhost:{server.port}", "alice", tls=client_tls(pki, "alice")) as client:
            assert client.request(FORWARD, [1, 2]).body == [1, 2]
            sid = client.session_id
    assert handler.closed == [sid]


# -- security -----------------------------------------------------------------------------------

def _expect_unavailable_then_good(server: ChannelServer, pki: Path, attempt: Any) -> None:
    with pytest.raises((RemoteError, grpc.RpcError)) as e:
        attempt()
    code = e.value.code if isinstance(e.value, RemoteError) else e.value.code()
    assert code == grpc.StatusCode.UNAVAILABLE
    with ChannelClient(f"127.0.0.1:{server.port}", "bob", tls=client_tls(pki, "bob")) as good:
        assert good.request(FORWARD, "still serving").body == "still serving"


def test_tls_rejects_client_without_certificate(start_server, pki) -> None:
    handler = EchoHandler()
    server = start_server(handler)

    def attempt() -> None:
        raw = RawStream(secure_channel(server.port, ca=pki / "ca.pem", no_client_cert=True))
        raw.send_message(Message(type=pb.HANDSHAKE, body={}, node_id="alice"))
        code, details = raw.finish()
        raw.close()
        raise RemoteError(code, details)

    _expect_unavailable_then_good(server, pki, attempt)
    assert handler.opened and len(handler.opened) == 1  # only the good client got a session


def test_tls_rejects_certificate_from_another_ca(start_server, pki, tmp_path) -> None:
    server = start_server(EchoHandler())
    make_certs(tmp_path / "other", client_ids=["alice"])
    rogue = client_tls(tmp_path / "other", "alice")
    tls = TLSFiles(ca=pki / "ca.pem", cert=rogue.cert, key=rogue.key)  # trusts our server, not trusted back
    _expect_unavailable_then_good(
        server, pki, lambda: ChannelClient(f"127.0.0.1:{server.port}", "alice", tls=tls).connect())


def test_tls_rejects_expired_client_certificate(start_server, pki, tmp_path) -> None:
    server = start_server(EchoHandler())
    shutil.copy(pki / "ca.pem", tmp_path / "ca.pem")
    shutil.copy(pki / "ca" / "ca.key", tmp_path / "ca.key")  # an old-layout folder with our CA
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    make_client_cert(tmp_path, "alice", not_before=past, not_after=past + dt.timedelta(days=1))
    tls = client_tls(tmp_path, "alice")
    _expect_unavailable_then_good(
        server, pki, lambda: ChannelClient(f"127.0.0.1:{server.port}", "alice", tls=tls).connect())


def test_client_refuses_server_from_another_ca(start_server, pki, tmp_path) -> None:
    server = start_server(EchoHandler())
    other = make_certs(tmp_path / "other", client_ids=["alice"])
    tls = TLSFiles(ca=other.ca_cert, cert=pki / "clients/alice.pem", key=pki / "clients/alice.key")
    _expect_unavailable_then_good(
        server, pki, lambda: ChannelClient(f"127.0.0.1:{server.port}", "alice", tls=tls).connect())


def test_node_id_must_match_certificate(start_server, connect, pki) -> None:
    server = start_server(EchoHandler())
    impostor = connect(server.port, "bob", tls=client_tls(pki, "alice"), handshake=False)
    with pytest.raises(RemoteError) as e:
        impostor.connect()
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "'alice'" in e.value.message
    assert len(server.sessions) == 0
    assert connect(server.port, "alice").request(FORWARD, 3).body == 3


def test_insecure_mode_is_loopback_only(start_server, connect) -> None:
    for address in ("0.0.0.0:0", "10.0.0.1:5000", "example.org:1"):
        with pytest.raises(ValueError, match="loopback"):
            ChannelServer(EchoHandler(), address, insecure=True)
        with pytest.raises(ValueError, match="loopback"):
            ChannelClient(address, "alice", insecure=True)
    with pytest.raises(ValueError):
        ChannelServer(EchoHandler(), "127.0.0.1:0")  # neither TLS nor insecure
    server = start_server(EchoHandler(), insecure=True)
    client = connect(server.port, "carol", insecure=True)
    assert client.welcome["checksum"] is True  # plaintext: CRCs on by default
    assert client.request(FORWARD, {"a": torch.ones(3)}).body["a"].sum() == 3
    assert next(iter(server.sessions.snapshot().values())).node_id == "carol"
