"""A fault-injecting TCP proxy for tests: a link that drops, freezes or is refused.

``FaultProxy(target_port)`` listens on 127.0.0.1:``.port`` and forwards each connection, byte for
byte, to the target. It never looks inside, so TLS, HTTP/2 and gRPC pass unchanged. While traffic
flows, a test (from any thread) can:

- ``cut_after(n)``: let ``n`` more bytes through, then reset every live connection: a link that
  drops mid-message. Peers see a RST (``SO_LINGER`` 0), as when a NAT or router loses the flow.
- ``cut_now()``: reset every live connection at once (a crashed peer host, a pulled cable).
- ``stall(t)`` / ``resume()``: forward nothing either way for ``t`` seconds (``None``: until
  ``resume()``), holding the bytes, connections left open: a frozen peer or a black-holing link.
- ``refuse(True)``: accept new connections and reset them at once: a server that is down.
- ``throttle(rate)``: each direction of each connection forwards at most ``rate`` bytes per second
  (None: as fast as it can): a slow link.

One thread runs a selector loop over every socket; the controls change state under a lock and
wake it. ``close()`` (or leaving the ``with`` block) stops it and closes every socket.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import struct
import threading
import time

_CHUNK = 64 * 1024
_MAX_BUFFER = 1 << 20  # per direction: stop reading a side whose destination does not drain
_CUT_FLUSH_S = 1.0  # a pending cut waits at most this long for the allowed bytes to be written
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


def _reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Pipe:
    """One direction of a connection: bytes read from ``src`` waiting to be written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.src, self.dst, self.up = src, dst, up
        self.buf = bytearray()
        self.eof = False  # src sent FIN: once buf is written, dst gets one too
        self.done = False  # that FIN was passed on
        self.free_at = 0.0  # throttled: when the link is free to write again


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.socks = (client, server)
        self.pipes = (_Pipe(client, server, True), _Pipe(server, client, False))
        self.closed = False


class FaultProxy:
    """A TCP proxy to ``host:target_port`` on 127.0.0.1:``.port``, with faults on demand.

    Counters: ``bytes_up`` / ``bytes_down`` (written to the server / to the client; counted just
    after the write, so a peer may see bytes a moment before they are counted), ``connections``
    (accepted, refused ones included), ``cuts`` (cut events, however many connections each reset).
    The target is dialled from the loop thread, blocking: meant for a target on loopback.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.bytes_up = self.bytes_down = self.connections = self.cuts = 0
        self._lock = threading.Lock()
        self._budget: int | None = None  # bytes left before a cut_after cut
        self._budget_dir = "both"
        self._cut_at: float | None = None  # a cut is due: when its allowed bytes are out, or at this time
        self._stall_until = 0.0  # monotonic; math.inf: until resume()
        self._refusing = self._stopping = False
        self._rate: float | None = None  # bytes per second per direction (throttle)
        self._conns: list[_Conn] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()  # any thread -> the loop: "look again"
        self._sel = selectors.DefaultSelector()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._sel.register(self._listener, _R)
        self._sel.register(self._wake_r, _R)
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- controls (any thread) ---------------------------------------------------------------
    def cut_after(self, nbytes: int, direction: str = "both") -> None:
        """Reset every live connection once ``nbytes`` more bytes have passed ("up": client to
        server, "down": server to client, "both"). One-shot: later connections pass normally."""
        if direction not in ("up", "down", "both") or nbytes < 0:
            raise ValueError(f"cut_after({nbytes!r}, {direction!r})")
        with self._lock:
            self._budget, self._budget_dir = nbytes, direction
            if nbytes == 0:
                self._arm_cut()
        self._wake()

    def cut_now(self) -> None:
        """Reset every live connection now."""
        with self._lock:
            self._budget, self._cut_at = None, 0.0
        self._wake()

    def stall(self, seconds: float | None) -> None:
        """Forward nothing, either way, on live and new connections, for ``seconds`` (None: until resume)."""
        with self._lock:
            self._stall_until = math.inf if seconds is None else time.monotonic() + seconds
        self._wake()

    def resume(self) -> None:
        with self._lock:
            self._stall_until = 0.0
        self._wake()

    def throttle(self, bytes_per_s: float | None) -> None:
        with self._lock:
            self._rate = bytes_per_s
        self._wake()

    def refuse(self, on: bool) -> None:
        """While on, new connections are accepted and reset at once."""
        with self._lock:
            self._refusing = on

    @property
    def live(self) -> int:
        """Connections being forwarded now."""
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout=5.0)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop (its own thread) -------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (stopped)
            self._wake_w.send(b"x")

    def _arm_cut(self) -> None:  # under the lock
        self._budget = None
        self._cut_at = time.monotonic() + _CUT_FLUSH_S

    def _want(self, sock: socket.socket, events: int, conn: _Conn | None = None) -> None:
        key = self._sel.get_map().get(sock)
        if key is None and events:
            self._sel.register(sock, events, conn)
        elif key is not None and not events:
            self._sel.unregister(sock)
        elif key is not None and key.events != events:
            self._sel.modify(sock, events, conn)

    def _drop(self, conn: _Conn, reset: bool) -> None:
        with self._lock:  # first: once a peer sees the close, ``live`` no longer counts it
            self._conns.remove(conn)
        conn.closed = True
        for sock in conn.socks:
            self._want(sock, 0)
            if reset:
                _reset(sock)
            else:
                sock.close()

    def _run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    if self._stopping:
                        return
                    stalled = now < self._stall_until
                    due = self._cut_at is not None and (
                        self._cut_at <= now or not any(p.buf for c in self._conns for p in c.pipes))
                    if due:
                        self._cut_at = None
                        self.cuts += 1
                    cutting = self._cut_at is not None  # stop reading until the allowed bytes are out
                    conns = list(self._conns)
                    rate = self._rate
                if due:
                    for conn in conns:
                        self._drop(conn, reset=True)
                    conns = []
                throttled = []  # when a throttled pipe may write again
                for conn in conns:  # stalled: nothing; cutting: writes only; else reads while there is room
                    want = dict.fromkeys(conn.socks, 0)
                    for p in conn.pipes if not stalled else ():
                        want[p.src] |= _R if not cutting and not p.eof and len(p.buf) < _MAX_BUFFER else 0
                        free = rate is None or p.free_at <= now
                        want[p.dst] |= _W if p.buf and free else 0
                        if p.buf and not free:
                            throttled.append(p.free_at - now)
                    for sock, events in want.items():
                        self._want(sock, events, conn)
                timeout = 0.02 if cutting else min(1.0, max(0.0, self._stall_until - now)) if stalled else 1.0
                timeout = min([timeout, *throttled])
                for key, events in self._sel.select(timeout):
                    if key.fileobj is self._wake_r:
                        self._wake_r.recv(4096)
                    elif key.fileobj is self._listener:
                        self._accept()
                    elif not key.data.closed:
                        self._pump(key.data, key.fileobj, events)
        finally:
            for conn in list(self._conns):
                self._drop(conn, reset=False)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            with self._lock:
                self.connections += 1
                refusing = self._refusing
            if refusing:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                _reset(client)
                continue
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append(_Conn(client, server))

    def _pump(self, conn: _Conn, sock: socket.socket, events: int) -> None:
        try:
            for p in conn.pipes:
                if events & _W and p.dst is sock and p.buf:
                    rate = self._rate
                    sent = sock.send(p.buf if rate is None else p.buf[:_CHUNK // 4])
                    del p.buf[:sent]
                    if rate is not None:  # the link is busy for as long as these bytes take
                        p.free_at = max(time.monotonic(), p.free_at) + sent / rate
                    with self._lock:
                        self.bytes_up += sent if p.up else 0
                        self.bytes_down += 0 if p.up else sent
                if events & _R and p.src is sock:
                    with self._lock:  # a budget, when set, is > 0 (0 arms the cut at once)
                        counts = self._budget_dir in ("both", "up" if p.up else "down")
                        budget = self._budget if counts else None
                    data = sock.recv(_CHUNK if budget is None else min(_CHUNK, budget))
                    p.buf += data
                    p.eof = not data
                    with self._lock:
                        if budget is not None and self._budget is not None:
                            self._budget -= len(data)
                            if self._budget <= 0:
                                self._arm_cut()
                if p.eof and not p.buf and not p.done:
                    p.dst.shutdown(socket.SHUT_WR)
                    p.done = True
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # one side reset or failed: so does the other
            self._drop(conn, reset=True)
            return
        if all(p.done for p in conn.pipes):
            self._drop(conn, reset=False)
