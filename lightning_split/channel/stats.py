"""Transport counters a logger can report per step."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TransportStats:
    """Counters of one ChannelClient. ``messages`` counts completed round trips.

    ``bytes_*`` are data-part bytes as they crossed the wire (after compression, frame headers
    not counted); ``raw_bytes_*`` are the tensors' bytes before compression.
    """

    messages: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    raw_bytes_sent: int = 0
    raw_bytes_received: int = 0
    last_rtt_s: float = 0.0
    total_rtt_s: float = 0.0
    reconnects: int = 0  # broken connections resumed
    resent: int = 0  # requests sent again after a reconnect (each runs once on the server)
    replayed: int = 0  # answered requests sent again to rebuild a restarted server's state (journal.py)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def mean_rtt_s(self) -> float:
        return self.total_rtt_s / self.messages if self.messages else 0.0

    @property
    def compression_ratio_sent(self) -> float:
        return self.raw_bytes_sent / self.bytes_sent if self.bytes_sent else 1.0

    def record_sent(self, wire_bytes: int, raw_bytes: int) -> None:
        with self._lock:
            self.bytes_sent += wire_bytes
            self.raw_bytes_sent += raw_bytes

    def record_reply(self, wire_bytes: int, raw_bytes: int, rtt_s: float) -> None:
        with self._lock:
            self.messages += 1
            self.bytes_received += wire_bytes
            self.raw_bytes_received += raw_bytes
            self.last_rtt_s = rtt_s
            self.total_rtt_s += rtt_s

    def _counters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def snapshot(self) -> TransportStats:
        """A consistent copy, for computing deltas later (``now - before``)."""
        with self._lock:
            return TransportStats(**self._counters())

    def reset(self) -> TransportStats:
        """Zero the counters; returns what they held (the delta since the last reset)."""
        with self._lock:
            old = TransportStats(**self._counters())
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, f.default)
            return old

    def __sub__(self, other: TransportStats) -> TransportStats:
        a, b = self.snapshot()._counters(), other.snapshot()._counters()
        d = {k: a[k] - b[k] for k in a}
        d["last_rtt_s"] = a["last_rtt_s"]
        return TransportStats(**d)

    def as_dict(self) -> dict[str, float]:
        snap = self.snapshot()
        d = snap._counters()
        d["mean_rtt_s"] = snap.mean_rtt_s
        return d
