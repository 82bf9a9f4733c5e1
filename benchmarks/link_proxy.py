"""A link in user space: a TCP forwarding proxy with a rate and a one-way delay per direction.

    python benchmarks/link_proxy.py TARGET_PORT RATE_BIT_S ONE_WAY_S   # prints its port, serves until stdin closes

``link.Link(mode="proxy")`` starts one per server port it is asked to reach (``client_addr``). For
hosts where the packet-level modes cannot run: no root, no network namespaces, no TUN device or
``tc``. It also cross-checks them: tiny GPT-2 speculative decoding at 20 ms RTT measured the same
through both (prompt lookup 4.37x plain decoding here, 4.4-4.7x through the TUN link).

The model is a store-and-forward link per direction, shared by every connection through the proxy
(a bonded channel's connections share one link, as on a real one): a chunk read at time t leaves
the link's serialiser at max(t, when the previous chunk left) + its bytes / rate, and is written to
the far side ``ONE_WAY_S`` after that. A reader and a writer thread per direction and connection, so
neither waits for the other and many chunks are in flight. Chunks are at most one millisecond of the
rate (1.5-64 KB): a small message waits at most ~1 ms behind a bulk one, as behind a full packet.

What it does not model: TCP's own view of the RTT. Each side's TCP talks to the proxy over loopback,
so congestion control and the flow-control window never see the delay (as if both ends had windows
of at least the bandwidth-delay product). Request-response traffic (generation's one round trip per
token) pays exactly the delay; a bulk transfer on a real link could be slower than here. Only
connections made to the proxy's address cross the link: gloo's ranks (the hand-built training
split) connect on ports of their own, so its rows need mode ``tun``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import sys
import threading
import time

_END = None  # end of a direction: its source closed


class Serialiser:
    """One direction of the link: the time its last chunk finishes leaving, shared by connections."""

    def __init__(self, rate_bit_s: float) -> None:
        self.seconds_per_byte = 8.0 / rate_bit_s if rate_bit_s > 0 else 0.0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def sent(self, nbytes: int, now: float) -> float:
        """When a chunk of ``nbytes`` read at ``now`` has left the link's sending end."""
        with self._lock:
            self._free_at = max(now, self._free_at) + nbytes * self.seconds_per_byte
            return self._free_at


def chunk_bytes(rate_bit_s: float) -> int:
    """One millisecond of the rate, within 1.5..64 KB."""
    return int(min(65536, max(1500, rate_bit_s / 8000))) if rate_bit_s > 0 else 65536


def pipe(src: socket.socket, dst: socket.socket, link: Serialiser, one_way_s: float, chunk: int) -> None:
    """Forward src -> dst through ``link`` until src closes, then half-close dst."""
    fifo: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while data := src.recv(chunk):
                fifo.put((link.sent(len(data), time.monotonic()) + one_way_s, data))
        except OSError:
            pass
        fifo.put((0.0, _END))

    def write() -> None:
        try:
            while True:
                due, data = fifo.get()
                if data is _END:
                    dst.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:  # the far side went away: stop both ways
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    for fn in (read, write):
        threading.Thread(target=fn, daemon=True).start()


def serve(target_port: int, rate_bit_s: float, one_way_s: float, host: str = "127.0.0.1") -> None:
    """Accept on a free port of ``host`` (printed), forward each connection to ``host:target_port``."""
    with contextlib.suppress(OSError):
        os.nice(-10)  # ahead of the benchmark's own processes on a busy host
    up, down = Serialiser(rate_bit_s), Serialiser(rate_bit_s)  # client -> server, server -> client
    chunk = chunk_bytes(rate_bit_s)
    listener = socket.create_server((host, 0))
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection((host, target_port))
        except OSError:
            client.close()
            continue
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe(client, server, up, one_way_s, chunk)
        pipe(server, client, down, one_way_s, chunk)


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
