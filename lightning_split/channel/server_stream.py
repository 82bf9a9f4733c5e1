"""One ``Split.Exchange`` call on the server: its identity, its session, its reassembler, its worker.

Frames in: each raw frame is cut (``framing.split_frame``), checked against the peer's
authenticated identity and fed to the stream's ``Reassembler``, whose payloads are charged to the
node's memory budget before they are allocated. Messages: the first binds the stream to a session
(a HANDSHAKE opens or resumes one; a request naming a session resumes it), the rest go to the
application's ``SessionHandler`` in order. Replies out: encoded by the worker thread, dealt to the
connection(s) of the stream, at most ``REPLY_WINDOW`` waiting to be sent.

Identity: with mutual TLS (the default) the peer is the CN of its client certificate, and every
frame's ``header.node_id`` must equal it (else PERMISSION_DENIED). With ``insecure=True`` (loopback
only, for tests and demos) the first frame's node id is taken on trust and the rest must match it.

Errors: a handler exception answers that one request with an ERROR reply (HandlerError keeps its
code, anything else is INTERNAL with a reference, never Python's text) and the stream goes on. A
protocol or wire violation aborts the stream with a status code and a message, logged as one
line naming the node. Neither harms other streams or the session's state.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, Message, Reassembler, WireError
from lightning_split.wire.compression import AcceptedEncodings
from lightning_split.wire.typed_body import expected_case

from . import handshake
from .bond import ABORT, CLOSE, JOIN_GRACE_S, Bond, FrameDealer, RoundRobinReader, send_whole
from .framing import EncodedFrames, encode_frames, split_frame
from .identity import peer_from_auth_context
from .replies import ReplyRecord
from .session import HandlerError, Session
from .streams import ReplyWindow

if TYPE_CHECKING:
    from .server import ChannelServer

log = logging.getLogger(__name__)

SERVER_NODE_ID = "server"
_NO_COMPRESSION = CompressionConfig()
# Replies queued on one stream but not yet sent (streams.ReplyWindow): more than a client pipelines.
REPLY_WINDOW = 32
MAX_DETAILS = 1000  # characters of an error's text sent to the peer


def internal_error(what: str, error: BaseException) -> str:
    """Log a failure of ours in one line (the traceback at DEBUG); returns a reference for the peer,
    which gets no Python internals (exception text may name files, values, other tenants)."""
    ref = secrets.token_hex(4)
    log.error("internal error %s in %s: %s: %s", ref, what, type(error).__name__, error)
    log.debug("internal error %s", ref, exc_info=error)
    return ref


def shortened(text: str, limit: int = MAX_DETAILS) -> str:
    """``text`` cut to ``limit`` characters: a message may quote what the peer sent (a node id, a
    hello's field), and status details travel in HTTP/2 trailers, which gRPC caps at a few KiB."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} chars)"
    return text[: limit - len(tail)] + tail


def error_message(request: Message, code: grpc.StatusCode, text: str) -> Message:
    return Message(type=pb.ERROR, body={"message": shortened(text)}, code=code.value[0], session_id=request.session_id,
                   step=request.step, sequence=request.sequence, node_id=SERVER_NODE_ID)


class ServerStream:
    """The state of one Exchange stream: its identity, its session, its reassembler."""

    def __init__(self, server: ChannelServer, context: grpc.ServicerContext,
                 requests: Iterator[bytes]) -> None:
        self.srv = server
        # The handler's instructions take typed bodies (the split protocol's do; a channel that
        # carries another protocol may send untyped Value trees).
        self.typed = bool(getattr(server.handler, "typed_bodies", False))
        self.cfg = server.config
        self.context = context
        self.requests = requests
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # what this connection sends
        # The logical stream: this connection's frames, or a bond's over several connections.
        self.reader = RoundRobinReader(requests, server.config.handshake_timeout_s)
        self.dealer = FrameDealer(self.outbox)
        self.bond: Bond | None = None  # opened by our handshake, activated once the welcome is dealt
        self.bond_token = ""  # its token: the bond is forgotten when this stream ends (release)
        self.joined = False  # this connection was handed to another stream's bond
        self.identity: str | None = None if server.insecure else self._certificate_identity()
        self.session: Session | None = None
        self.finished = False
        self.handshake_done = threading.Event()
        # We verify CRCs if *we* want them; the handshake makes the client send them then.
        self.verify = server.checksum
        self.reassembler = self._reassembler(_NO_COMPRESSION)
        # What the watchdog reads (streams.py).
        self.opened = self.last_active = time.monotonic()
        self.handling = False
        self.window = ReplyWindow(REPLY_WINDOW)
        self.payload_key = ("stream", id(self))  # a message in flight, in the node's memory account

    @property
    def account(self) -> Any:
        """The node's share of the memory budget (in plaintext the node is known after a frame)."""
        return self.srv.budget.account(self.identity or "")

    def _reassembler(self, allowed: CompressionConfig | AcceptedEncodings) -> Reassembler:
        # Every message's payload is charged to the node's memory budget before it is allocated.
        return Reassembler(self.cfg.limits, checksum=self.verify, compression_allowed=allowed,
                           pin_memory=self.cfg.wants_pinned(), charge=self._charge_payload)

    def _charge_payload(self, nbytes: int) -> None:
        account = self.account
        try:
            account.set(self.payload_key, nbytes, "a message in flight")
        except HandlerError as e:
            raise WireError(e.message, e.code) from None

    def admit(self) -> None:
        if self.identity is None:  # plaintext: the first frame names the peer, then it is admitted
            self.srv.streams.watch(self)
            return
        try:
            self.srv.streams.admit(self.identity, self)
        except HandlerError as e:
            self._refuse(e.code, e.message)

    # -- what the watchdog reads ----------------------------------------------------------------
    def handshaken(self) -> bool:
        return self.handshake_done.is_set()

    def receiving(self) -> bool:
        return self.reassembler.in_progress

    def busy(self) -> bool:
        return self.handling or self.window.pending() > 0

    def expire(self, code: grpc.StatusCode, reason: str) -> None:
        """End this stream from the watchdog's thread: the peer gets ``code`` and ``reason``."""
        log.warning("stream of %s ended: %s", self.identity or self.context.peer(), reason)
        with contextlib.suppress(Exception):  # abort() records the status, then raises here
            self.context.abort(code, reason)
        self.dealer.close(ABORT)  # the sending generator raises, gRPC sends the status

    def _refuse(self, code: grpc.StatusCode, message: str) -> None:
        """Abort the call with ``code``: one log line with the node id, no traceback."""
        message = shortened(message)
        log.warning("refused %s: %s: %s", shortened(self.identity or self.context.peer(), 80), code.name, message)
        self.context.abort(code, message)

    fingerprint = ""  # of the client certificate, set by _certificate_identity (none in plaintext)

    def _certificate_identity(self) -> str:
        """The node id (CN) of the client certificate; a revoked certificate is refused here."""
        try:
            peer = peer_from_auth_context(self.context.auth_context())
        except HandlerError as e:
            self.context.abort(e.code, e.message)
        if self.srv.revocations.is_revoked(peer):
            log.warning("refused %s: its certificate (serial %x) is revoked", peer.node_id, peer.serial)
            self.context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate of node {peer.node_id} is revoked")
        self.fingerprint = peer.fingerprint  # sessions are bound to it (session.py)
        return peer.node_id

    def release(self) -> None:
        """The call is over: forget it, and give back what it held at once (not at the next GC)."""
        self.srv.streams.leave(self)
        if self.bond_token:  # a bond still waiting for joins holds this call's iterator and outbox
            self.srv.bonds.forget(self.bond_token)
        self.account.release(self.payload_key)
        self.reassembler.close()
        if self.session is not None:  # the session's grace period starts if no other stream carries it
            self.srv.sessions.detach(self.session)
        self.session = None

    def serve(self) -> None:
        """The stream's worker: requests in, encoded replies out, in order."""
        end: Any = CLOSE
        try:
            for frame in self.reader:
                self.last_active, self.handling = time.monotonic(), True
                reply = self.on_frame(frame)
                if not self.reassembler.in_progress:
                    self._settle_payload()
                if reply is not None:
                    self._send(reply)
                self.last_active, self.handling = time.monotonic(), False
                if self.finished or self.joined:
                    break
            else:
                if self.reassembler.in_progress:  # half-closed in the middle of a message
                    self._refuse(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended in the middle of a message")
        except Exception as e:  # context.abort() raises; gRPC already holds the status to send
            end = ABORT
            if self.context.code() is None and self.context.is_active():
                failed = isinstance(e, (grpc.RpcError, TimeoutError))  # a bonded connection broke
                if not failed:  # a bug of ours: one line for the log, no Python internals for the peer
                    log.error("stream worker for %s failed: %s: %s", self.identity, type(e).__name__, e)
                    log.debug("stream worker failure", exc_info=True)
                with contextlib.suppress(Exception):
                    detail = f": {e}" if isinstance(e, TimeoutError) else ""  # our own bond's words
                    self.context.abort(grpc.StatusCode.UNAVAILABLE if failed else grpc.StatusCode.INTERNAL,
                                       f"the stream's connection failed{detail}" if failed
                                       else "internal server error")
        finally:
            self.account.release(self.payload_key)
            self.reassembler.close()
            self.reader.close()
            if not self.joined:  # a joined connection is ended by the stream whose bond it is in
                self.dealer.close(end)

    def _settle_payload(self) -> None:
        """A message is handled: what stays charged is the buffer kept for the next one (if the
        budget has room for it; else the buffer goes)."""
        account = self.account
        try:
            account.set(self.payload_key, self.reassembler.pooled_bytes(), "a buffer kept for reuse")
        except HandlerError:
            self.reassembler.close()
            account.release(self.payload_key)

    def _send(self, reply: EncodedFrames) -> None:
        """Queue a reply for sending, once fewer than REPLY_WINDOW replies wait to be sent."""
        if not self.window.acquire(timeout=self.cfg.stream_stall_timeout_s):
            self._refuse(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"the client read no reply for {self.cfg.stream_stall_timeout_s:.0f} s")
        reply.on_sent = self.window.on_sent()
        # A reply due on a bonded connection that has not joined: the client sent its request
        # before its joins were answered (or the join is being attached right now); see bond.py.
        self.dealer.put(reply, timeout=min(self.cfg.handshake_timeout_s, JOIN_GRACE_S))
        if self.bond is not None:
            self.bond.activate()  # the welcome went out alone: bonded counting starts
            self.bond = None

    # -- frames -> messages ------------------------------------------------------------------
    def on_frame(self, raw: bytes) -> EncodedFrames | None:
        try:
            frame, data = split_frame(raw)
        except WireError as e:
            self._refuse(e.code, f"wire error: {e}")
        node_id = frame.header.node_id
        if self.identity is None:  # insecure mode: the first frame names the peer
            if not node_id:
                self._refuse(grpc.StatusCode.UNAUTHENTICATED, "frame without a node id")
            self.identity = node_id
            try:
                self.srv.streams.admit(node_id, self)
            except HandlerError as e:
                self._refuse(e.code, e.message)
        elif node_id != self.identity:
            self._refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                f"frame header names node {node_id!r} but the peer is authenticated as {self.identity!r}",
            )
        try:
            msg = self.reassembler.add(frame, data)
        except WireError as e:
            self._refuse(e.code, f"wire error: {e}")
        if msg is None:
            return None
        if frame.fragment_count > 1:  # striped: the next micro-batch's fragments come in meanwhile
            self.reader.read_ahead()
        if self.session is None and msg.type == pb.HANDSHAKE and isinstance(msg.body, dict) \
                and "join" in msg.body:
            self._join(msg)
            return None
        reply = self.on_message(msg)
        comp = self.session.reply_compression(msg) if self.session else _NO_COMPRESSION
        chunk = self.session.chunk_size if self.session else self.cfg.chunk_size
        return encode_frames(reply, comp, chunk, self.session.checksum if self.session else True,
                             stripes=self.dealer.width)

    def _abort(self, err: HandlerError) -> None:
        self._refuse(err.code, err.message)

    # -- messages -----------------------------------------------------------------------------
    def on_message(self, msg: Message) -> Message:
        assert self.identity is not None
        if self.session is None:
            self.handshake_done.set()
            if msg.type == pb.HANDSHAKE:
                return self._handshake(msg)
            if not msg.session_id:
                self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                             "the first message on a stream must be a HANDSHAKE or name a session")
            try:  # a reconnect: the stream resumes a session this node already owns
                self._bind(self.srv.sessions.get(msg.session_id, self.identity, self.fingerprint))
            except HandlerError as e:
                self._abort(e)
        elif msg.type == pb.HANDSHAKE:
            self._refuse(grpc.StatusCode.FAILED_PRECONDITION, "this stream has already shaken hands")
        elif msg.session_id != self.session.id:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         "a stream carries one session; open another stream for another session")
        assert self.session is not None
        if msg.type == pb.CLOSE:
            if self.srv.sessions.close(self.session.id):
                log.info("closed session %s of %s at its client's request", self.session.id[:8], self.identity)
            self.finished = True
            return self._reply(msg, {"closed": True})
        return self._dispatch(self.session, msg)

    def _join(self, msg: Message) -> None:
        """This connection joins the bond of another stream (same identity): answer here, hand over."""
        try:
            bond = self.srv.bonds.join(msg.body.get("join"), msg.body.get("index"), self._owner())
        except ValueError as e:
            self._refuse(grpc.StatusCode.PERMISSION_DENIED, f"bad join: {e}")
        self.handshake_done.set()
        index = int(msg.body["index"])
        # Read from before the answer: the client sends bonded fragments once all its joins are
        # answered, and the bond's reader gives a join that lags behind them only JOIN_GRACE_S.
        bond.reader.attach(index, self.requests)
        send_whole(self.outbox, encode_frames(self._reply(msg, {"joined": index}), _NO_COMPRESSION,
                                              self.cfg.chunk_size, True))
        bond.dealer.attach(index, self.outbox)
        self.joined = True

    def _owner(self) -> str:
        """Who may join this stream's bond: the same node with the same certificate."""
        return f"{self.identity or ''}#{self.fingerprint}"

    def _bind(self, session: Session) -> None:
        if self.session is not None:
            self.srv.sessions.detach(self.session)
        self.srv.sessions.attach(session)
        self.session = session
        # From now on the client may use the compression this server allows (message by message).
        self.reassembler.close()
        self.reassembler = self._reassembler(self.cfg.accepted())

    def _reply(self, request: Message, body: Any) -> Message:
        if isinstance(body, Message):
            reply = body
            reply.type = reply.type or pb.RESULT
        else:
            reply = Message(type=pb.RESULT, body=body)
        reply.session_id = request.session_id or (self.session.id if self.session else "")
        reply.sequence, reply.step, reply.node_id = request.sequence, request.step, SERVER_NODE_ID
        reply.answers = request.type  # which picks the reply body's message (typed_body.py)
        reply.typed = self.typed
        return reply

    def _dispatch(self, session: Session, msg: Message) -> Message:
        """Run the request, exactly once: one the session already answered (sent again after a
        reconnect) gets the reply it got then (replies.py)."""
        table = self.srv.sessions
        table.begin(session)
        try:
            with session.lock:
                if session.closed:
                    return error_message(msg, grpc.StatusCode.NOT_FOUND, "the session was closed")
                if session.replies is None:
                    session.replies = ReplyRecord(session.account, (session.id, "replies"))
                record: ReplyRecord = session.replies
                try:
                    record.acknowledge(msg.acked)
                    kept = record.replay(msg.sequence, msg.type)
                except HandlerError as e:
                    return error_message(msg, e.code, e.message)
                if kept is not None:
                    log.info("answered request %d (%s) of %s from the record: it ran before the reconnect",
                             msg.sequence, pb.MessageType.Name(msg.type), session.node_id)
                    return kept
                reply = self._run(session, msg)
                record.keep(msg.sequence, msg.type, reply)
                return reply
        finally:
            table.end(session)

    def _run(self, session: Session, msg: Message) -> Message:
        want = expected_case(msg.type, self.typed)
        if want is not None and msg.body_case not in (want, None):
            return error_message(msg, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"a {pb.MessageType.Name(msg.type)} body is a {want} message (PayloadMeta.body), "
                                 f"not {msg.body_case}")
        try:
            started = time.perf_counter()
            reply = self._reply(msg, self.srv.handler.handle(session, msg))
            # How long the handler took: the client tells transfer from compute with it.
            reply.server_us = int(1e6 * (time.perf_counter() - started))
            return reply
        except HandlerError as e:
            return error_message(msg, e.code, e.message)
        except Exception as e:  # a bug of ours: the peer gets a reference to quote, the log the details
            ref = internal_error(f"{pb.MessageType.Name(msg.type)} of {session.node_id} (session "
                                 f"{session.id[:8]}, step {msg.step})", e)
            return error_message(msg, grpc.StatusCode.INTERNAL, f"internal server error (ref {ref})")

    def _handshake(self, msg: Message) -> Message:
        assert self.identity is not None
        table, handler = self.srv.sessions, self.srv.handler
        try:
            if msg.body_case != "hello":
                raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "bad HANDSHAKE: the body must be a Hello")
            agreed = handshake.negotiate(msg.body, self.identity, self.cfg, self.verify)
            resume_id = msg.body.get("session_id") or msg.session_id
            if not isinstance(resume_id, str):
                raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "bad HANDSHAKE: session_id must be a string")
            if resume_id:
                session = table.get(resume_id, self.identity, self.fingerprint)
                with session.lock:
                    session.client_to_server = agreed["client_to_server"]
                    session.server_to_client = agreed["server_to_client"]
                    session.reply_lossy = agreed["reply_lossy"]
                    session.chunk_size = agreed["chunk_size"]
                    session.checksum = agreed["checksum"]
                    resume = getattr(handler, "resume_session", None)
                    extras = resume(session, msg.body) if resume else {}
                resumed = True
            else:
                session = table.create(self.identity, hello=msg.body, chunk_size=agreed["chunk_size"],
                                       fingerprint=self.fingerprint,
                                       checksum=agreed["checksum"],
                                       client_to_server=agreed["client_to_server"],
                                       server_to_client=agreed["server_to_client"],
                                       reply_lossy=agreed["reply_lossy"])
                try:
                    with session.lock:
                        extras = handler.open_session(session, msg.body)
                except BaseException:
                    table.close(session.id)
                    raise
                resumed = False
        except HandlerError as e:
            self._abort(e)
            raise  # unreachable: abort raises
        except Exception as e:
            ref = internal_error(f"opening a session for {self.identity}", e)
            self._refuse(grpc.StatusCode.INTERNAL, f"could not open the session: internal server error (ref {ref})")
            raise
        self._bind(session)
        log.info("%s session %s for %s", "resumed" if resumed else "opened", session.id[:8], self.identity)
        body = handshake.welcome(session.id, agreed, self.cfg, extras, resumed, self.typed)
        if agreed["connections"] > 1:
            self.bond = self.srv.bonds.open(self._owner(), agreed["connections"], self.reader, self.dealer)
            self.bond_token = self.bond.token
            body.update(connections=agreed["connections"], bond_token=self.bond.token)
        return self._reply(msg, body)
