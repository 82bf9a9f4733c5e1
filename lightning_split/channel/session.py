"""Server-side sessions: what outlives a single gRPC stream.

A session belongs to one node id (the CN of the client's certificate). Its ``state`` dict is the
handler's: the model segment's autograd state, an optimizer, a KV cache... A broken stream leaves
the session alone; a reconnecting stream of the same node resumes it. Sessions end on CLOSE, on
idle-TTL expiry, a grace period after their last stream ended without a CLOSE (an orphan: its
client crashed or lost its link), when the server stops, or when the CRL revokes the owner's
certificate; each end goes through ``handler.close_session``.

Under mutual TLS a session is also bound to the SHA-256 fingerprint of the certificate that opened
it: only a stream presenting that very certificate resumes it. A renewed certificate (same CN, new
key and serial, e.g. ``lightning-split certs rotate --client NAME``) connects fine but opens a new
session; it continues the old work by resuming from a saved state tag, not by taking over the live
session. So a second certificate issued with the same CN cannot hijack a session either.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc

from lightning_split.wire import CompressionConfig, Message
from lightning_split.wire.compression import ENCODING_MODES

log = logging.getLogger(__name__)


class HandlerError(Exception):
    """Raised by a handler (or the channel) to answer with a specific gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclass(eq=False)
class Session:
    id: str
    node_id: str
    client_to_server: CompressionConfig
    server_to_client: CompressionConfig
    chunk_size: int
    checksum: bool = True  # frames to the client carry CRCs (agreed at the handshake)
    # Lossy modes a request may ask for its reply (Header.reply_encoding): both ends allow them.
    reply_lossy: frozenset[str] = frozenset()
    fingerprint: str = ""  # SHA-256 of the owner's client certificate; empty without TLS
    hello: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=dict)
    # Held while the handler works on a request: two streams of one session (an old one still
    # dying while the reconnect arrives) never run the handler concurrently on the same state.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    closed: bool = False
    suspended: bool = False  # closed because the server stops: a handler may keep it for a restart
    # The owner's share of the server's memory budget (budget.NodeAccount): what the session
    # holds between requests (saved activations, KV cache) is charged to it under keys that
    # start with the session id, and released when the session ends. None: not accounted.
    account: Any = field(default=None, repr=False)
    # Replies kept until the client acknowledges them (replies.ReplyRecord): exactly-once over
    # reconnects. Made by the first request.
    replies: Any = field(default=None, repr=False)
    _busy: int = field(default=0, repr=False)
    _streams: int = field(default=0, repr=False)  # live streams bound to it
    _orphaned: float | None = field(default=None, repr=False)  # when its last stream ended

    def reply_compression(self, request: Message) -> CompressionConfig:
        """The compression of the reply to ``request``: the agreed one, or the lossy mode the
        request asked for if both ends allow it."""
        mode = ENCODING_MODES.get(request.reply_encoding)
        if mode is None or mode not in self.reply_lossy or mode == self.server_to_client.lossy:
            return self.server_to_client
        return dataclasses.replace(self.server_to_client, lossy=mode)

    def touch(self) -> None:
        self.last_seen = time.monotonic()


@runtime_checkable
class SessionHandler(Protocol):
    """What the server-side application gives :class:`~lightning_split.channel.ChannelServer`.

    ``open_session`` runs once per new session with the client's hello (all its keys, including
    handler-specific ones); what it returns is merged into the welcome. It may raise HandlerError
    to refuse the client. ``handle`` gets each request (any message type but HANDSHAKE and CLOSE)
    and returns the body of a RESULT reply, or a full ``wire.Message`` to choose the reply's type
    and code. ``close_session`` frees what the session held; it is called exactly once.
    Optionally a handler may define ``resume_session(session, hello) -> dict``, called when a
    HANDSHAKE names an existing session of the same node.
    """

    def open_session(self, session: Session, hello: dict[str, Any]) -> dict[str, Any]: ...

    def handle(self, session: Session, request: Message) -> Any: ...

    def close_session(self, session: Session) -> None: ...


class SessionTable:
    """Live sessions, bounded in number, expired when idle for ``ttl_s``."""

    def __init__(self, handler: SessionHandler, max_sessions: int, ttl_s: float,
                 max_per_node: int | None = None, budget: Any = None, orphan_grace_s: float | None = None) -> None:
        self._handler = handler
        self._max = max_sessions
        self._max_per_node = max_per_node or max_sessions
        self._ttl = ttl_s
        self._orphan_grace = ttl_s if orphan_grace_s is None else orphan_grace_s
        self.closed_count = 0  # sessions ended so far (the server trims its heap after some end)
        self._budget = budget  # a budget.MemoryBudget: each session is charged to its node's account
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def snapshot(self) -> dict[str, Session]:
        with self._lock:
            return dict(self._sessions)

    def create(self, node_id: str, **kwargs: Any) -> Session:
        self.expire()
        self._make_room(node_id, kwargs.get("fingerprint", ""))
        with self._lock:
            # The node's own cap first: one tenant's excess must not use up the slots of others.
            held = sum(1 for s in self._sessions.values() if s.node_id == node_id)
            if held >= self._max_per_node:
                raise HandlerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"node {node_id!r} holds its maximum of {self._max_per_node} sessions; close one or retry later",
                )
            if len(self._sessions) >= self._max:
                raise HandlerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server holds its maximum of {self._max} sessions; close one or retry later",
                )
            # 128 random bits: a session id is a capability only in combination with the owner's
            # certificate, but it must not be guessable either.
            sid = secrets.token_hex(16)
            session = Session(id=sid, node_id=node_id, **kwargs)
            if self._budget is not None:
                session.account = self._budget.account(node_id)
            self._sessions[sid] = session
            return session

    def _make_room(self, node_id: str, fingerprint: str) -> None:
        """A node at a cap that still holds an orphan of the same certificate (its client crashed
        and came back as a new process) gets that slot back now, not after the grace period."""
        with self._lock:
            held = [s for s in self._sessions.values() if s.node_id == node_id]
            full = len(held) >= self._max_per_node or len(self._sessions) >= self._max
            orphans = sorted((s for s in held if s._orphaned is not None and s._busy == 0
                              and s.fingerprint == fingerprint), key=lambda s: s._orphaned or 0.0)
            if not full or not orphans:
                return
            taken = orphans[0]
            del self._sessions[taken.id]
        log.info("session %s of %s closed: its client came back with a new session", taken.id[:8], node_id)
        self._finish(taken)

    def restore(self, session_id: str, node_id: str, **kwargs: Any) -> Session:
        """Re-create a session a previous run of the server kept (same id, node and certificate),
        waiting for its client to resume it within the TTL."""
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id[:8]} exists already")
            session = Session(id=session_id, node_id=node_id, **kwargs)
            if self._budget is not None:
                session.account = self._budget.account(node_id)
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str, node_id: str, fingerprint: str = "") -> Session:
        """The live session ``session_id`` if ``node_id`` owns it, with the same certificate.

        Unknown or expired ids give NOT_FOUND; a session owned by another node, or opened with
        another certificate (``fingerprint``), gives PERMISSION_DENIED (ids are unguessable, so
        telling the two apart reveals nothing useful, and it makes a misconfigured client easy to
        diagnose).
        """
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise HandlerError(grpc.StatusCode.NOT_FOUND, f"no live session {session_id[:8]}...")
        if session.node_id != node_id:
            raise HandlerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"session {session_id[:8]}... does not belong to node {node_id!r}",
            )
        if session.fingerprint and session.fingerprint != fingerprint:
            raise HandlerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"session {session_id[:8]}... was opened with another certificate of node {node_id!r}; "
                "a renewed certificate opens a new session",
            )
        session.touch()
        return session

    def begin(self, session: Session) -> None:
        """Mark the session busy: a request that runs longer than the TTL must not expire it."""
        with self._lock:
            session._busy += 1
        session.touch()

    def end(self, session: Session) -> None:
        with self._lock:
            session._busy -= 1
        session.touch()

    def attach(self, session: Session) -> None:
        """A stream now carries the session: it is no orphan."""
        with self._lock:
            session._streams += 1
            session._orphaned = None

    def detach(self, session: Session) -> None:
        """A stream that carried the session ended; with no stream left, its grace period starts."""
        with self._lock:
            session._streams -= 1
            if session._streams <= 0:
                session._streams, session._orphaned = 0, time.monotonic()

    def close(self, session_id: str) -> bool:
        """Remove the session and let the handler free it; False if it was already gone."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._finish(session)
        return True

    def expire(self) -> list[str]:
        """Close sessions idle for longer than the TTL, and orphans past their grace; their ids."""
        now = time.monotonic()

        def why(s: Session) -> str | None:
            if s._busy:
                return None
            if s._orphaned is not None and now - s._orphaned > self._orphan_grace:
                return f"its last stream ended {now - s._orphaned:.0f} s ago without a CLOSE"
            return f"{now - s.last_seen:.0f} s idle" if now - s.last_seen > self._ttl else None

        with self._lock:
            dead = [(s, reason) for s in self._sessions.values() if (reason := why(s))]
            for s, _ in dead:
                del self._sessions[s.id]
        for s, reason in dead:
            log.info("session %s of %s expired: %s", s.id[:8], s.node_id, reason)
            self._finish(s)
        return [s.id for s, _ in dead]

    def close_where(self, predicate: Callable[[Session], bool]) -> list[str]:
        """Close the sessions ``predicate`` picks (e.g. those of a revoked certificate); their ids."""
        with self._lock:
            picked = [s for s in self._sessions.values() if predicate(s)]
            for s in picked:
                del self._sessions[s.id]
        for s in picked:
            self._finish(s)
        return [s.id for s in picked]

    def close_all(self, suspend: bool = False) -> None:
        """Close every session; ``suspend``: because the server stops (a handler may keep them)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.suspended = suspend
            self._finish(s)

    def _finish(self, session: Session) -> None:
        # Wait for a request still running on it, then free it exactly once.
        with session.lock:
            if session.closed:
                return
            session.closed = True
            self.closed_count += 1
            try:
                self._handler.close_session(session)
            except Exception as e:  # a handler bug must not take the server down
                log.error("close_session failed for session %s of %s: %s: %s", session.id[:8],
                          session.node_id, type(e).__name__, e)
                log.debug("close_session failure", exc_info=True)
            finally:
                session.state.clear()
                session.replies = None
                if session.account is not None:  # whatever the handler still had charged goes back
                    session.account.release_prefix(session.id)
