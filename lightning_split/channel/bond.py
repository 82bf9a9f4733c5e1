"""Bonded connections: one logical Exchange stream carried by several gRPC connections.

Why: gRPC's core encrypts, frames and copies the bytes of one connection on one thread at a time.
On hosts where that path moves well under a GB/s (measured on an H200 VM: ~0.3-0.6 GB/s per
connection, 2.4x that with four), several connections carry a large activation faster.

How, without touching what the stream means: fragment n of the logical stream (counting from the
handshake's reply on) travels on connection n mod K, in both directions, and each side reads its
K connections in the same round-robin order. The fragments therefore come out of the
``RoundRobinReader`` in exactly the order a single stream would deliver them, and go through the
same ``Reassembler`` checks; messages are handled and answered in order as before.

Setting up a bond: the client's hello asks for ``connections: K``; the server's welcome grants
K (at most its own ``max_connections``) and a random ``bond_token``. The client then opens K-1
more connections; on each, its first message is a HANDSHAKE ``{"join": token, "index": i}``,
answered on that connection alone. The server accepts a join only from the identity that opened
the bond (its certificate's CN), once per index, before the handshake timeout. Neither the join
nor its answer counts as a bonded fragment. If any of the K connections fails, the whole logical
stream fails (a request's fragments may be on any of them).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from .framing import EncodedFrames

CLOSE = None  # an outbox item that ends its connection's request/response generator
ABORT = object()  # an outbox item that ends it with the error the stream was aborted with


class BondAborted(Exception):  # noqa: N818 - raised by outbox_frames on ABORT
    pass


class _Ring:
    """K slots filled as connections join, and the slot whose turn is next (fragment n: n mod K).

    What the dealer (outboxes) and the reader (incoming iterators) share: slot 0 is the stream's
    own connection; ``expand`` makes room for the bond's others and restarts the count at 0.
    """

    def __init__(self, first: Any) -> None:
        self.slots: list[Any] = [first]
        self.next = 0
        self._ready = threading.Condition()

    def expand(self, count: int) -> None:
        with self._ready:
            self.slots += [None] * (count - len(self.slots))
            self.next = 0

    def attach(self, index: int, item: Any) -> None:
        with self._ready:
            self.slots += [None] * (index + 1 - len(self.slots))
            self.slots[index] = item
            self._ready.notify_all()

    def _slot(self, index: int, timeout: float | None) -> Any:
        """Slot ``index``'s item, waiting up to ``timeout`` for its connection to join."""
        with self._ready:
            if not self._ready.wait_for(lambda: self.slots[index] is not None, timeout):
                raise TimeoutError(f"bonded connection {index} never joined")
            return self.slots[index]

    def _advance(self, index: int) -> None:
        with self._ready:
            self.next = (index + 1) % len(self.slots)


class FrameDealer(_Ring):
    """Deals the fragments of each message over K outboxes, fragment n to outbox n mod K."""

    def __init__(self, outbox: queue.SimpleQueue) -> None:
        super().__init__(outbox)
        self.closed = False

    def attach(self, index: int, outbox: queue.SimpleQueue) -> None:
        with self._ready:  # a re-entrant lock: the check and the attach are one step
            if self.closed:  # the stream ended before this connection joined: end it too
                outbox.put(CLOSE)
                return
            super().attach(index, outbox)

    @property
    def width(self) -> int:
        """K: the connections the fragments are dealt over (those still joining included)."""
        return len(self.slots)

    def put(self, frames: EncodedFrames, timeout: float | None = None) -> None:
        """Deal ``frames``; a connection that has not joined yet is waited for (``timeout``)."""
        for i in range(frames.fragment_count):
            index = self.next
            self._slot(index, timeout).put((frames, i))
            self._advance(index)

    def close(self, first: Any = CLOSE) -> None:
        """End every attached outbox: the first (the stream's own connection) with ``first``."""
        with self._ready:
            self.closed = True
            attached = list(self.slots)
        for i, outbox in enumerate(attached):
            if outbox is not None:
                outbox.put(first if i == 0 else CLOSE)


def send_whole(outbox: queue.SimpleQueue, frames: EncodedFrames) -> None:
    """All of a message on one connection, outside any bond's count (a join and its answer)."""
    for i in range(frames.fragment_count):
        outbox.put((frames, i))


def outbox_frames(outbox: queue.SimpleQueue, alive: Any = None) -> Iterator[bytes]:
    """One connection's share of the dealt fragments, serialized as gRPC needs them to be sent.

    ``alive``: a callable; while nothing is queued it is asked every second, and the generator
    ends once it says False (a server connection whose call is gone must not hold its thread).
    """
    while True:
        try:
            item = outbox.get(timeout=1.0 if alive is not None else None)
        except queue.Empty:
            if not alive():
                return
            continue
        if item is CLOSE:
            return
        if item is ABORT:
            raise BondAborted
        frames, index = item
        yield frames.frame(index)
        if index == frames.fragment_count - 1 and frames.on_sent is not None:
            frames.on_sent()  # the message's last fragment is gRPC's now (server.py's reply window)


_PENDING = object()  # a read-ahead still waiting for its connection's next fragment
# How long a join may lag behind a fragment that needs it. A client sends nothing bonded before
# every join is answered, and the server attaches a joined connection before answering it, so a
# fragment (or a reply) due on a connection that has not joined means that join is not coming;
# the grace only absorbs a join answered but not yet attached on the server's side.
JOIN_GRACE_S = 2.0


class RoundRobinReader(_Ring):
    """Reads K connections' incoming fragments in round-robin order: the logical stream.

    While it waits for a connection to join, it reads one fragment ahead on each connection that
    is already there (a thread each, only then). If one of those ends meanwhile (the peer
    half-closed or cancelled it), the logical stream can never go on, and the wait ends at once;
    if one delivers a fragment, the join should have come before it, and the wait ends after
    ``JOIN_GRACE_S``. Either way with TimeoutError, as when the join timeout passes, instead of
    holding the stream and its thread for the whole join timeout.

    The same read-ahead serves a worker about to be busy (``read_ahead``): grpcio receives a
    message only when asked for the next one, on the asking thread, so while the worker handles a
    request the next one's fragments would wait in the connections, to be received one connection
    after another once it is done.
    """

    def __init__(self, first: Iterator[bytes], join_timeout_s: float) -> None:
        super().__init__(first)
        self.join_timeout_s = join_timeout_s
        # slot -> _PENDING, or what its read-ahead got and when: (fragment, None, t) or (None, the
        # exception, t): StopIteration when the connection ended, an RpcError when it broke.
        self._ahead: dict[int, Any] = {}
        # slot -> its reading thread, started at its first read-ahead and kept: it waits for the
        # next (``Thread.start`` waits for the thread to run: on a busy host that cost the worker
        # a third of its time when every striped message started K of them).
        self._readers: dict[int, threading.Thread] = {}
        self._closed = False

    def close(self) -> None:
        """The stream is done with its connections: the reading threads end."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            index = self.next
            source = self._joined(index)
            try:
                raw = self._take(index, source)
            except StopIteration:
                return
            self._advance(index)
            yield raw

    def read_ahead(self) -> None:
        """Receive the next fragment of every connection now, each on a thread of its own, while
        the caller goes on (the server's worker, with a message to handle that was striped over
        the connections: the next micro-batch's fragments arrive meanwhile). One fragment a
        connection; a message of one fragment (a decode step) never asks for it, as the thread
        hop would only add to its round trip (measured on a 2-core VM: 1.35 -> 2.03 ms)."""
        with self._ready:
            if len(self.slots) > 1:
                self._start_read_ahead()

    def _start_read_ahead(self) -> None:
        """Under the lock: ask each connection's reading thread for one fragment (_PENDING)."""
        for j, source in enumerate(self.slots):
            if source is not None and j not in self._ahead:
                self._ahead[j] = _PENDING
                if j not in self._readers:
                    self._readers[j] = threading.Thread(target=self._read_ahead, args=(j, source), daemon=True,
                                                        name="split-bond-read-ahead")
                    self._readers[j].start()
        self._ready.notify_all()

    def _joined(self, index: int) -> Any:
        """Slot ``index``'s connection, waiting up to the join timeout for it to join, or until
        one of the connections already there ends."""
        start = time.monotonic()
        deadline, why = start + self.join_timeout_s, ""
        with self._ready:
            while self.slots[index] is None:
                self._start_read_ahead()
                for j, got in self._ahead.items():
                    if got is _PENDING:
                        continue
                    if got[1] is not None:
                        raise TimeoutError(f"bonded connection {index} never joined: connection {j} "
                                           "ended first") from None
                    arrived = max(got[2], start)  # read ahead before this wait (read_ahead): from now
                    if arrived + JOIN_GRACE_S < deadline:
                        deadline, why = arrived + JOIN_GRACE_S, f" (fragments wait on connection {j})"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"bonded connection {index} never joined{why}")
                self._ready.wait(remaining)
            return self.slots[index]

    def _read_ahead(self, index: int, source: Iterator[bytes]) -> None:
        """Slot ``index``'s reading thread: one fragment each time it is asked, until the
        connection ends or the reader closes."""
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._closed or self._ahead.get(index) is _PENDING)
                if self._closed:
                    return
            try:
                got: tuple[Any, BaseException | None, float] = (next(source), None, time.monotonic())
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises or ends
                got = (None, e, time.monotonic())
            with self._ready:
                self._ahead[index] = got
                self._ready.notify_all()
            if got[1] is not None:
                return

    def _take(self, index: int, source: Iterator[bytes]) -> bytes:
        """Slot ``index``'s next fragment: the one read ahead if there is one, else the next one."""
        with self._ready:
            if index in self._ahead:
                self._ready.wait_for(lambda: self._ahead[index] is not _PENDING)
                raw, error, _ = self._ahead.pop(index)
                if error is not None:
                    raise error
                return raw
        return next(source)


class Bond:
    """The server's record of one logical stream's connections while they join."""

    def __init__(self, identity: str, count: int, reader: RoundRobinReader, dealer: FrameDealer) -> None:
        self.identity, self.count = identity, count
        self.reader, self.dealer = reader, dealer
        self.token = secrets.token_hex(16)
        self.joined: set[int] = set()
        self.created = time.monotonic()

    def activate(self) -> None:
        """Bonded counting starts: the next fragment each way is fragment 0, on connection 0."""
        self.reader.expand(self.count)
        self.dealer.expand(self.count)


class BondTable:
    """Bonds waiting for their connections, by token. A join is checked against the bond's
    identity and index; a bond stays joinable for ``timeout_s`` after it is opened."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._bonds: dict[str, Bond] = {}
        self._lock = threading.Lock()

    def open(self, identity: str, count: int, reader: RoundRobinReader, dealer: FrameDealer) -> Bond:
        """Register a bond; the stream calls ``bond.activate()`` once its welcome is on its way."""
        bond = Bond(identity, count, reader, dealer)
        with self._lock:
            self._forget_stale()
            self._bonds[bond.token] = bond
        return bond

    def join(self, token: Any, index: Any, identity: str) -> Bond:
        """The bond a join message names; ValueError (PERMISSION_DENIED to the peer) otherwise."""
        with self._lock:
            self._forget_stale()
            bond = self._bonds.get(token) if isinstance(token, str) else None
            if bond is None or bond.identity != identity:
                raise ValueError("unknown bond token (or it belongs to another identity)")
            if not isinstance(index, int) or isinstance(index, bool) or not 0 < index < bond.count \
                    or index in bond.joined:
                raise ValueError(f"bond index {index!r} is out of range or already joined")
            bond.joined.add(index)
            if len(bond.joined) == bond.count - 1:  # complete: no more joins
                del self._bonds[bond.token]
            return bond

    def forget(self, token: str) -> None:
        """The bond's stream ended: no connection may join it any more (and it no longer holds
        the stream's call and outbox until the next open or join finds it stale)."""
        with self._lock:
            self._bonds.pop(token, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._bonds)

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for token in [t for t, b in self._bonds.items() if now - b.created > self.timeout_s]:
            del self._bonds[token]
