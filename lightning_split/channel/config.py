"""Channel settings, and the gRPC channel/server options derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from lightning_split.wire import CompressionConfig, WireLimits
from lightning_split.wire.compression import AcceptedEncodings

# Room in one gRPC message for the Frame's header fields around a chunk of data.
FRAME_HEADROOM = 64 * 1024
LOSSLESS_MODES = ("none", "blosc2")
LOSSY_MODES = ("none", "bf16", "fp16", "fp8", "int8")


def auto_connections() -> int:
    """Connections to bond a stream over by default: 1 per 4 cores, at most 4, at least 1.

    Measured on a 16-core H200 host: 2-4 connections move 16-64 MiB activations 1.6-1.7x faster
    than one (and cut generation's prompt time), while on a 2-core host extra connections only
    add threads that compete for the cores."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 4))


def host_memory_bytes() -> int:
    """Physical memory of this host (0 if unknown: then budgets are unlimited)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class ChannelConfig:
    """Everything the client and the server of one channel are configured with.

    On the client, ``client_to_server``/``server_to_client`` are the compression it *asks for*;
    the server grants the request limited to ``allow_lossless``/``allow_lossy`` (and, for replies,
    to what the client says it can decode). On the server they are only a fallback for a hello
    that asks for nothing.
    """

    chunk_size: int = 1 << 20
    client_to_server: CompressionConfig = field(default_factory=CompressionConfig)
    server_to_client: CompressionConfig = field(default_factory=CompressionConfig)
    allow_lossless: tuple[str, ...] = LOSSLESS_MODES
    allow_lossy: tuple[str, ...] = LOSSY_MODES
    # CRC-32 per fragment. None = auto: on for plaintext (loopback) channels, off under TLS, whose
    # AEAD records already authenticate every byte (the CRC would only cost ~2.5 ms per 16 MiB
    # per side). The handshake agrees: frames carry CRCs if either end wants them, and each end
    # verifies them if it wants them.
    checksum: bool | None = None
    limits: WireLimits = field(default_factory=WireLimits)
    max_sessions: int = 64
    session_ttl_s: float = 600.0
    # A session whose streams have all ended without a CLOSE (a crashed client, a cut link) is
    # closed this long after its last stream ended, and its memory given back, instead of holding
    # its slot for the whole TTL. A reconnecting client resumes it within this time.
    session_orphan_grace_s: float = 60.0
    # Fair admission among tenants (a node is one client certificate): one node's excess is
    # refused with RESOURCE_EXHAUSTED while every other node is served as before. A stream is one
    # Exchange call (a bonded session uses one per connection), and each holds a server thread.
    max_sessions_per_node: int = 8
    max_streams_per_node: int = 32
    # A stream after its handshake that neither sends a fragment nor waits for a reply for this
    # long is ended (its session lives on: the client's next request reopens a stream) ...
    stream_idle_timeout_s: float = 600.0
    # ... and one whose message stops arriving mid-way (no fragment for this long) is aborted,
    # its partial payload freed.
    stream_stall_timeout_s: float = 60.0
    # Memory the server holds for its peers (payloads in flight, saved activations, KV caches),
    # charged before it is allocated (budget.py). None: memory_bytes = half the host's RAM,
    # node_memory_bytes = a quarter of memory_bytes; 0: unlimited.
    memory_bytes: int | None = None
    node_memory_bytes: int | None = None
    handshake_timeout_s: float = 30.0
    request_deadline_s: float = 300.0
    # HTTP/2 keepalive pings find a dead or frozen peer (a pulled cable, a killed VM, a stopped
    # process) that TCP alone would only notice after many minutes: within about
    # keepalive_time_s + keepalive_timeout_s (10 s by default; a ping costs a few dozen bytes).
    keepalive_time_s: float = 5.0
    keepalive_timeout_s: float = 5.0
    # A client whose connection breaks reconnects (bounded exponential backoff) for this long,
    # resumes its session and sends the requests in flight again; the server answers those it ran
    # already from its record (replies.py), so each runs exactly once. 0: fail them instead.
    reconnect_deadline_s: float = 30.0
    # The client keeps the requests of the steps under way and of the sequence being generated,
    # up to this many tensor bytes, to bring a server that restarted from its saved state back to
    # where it was (journal.py). 0: keep none (such a restart then fails what was in flight).
    restart_replay_bytes: int = 1 << 30
    # HTTP/2 tuning; zero keeps gRPC's default. See benchmarks/transport.py for measurements.
    http2_max_frame_bytes: int = 0
    http2_lookahead_bytes: int = 0
    http2_write_buffer_bytes: int = 0
    grpc_options: tuple[tuple[str, Any], ...] = ()  # extra raw gRPC channel/server arguments
    # Connections one stream is bonded over (bond.py): the client asks for ``connections``, the
    # server grants up to ``max_connections``. Several help where one connection's gRPC core is
    # the bottleneck (many-core hosts, large activations); 1 is a plain single stream. None: by
    # the host's cores (auto_connections): 1 below 8 cores, where extra threads only compete.
    connections: int | None = None
    max_connections: int = 8
    # Receive payloads into page-locked memory, so tensors reach a GPU by asynchronous copies.
    # None = auto: on where CUDA is available.
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        if not 4096 <= self.chunk_size <= 64 << 20:
            raise ValueError(f"chunk_size must be within [4 KiB, 64 MiB], got {self.chunk_size}")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if not 1 <= self.wanted_connections() <= 64 or not 1 <= self.max_connections <= 64:
            raise ValueError("connections and max_connections must be within [1, 64]")
        if self.max_sessions_per_node < 1 or self.max_streams_per_node < 1:
            raise ValueError("max_sessions_per_node and max_streams_per_node must be >= 1")
        for name in ("memory_bytes", "node_memory_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: unlimited) or None (auto)")
        for name in ("session_ttl_s", "session_orphan_grace_s", "handshake_timeout_s", "request_deadline_s",
                     "stream_idle_timeout_s", "stream_stall_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for d in (self.client_to_server, self.server_to_client):
            if not isinstance(d, CompressionConfig):
                raise TypeError("compression settings must be wire.CompressionConfig instances")

    def wanted_connections(self) -> int:
        return auto_connections() if self.connections is None else int(self.connections)

    def memory_budgets(self) -> tuple[int, int]:
        """(server, per node) memory budgets in bytes, 0 meaning unlimited, auto sizes resolved."""
        total = self.memory_bytes
        if total is None:
            total = host_memory_bytes() // 2
        node = self.node_memory_bytes
        if node is None:
            node = total // 4
        return int(total), int(node)

    def accepted(self) -> AcceptedEncodings:
        """The encodings this end decodes: RAW and whatever it allows. A peer may switch among them
        message by message (the adaptive compression of the split's training steps)."""
        return AcceptedEncodings(frozenset(self.allow_lossless), frozenset(self.allow_lossy))

    def wants_pinned(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        import torch

        return torch.cuda.is_available()

    def wants_checksum(self, insecure: bool) -> bool:
        return insecure if self.checksum is None else bool(self.checksum)

    def replace(self, **changes: Any) -> ChannelConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelConfig:
        """Build from plain data (a Hydra node); compression and limits may be given as dicts."""
        d = dict(d)
        for key in ("client_to_server", "server_to_client"):
            if isinstance(d.get(key), dict):
                d[key] = CompressionConfig.from_dict(d[key])
        if isinstance(d.get("limits"), dict):
            d["limits"] = WireLimits(**d["limits"])
        for key in ("allow_lossless", "allow_lossy"):
            if key in d:
                d[key] = tuple(d[key])
        if "grpc_options" in d:
            d["grpc_options"] = tuple(tuple(kv) for kv in d["grpc_options"])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ChannelConfig keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message (one Frame) either side sends or accepts."""
        return self.chunk_size + FRAME_HEADROOM

    def _common_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.http2_max_frame_bytes:
            opts.append(("grpc.http2.max_frame_size", self.http2_max_frame_bytes))
        if self.http2_lookahead_bytes:
            opts.append(("grpc.http2.lookahead_bytes", self.http2_lookahead_bytes))
        opts += list(self.grpc_options)
        if self.http2_write_buffer_bytes:
            opts.append(("grpc.http2.write_buffer_size", self.http2_write_buffer_bytes))
        return opts

    def client_options(self) -> list[tuple[str, Any]]:
        # A long-lived stream must not be multiplexed with other channels' streams by accident:
        # a local subchannel pool keeps each ChannelClient on its own TCP/TLS connection.
        # After a dropped connection gRPC waits before it dials again (1 s, doubling to 2 min by
        # default): a reconnecting client would spend its deadline waiting on that. (Not
        # min_reconnect_backoff_ms: gRPC also takes it as the time a connection attempt, TCP and
        # TLS, may take; 100 ms of it failed handshakes on a loaded host.)
        return [*self._common_options(), ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            *self._common_options(),
            # Without this a second server could silently share a fixed port with the first.
            ("grpc.so_reuseport", 0),
            # Clients choose their keepalive: pings up to one a second are welcome (a client pinging
            # faster than the server allows would be cut off with "too many pings").
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_time_s * 500)),
            # A peer that opens TCP and never finishes the TLS handshake is dropped after this.
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
        ]
