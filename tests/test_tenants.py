"""Many tenants on one server: one node (mallory) floods sessions, streams and memory; another
(alice) is served as if alone. Real mTLS servers on loopback, real certificates, hand-made frames.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, RemoteError
from lightning_split.channel.budget import BudgetExceeded, MemoryBudget
from lightning_split.channel.handshake import build_hello
from lightning_split.channel.streams import ReplyWindow
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.wire import CompressionConfig, Message, message_to_frames
from tests.channel_util import EchoHandler, open_raw, wait_for
from tests.split_cases import CASES

S = grpc.StatusCode
FORWARD = pb.FORWARD
BLOSC = CompressionConfig(lossless="blosc2")
MIB = 1 << 20


def alice_matches_local(address: str, tls_for) -> None:  # noqa: ANN001
    """Alice's split forward and backward equal the local model's exactly (fp32, CPU)."""
    case = CASES["sequential"]
    spec = case.spec("two_part")
    local = build_model(case.source).eval()
    x = case.inputs(local)["x"]
    remote = open_split(address, "alice", tls_for("alice"), source=case.source, spec=spec)
    try:
        model = remote.model.eval()
        outs, grads = [], []
        for m in (model, local):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            y.pow(2).sum().backward()
            outs.append(y.detach())
            grads.append(xi.grad)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    finally:
        remote.close()


def partial_message(sid: str, nbytes: int, node: str = "mallory", chunk: int = 64 * 1024) -> list[pb.Frame]:
    """The frames of a FORWARD carrying ``nbytes`` of tensor, cut into ``chunk``-byte fragments."""
    msg = Message(type=FORWARD, body=torch.zeros(nbytes // 4), session_id=sid, node_id=node, sequence=2)
    return list(message_to_frames(msg, chunk_size=chunk))


# -- sessions and streams -----------------------------------------------------------------------

def test_a_node_over_its_session_cap_is_refused_while_others_are_served(split_server, connect, caplog) -> None:
    config = ChannelConfig(max_sessions=6, max_sessions_per_node=3)
    address, tls_for = split_server(CASES["sequential"].source, CASES["sequential"].spec("two_part"),
                                    config=config)
    port = int(address.rsplit(":", 1)[1])
    mallory = [connect(port, "mallory") for _ in range(3)]  # its cap
    with pytest.raises(RemoteError) as err:
        connect(port, "mallory")
    assert err.value.code == S.RESOURCE_EXHAUSTED and "'mallory'" in err.value.message
    # Mallory keeps its sessions alive, over and over; alice still gets a session and exact results.
    stop, refused = threading.Event(), []

    def keep_touching() -> None:
        while not stop.is_set():
            for c in mallory:
                c.request(pb.CACHE, {"op": "info"})
            try:
                connect(port, "mallory")
            except RemoteError as e:
                refused.append(e.code)

    flood = threading.Thread(target=keep_touching, daemon=True)
    flood.start()
    try:
        alice_matches_local(address, tls_for)
    finally:
        stop.set()
        flood.join(10)
    assert refused and set(refused) == {S.RESOURCE_EXHAUSTED}
    assert any("refused mallory: RESOURCE_EXHAUSTED" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.WARNING)


def test_streams_over_the_node_cap_are_refused_at_once(start_server, pki, connect) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(max_streams_per_node=4, handshake_timeout_s=30))
    held = [open_raw(server.port, pki, "mallory") for _ in range(4)]  # silent streams, each a thread
    assert wait_for(lambda: server.streams.counts().get("mallory") == 4)
    extra = open_raw(server.port, pki, "mallory")
    code, details = extra.finish(timeout=5)
    assert code == S.RESOURCE_EXHAUSTED and "maximum of 4 streams" in details
    client = connect(server.port, "alice")  # another node is admitted as before
    assert client.request(FORWARD, {"x": 1}).body == {"x": 1}
    for raw in held:
        raw.close()
    assert wait_for(lambda: "mallory" not in server.streams.counts(), timeout=10)
    client2 = connect(server.port, "mallory")  # its streams ended: mallory is admitted again
    assert client2.request(FORWARD, 2).body == 2


def test_an_idle_stream_is_ended_and_its_session_lives_on(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler, config=ChannelConfig(stream_idle_timeout_s=0.4))
    client = connect(server.port, "alice")
    assert client.request(FORWARD, {"count": True}).body["count"] == 1
    first = client._stream
    assert wait_for(lambda: first.dead.is_set(), timeout=5)  # the server ended the idle stream
    assert server.streams.counts() == {}
    # The client's next request opens a new stream for the same session: nothing is lost.
    assert client.request(FORWARD, {"count": True}).body["count"] == 2
    assert handler.opened == [client.session_id] and not handler.closed


def test_a_busy_stream_is_not_idle(start_server, connect) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(stream_idle_timeout_s=0.3))
    client = connect(server.port, "alice")
    stream = client._stream
    assert client.request(FORWARD, {"sleep": 1.0}, timeout=10).body == {"sleep": 1.0}
    assert client._stream is stream  # a request running longer than the idle timeout kept it


def test_a_stalled_message_is_aborted_and_its_memory_given_back(start_server, pki) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(stream_stall_timeout_s=0.5))
    raw = open_raw(server.port, pki, "mallory")
    sid = raw.handshake("mallory")["session_id"]
    frames = partial_message(sid, MIB)
    raw.send(frames[0])  # one fragment of sixteen, then nothing
    assert wait_for(lambda: server.budget.used > MIB, timeout=5)  # the payload buffer is charged
    raw._reader.join(timeout=10)  # the server ends the stream; we never half-close it
    assert raw.code == S.DEADLINE_EXCEEDED and "stalled" in raw.details
    assert wait_for(lambda: server.budget.used == 0 and server.streams.counts() == {}, timeout=5)
    assert len(server.sessions) == 1  # the session outlives its stream


# -- memory -----------------------------------------------------------------------------------

def test_a_payload_over_the_node_budget_is_refused_before_it_is_allocated(start_server, pki, connect) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(node_memory_bytes=MIB, memory_bytes=0))
    raw = open_raw(server.port, pki, "mallory")
    sid = raw.handshake("mallory")["session_id"]
    raw.send(partial_message(sid, 2 * MIB)[0])  # fragment 0 declares 2 MiB: refused at once
    code, details = raw.finish()
    assert code == S.RESOURCE_EXHAUSTED and "memory budget of node 'mallory'" in details
    assert server.budget.used == 0
    client = connect(server.port, "alice")  # alice's own budget is untouched
    x = torch.randn(MIB // 8)
    torch.testing.assert_close(client.request(FORWARD, x).body, x)
    # Between messages alice's stream may keep one payload buffer for reuse (not pinned ones:
    # PyTorch's caching host allocator recycles those), charged to her alone.
    assert server.budget.usage().get("alice", 0) < MIB and "mallory" not in server.budget.usage()


def test_a_blosc2_chunk_that_expands_past_the_budget_is_refused_before_decompressing(start_server, pki) -> None:
    server = start_server(EchoHandler(), config=ChannelConfig(node_memory_bytes=2 * MIB, memory_bytes=0))
    raw = open_raw(server.port, pki, "mallory")
    sid = raw.handshake("mallory", ChannelConfig(client_to_server=BLOSC))["session_id"]
    zeros = torch.zeros(4 * MIB // 4)  # 4 MiB that blosc2 sends in a few hundred bytes
    msg = Message(type=FORWARD, body=zeros, session_id=sid, node_id="mallory", sequence=2)
    frames = list(message_to_frames(msg, BLOSC))
    assert sum(len(f.data) for f in frames) < 64 * 1024
    raw.send(*frames)
    code, details = raw.finish()
    assert code == S.RESOURCE_EXHAUSTED and "memory budget" in details
    assert server.budget.used == 0


@pytest.mark.parametrize("connections", [1, 4])  # a bonded stream reports the server's status too
def test_the_server_budget_bounds_all_nodes_together(start_server, pki, connect, connections) -> None:
    config = ChannelConfig(memory_bytes=3 * MIB // 2, node_memory_bytes=0, stream_stall_timeout_s=30)
    server = start_server(EchoHandler(), config=config)
    raw = open_raw(server.port, pki, "mallory")
    sid = raw.handshake("mallory")["session_id"]
    raw.send(partial_message(sid, MIB)[0])  # mallory holds 1 MiB mid-message
    assert wait_for(lambda: server.budget.usage().get("mallory", 0) > MIB)
    client = connect(server.port, "alice", config=ChannelConfig(connections=connections))
    with pytest.raises(RemoteError) as err:
        client.request(FORWARD, torch.zeros(MIB // 4))
    assert err.value.code == S.RESOURCE_EXHAUSTED and "server memory budget" in err.value.message
    raw.close()  # mallory's stream ends: its payload goes back at once
    assert wait_for(lambda: server.budget.used == 0, timeout=5)
    assert client.request(FORWARD, {"ok": True}).body == {"ok": True}  # a new stream, same session
    assert client.request(FORWARD, torch.ones(MIB // 4)).body.sum() == MIB // 4


def test_memory_budget_accounting() -> None:
    budget = MemoryBudget(server_bytes=100, node_bytes=60)
    a, b = budget.account("a"), budget.account("b")
    a.set(("s1", "kv"), 50)
    with pytest.raises(BudgetExceeded, match="node 'a'"):
        a.set(("s1", "graphs"), 20)
    b.set(("s2", "kv"), 50)
    with pytest.raises(BudgetExceeded, match="server memory budget"):
        b.check("payload", 1)
    assert budget.usage() == {"a": 50, "b": 50}
    a.set(("s1", "kv"), 10)  # shrinking always works
    b.set("payload", 10)
    a.release_prefix("s1")
    assert budget.usage() == {"b": 60} and budget.used == 60
    with b.hold("more", 0):
        pass
    b.release("payload")
    b.release_prefix("s2")
    assert budget.used == 0


def test_reply_window_blocks_a_client_that_reads_nothing() -> None:
    window = ReplyWindow(2)
    assert window.acquire(0.1) and window.acquire(0.1)
    t0 = time.monotonic()
    assert not window.acquire(0.2) and time.monotonic() - t0 >= 0.19
    window.on_sent()()
    assert window.pending() == 1 and window.acquire(0.1)


# -- errors -----------------------------------------------------------------------------------

def _hello(**changes: object) -> dict:
    hello = build_hello(ChannelConfig(), "mallory")
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = hello
        for p in parents:
            node = node[p]
        node[leaf] = value
    return hello


@pytest.mark.parametrize("hello", [
    _hello(capabilities__lossless=5),
    _hello(capabilities__lossy={"a": 1}),
    _hello(compression__client_to_server={"lossless": "blosc2", "level": "high"}),
    _hello(compression__server_to_client={"nthreads": [1]}),
    _hello(session_id=5),
    _hello(capabilities__chunk_size="big"),
    _hello(capabilities=[1, 2]),
    _hello(compression="zstd"),
    _hello(compression__client_to_server={"lossless": "blosc2", "level": torch.zeros(3)}),  # fuzzer
    _hello(capabilities__connections=torch.zeros(2, dtype=torch.int64)),
    "not a dict",
])
def test_malformed_hellos_get_invalid_argument(start_server, pki, hello, caplog) -> None:
    server = start_server(EchoHandler())
    raw = open_raw(server.port, pki, "mallory")
    raw.send_any(Message(type=pb.HANDSHAKE, body=hello, node_id="mallory", sequence=1))
    code, details = raw.finish()
    assert code == S.INVALID_ARGUMENT and "bad HANDSHAKE" in details
    refusals = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(refusals) == 1 and "mallory" in refusals[0].getMessage() and not refusals[0].exc_info
    assert len(server.sessions) == 0


def test_clients_that_cancel_leave_no_tracebacks(start_server, pki, connect, caplog) -> None:
    """A client that cancels its call (idle after the handshake, or mid-message) ends its stream
    quietly: no 'Exception iterating responses' from gRPC, nothing charged left behind."""
    server = start_server(EchoHandler(), config=ChannelConfig(max_sessions_per_node=16))
    for i in range(10):
        raw = open_raw(server.port, pki, "mallory")
        sid = raw.handshake("mallory")["session_id"]
        if i % 2:
            raw.send(partial_message(sid, MIB)[0])
            assert wait_for(lambda: server.budget.usage().get("mallory", 0) > MIB)
        raw.close()  # cancels the call
    assert wait_for(lambda: server.streams.counts() == {} and server.budget.used == 0, timeout=10)
    assert connect(server.port, "alice").request(FORWARD, 1).body == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


def test_a_status_quoting_the_peer_stays_deliverable(start_server, pki) -> None:
    """A refusal that quotes what the peer sent (here a 20,000-character node id) is cut short:
    status details travel in HTTP/2 trailers, and an oversized one would never arrive."""
    server = start_server(EchoHandler())
    raw = open_raw(server.port, pki, "mallory")
    sid = raw.handshake("mallory")["session_id"]
    msg = Message(type=FORWARD, body=1, session_id=sid, node_id="x" * 20_000, sequence=2)
    raw.send(*message_to_frames(msg))
    code, details = raw.finish()
    assert code == S.PERMISSION_DENIED and "authenticated as 'mallory'" not in details
    assert details.startswith("frame header names node 'xxx") and len(details) <= 1000
