"""One logical stream bonded over several mutual-TLS connections (channel/bond.py)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, RemoteError
from lightning_split.channel.bond import RoundRobinReader
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


# -- the reader's read-ahead (bond.RoundRobinReader), on plain iterators --------------------------

class _Source:
    """A connection's incoming fragments, counting how many were taken from it (and by which thread)."""

    def __init__(self, name: str, count: int, fail_at: int | None = None) -> None:
        self.name, self.count, self.fail_at, self.taken = name, count, fail_at, 0

    def __iter__(self):  # noqa: ANN204
        return self

    def __next__(self) -> bytes:
        if self.taken == self.fail_at:
            raise grpc.RpcError(f"{self.name} broke")
        if self.taken >= self.count:
            raise StopIteration
        self.taken += 1
        return f"{self.name}-{self.taken - 1}".encode()


def _until(check, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def test_read_ahead_receives_every_connection_while_the_worker_is_busy() -> None:
    before = set(threading.enumerate())
    sources = [_Source(f"c{j}", 3) for j in range(3)]
    reader = RoundRobinReader(sources[0], join_timeout_s=5)
    reader.expand(3)
    for j in (1, 2):
        reader.attach(j, sources[j])
    it = iter(reader)
    got = [next(it).decode() for _ in range(3)]  # a message striped over the three
    assert [s.taken for s in sources] == [1, 1, 1]  # read on demand, by the worker itself
    reader.read_ahead()  # it is about to handle that message
    # Meanwhile each connection's next fragment is received, on threads of their own (what the
    # worker would otherwise receive itself, one connection after another, once it is done).
    assert _until(lambda: all(s.taken == 2 for s in sources))
    time.sleep(0.05)
    assert all(s.taken == 2 for s in sources)  # one fragment each, no further
    assert [next(it).decode() for _ in range(3)] == ["c0-1", "c1-1", "c2-1"]
    reader.read_ahead()  # again: the same three threads, asked once more
    got += ["c0-1", "c1-1", "c2-1"] + [raw.decode() for raw in it]
    assert got == [f"c{j}-{n}" for n in range(3) for j in range(3)]  # round-robin, as one stream
    readers = [t for t in set(threading.enumerate()) - before if t.name == "split-bond-read-ahead"]
    assert len(readers) <= 3
    reader.close()
    assert _until(lambda: not any(t.is_alive() for t in readers))


def test_read_ahead_of_one_connection_does_nothing_and_a_broken_one_fails_in_its_place() -> None:
    single = _Source("c0", 3)
    reader = RoundRobinReader(single, join_timeout_s=5)
    reader.read_ahead()
    time.sleep(0.05)
    assert single.taken == 0  # no thread between the worker and its only connection
    assert [raw.decode() for raw in reader] == ["c0-0", "c0-1", "c0-2"]

    sources = [_Source("c0", 5), _Source("c1", 5, fail_at=1)]
    reader = RoundRobinReader(sources[0], join_timeout_s=5)
    reader.expand(2)
    reader.attach(1, sources[1])
    it = iter(reader)
    assert [next(it).decode() for _ in range(2)] == ["c0-0", "c1-0"]
    reader.read_ahead()
    assert next(it).decode() == "c0-1"
    with pytest.raises(grpc.RpcError, match="c1 broke"):
        next(it)
