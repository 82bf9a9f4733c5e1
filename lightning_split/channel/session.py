"""Server-side sessions: what outlives a single gRPC stream.

A session belongs to one node id (the CN of the client's certificate). Its ``state`` dict is the
handler's: the model segment's autograd state, an optimizer, a KV cache... A broken stream leaves
the session alone; a reconnecting stream of the same node resumes it. Sessions end on CLOSE, on
idle-TTL expiry, or when the server stops; each end goes through ``handler.close_session``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc

from lightning_split.wire import CompressionConfig, Message

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
    hello: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=dict)
    # Held while the handler works on a request: two streams of one session (an old one still
    # dying while the reconnect arrives) never run the handler concurrently on the same state.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    closed: bool = False
    _busy: int = field(default=0, repr=False)

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

    def __init__(self, handler: SessionHandler, max_sessions: int, ttl_s: float) -> None:
        self._handler = handler
        self._max = max_sessions
        self._ttl = ttl_s
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
        with self._lock:
            if len(self._sessions) >= self._max:
                raise HandlerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server holds its maximum of {self._max} sessions; close one or retry later",
                )
            # 128 random bits: a session id is a capability only in combination with the owner's
            # certificate, but it must not be guessable either.
            sid = secrets.token_hex(16)
            session = Session(id=sid, node_id=node_id, **kwargs)
            self._sessions[sid] = session
            return session

    def get(self, session_id: str, node_id: str) -> Session:
        """The live session ``session_id`` if ``node_id`` owns it.

        Unknown or expired ids give NOT_FOUND; a session owned by another node gives
        PERMISSION_DENIED (ids are unguessable, so telling the two apart reveals nothing useful,
        and it makes a misconfigured client easy to diagnose).
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

    def close(self, session_id: str) -> bool:
        """Remove the session and let the handler free it; False if it was already gone."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._finish(session)
        return True

    def expire(self) -> list[str]:
        """Close sessions idle for longer than the TTL; returns their ids."""
        now = time.monotonic()
        with self._lock:
            dead = [s for s in self._sessions.values() if s._busy == 0 and now - s.last_seen > self._ttl]
            for s in dead:
                del self._sessions[s.id]
        for s in dead:
            log.info("session %s of %s expired after %.0f s idle", s.id[:8], s.node_id, now - s.last_seen)
            self._finish(s)
        return [s.id for s in dead]

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            self._finish(s)

    def _finish(self, session: Session) -> None:
        # Wait for a request still running on it, then free it exactly once.
        with session.lock:
            if session.closed:
                return
            session.closed = True
            try:
                self._handler.close_session(session)
            except Exception:  # a handler bug must not take the server down
                log.exception("close_session failed for session %s", session.id[:8])
