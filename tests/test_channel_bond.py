"""One logical stream bonded over several mutual-TLS connections (channel/bond.py)."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, RemoteError
from lightning_split.wire import Message
from tests.channel_util import EchoHandler, open_raw, sample_body

FORWARD, STATE = pb.FORWARD, pb.STATE
SMALL_CHUNKS = 16 * 1024  # many fragments per message, so every connection carries some


def _bonded(start_server, connect, asked: int, granted_max: int = 8, handler=None):  # noqa: ANN001, ANN202
    handler = handler or EchoHandler()
    server = start_server(handler, config=ChannelConfig(chunk_size=SMALL_CHUNKS, max_connections=granted_max))
    client = connect(server.port, config=ChannelConfig(chunk_size=SMALL_CHUNKS, connections=asked))
    return server, client, handler


@pytest.mark.parametrize("asked", [2, 3])
def test_bonded_stream_carries_requests_in_order(start_server, connect, asked: int) -> None:
    _, client, handler = _bonded(start_server, connect, asked)
    assert client.welcome["connections"] == asked and len(client._stream.calls) == asked
    bodies = [sample_body(scale=1 + i % 3) | {"i": i} for i in range(12)]
    futures = [client.submit(FORWARD, body, step=i) for i, body in enumerate(bodies)]  # all in flight
    for i, (future, body) in enumerate(zip(futures, bodies, strict=True)):
        reply = future.result(timeout=30)
        assert reply.step == i and reply.body["i"] == i
        assert torch.equal(reply.body["x"], body["x"]) and torch.equal(reply.body["ids"], body["ids"])
    seqs = [seq for _, seq, _ in handler.seen]
    assert seqs == sorted(seqs)  # handled in the order sent, whatever connection carried what


def test_server_grants_at_most_its_max(start_server, connect) -> None:
    _, client, _ = _bonded(start_server, connect, asked=5, granted_max=2)
    assert client.welcome["connections"] == 2 and len(client._stream.calls) == 2
    assert client.request(STATE, {"count": True}).body["count"] == 1


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)])
def test_the_default_follows_the_cores(start_server, connect, monkeypatch, cores: int, expected: int) -> None:
    """One connection on small hosts, where extra threads only compete; up to four on many cores."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    assert ChannelConfig().wanted_connections() == expected
    server = start_server(EchoHandler())
    client = connect(server.port)
    assert len(client._stream.calls) == expected
    assert client.welcome.get("connections", 1) == expected
    assert client.request(STATE, {"count": True}).body["count"] == 1


@pytest.mark.parametrize("who", ["bob", "alice"])
def test_join_needs_the_token_and_the_same_identity(start_server, connect, pki, who: str) -> None:
    server, client, _ = _bonded(start_server, connect, asked=3)
    # The bond is complete, so its token is spent; open a fresh one that waits for its joins.
    raw = open_raw(server.port, pki, "alice")
    welcome = raw.handshake("alice", ChannelConfig(chunk_size=SMALL_CHUNKS, connections=2))
    token = welcome["bond_token"] if who == "bob" else "0" * 32  # bob steals it; alice guesses
    intruder = open_raw(server.port, pki, who)
    intruder.send_message(Message(type=pb.HANDSHAKE, body={"join": token, "index": 1}, node_id=who, sequence=1))
    code, details = intruder.finish()
    assert code == grpc.StatusCode.PERMISSION_DENIED and "bad join" in details
    intruder.close()
    raw.close()
    assert client.request(STATE, {"count": True}).body["count"] == 1  # the real bond never noticed


def test_a_dropped_connection_fails_the_stream_and_the_next_request_rebonds(start_server, connect) -> None:
    _, client, handler = _bonded(start_server, connect, asked=3)
    sid = client.session_id
    slow = client.submit(FORWARD, {"sleep": 0.5})
    threading.Timer(0.1, client._stream.calls[2].cancel).start()  # one of three connections drops
    with pytest.raises(RemoteError):
        slow.result(timeout=10)
    # The next request handshakes again (resuming the session) and bonds three new connections.
    assert client.request(STATE, {"count": True}).body["count"] == 2
    assert client.session_id == sid and handler.opened == [sid]
    assert len(client._stream.calls) == 3 and client.welcome["resumed"] is True
    body = sample_body(scale=2)
    assert torch.equal(client.request(FORWARD, body).body["x"], body["x"])


def test_a_connection_that_never_joins_ends_the_stream(start_server, pki) -> None:
    """A client that was granted a bond but never opens its other connections does not hold the
    server's worker forever: the stream ends UNAVAILABLE after the handshake timeout."""
    server = start_server(EchoHandler(), config=ChannelConfig(handshake_timeout_s=1.0))
    raw = open_raw(server.port, pki, "alice")
    welcome = raw.handshake("alice", ChannelConfig(connections=2))
    assert welcome["connections"] == 2
    # Fragment 0 goes on connection 0, so it is read; fragment 1's connection never comes.
    raw.send_message(Message(type=FORWARD, body={"i": 0}, node_id="alice", session_id=welcome["session_id"],
                             sequence=2))
    raw.send_message(Message(type=FORWARD, body={"i": 1}, node_id="alice", session_id=welcome["session_id"],
                             sequence=3))
    code, details = raw.finish(timeout=15)
    assert code == grpc.StatusCode.UNAVAILABLE and "never joined" in details
    raw.close()
