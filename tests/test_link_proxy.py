"""The user-space link of the benchmarks (``benchmarks/link_proxy.py``, ``Link(mode="proxy")``):
bytes arrive intact, in order and half-closes pass; a round trip takes at least the RTT; a bulk
transfer takes at least its bytes at the rate, with both directions at once and several
connections sharing the rate of their direction. Real sockets on loopback, the proxy its own process."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from benchmarks.link import Link
from benchmarks.link_proxy import Serialiser, chunk_bytes


@pytest.fixture
def echo_port():
    """A TCP server on loopback that sends back what it reads, then half-closes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _dial(link: Link, port: int) -> socket.socket:
    host, proxy_port = link.client_addr(port).rsplit(":", 1)
    sock = socket.create_connection((host, int(proxy_port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send payload (from a thread: both directions at once), half-close, read all that comes back."""
    sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while data := sock.recv(1 << 16):
        got += data
    sender.join()
    return bytes(got)


def test_round_trips_pay_the_rtt_and_bytes_arrive_in_order(echo_port: int) -> None:
    with Link("1gbit", rtt_ms=40, mode="proxy") as link:
        with _dial(link, echo_port) as sock:
            times = []
            for i in range(5):
                t0 = time.perf_counter()
                sock.sendall(bytes([i]) * 64)
                got = b""
                while len(got) < 64:
                    got += sock.recv(64 - len(got))
                times.append(time.perf_counter() - t0)
                assert got == bytes([i]) * 64
            assert min(times) >= 0.040  # the whole RTT, never less
            assert sorted(times)[2] < 0.040 + 0.5  # and not much more (a loose bound on a busy host)
        with _dial(link, echo_port) as sock:  # a second connection reuses the same proxy
            payload = bytes(range(256)) * 4096  # 1 MiB
            assert _echo_through(sock, payload) == payload
        assert len(link._proxies) == 1
    assert not link._proxies  # closed with the link


def test_bulk_transfers_take_their_bytes_at_the_rate_shared_per_direction(echo_port: int) -> None:
    rate = 40e6  # 40 Mbit/s each way
    payload = bytes(range(256)) * 2048  # 512 KiB each connection, echoed back
    with Link("40mbit", rtt_ms=0, mode="proxy") as link:
        socks = [_dial(link, echo_port) for _ in range(2)]
        results: list[bytes] = [b"", b""]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _echo_through(socks[i], payload)))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for sock in socks:
            sock.close()
    assert results == [payload, payload]
    # Both connections share each direction's 40 Mbit/s: at least 2 x 512 KiB at the rate (the two
    # directions overlap, so a round trip's two crossings cost about one).
    assert elapsed >= 2 * len(payload) * 8 / rate * 0.95


def test_the_serialiser_queues_chunks_behind_each_other() -> None:
    link = Serialiser(8e6)  # one byte per microsecond
    assert link.sent(1000, now=10.0) == pytest.approx(10.001)
    assert link.sent(1000, now=10.0) == pytest.approx(10.002)  # behind the first
    assert link.sent(500, now=20.0) == pytest.approx(20.0005)  # an idle link sends at once
    assert chunk_bytes(100e6) == 12500 and chunk_bytes(10e9) == 65536 and chunk_bytes(1e6) == 1500
