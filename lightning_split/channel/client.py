"""The gRPC client side of the secured channel.

One ChannelClient keeps one bidirectional ``Split.Exchange`` stream open. Requests are cut into
frames by the caller's thread and queued whole, and a single request iterator drains the queue,
so fragments of different messages never interleave. A reader thread reassembles replies and
resolves the waiting futures by sequence number; several requests may be in flight at once
(``submit``), and the server answers them in order.

If the connection breaks (UNAVAILABLE: a cut link, a reset, a server restarting, or silence found
by the liveness check), the client reconnects with backoff for ``reconnect_deadline_s``, resumes
its session with a new handshake and sends the requests in flight again with their sequence
numbers: the server answers those it already ran from its record (replies.py), so each runs once.
Every request has a deadline; a missed deadline fails that request with DEADLINE_EXCEEDED and
cancels the stream (the server answers in order, so later replies would be stuck behind it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import grpc

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, Message, Reassembler, WireError
from lightning_split.wire.compression import LOSSY_ENCODINGS

from . import handshake, tls_probe
from .bond import outbox_frames, send_whole
from .certs import TLSFiles, validate_node_id
from .client_stream import ClientStream, PendingRequest, RemoteError, error_text, fail_all, status_from_int
from .config import ChannelConfig
from .framing import encode_frames, identity, passthrough, split_frame
from .journal import TRAINING, Journal, kind_of
from .resume import Resuming
from .server import EXCHANGE_METHOD, is_loopback_address
from .stats import TransportStats

log = logging.getLogger(__name__)

class ChannelClient(Resuming):
    """The split client's endpoint. ``connect()`` handshakes; ``request``/``submit`` exchange messages."""

    def __init__(self, address: str, node_id: str, tls: TLSFiles | None = None, insecure: bool = False,
                 config: ChannelConfig | None = None, hello_extra: dict[str, Any] | None = None,
                 server_name_override: str | None = None) -> None:
        if insecure and not is_loopback_address(address):
            raise ValueError(f"refusing plaintext to {address!r}: insecure=True is for loopback only")
        if not insecure and tls is None:
            raise ValueError("a ChannelClient needs tls=TLSFiles(...) (or insecure=True on loopback)")
        self.address = address
        self.node_id = validate_node_id(node_id)
        self.tls = tls
        self.insecure = insecure
        self.config = config or ChannelConfig()
        self.hello_extra = dict(hello_extra or {})
        self.server_name_override = server_name_override
        self.session_id = ""
        self.welcome: dict[str, Any] = {}
        self.stats = TransportStats()
        # Until the welcome says otherwise: the configured chunk size, compression as requested.
        self._chunk_size = self.config.chunk_size
        self._c2s = self.config.client_to_server
        self._verify = self.config.wants_checksum(insecure)  # check CRCs of replies
        self._send_crc = True  # until the welcome says what was agreed
        self._seq = itertools.count(1)
        self._lock = threading.RLock()  # opening streams, numbering and queueing requests
        self._pending: dict[int, PendingRequest] = {}
        self._pending_cv = threading.Condition()
        self._journal = Journal(self.config.restart_replay_bytes)  # what a restarted server lacks
        self._generation = 0  # bumped per queued request: the watchdog's wake-up check
        self._channels: list[grpc.Channel] = []  # one per connection of a bonded stream
        self._stream: ClientStream | None = None
        self._closed = False
        self._reconnecting = False  # a broken stream's requests wait for a new one
        self._closing = False  # close() was called: a reconnect in progress gives up
        self._watchdog = threading.Thread(target=_watch_deadlines, args=(weakref.ref(self), self._pending_cv),
                                          name="split-deadlines", daemon=True)
        self._watchdog.start()

    # -- connection ---------------------------------------------------------------------------
    def _channel(self, index: int) -> grpc.Channel:
        while len(self._channels) <= index:
            self._channels.append(self._make_channel())
        return self._channels[index]

    def _make_channel(self) -> grpc.Channel:
        # Its own connection: gRPC would otherwise share one TCP connection between our channels.
        options = self.config.client_options() + [("grpc.use_local_subchannel_pool", 1)]
        if self.insecure:
            return grpc.insecure_channel(self.address, options=options)
        assert self.tls is not None
        ca, cert, key = self.tls.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        if self.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        return grpc.secure_channel(self.address, creds, options=options)

    def _open_stream(self) -> ClientStream:
        if self._closed:
            raise RemoteError(grpc.StatusCode.CANCELLED, "the client is closed")
        stream = ClientStream(self.config.handshake_timeout_s)
        stream.start(self._exchange(0, stream.outbox))
        # Replies may only use what we asked for; the server grants a subset of it.
        reassembler = Reassembler(self.config.limits, checksum=self._verify,
                                  compression_allowed=self.config.accepted(),
                                  pin_memory=self.config.wants_pinned())
        stream.reader = threading.Thread(target=self._read, args=(stream, reassembler),
                                         name=f"split-reader-{self.node_id}", daemon=True)
        stream.reader.start()
        self._stream = stream
        return stream

    def _exchange(self, index: int, outbox: queue.SimpleQueue) -> Any:
        """A new Exchange call on connection ``index``, sending what is put in ``outbox``."""
        exchange = self._channel(index).stream_stream(EXCHANGE_METHOD, request_serializer=passthrough,
                                                      response_deserializer=identity)
        return exchange(outbox_frames(outbox))

    def _bond(self, stream: ClientStream, welcome: dict[str, Any]) -> None:
        """Join connections 1..K-1 to the stream, as the welcome granted (bond.py)."""
        count = int(welcome.get("connections", 1))
        if count <= 1:
            return
        assert stream.rr is not None
        stream.rr.expand(count)
        stream.dealer.expand(count)
        for index in range(1, count):
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            call = self._exchange(index, outbox)
            stream.add(call)
            join = Message(type=pb.HANDSHAKE, body={"join": welcome["bond_token"], "index": index},
                           session_id=self.session_id, sequence=next(self._seq), node_id=self.node_id)
            send_whole(outbox, encode_frames(join, CompressionConfig(), self._chunk_size, True))
            ack, got = Reassembler(self.config.limits, checksum=False), None
            give_up = threading.Timer(self.config.handshake_timeout_s, call.cancel)  # no answer: no hang
            give_up.daemon = True
            give_up.start()
            try:
                while got is None:
                    got = ack.add(*split_frame(next(call)))
            except (grpc.RpcError, StopIteration) as e:
                detail = e.details() if isinstance(e, grpc.RpcError) else "the server ended it"
                raise RemoteError(grpc.StatusCode.UNAVAILABLE, f"bonded connection {index}: {detail}") from e
            finally:
                give_up.cancel()
            if got.type == pb.ERROR:
                raise RemoteError(status_from_int(got.code), error_text(got))
            stream.dealer.attach(index, outbox)
            stream.rr.attach(index, call)

    def _live_stream(self) -> ClientStream:
        stream = self._stream
        if stream is None or stream.dead.is_set():
            # A handshake (resuming our session if we have one) agrees the compression and bond again.
            if self.session_id and stream is not None and not self._closing:
                self._connect_retrying(stream.error or RemoteError(grpc.StatusCode.UNAVAILABLE, "the stream ended"))
            else:  # a first connection, or the CLOSE of a closing client: one attempt
                self.connect()
            assert self._stream is not None
            return self._stream
        return stream

    def connect(self) -> dict[str, Any]:
        """Open the stream and handshake (resuming our session if we have one); returns the welcome."""
        with self._lock:
            if self._stream is not None:
                self._stream.shutdown()
            stream = self._open_stream()
            hello = handshake.build_hello(self.config, self.node_id, self.hello_extra, self.session_id,
                                          checksum=self._verify)
            fut = self._enqueue(stream, pb.HANDSHAKE, hello, 0, self.config.handshake_timeout_s,
                                CompressionConfig(), self.config.chunk_size)
        try:
            reply = self._wait(fut, self.config.handshake_timeout_s)
        except RemoteError as e:
            # The first handshake only (a reconnect's failure is the link's): say what TLS refused.
            why = tls_probe.diagnose(self.address, self.tls, self.server_name_override) if (
                e.code == grpc.StatusCode.UNAVAILABLE and self.tls is not None and not self.session_id) else None
            if why is None:
                raise
            raise RemoteError(e.code, f"{e.message}: {why}") from e
        body = reply.body
        if not isinstance(body, dict) or not isinstance(body.get("session_id"), str):
            raise RemoteError(grpc.StatusCode.INTERNAL, "malformed welcome from the server")
        with self._lock:
            self.session_id = body["session_id"]
            self._chunk_size = int(body["chunk_size"])
            self._send_crc = bool(body.get("checksum", True))
            self._c2s = CompressionConfig.from_dict(body["compression"]["client_to_server"])
            self.welcome = body
            try:
                self._bond(stream, body)
            except BaseException:
                stream.shutdown()
                raise
            if body.get("resumed"):
                self.stats.reconnects += 1
            if body.get("restored"):  # the server restarted: give it back what it lost
                self._bring_back(body)
            # Requests a broken stream left unanswered go first, before any new one can.
            self._resend(stream)
        return body

    # -- requests ------------------------------------------------------------------------------
    def _enqueue(self, stream: ClientStream, type_: int, body: Any, step: int, timeout: float | None,
                 compression: CompressionConfig, chunk_size: int, reply_encoding: int = 0) -> Future:
        seq = next(self._seq)
        msg = Message(type=type_, body=body, session_id=self.session_id, step=step, sequence=seq,
                      node_id=self.node_id, acked=self._acked(seq), reply_encoding=reply_encoding,
                      typed=bool(self.welcome and self.welcome.get("typed_bodies")))
        # Encode here, in the caller's thread: an unencodable body raises to the caller. The frames
        # themselves are cut lazily by the sending thread.
        # The hello always carries CRCs: the server may want them, and we don't know yet.
        crc = True if type_ == pb.HANDSHAKE else self._send_crc
        frames = encode_frames(msg, compression, chunk_size, crc, stripes=stream.dealer.width)
        fut: Future = Future()
        now = time.monotonic()
        limit = self.config.request_deadline_s if timeout is None else timeout
        resend = msg if type_ not in (pb.HANDSHAKE, pb.CLOSE) else None
        with self._pending_cv:
            if resend is not None:  # kept, for a server that restarts (journal.py)
                self._journal.record(seq, msg, self._oldest_waiting_step())
            died = stream.error is not None  # the stream died while we encoded
            if died and (resend is None or not self._may_resume(stream.error)):
                fut.set_exception(RemoteError(stream.error.code, stream.error.message))
                return fut
            # Died, to be resumed: a reconnect sends it (it waits for the lock we hold).
            self._pending[seq] = PendingRequest(fut, stream, now, now + limit, resend, compression)
            self._generation += 1
            self._pending_cv.notify()
            if died:
                self._start_reconnect(stream.error)
        if not died:
            self.stats.record_sent(frames.wire_bytes, frames.raw_bytes)
            stream.dealer.put(frames)
        return fut

    @property
    def sending(self) -> CompressionConfig:
        """The compression of this client's requests, as the welcome agreed it."""
        return self._c2s

    def _oldest_waiting_step(self) -> int | None:
        """The lowest step of the training requests that wait for their reply (under _pending_cv)."""
        steps = [p.request.step for p in self._pending.values()
                 if p.request is not None and kind_of(p.request) == TRAINING]
        return min(steps, default=None)

    def _acked(self, seq: int) -> int:
        """Every reply before the oldest one still awaited has arrived (the server may forget them)."""
        with self._pending_cv:
            return min(self._pending, default=seq) - 1

    def submit(self, type: int, body: Any = None, step: int = 0, timeout: float | None = None,
               compression: CompressionConfig | None = None, reply_lossy: str | None = None) -> Future:
        """Send a request without waiting; the Future resolves to the reply Message.

        ``compression``: this request's, instead of the agreed one (a lossy mode the server does
        not allow is refused by it); ``reply_lossy``: the lossy mode its reply should use, where
        both ends allow it (``Header.reply_encoding``). Adaptive compression changes both per message.

        It fails with RemoteError for an ERROR reply, a broken stream or a missed deadline.
        Like ``torch.distributed.isend``: CPU tensors in ``body`` are sent from their own memory,
        so do not modify them in place until the future is done. CUDA tensors are copied to the
        host by a copy queued on the current stream: later work on that stream may change them.
        """
        self._await_reconnect()
        with self._lock:
            if self._closed:
                raise RemoteError(grpc.StatusCode.CANCELLED, "the client is closed")
            stream = self._live_stream()
            return self._enqueue(stream, type, body, step, timeout, compression or self._c2s, self._chunk_size,
                                 LOSSY_ENCODINGS.get(reply_lossy or "none", 0))

    def _await_reconnect(self) -> None:
        """A reconnect in progress: a new request goes on the stream it makes."""
        limit = time.monotonic() + self.config.reconnect_deadline_s + self.config.handshake_timeout_s
        with self._pending_cv:
            while self._reconnecting and time.monotonic() < limit:
                self._pending_cv.wait(0.1)

    def request(self, type: int, body: Any = None, step: int = 0, timeout: float | None = None,
                **options: Any) -> Message:
        """Send a request and wait for its reply (a RESULT Message); RemoteError otherwise.
        ``options``: ``compression`` and ``reply_lossy``, as for ``submit``."""
        return self._wait(self.submit(type, body, step, timeout, **options), timeout)

    def _wait(self, fut: Future, timeout: float | None) -> Message:
        # The watchdog fails the future at its deadline; the margin only guards against a bug there.
        limit = (self.config.request_deadline_s if timeout is None else timeout) + 5.0
        try:
            return fut.result(timeout=limit)
        except TimeoutError:
            raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "no reply in time") from None

    # -- replies ---------------------------------------------------------------------------------
    def _read(self, stream: ClientStream, reassembler: Reassembler) -> None:
        err: RemoteError
        assert stream.rr is not None
        try:
            for raw in stream.rr:
                stream.last_rx = time.monotonic()
                msg = reassembler.add(*split_frame(raw))
                if msg is not None:
                    self._resolve(msg)
            err = RemoteError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        except grpc.RpcError as e:
            err = RemoteError(e.code(), e.details() or "stream failed")
        except WireError as e:
            err = RemoteError(e.code, f"malformed reply from the server: {e}")
        except TimeoutError as e:
            err = RemoteError(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:  # never leave futures hanging because of a bug in here
            log.exception("reader thread failed")
            err = RemoteError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        if stream.stalled is not None:  # we ended it: the server stopped answering
            err = stream.stalled
        elif err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            with contextlib.suppress(Exception):  # the best account of why, never a hung future
                err = stream.failure(err)
        stream.shutdown()  # every connection of the stream: a message may have fragments on any
        stream.rr.close()  # and its reading threads
        with self._pending_cv:
            stream.error = err  # from now on _enqueue fails requests for this stream at once
            keep = self._may_resume(err)
            doomed = self._take_pending(lambda p: p.stream is stream and (not keep or p.request is None))
            if keep and any(p.stream is stream for p in self._pending.values()):
                self._start_reconnect(err)
        fail_all(doomed, err)

    def _resolve(self, msg: Message) -> None:
        with self._pending_cv:
            pending = self._pending.pop(msg.sequence, None)
        if pending is None:  # its deadline passed already; nobody waits for it
            return
        self.stats.record_reply(msg.wire_bytes, msg.raw_bytes, time.monotonic() - pending.sent_at)
        if msg.type == pb.ERROR:
            pending.future.set_exception(RemoteError(status_from_int(msg.code), error_text(msg)))
        else:
            pending.future.set_result(msg)

    def _take_pending(self, which: Any) -> list[PendingRequest]:
        with self._pending_cv:
            seqs = [s for s, p in self._pending.items() if which(p)]
            return [self._pending.pop(s) for s in seqs]

    def _expire(self, now: float) -> float | None:
        """Fail requests past their deadline; returns seconds until the next one (None: none)."""
        expired = self._take_pending(lambda p: p.deadline <= now)
        with self._pending_cv:
            rest = [p.deadline for p in self._pending.values()]
        if expired:
            fail_all(expired, RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "request deadline exceeded"))
            # Replies come in order: everything behind the late one is stuck, so start over.
            for stream in {p.stream for p in expired}:
                stream.shutdown()
        return min(rest) - now if rest else None

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """End the session (CLOSE), the stream and the channel. Safe to call twice.

        If the stream had broken, a new one carries the CLOSE, so the server frees the session's
        state now rather than at its idle TTL (which does it if the server is unreachable).
        """
        self._closing = True  # a reconnect holding the lock stops at its next attempt
        with self._lock:
            if self._closed:
                return
            for attempt in range(2 if self.session_id else 0):
                try:  # a second try only if the stream was found dying under the first
                    self._wait(self._enqueue(self._live_stream(), pb.CLOSE, None, 0, 5.0, CompressionConfig(),
                                             self._chunk_size), 5.0)
                    break
                except RemoteError as e:
                    log.debug("CLOSE failed (attempt %d): %s", attempt + 1, e)
                    if e.code != grpc.StatusCode.CANCELLED:
                        break
            self._closed = True
            stream = self._stream
            if stream is not None:
                stream.shutdown()
                if stream.reader is not None:
                    stream.reader.join(timeout=5)
            for channel in self._channels:
                channel.close()
            self._channels = []
        with self._pending_cv:
            self._pending_cv.notify_all()

    def __enter__(self) -> ChannelClient:
        if not self.session_id:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def _watch_deadlines(ref: weakref.ref[ChannelClient], cv: threading.Condition) -> None:
    """Deadline watchdog of one client. Holds only a weak reference between checks, so a client
    dropped without close() is still garbage-collected (and the thread then ends)."""
    while True:
        client = ref()
        if client is None:
            return
        with cv:
            if client._closed and not client._pending:
                return
            generation = client._generation
        wait_s = client._expire(time.monotonic())  # fails futures: not under the lock
        client._check_liveness(time.monotonic())
        with cv:
            # A request queued meanwhile may have an earlier deadline: then look again at once.
            if client._generation == generation:
                del client
                # Wake at the next deadline, on a new request, or each second to notice a
                # collected client.
                cv.wait(1.0 if wait_s is None else min(wait_s, 1.0))
