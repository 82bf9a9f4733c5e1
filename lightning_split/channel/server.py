"""The gRPC server side of the secured channel.

One ``Split.Exchange`` stream per connected client. The servicer reassembles the stream's frames
into messages (wire.Reassembler checks every size, dtype and checksum), binds the stream to an
authenticated identity and a session, hands each request to the application's SessionHandler in
order, and cuts the reply back into frames.

Identity: with mutual TLS (the default) the peer is the CN of its client certificate, and every
frame's ``header.node_id`` must equal it (else PERMISSION_DENIED). With ``insecure=True`` (loopback
only, for tests and demos) the first frame's node id is taken on trust and the rest must match it.

Errors: a handler exception answers that one request with an ERROR reply (HandlerError keeps its
code, anything else is INTERNAL) and the stream goes on. A protocol or wire violation aborts the
stream with a status code and a message. Neither harms other streams or the session's state.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, Message, Reassembler, WireError

from . import handshake
from .bond import ABORT, CLOSE, Bond, BondTable, FrameDealer, RoundRobinReader, outbox_frames, send_whole
from .certs import TLSFiles
from .config import ChannelConfig
from .framing import EncodedFrames, encode_frames, identity, passthrough, split_frame
from .session import HandlerError, Session, SessionHandler, SessionTable

log = logging.getLogger(__name__)

SERVER_NODE_ID = "server"
SERVICE_NAME = "lightning_split.v1.Split"
EXCHANGE_METHOD = f"/{SERVICE_NAME}/Exchange"
_NO_COMPRESSION = CompressionConfig()


def is_loopback_address(address: str) -> bool:
    """True for ``127.x.x.x:port``, ``[::1]:port``, ``localhost:port``."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_message(request: Message, code: grpc.StatusCode, text: str) -> Message:
    return Message(type=pb.ERROR, body=text, code=code.value[0], session_id=request.session_id,
                   step=request.step, sequence=request.sequence, node_id=SERVER_NODE_ID)


class _Servicer:
    """``Split.Exchange``, registered by hand so replies can be pre-serialized bytes and requests
    arrive as raw bytes, parsed by ``framing.split_frame`` (framing.py)."""

    def __init__(self, server: ChannelServer) -> None:
        self._srv = server

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.Exchange, request_deserializer=identity, response_serializer=passthrough)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Exchange": method})

    def Exchange(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
                 ) -> Iterator[bytes]:
        """Two threads per connection, so that computing and sending overlap.

        gRPC's worker thread runs this generator and only sends; a second thread receives,
        reassembles, runs the handler and encodes each reply (queuing its device->host copies),
        then goes straight on to the next request while the reply's bytes are still being sent.
        A connection that joins another's bond (bond.py) only sends its share of that stream.
        """
        stream = _Stream(self._srv, context, request_iterator)
        # The handshake must arrive in time: a connected peer that stays silent holds a worker.
        timer = threading.Timer(self._srv.config.handshake_timeout_s, stream.handshake_timed_out)
        timer.daemon = True
        timer.start()
        threading.Thread(target=stream.serve, name="split-stream", daemon=True).start()
        try:
            # On ABORT this raises BondAborted: the worker aborted the call, and gRPC sends the
            # status it was given.
            for raw in outbox_frames(stream.outbox, alive=context.is_active):
                timer.cancel()
                yield raw
        finally:
            timer.cancel()
            stream.release()


class _Stream:
    """The state of one Exchange stream: its identity, its session, its reassembler."""

    def __init__(self, server: ChannelServer, context: grpc.ServicerContext,
                 requests: Iterator[bytes]) -> None:
        self.srv = server
        self.cfg = server.config
        self.context = context
        self.requests = requests
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # what this connection sends
        # The logical stream: this connection's frames, or a bond's over several connections.
        self.reader = RoundRobinReader(requests, server.config.handshake_timeout_s)
        self.dealer = FrameDealer(self.outbox)
        self.bond: Bond | None = None  # opened by our handshake, activated once the welcome is dealt
        self.joined = False  # this connection was handed to another stream's bond
        self.identity: str | None = None if server.insecure else self._certificate_identity()
        self.session: Session | None = None
        self.finished = False
        self.handshake_done = threading.Event()
        # We verify CRCs if *we* want them; the handshake makes the client send them then.
        self.verify = server.checksum
        self.reassembler = Reassembler(self.cfg.limits, checksum=self.verify,
                                       compression_allowed=_NO_COMPRESSION, pin_memory=self.cfg.wants_pinned())

    def _certificate_identity(self) -> str:
        names = self.context.auth_context().get("x509_common_name") or []
        if len(names) != 1 or not names[0]:
            self.context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate identity (CN)")
        return names[0].decode("utf-8", "replace")

    def handshake_timed_out(self) -> None:
        if self.session is None and not self.handshake_done.is_set():
            log.warning("stream from %s sent no HANDSHAKE in %.1f s: cancelled",
                        self.context.peer(), self.cfg.handshake_timeout_s)
            self.context.cancel()

    def release(self) -> None:
        self.session = None

    def serve(self) -> None:
        """The stream's worker: requests in, encoded replies out, in order."""
        end: Any = CLOSE
        try:
            for frame in self.reader:
                reply = self.on_frame(frame)
                if reply is not None:
                    self.dealer.put(reply, timeout=self.cfg.handshake_timeout_s)
                    if self.bond is not None:
                        self.bond.activate()  # the welcome went out alone: bonded counting starts
                        self.bond = None
                if self.finished or self.joined:
                    break
        except Exception as e:  # context.abort() raises; gRPC already holds the status to send
            end = ABORT
            if self.context.code() is None and self.context.is_active():
                failed = isinstance(e, (grpc.RpcError, TimeoutError))  # a bonded connection broke
                if not failed:
                    log.exception("stream worker failed")
                with contextlib.suppress(Exception):
                    self.context.abort(grpc.StatusCode.UNAVAILABLE if failed else grpc.StatusCode.INTERNAL,
                                       f"the stream's worker stopped: {type(e).__name__}: {e}")
        finally:
            if not self.joined:  # a joined connection is ended by the stream whose bond it is in
                self.dealer.close(end)

    # -- frames -> messages ------------------------------------------------------------------
    def on_frame(self, raw: bytes) -> EncodedFrames | None:
        try:
            frame, data = split_frame(raw)
        except WireError as e:
            log.warning("wire violation from %s: %s", self.identity or self.context.peer(), e)
            self.context.abort(e.code, f"wire error: {e}")
        node_id = frame.header.node_id
        if self.identity is None:  # insecure mode: the first frame names the peer
            if not node_id:
                self.context.abort(grpc.StatusCode.UNAUTHENTICATED, "frame without a node id")
            self.identity = node_id
        elif node_id != self.identity:
            self.context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"frame header names node {node_id!r} but the peer is authenticated as {self.identity!r}",
            )
        try:
            msg = self.reassembler.add(frame, data)
        except WireError as e:
            log.warning("wire violation from %s: %s", self.identity, e)
            self.context.abort(e.code, f"wire error: {e}")
        if msg is None:
            return None
        if self.session is None and msg.type == pb.HANDSHAKE and isinstance(msg.body, dict) \
                and "join" in msg.body:
            self._join(msg)
            return None
        reply = self.on_message(msg)
        comp = self.session.server_to_client if self.session else _NO_COMPRESSION
        chunk = self.session.chunk_size if self.session else self.cfg.chunk_size
        return encode_frames(reply, comp, chunk, self.session.checksum if self.session else True)

    def _abort(self, err: HandlerError) -> None:
        self.context.abort(err.code, err.message)

    # -- messages -----------------------------------------------------------------------------
    def on_message(self, msg: Message) -> Message:
        assert self.identity is not None
        if self.session is None:
            self.handshake_done.set()
            if msg.type == pb.HANDSHAKE:
                return self._handshake(msg)
            if not msg.session_id:
                self.context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                   "the first message on a stream must be a HANDSHAKE or name a session")
            try:  # a reconnect: the stream resumes a session this node already owns
                self._bind(self.srv.sessions.get(msg.session_id, self.identity))
            except HandlerError as e:
                self._abort(e)
        elif msg.type == pb.HANDSHAKE:
            self.context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this stream has already shaken hands")
        elif msg.session_id != self.session.id:
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                               "a stream carries one session; open another stream for another session")
        assert self.session is not None
        if msg.type == pb.CLOSE:
            self.srv.sessions.close(self.session.id)
            self.finished = True
            return self._reply(msg, {"closed": True})
        return self._dispatch(self.session, msg)

    def _join(self, msg: Message) -> None:
        """This connection joins the bond of another stream (same identity): answer here, hand over."""
        try:
            bond = self.srv.bonds.join(msg.body.get("join"), msg.body.get("index"), self.identity or "")
        except ValueError as e:
            self.context.abort(grpc.StatusCode.PERMISSION_DENIED, f"bad join: {e}")
        self.handshake_done.set()
        index = int(msg.body["index"])
        send_whole(self.outbox, encode_frames(self._reply(msg, {"joined": index}), _NO_COMPRESSION,
                                              self.cfg.chunk_size, True))
        bond.dealer.attach(index, self.outbox)
        bond.reader.attach(index, self.requests)
        self.joined = True

    def _bind(self, session: Session) -> None:
        self.session = session
        # From now on the client may only use the compression the handshake granted it.
        self.reassembler = Reassembler(self.cfg.limits, checksum=self.verify,
                                       compression_allowed=session.client_to_server,
                                       pin_memory=self.cfg.wants_pinned())

    def _reply(self, request: Message, body: Any) -> Message:
        if isinstance(body, Message):
            reply = body
            reply.type = reply.type or pb.RESULT
        else:
            reply = Message(type=pb.RESULT, body=body)
        reply.session_id = request.session_id or (self.session.id if self.session else "")
        reply.sequence, reply.step, reply.node_id = request.sequence, request.step, SERVER_NODE_ID
        return reply

    def _dispatch(self, session: Session, msg: Message) -> Message:
        table = self.srv.sessions
        table.begin(session)
        try:
            with session.lock:
                if session.closed:
                    raise HandlerError(grpc.StatusCode.NOT_FOUND, "the session was closed")
                return self._reply(msg, self.srv.handler.handle(session, msg))
        except HandlerError as e:
            return error_message(msg, e.code, e.message)
        except Exception as e:
            log.exception("handler failed on %s step %d", pb.MessageType.Name(msg.type), msg.step)
            return error_message(msg, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            table.end(session)

    def _handshake(self, msg: Message) -> Message:
        assert self.identity is not None
        table, handler = self.srv.sessions, self.srv.handler
        try:
            agreed = handshake.negotiate(msg.body, self.identity, self.cfg, self.verify)
            resume_id = msg.body.get("session_id") or msg.session_id
            if resume_id:
                session = table.get(resume_id, self.identity)
                with session.lock:
                    session.client_to_server = agreed["client_to_server"]
                    session.server_to_client = agreed["server_to_client"]
                    session.chunk_size = agreed["chunk_size"]
                    session.checksum = agreed["checksum"]
                    resume = getattr(handler, "resume_session", None)
                    extras = resume(session, msg.body) if resume else {}
                resumed = True
            else:
                session = table.create(self.identity, hello=msg.body, chunk_size=agreed["chunk_size"],
                                       checksum=agreed["checksum"],
                                       client_to_server=agreed["client_to_server"],
                                       server_to_client=agreed["server_to_client"])
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
            log.exception("open_session failed")
            self.context.abort(grpc.StatusCode.INTERNAL, f"open_session failed: {type(e).__name__}: {e}")
            raise
        self._bind(session)
        log.info("%s session %s for %s", "resumed" if resumed else "opened", session.id[:8], self.identity)
        body = handshake.welcome(session.id, agreed, self.cfg, extras, resumed)
        if agreed["connections"] > 1:
            self.bond = self.srv.bonds.open(self.identity, agreed["connections"], self.reader, self.dealer)
            body.update(connections=agreed["connections"], bond_token=self.bond.token)
        return self._reply(msg, body)


class ChannelServer:
    """The split server's endpoint: ``start()`` binds, serves until ``stop()``.

    ``handler`` is the application (a SessionHandler). ``tls`` holds the server certificate and the
    CA that signs client certificates; clients without one are refused during the TLS handshake.
    """

    def __init__(self, handler: SessionHandler, address: str = "127.0.0.1:0", tls: TLSFiles | None = None,
                 insecure: bool = False, config: ChannelConfig | None = None,
                 max_workers: int | None = None) -> None:
        if insecure:
            if not is_loopback_address(address):
                raise ValueError(
                    f"refusing to serve plaintext on {address!r}: insecure=True is only allowed on a "
                    "loopback address (127.0.0.1, ::1, localhost); use mutual TLS otherwise"
                )
        elif tls is None:
            raise ValueError("a ChannelServer needs tls=TLSFiles(...) (or insecure=True on loopback)")
        self.handler = handler
        self.address = address
        self.tls = tls
        self.insecure = insecure
        self.config = config or ChannelConfig()
        self.checksum = self.config.wants_checksum(insecure)
        # Each live connection holds a worker thread for its lifetime (sync gRPC server).
        self.max_workers = max_workers or self.config.max_sessions * self.config.max_connections + 8
        self.bonds = BondTable(self.config.handshake_timeout_s)
        self.sessions = SessionTable(handler, self.config.max_sessions, self.config.session_ttl_s)
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._stop_reaper = threading.Event()
        self._reaper: threading.Thread | None = None

    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="split-rpc"),
            options=self.config.server_options(),
            # Streams beyond the worker count are refused (RESOURCE_EXHAUSTED) instead of queued.
            maximum_concurrent_rpcs=self.max_workers,
        )
        server.add_generic_rpc_handlers((_Servicer(self).handler(),))
        if self.insecure:
            port = server.add_insecure_port(self.address)
        else:
            assert self.tls is not None
            ca, cert, key = self.tls.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                require_client_auth=True)
            port = server.add_secure_port(self.address, creds)
        if not port:
            raise OSError(f"could not bind {self.address}")
        server.start()
        self._server, self.port = server, port
        self._reaper = threading.Thread(target=self._reap, name="split-session-reaper", daemon=True)
        self._reaper.start()
        log.info("channel server on %s (port %d, %s)", self.address, port,
                 "INSECURE" if self.insecure else "mutual TLS")
        return port

    def _reap(self) -> None:
        interval = min(max(self.config.session_ttl_s / 4, 0.05), 30.0)
        while not self._stop_reaper.wait(interval):
            try:
                self.sessions.expire()
            except Exception:
                log.exception("session expiry failed")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, end live streams after ``grace`` seconds, then close every session."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(grace).wait()
        self._stop_reaper.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.sessions.close_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        server = self._server
        return True if server is None else server.wait_for_termination(timeout)

    def __enter__(self) -> ChannelServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0.5)
