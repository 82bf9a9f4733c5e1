"""The gRPC server side of the secured channel.

``ChannelServer`` binds (mutual TLS by default), registers ``Split.Exchange`` and runs a reaper
that expires idle sessions, ends idle, stalled or silent streams (streams.py) and closes the
sessions of revoked certificates. Each Exchange call is a ``ServerStream`` (server_stream.py):
two threads, one receiving, handling and encoding, gRPC's own one sending. Tenants are bounded
per node: sessions (session.py), streams (streams.py) and memory (budget.py).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .bond import BondAborted, BondTable, outbox_frames
from .budget import MemoryBudget
from .certs import TLSFiles
from .config import ChannelConfig
from .framing import identity, passthrough
from .identity import RevocationList, server_credentials
from .server_stream import SERVER_NODE_ID, ServerStream, error_message, internal_error
from .session import SessionHandler, SessionTable
from .streams import StreamTable

__all__ = ["ChannelServer", "EXCHANGE_METHOD", "SERVER_NODE_ID", "SERVICE_NAME", "error_message",
           "is_loopback_address"]

log = logging.getLogger(__name__)

SERVICE_NAME = "lightning_split.v1.Split"
EXCHANGE_METHOD = f"/{SERVICE_NAME}/Exchange"


M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
MALLOC_ARENAS = 2  # what the server caps glibc's arenas at (limit_malloc_arenas)


def _libc() -> Any:
    """glibc, with ``malloc_trim`` and ``mallopt`` typed; False elsewhere (musl, macOS...)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    if _libc():
        _libc().malloc_trim(0)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc malloc's arenas at ``arenas`` for this process, unless the operator chose
    (``MALLOC_ARENA_MAX`` or ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``); True if set.

    Why: glibc gives threads arenas of their own, up to 8 per core. Every stream has a thread of
    its own and gRPC's pool has many, so a busy server soon uses them all, and each arena keeps the
    free space at the top of its heap resident: ``malloc_trim`` does not release it, and free()
    only once it exceeds the trim threshold, which glibc raises to twice the largest block it
    freed (up to 64 MiB). That memory is held for nobody: in a fuzz run of 6,000 hellos the
    server's RSS grew 12 % (its other arenas' RSS 9 -> 77 MiB) while the bytes in use stayed flat;
    with 2 arenas, 1.7 %. Called before the server's threads start (``ChannelServer.start``);
    glibc fixes the cap once the process has more than 8 arenas, after which this changes nothing.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return bool(_libc() and _libc().mallopt(M_ARENA_MAX, arenas))


_LIBC: Any = None
TRIM_INTERVAL_S = 5.0


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
        stream = ServerStream(self._srv, context, request_iterator)
        try:
            # Counted against its node (streams.py): over the node's cap this aborts the call.
            # From here the server's watchdog ends it if it idles or stalls, or never shakes hands.
            stream.admit()
            threading.Thread(target=stream.serve, name="split-stream", daemon=True).start()
            # On ABORT this raises BondAborted: the worker aborted the call, and gRPC sends the
            # status it was given. A call the client already cancelled just ends (raising then
            # would only make gRPC log a traceback for a call nobody hears).
            try:
                yield from outbox_frames(stream.outbox, alive=context.is_active)
            except BondAborted:
                if context.is_active():
                    raise
        finally:
            stream.release()


class ChannelServer:
    """The split server's endpoint: ``start()`` binds, serves until ``stop()``.

    ``handler`` is the application (a SessionHandler). ``tls`` holds the server certificate and the
    CA that signs client certificates; clients without one are refused during the TLS handshake.
    """

    def __init__(self, handler: SessionHandler, address: str = "127.0.0.1:0", tls: TLSFiles | None = None,
                 insecure: bool = False, config: ChannelConfig | None = None,
                 max_workers: int | None = None, crl: str | os.PathLike | None = None) -> None:
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
        self.revocations = RevocationList(None)  # plaintext: no certificates to revoke
        if tls is not None and not insecure:
            # What `lightning-split certs revoke` listed (crl.pem beside server.pem); re-read on change.
            self.revocations = RevocationList(crl or tls.crl or Path(tls.cert).parent / "crl.pem", trust=tls.ca)
        self.config = config or ChannelConfig()
        self.checksum = self.config.wants_checksum(insecure)
        # Each live connection holds a worker thread for its lifetime (sync gRPC server).
        self.max_workers = max_workers or self.config.max_sessions * self.config.max_connections + 8
        self.bonds = BondTable(self.config.handshake_timeout_s)
        cfg = self.config
        # What peers make the server hold, charged per node before it is allocated (budget.py).
        self.budget = MemoryBudget(*cfg.memory_budgets())
        self.sessions = SessionTable(handler, cfg.max_sessions, cfg.session_ttl_s,
                                     max_per_node=cfg.max_sessions_per_node, budget=self.budget,
                                     orphan_grace_s=cfg.session_orphan_grace_s)
        self._trimmed = (0, 0.0)  # sessions.closed_count and time.monotonic() at the last heap trim
        self.streams = StreamTable(cfg.max_streams_per_node, cfg.handshake_timeout_s,
                                   cfg.stream_idle_timeout_s, cfg.stream_stall_timeout_s)
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._stop_reaper = threading.Event()
        self._reaper: threading.Thread | None = None
        self.health = health.HealthServicer()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        limit_malloc_arenas()  # before gRPC's threads start: each would take an arena of its own
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="split-rpc"),
            options=self.config.server_options(),
            # Streams beyond the worker count are refused (RESOURCE_EXHAUSTED) instead of queued.
            maximum_concurrent_rpcs=self.max_workers,
        )
        server.add_generic_rpc_handlers((_Servicer(self).handler(),))
        # The standard gRPC health service: operators' probes, and the clients' liveness checks
        # while they wait for a reply (client.py), answered by another thread than the stream's.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.insecure:
            port = server.add_insecure_port(self.address)
        else:
            assert self.tls is not None
            # Re-reads the certificate files on change: a rotated server certificate needs no restart.
            port = server.add_secure_port(self.address, server_credentials(self.tls))
        if not port:
            raise OSError(f"could not bind {self.address}")
        server.start()
        self._server, self.port = server, port
        self._restore_sessions()
        self._reaper = threading.Thread(target=self._reap, name="split-session-reaper", daemon=True)
        self._reaper.start()
        log.info("channel server on %s (port %d, %s)", self.address, port,
                 "INSECURE" if self.insecure else "mutual TLS")
        return port

    def _restore_sessions(self) -> None:
        """Sessions the handler kept from a previous run (``restored_sessions``), back under their
        ids and certificates for their clients to resume."""
        for record in getattr(self.handler, "restored_sessions", list)():
            try:
                session = self.sessions.restore(record["id"], record["node_id"], fingerprint=record["fingerprint"],
                                                hello=record["hello"], chunk_size=self.config.chunk_size,
                                                client_to_server=self.config.client_to_server,
                                                server_to_client=self.config.server_to_client)
                with session.lock:
                    self.handler.reopen_session(session, record)
            except Exception as e:  # one bad record must not keep the server from starting
                self.sessions.close(record.get("id", ""))
                internal_error(f"restoring session {str(record.get('id', ''))[:8]}", e)
                continue
            log.info("restored session %s of %s at step %s", session.id[:8], session.node_id,
                     getattr(session.state.get("segment"), "last_step", "?"))

    def _reap(self) -> None:
        """Expire idle sessions, and end streams that idle, stall or never shake hands (streams.py)."""
        cfg = self.config
        deadlines = (cfg.session_ttl_s, cfg.session_orphan_grace_s, cfg.stream_idle_timeout_s,
                     cfg.stream_stall_timeout_s, cfg.handshake_timeout_s)
        interval = min(max(min(deadlines) / 4, 0.05), 1.0)
        while not self._stop_reaper.wait(interval):
            for what, chore in (("session expiry", self.sessions.expire),
                                ("stream watchdog", self.streams.expire_overdue),
                                ("revocation check", self._close_revoked),
                                ("heap trim", self._trim_after_closes)):
                try:
                    chore()
                except Exception as e:
                    internal_error(what, e)

    def _trim_after_closes(self) -> None:
        """Once sessions have ended, hand the heap they freed back to the OS: glibc keeps freed
        memory in its per-thread arenas, so without this a server's RSS stays at its high-water
        mark after its tenants leave (466 -> 1,212 MB with 16 wide sessions, 886 MB after all
        closed). Not on a request's path: the reaper does it, at most every few seconds (a trim
        of a large heap takes milliseconds and holds the allocator's locks)."""
        closed, now = self.sessions.closed_count, time.monotonic()
        if closed != self._trimmed[0] and now - self._trimmed[1] >= TRIM_INTERVAL_S:
            self._trimmed = (closed, now)
            release_freed_heap()

    def _close_revoked(self) -> None:
        """Re-read the CRL if it changed; close the live sessions of certificates it revokes."""
        crl = self.revocations
        crl.refresh()
        for sid in self.sessions.close_where(lambda s: crl.revokes_fingerprint(s.fingerprint)):
            log.warning("closed session %s: its owner's certificate is revoked", sid[:8])
        self.streams.expire_where(lambda s: bool(s.fingerprint) and crl.revokes_fingerprint(s.fingerprint),
                                  grpc.StatusCode.PERMISSION_DENIED, "the client certificate was revoked")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, end live streams after ``grace`` seconds, then close every session."""
        server, self._server = self._server, None
        if server is None:
            return
        self.health.enter_graceful_shutdown()
        server.stop(grace).wait()
        self._stop_reaper.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.sessions.close_all(suspend=True)

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
