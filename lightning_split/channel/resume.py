"""How a ChannelClient finds that its connection is gone, and resumes its session.

Mixed into ``client.ChannelClient``, whose state it works on: its streams, its pending requests
(``_pending``, under ``_pending_cv``), its lock (held while a stream is made), its config.

* Liveness: waiting for a reply with nothing heard for ``keepalive_time_s``, the client asks the
  server's ``grpc.health.v1`` service on the same connection to answer within
  ``keepalive_timeout_s``; silence is a broken connection (a stalled link, a stopped server).
* Reconnecting: a broken connection (UNAVAILABLE) with requests waiting starts a reconnect thread
  (or a caller of ``submit`` does it first): bounded exponential backoff for
  ``reconnect_deadline_s``, a handshake that resumes the session, then the unanswered requests
  sent again, oldest first, with their own sequence numbers, before any new one: the server
  answers those it ran already from its record (``replies.py``).
* A server that restarted from its saved state (``restored`` in the welcome) lost what it built
  since: the client sends again what it kept for that (journal.py); what it did not keep fails
  with ABORTED.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lightning_split._proto import split_pb2 as pb

from .client_stream import ClientStream, PendingRequest, RemoteError, fail_all
from .framing import encode_frames
from .journal import TRAINING, kind_of

log = logging.getLogger(__name__)

READS = (pb.INFER, pb.SPLIT, pb.LOAD)  # uncached INFER: run again, they change nothing


class Resuming:
    """Liveness checks and reconnects of a ChannelClient (see the module's docstring). Uses its
    ``connect()`` (a handshake that resumes the session), ``_acked()`` and ``_take_pending()``."""

    _pending: dict[int, PendingRequest]
    _pending_cv: threading.Condition
    _lock: Any
    _stream: ClientStream | None
    _channels: list[grpc.Channel]
    _reconnecting: bool
    _closing: bool
    _closed: bool
    config: Any
    address: str
    session_id: str
    node_id: str
    stats: Any
    _c2s: Any  # the compression and fragment size the welcome agreed, for requests sent again
    _chunk_size: int
    _send_crc: bool
    _journal: Any  # journal.Journal

    # -- liveness -------------------------------------------------------------------------------------
    def _check_liveness(self, now: float) -> None:
        """Waiting for a reply and nothing heard for ``keepalive_time_s``: ask the server's health
        service, on the same connection, to answer within ``keepalive_timeout_s``. A server that
        is merely busy answers (another thread); a stalled link or a frozen server does not, and
        the stream is then handled as broken (reconnected, its requests sent again). HTTP/2
        keepalive pings alone do not find these while the client has data in flight."""
        stream, interval = self._stream, self.config.keepalive_time_s
        if stream is None or stream.dead.is_set() or stream.probe is not None or not self._channels:
            return
        with self._pending_cv:
            waiting = any(p.stream is stream for p in self._pending.values())
        if not waiting or now - stream.last_rx < interval:
            return
        check = health_pb2_grpc.HealthStub(self._channels[0]).Check
        stream.probe = check.future(health_pb2.HealthCheckRequest(), timeout=self.config.keepalive_timeout_s)
        stream.probe.add_done_callback(lambda f: self._probed(stream, f))

    def _probed(self, stream: ClientStream, probe: Any) -> None:
        code = probe.code()
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) and not stream.dead.is_set():
            stream.stalled = RemoteError(
                grpc.StatusCode.UNAVAILABLE, f"the server did not answer for {time.monotonic() - stream.last_rx:.1f} s "
                f"(a stalled link or a frozen server)")
            log.warning("%s: %s", self.address, stream.stalled.message)
            stream.shutdown()
        else:  # alive (or a server without the health service): look again after another interval
            stream.last_rx = time.monotonic()
        stream.probe = None

    # -- reconnecting -----------------------------------------------------------------------------
    def _may_resume(self, err: RemoteError) -> bool:
        """A broken connection (not a stream we ended ourselves, nor a server that refused us) is
        reconnected, if we have a session to resume."""
        return (err.code == grpc.StatusCode.UNAVAILABLE and bool(self.session_id) and not self._closed
                and self.config.reconnect_deadline_s > 0)

    def _start_reconnect(self, cause: RemoteError) -> None:
        """Requests wait on a broken stream: reconnect, unless a reconnect is under way (it looks
        for them again before it ends). Under _pending_cv."""
        if not self._reconnecting:
            self._reconnecting = True
            threading.Thread(target=self._reconnect, args=(cause,), name=f"split-reconnect-{self.node_id}",
                             daemon=True).start()

    @staticmethod
    def _is_orphan(p: PendingRequest) -> bool:
        """A request of a broken stream that waits to be sent again."""
        return p.stream.dead.is_set() and p.request is not None

    def _orphans(self) -> list[tuple[int, PendingRequest]]:
        """The orphans, oldest first (under _pending_cv)."""
        return sorted((seq, p) for seq, p in self._pending.items() if self._is_orphan(p))

    def _reconnect(self, cause: RemoteError) -> None:
        """The reconnect thread: new requests wait for the stream it makes."""
        with self._lock:
            try:
                self._connect_retrying(cause)
            except RemoteError:
                pass  # _give_up failed what waited, with the reason
            except Exception as e:  # a bug of ours must not leave requests (and submit) waiting
                log.exception("reconnect failed")
                self._give_up(cause, RemoteError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"), 0.0)

    def _connect_retrying(self, cause: RemoteError) -> None:
        """Reconnect with bounded exponential backoff, resume the session, send again what was in
        flight (with its sequence numbers: the server runs each request once, replies.py).
        Under self._lock. Raises the last error if it gives up, after failing what waited."""
        if not self.config.reconnect_deadline_s > 0:
            self.connect()
            return
        started = time.monotonic()
        deadline, delay = started + self.config.reconnect_deadline_s, 0.05
        log.warning("connection to %s lost (%s); reconnecting for up to %.0f s", self.address, cause.message,
                    self.config.reconnect_deadline_s)
        while True:
            try:
                if self._closed or self._closing:
                    raise RemoteError(grpc.StatusCode.CANCELLED, "the client is closing")
                if self._stream is None or self._stream.dead.is_set():
                    self.connect()  # resends what is in flight
                else:
                    self._resend(self._stream)  # someone else reconnected first
            except RemoteError as e:
                gone = e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if gone or time.monotonic() + delay > deadline:
                    raise self._give_up(cause, e, time.monotonic() - started) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            with self._pending_cv:
                if not self._orphans():  # a stream that broke meanwhile left none behind
                    self._reconnecting = False
                    self._pending_cv.notify_all()
                    break
        log.warning("reconnected to %s after %.2f s: session %s resumed", self.address, time.monotonic() - started,
                    self.session_id[:8])

    def _resend(self, stream: ClientStream) -> None:
        """Send the unanswered requests of broken streams on ``stream``, oldest first, with their
        own sequence numbers: the server answers those it ran already from its record."""
        with self._pending_cv:
            todo = self._orphans()
            for _, p in todo:
                p.stream = stream
        for seq, p in todo:
            assert p.request is not None
            p.request.acked = self._acked(seq)
            stream.dealer.put(encode_frames(p.request, p.compression or self._c2s, self._chunk_size, self._send_crc,
                                            stripes=stream.dealer.width))
        if todo:
            self.stats.resent += len(todo)
            log.warning("session %s resumed: %d requests in flight sent again", self.session_id[:8], len(todo))

    def _bring_back(self, welcome: dict[str, Any]) -> None:
        """The server came back from its saved state (``restored``): send again, oldest first,
        what it lacks (journal.py): the training requests since the step it came back at and the
        generated sequence's, those answered before (their new replies are dropped) with those
        still waiting. What cannot be brought back fails with ABORTED."""
        last_step = int(welcome.get("last_step", -1))
        gone = ClientStream(0.0)  # the answered ones join the orphans, to be sent in order with them
        gone.shutdown()
        with self._pending_cv:
            waiting = {seq: p.request for seq, p in self._pending.items() if self._is_orphan(p)}
            plan = self._journal.plan(last_step, bool(welcome.get("trains", True)), waiting)
            again = {seq for seq, _ in plan.requests}
            for seq, msg in plan.requests:
                if seq not in waiting:  # answered before: nobody waits for its reply this time
                    now = time.monotonic()
                    self._pending[seq] = PendingRequest(_dropped_reply(seq), gone, now,
                                                        now + self.config.request_deadline_s, msg)
            lost = self._take_pending(lambda p: self._is_orphan(p) and p.request is not None
                                      and p.request.sequence not in again and kind_of(p.request) is not None)
            if plan.training_lost:  # a checkpoint's state or a query would not match the client's
                lost += self._take_pending(lambda p: self._is_orphan(p) and p.request.type not in READS)
        replayed = [msg.step for _, msg in plan.requests if kind_of(msg) == TRAINING]
        welcome["replayed_step"] = max([last_step, *replayed])
        self.stats.replayed += len(plan.requests) - len(waiting.keys() & again)
        log.warning("the server restarted and resumed session %s at step %s: %d requests sent again to bring it "
                    "back%s", self.session_id[:8], last_step, len(plan.requests),
                    f"; {len(lost)} in flight could not be" if lost else "")
        fail_all(lost, RemoteError(grpc.StatusCode.ABORTED, f"the server restarted and resumed session "
                                f"{self.session_id[:8]} at step {last_step}, and this client did not keep "
                                "what this request built on: it is lost"))

    def _give_up(self, cause: RemoteError, last: RemoteError, spent_s: float) -> RemoteError:
        code = grpc.StatusCode.UNAVAILABLE if last.code == grpc.StatusCode.DEADLINE_EXCEEDED else last.code
        err = RemoteError(code, f"lost the connection to {self.address} ({cause.message}) and could not resume "
                                f"session {self.session_id[:8]} in {spent_s:.1f} s: {last.message}")
        log.warning("%s", err.message)
        with self._pending_cv:
            self._reconnecting = False
            self._pending_cv.notify_all()
            lost = self._take_pending(self._is_orphan)
        fail_all(lost, err)
        return err


def _dropped_reply(seq: int) -> Future:
    """The future of a request sent again only to rebuild the server's state: its reply is
    dropped, an error is logged (the request that waits behind it fails too)."""
    fut: Future = Future()
    fut.add_done_callback(lambda f: f.exception() is not None
                          and log.warning("request %d, sent again after a restart, failed: %s", seq, f.exception()))
    return fut
