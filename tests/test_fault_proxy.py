"""The fault-injection proxy itself: against a plain TCP echo server, then in front of a real mTLS channel."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, RemoteError
from tests.channel_util import EchoHandler, wait_for
from tests.fault_proxy import FaultProxy


class EchoServer:
    """A TCP echo server on 127.0.0.1, a thread per connection; ``received``: bytes read, all connections."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, name="echo-accept", daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._echo, args=(conn,), name="echo-conn", daemon=True)
            self.threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    with self.lock:
                        self.received += len(data)
                    conn.sendall(data)
                except TimeoutError:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self.stopping.set()
        for t in list(self.threads):
            t.join(timeout=2)
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p


def dial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends: (bytes, "eof" | "reset")."""
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk


def echo_round(port: int, payload: bytes = b"ping") -> None:
    with dial(port) as sock:
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def test_bytes_pass_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = os.urandom(300_000)  # more than one read, fewer than the buffers would hold
    with dial(proxy.port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exact(sock, len(payload)) == payload
        sender.join()
    assert wait_for(lambda: proxy.bytes_down == len(payload))  # counted just after the write
    assert proxy.bytes_up == proxy.bytes_down == echo.received == len(payload)
    assert proxy.connections == 1 and proxy.cuts == 0


def test_half_close_is_passed_on(proxy: FaultProxy) -> None:
    with dial(proxy.port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server sees EOF, answers, and closes its end
        assert read_to_end(sock) == (b"last words", "eof")
    assert wait_for(lambda: proxy.live == 0)


@pytest.mark.parametrize("direction", ["up", "both"])
def test_cut_after_k_bytes(proxy: FaultProxy, echo: EchoServer, direction: str) -> None:
    with dial(proxy.port) as sock:
        sock.sendall(b"a" * 600)
        assert recv_exact(sock, 600) == b"a" * 600
        # "up": 1000 more bytes from the client; "both": 600 up + 600 echoed down, then 400 more.
        proxy.cut_after(1000 if direction == "up" else 1600, direction)
        sock.sendall(b"b" * 600)
        if direction == "both":
            assert recv_exact(sock, 600) == b"b" * 600
        sock.sendall(b"c" * 600)
        t0 = time.monotonic()
        got, how = read_to_end(sock)
        assert time.monotonic() - t0 < 2.0
    assert how in ("eof", "reset")
    assert len(got) <= 1000 and set(got) <= {ord("b"), ord("c")}
    # Exactly the allowed bytes reached the server: 600 before, then 1000 up ("up"), or 600 up +
    # 600 down + 400 up ("both").
    assert wait_for(lambda: echo.received >= 1600)
    time.sleep(0.1)
    assert echo.received == 1600
    assert proxy.cuts == 1 and proxy.live == 0
    echo_round(proxy.port, b"x" * 5000)  # one-shot: the next connection passes whole
    assert proxy.cuts == 1 and proxy.connections == 2


def test_cut_now_resets_every_connection(proxy: FaultProxy) -> None:
    socks = [dial(proxy.port) for _ in range(3)]
    for s in socks:
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
    proxy.cut_now()
    for s in socks:
        with s:
            assert read_to_end(s)[1] in ("eof", "reset")
    assert proxy.cuts == 1 and proxy.live == 0 and proxy.connections == 3
    echo_round(proxy.port)


def test_cut_sends_rst(proxy: FaultProxy) -> None:
    with dial(proxy.port) as sock:
        sock.sendall(b"hi")
        assert recv_exact(sock, 2) == b"hi"  # forwarded: the proxy has it
        proxy.cut_now()
        time.sleep(0.2)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(3):  # the RST makes the next send or recv fail, never a quiet EOF
                sock.sendall(b"x")
                sock.recv(1)


def test_stall_delays_without_losing_bytes(proxy: FaultProxy) -> None:
    payload = os.urandom(100_000)
    with dial(proxy.port) as sock:
        sock.sendall(b"hi")
        assert recv_exact(sock, 2) == b"hi"  # a live connection, stalled mid-way
        proxy.stall(0.5)
        t0 = time.monotonic()
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
        assert time.monotonic() - t0 >= 0.4
    assert proxy.cuts == 0


def test_stall_until_resume_holds_new_connections(proxy: FaultProxy) -> None:
    proxy.stall(None)
    with dial(proxy.port) as sock:  # a connection made while stalled is held as well
        sock.sendall(b"held")
        assert select.select([sock], [], [], 0.3)[0] == []
        proxy.resume()
        assert recv_exact(sock, 4) == b"held"


def closed_at_once(port: int) -> bool:
    """A connection to ``port`` is reset (at connect or on first use) or ends before any reply."""
    try:
        with dial(port) as sock:
            sock.sendall(b"anyone?")
            return read_to_end(sock)[0] == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_refuse(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.refuse(True)
    assert closed_at_once(proxy.port)
    assert proxy.connections == 1 and proxy.live == 0 and echo.received == 0
    proxy.refuse(False)
    echo_round(proxy.port)


def test_target_down_resets_the_client() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with FaultProxy(port) as p:
        assert closed_at_once(p.port)
        assert p.connections == 1 and p.live == 0


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fault-proxy")]


def test_close_leaves_nothing_behind(echo: EchoServer) -> None:
    before = proxy_threads()
    p = FaultProxy(echo.port)
    assert proxy_threads() == [*before, f"fault-proxy-{p.port}"]
    sock = dial(p.port)
    sock.sendall(b"hi")
    assert recv_exact(sock, 2) == b"hi"
    p.stall(None)  # even a stalled proxy stops at once
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 1.0
    assert proxy_threads() == before
    with sock:
        assert read_to_end(sock)[1] == "eof"
    with pytest.raises(ConnectionRefusedError):
        dial(p.port)
    p.close()  # twice is fine


# The channel's transparent reconnect (issue 23, being built) would hide the faults this test is
# about: switch it off where the config has it.
NO_RECONNECT = {"reconnect_deadline_s": 0.0} if "reconnect_deadline_s" in ChannelConfig.__dataclass_fields__ else {}


def expect_unavailable(fn: Callable[[], object]) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        fn()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
    return err.value


def test_grpc_channel_through_the_proxy(start_server, connect) -> None:
    handler = EchoHandler()
    server = start_server(handler)
    config = ChannelConfig(connections=1, **NO_RECONNECT)
    with FaultProxy(server.port) as p:
        client = connect(p.port, config=config)
        assert client.request(pb.FORWARD, 5).body == 5
        assert p.connections == 1 and p.bytes_up > 0 and p.bytes_down > 0
        # The link drops while the server works on a request: the request fails with UNAVAILABLE.
        pending = client.submit(pb.FORWARD, {"sleep": 0.5})
        assert wait_for(lambda: len(handler.seen) == 2)
        p.cut_now()
        expect_unavailable(lambda: pending.result(timeout=10))
        client.close()
        # The link drops 20 kB into a 1 MiB request (inside TLS records, inside HTTP/2 frames).
        client = connect(p.port, config=config)
        p.cut_after(20_000, "up")
        expect_unavailable(lambda: client.request(pb.FORWARD, torch.zeros(1 << 18), timeout=10))
        # Dropped, and the server unreachable: the next request fails with UNAVAILABLE too.
        # (A drop alone does not fail it: the client opens a new stream, on a new connection.)
        p.refuse(True)
        p.cut_now()
        expect_unavailable(lambda: client.request(pb.FORWARD, 6, timeout=10))
        assert p.cuts == 3
        p.refuse(False)
        client.close()


def test_throttle_limits_each_direction_to_its_rate() -> None:
    """1 MiB through a 4 MiB/s link takes about a quarter of a second, not a millisecond."""
    with socket.create_server(("127.0.0.1", 0)) as server, FaultProxy(server.getsockname()[1]) as proxy:
        proxy.throttle(4 << 20)
        sender = socket.create_connection(("127.0.0.1", proxy.port))
        peer, _ = server.accept()
        payload = b"x" * (1 << 20)
        started = time.monotonic()
        threading.Thread(target=sender.sendall, args=(payload,), daemon=True).start()
        got = 0
        while got < len(payload):
            got += len(peer.recv(1 << 20))
        took = time.monotonic() - started
        assert 0.2 < took < 2.0, took
        sender.close()
        peer.close()
