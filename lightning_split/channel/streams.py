"""The server's live streams: fair admission per node, and a watchdog for idle and stalled ones.

Each Exchange call holds a server thread for as long as it lives, so streams are a resource one
tenant could take from all others. The :class:`StreamTable` admits at most ``max_per_node`` live
streams per node (the identity of its client certificate) and refuses the excess with
RESOURCE_EXHAUSTED; other nodes are admitted as before.

The watchdog (:meth:`StreamTable.overdue`, called by the server's reaper every second or so)
ends streams that hold resources without using them:

* no HANDSHAKE (or first request) within ``handshake_s`` of opening;
* a message whose fragments stop arriving for ``stall_s`` (its partial payload is freed);
* after the handshake, nothing sent and nothing awaited for ``idle_s``: the session lives on,
  the client's next request opens a new stream;
* replies the client does not read for ``stall_s`` (the reply window stays full).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import grpc

from .session import HandlerError

__all__ = ["ReplyWindow", "StreamTable", "WatchedStream"]


class WatchedStream(Protocol):
    """What the watchdog reads of a stream (``channel.server_stream.ServerStream``)."""

    identity: str | None
    opened: float  # time.monotonic() when the call arrived
    last_active: float  # the last fragment received or reply finished
    joined: bool  # a connection handed to another stream's bond: that stream watches for both
    fingerprint: str  # of the client certificate ("" in plaintext)

    def handshaken(self) -> bool: ...

    def receiving(self) -> bool: ...  # a message is partly received

    def busy(self) -> bool: ...  # a request is being handled, or replies wait to be sent

    def expire(self, code: grpc.StatusCode, reason: str) -> None: ...


class StreamTable:
    """Live streams by node; ``admit`` / ``leave`` bracket each stream's life."""

    def __init__(self, max_per_node: int, handshake_s: float, idle_s: float, stall_s: float) -> None:
        self.max_per_node = max_per_node
        self.handshake_s, self.idle_s, self.stall_s = handshake_s, idle_s, stall_s
        self._lock = threading.Lock()
        self._streams: dict[str, set[WatchedStream]] = {}
        self._anonymous: set[WatchedStream] = set()  # insecure streams before their first frame

    def watch(self, stream: WatchedStream) -> None:
        """Watch a stream whose identity is not known yet (plaintext, before its first frame)."""
        with self._lock:
            self._anonymous.add(stream)

    def admit(self, node_id: str, stream: WatchedStream) -> None:
        """Count ``stream`` against ``node_id``; HandlerError(RESOURCE_EXHAUSTED) over its cap."""
        with self._lock:
            held = self._streams.setdefault(node_id, set())
            if len(held) >= self.max_per_node:
                raise HandlerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"node {node_id!r} holds its maximum of {self.max_per_node} streams; close one or retry later")
            self._anonymous.discard(stream)
            held.add(stream)

    def leave(self, stream: WatchedStream) -> None:
        with self._lock:
            self._anonymous.discard(stream)
            for node_id, held in list(self._streams.items()):
                held.discard(stream)
                if not held:
                    del self._streams[node_id]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {n: len(s) for n, s in self._streams.items()}

    def overdue(self, now: float | None = None) -> list[tuple[WatchedStream, grpc.StatusCode, str]]:
        """Streams the watchdog should end now, with the status and reason to end them with."""
        now = time.monotonic() if now is None else now
        with self._lock:
            streams = list(self._anonymous) + [s for held in self._streams.values() for s in held]
        out = []
        for s in streams:
            if s.joined:
                continue
            if not s.handshaken():
                if now - s.opened > self.handshake_s:
                    out.append((s, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no HANDSHAKE within {self.handshake_s:.0f} s of opening the stream"))
            elif s.receiving():
                if now - s.last_active > self.stall_s:
                    out.append((s, grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"a message stalled: no fragment for {self.stall_s:.0f} s"))
            elif not s.busy() and now - s.last_active > self.idle_s:
                out.append((s, grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the stream was idle for {self.idle_s:.0f} s (the session lives on)"))
        return out

    def expire_where(self, predicate: Callable[[WatchedStream], bool], code: grpc.StatusCode, reason: str) -> int:
        """End every stream ``predicate`` picks (e.g. those of a revoked certificate); how many."""
        with self._lock:
            streams = [s for held in self._streams.values() for s in held if predicate(s)]
        for s in streams:
            s.expire(code, reason)
        return len(streams)

    def expire_overdue(self) -> int:
        """End every overdue stream; returns how many."""
        overdue = self.overdue()
        for stream, code, reason in overdue:
            stream.expire(code, reason)
        return len(overdue)


class ReplyWindow:
    """At most ``size`` replies queued but not yet handed to gRPC on one stream.

    A client that sends requests but never reads its replies would otherwise make the server
    queue reply after reply in memory; with the window full the server stops reading the
    client's requests (gRPC's flow control then stops the client), and a window that stays full
    for the stall timeout ends the stream.
    """

    def __init__(self, size: int) -> None:
        self._free = threading.Semaphore(size)
        self._size = size
        self._lock = threading.Lock()
        self._queued = 0

    def acquire(self, timeout: float) -> bool:
        if not self._free.acquire(timeout=timeout):
            return False
        with self._lock:
            self._queued += 1
        return True

    def release(self) -> None:
        with self._lock:
            self._queued -= 1
        self._free.release()

    def pending(self) -> int:
        with self._lock:
            return self._queued

    def on_sent(self) -> Callable[[], None]:
        """The callback the sender calls once a reply's last fragment went to gRPC."""
        return self.release
