"""The client's view of one Exchange stream, and of a request waiting for its reply.

``ClientStream``: its gRPC call(s) (one, or one per connection of a bond), the frame dealer and
round-robin reader, its reader thread, when a reply last arrived and the liveness check in flight.
``PendingRequest``: a request's future, the stream it went on, its deadline, and the request
itself, to send again on a new stream after a reconnect.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc

from lightning_split.wire import Message

from .bond import FrameDealer, RoundRobinReader

_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
# How long the connections of a failed bonded stream are given to receive the server's status.
BOND_STATUS_GRACE_S = 0.5


def error_text(msg: Message) -> str:
    """The text of an ERROR reply (ErrorBody.message)."""
    body = msg.body
    return str(body.get("message", "")) if isinstance(body, dict) else str(body)


def status_from_int(value: int) -> grpc.StatusCode:
    return _STATUS_BY_VALUE.get(int(value), grpc.StatusCode.UNKNOWN)


class RemoteError(Exception):
    """A request failed on the server (an ERROR reply) or on the way (a broken stream)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class PendingRequest:
    future: Future
    stream: ClientStream
    sent_at: float
    deadline: float
    # The request, to send again on a new stream after a reconnect (None: not to be re-sent, like
    # the hello of the stream that broke), and the compression it was sent with (None: as agreed).
    request: Message | None = None
    compression: Any = None


class ClientStream:
    """One logical Exchange stream: its call(s), the frame dealer and reader, its reader thread.

    Usually one call; bonded over several connections (bond.py) after a handshake that grants it.
    """

    def __init__(self, join_timeout_s: float) -> None:
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # the first connection's
        self.dealer = FrameDealer(self.outbox)
        self.calls: list[Any] = []
        self.rr: RoundRobinReader | None = None
        self.join_timeout_s = join_timeout_s
        self.reader: threading.Thread | None = None
        self.dead = threading.Event()
        self.error: RemoteError | None = None  # set (under the client's pending lock) once it failed
        # Liveness: when a reply last arrived, the health check in flight, and why we gave up on it.
        self.last_rx = time.monotonic()
        self.probe: Any = None
        self.stalled: RemoteError | None = None

    def start(self, call: Any) -> None:
        self.rr = RoundRobinReader(call, self.join_timeout_s)
        self.add(call)

    def add(self, call: Any) -> None:
        self.calls.append(call)
        # A message may have fragments on any connection: one that ends ends the whole stream, at
        # once, rather than when the reader next gets to it (the reader then fails what is pending).
        # When the server ended it, the others get a moment to receive their own status first: the
        # server ends a failed bonded stream with its error on one connection, plainly on the rest.
        call.add_done_callback(lambda c: self.shutdown(grace_s=self._grace(c)))

    def shutdown(self, grace_s: float = 0.0) -> None:
        if self.dead.is_set():
            return
        self.dead.set()  # before the reader notices: no new request may pick this stream
        self.dealer.close()
        if grace_s:
            timer = threading.Timer(grace_s, self._cancel_all)
            timer.daemon = True
            timer.start()
        else:
            self._cancel_all()

    def _grace(self, ended: Any) -> float:
        if len(self.calls) < 2 or ended.code() == grpc.StatusCode.CANCELLED:  # ours, or a lone one
            return 0.0
        return BOND_STATUS_GRACE_S

    def _cancel_all(self) -> None:
        for call in list(self.calls):
            call.cancel()

    def failure(self, fallback: RemoteError) -> RemoteError:
        """Why the stream failed: the status of the connection that carried the server's error.

        On a bonded stream the reader may be on a connection that the server closed plainly, or
        that our own shutdown cancelled, after another one ended with the real status."""
        if len(self.calls) > 1:
            deadline = time.monotonic() + BOND_STATUS_GRACE_S
            for call in self.calls:
                while not call.done() and time.monotonic() < deadline:
                    time.sleep(0.005)
            for call in self.calls:
                if call.done() and call.code() not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                    return RemoteError(call.code(), call.details() or "stream failed")
        return fallback


def fail_all(pending: list[PendingRequest], err: RemoteError) -> None:
    for p in pending:
        if not p.future.done():
            p.future.set_exception(RemoteError(err.code, err.message))
