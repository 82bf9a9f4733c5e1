"""Failed TLS handshakes in the server's own log, with the peer's address.

gRPC Python never hears of a connection whose TLS handshake fails (a client certificate from
another CA, an expired one, a client that does not trust our certificate): the C core drops it
before any Python code runs, and logs nothing by default. The one place where the peer's address
and the reason appear together is the C core's handshaker trace, which it writes to the process's
stderr. ``HandshakeWatch`` turns that trace on (``GRPC_TRACE=handshaker``, before gRPC starts),
reads the process's stderr through a pipe, and turns each failed handshake into one WARNING of
ours::

    TLS handshake from ipv4:10.0.0.7:53128 failed: Ssl handshake failed (TSI_PROTOCOL_FAILURE): ...

Every other line goes on to the real stderr unchanged, except the trace's own lines, which only
this module asked for. gRPC reads its trace settings when it is first imported, so ``install()``
must come before anything imports ``grpc``: this module imports nothing of the package (it belongs
to the apps layer: ``lightning-split serve`` installs it first thing, ``server.log_tls_failures``).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sys
import threading

log = logging.getLogger(__name__)

# A C-core log line: severity, date, time, thread, file:line]
_CORE_LINE = re.compile(r"^[IDW]\d{4} [\d:.]+\s+\d+ (?P<file>[\w./-]+):\d+\] ")
_TRACED = ("handshaker.cc", "trace.cc", "channel_trace.h", "ssl_transport_security.cc", "log.cc", "tcp_server_posix.cc",
           "security_handshaker.cc", "http_connect_handshaker.cc", "handshaker_registry.cc")
_FAILED = re.compile(r"CallNextHandshakerLocked: error=(?P<error>(?!OK\b).*)")
_PEER = re.compile(r"endpoint_peer_address=(?P<peer>[^,}\s]+)")
# The lines a traced record goes on with: an error's source locations, then the handshake's arguments.
_CONTINUED = re.compile(r"^( shutdown=|=== Source Location Trace|src/core/|\s*$)")
_HINTS = (
    ("Socket closed", "the client closed the connection during the handshake: it may not trust this "
                      "server's certificate (another CA, a wrong server name)"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "the client sent no certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "the client's certificate is not signed by this server's CA, or has expired"),
    ("Invalid certificate verification context", "the client's certificate is not signed by this server's CA"),
    ("WRONG_VERSION_NUMBER", "the client does not speak TLS (plaintext?)"),
)


def hint(error: str) -> str:
    """What a handshake error most likely means, for the operator."""
    return next((text for key, text in _HINTS if key in error), "")


class HandshakeWatch:
    """Reads this process's stderr through a pipe: failed handshakes become WARNINGs, the rest passes."""

    def __init__(self) -> None:
        self._real = os.dup(2)  # where every line that is not ours still goes
        read, write = os.pipe()
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        self._reader = os.fdopen(read, "r", encoding="utf-8", errors="replace")
        self._pending: str | None = None  # a failure whose peer address is on a following line
        self._dropping = False  # the continuation lines of a trace line we drop
        self.failures = 0
        self.pass_debug = True
        # The pump only reads: a log line of ours goes to stderr, which is this pipe, so another
        # thread writes it (the pump writing into a full pipe that only it drains would hang).
        self._reports: queue.SimpleQueue[str] = queue.SimpleQueue()
        for target, name in ((self._pump, "tls-handshake-pump"), (self._log, "tls-handshake-log")):
            threading.Thread(target=target, name=name, daemon=True).start()

    @classmethod
    def install(cls) -> HandshakeWatch | None:
        """Turn the handshaker trace on and start watching; None (nothing changed) where gRPC has
        already started, or stderr is not a file descriptor we can replace."""
        if "grpc" in sys.modules and "handshaker" not in os.environ.get("GRPC_TRACE", ""):
            log.info("gRPC started before the TLS handshake log could be set up: failed handshakes are not logged")
            return None
        asked = os.environ.get("GRPC_VERBOSITY", "").upper() == "DEBUG"
        os.environ["GRPC_TRACE"] = ",".join(filter(None, [os.environ.get("GRPC_TRACE"), "handshaker"]))
        os.environ["GRPC_VERBOSITY"] = "DEBUG"  # the trace is written at DEBUG
        try:
            watch = cls()
            watch.pass_debug = asked  # the C core's other DEBUG lines only where the operator asked for them
            return watch
        except OSError as e:
            log.info("no TLS handshake log: %s", e)
            return None

    def _pump(self) -> None:
        for line in self._reader:
            try:
                if not self._ours(line):
                    os.write(self._real, line.encode())
            except Exception:  # noqa: BLE001 - the pipe must keep draining, or stderr writes block
                os.write(self._real, line.encode())

    def _ours(self, line: str) -> bool:
        """Whether ``line`` belongs to the trace we asked for (logged as a failure, or dropped)."""
        core = _CORE_LINE.match(line)
        if core is None and not (self._dropping and _CONTINUED.match(line)):
            self._dropping = False
            return False
        if core is not None:
            self._dropping = core["file"].rsplit("/", 1)[-1] in _TRACED or (line[0] == "D" and not self.pass_debug)
            if not self._dropping:
                return False
            failed = _FAILED.search(line)
            if failed:
                self._pending = failed["error"].strip().removesuffix(": OK")
        if self._pending is not None:
            peer = _PEER.search(line)
            if peer:
                self._report(peer["peer"], self._pending)
                self._pending = None
        return True

    def _report(self, peer: str, error: str) -> None:
        self.failures += 1
        why = hint(error)
        self._reports.put(f"TLS handshake from {peer} failed: {error[:300]}" + (f" ({why})" if why else ""))

    def _log(self) -> None:
        while True:
            log.warning("%s", self._reports.get())
