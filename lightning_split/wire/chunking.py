"""Cutting a message into Frames and putting it back together (claim 6).

Sending: :func:`encode_message` encodes the body once (eagerly, so encoding errors surface before
anything is sent) and returns an :class:`EncodedMessage` with ``wire_bytes`` / ``raw_bytes``
statistics; ``.frames()`` yields the Frames lazily. :func:`message_to_frames` is
``encode_message(...).frames()``: an iterator that also carries the statistics as attributes.
Each fragment's ``data`` is sliced out of the (meta, buffers...) sequence with one copy; the whole
data part is never concatenated.

Receiving: one :class:`Reassembler` per stream direction. Fragments of one message arrive in
order; fragment 0 fixes header and sizes, which are checked against WireLimits before the
payload buffer is allocated (once, 64-byte aligned, never grown; reused for the next message
once no decoded tensor refers to it any more). ``Reassembler.add(frame, data)`` takes a fragment's
data separately (e.g. a memoryview of the received bytes: channel/framing.py ``split_frame``),
with the same checks, so it is copied once, into the payload buffer.

Measured (2-core x86 VM, fp32 tensor, 1 MiB fragments, frames consumed as a stream): sending
4.4-4.9 GB/s with CRC-32, 12-17 GB/s without; receiving 4.2-5.2 GB/s with CRC, 12-21 GB/s
without. zlib.crc32 itself runs at ~7 GB/s here (2 GB/s on the GPU hosts' zlib), so it is the
main cost: TLS already authenticates every record, and ``checksum=False`` on both sides skips it.
Holding all Frames of a big message in a list (instead of streaming them) costs ~2x: every
fragment is then fresh memory to fault in.
"""

from __future__ import annotations

import bisect
import itertools
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from lightning_split._proto import split_pb2 as pb

from .compression import CompressionConfig
from .errors import WireError, exhausted, invalid
from .limits import WireLimits
from .message import PROTOCOL_VERSION, Message
from .tensor_codec import ALIGN, _decode, _encode
from .typed_body import body_case

__all__ = ["message_to_frames", "encode_message", "EncodedMessage", "FrameIterator", "Reassembler",
           "message_header"]

_KNOWN_TYPES = frozenset(v for v in pb.MessageType.values() if v != pb.MESSAGE_TYPE_UNSPECIFIED)
# How many references hold a tensor storage (a private torch API; without it buffers are never reused).
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def message_header(msg: Message) -> pb.Header:
    """The pb.Header of ``msg``; WireError(INVALID_ARGUMENT) if a field is out of range."""
    if msg.type not in _KNOWN_TYPES:
        raise invalid(f"Header.type: unknown or unspecified value {msg.type}")
    try:
        return pb.Header(protocol_version=msg.protocol_version, type=msg.type, node_id=msg.node_id,
                         code=int(msg.code), session_id=msg.session_id, step=msg.step, sequence=msg.sequence,
                         acked=msg.acked, reply_encoding=msg.reply_encoding, server_us=msg.server_us)
    except (ValueError, TypeError) as e:
        raise invalid(f"Header field out of range: {e}") from e


# The smallest fragment a message is cut into to spread it over bonded connections: below it,
# gRPC's cost per message (tens of microseconds) outweighs what striping saves.
MIN_STRIPE_BYTES = 64 << 10


class EncodedMessage:
    """A message encoded for sending. ``wire_bytes`` = ``payload_bytes`` = meta + buffers
    (what crosses the wire, before gRPC/TLS framing); ``raw_bytes`` = tensors before compression."""

    def __init__(self, header: pb.Header, meta: bytes, buffers: list[memoryview], raw_bytes: int,
                 chunk_size: int, checksum: bool, pending: list[Any] | None = None, stripes: int = 1) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if len(meta) >= 2**32:
            raise WireError("PayloadMeta over 4 GiB", grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.header = header
        self.meta = meta
        self.buffers = buffers
        self.raw_bytes = raw_bytes
        self.meta_bytes = len(meta)
        self.payload_bytes = len(meta) + sum(len(b) for b in buffers)
        self.wire_bytes = self.payload_bytes
        if stripes > 1:  # at least ``stripes`` fragments of MIN_STRIPE_BYTES or more (see encode_message)
            chunk_size = min(chunk_size, max(MIN_STRIPE_BYTES, -(-self.payload_bytes // stripes)))
        self.chunk_size = chunk_size
        self.checksum = checksum
        self.fragment_count = max(1, -(-self.payload_bytes // chunk_size))
        self._pending = list(pending or [])
        self._pieces = [memoryview(meta)] + [memoryview(b).cast("B") for b in buffers if len(b)]
        self._starts = list(itertools.accumulate((len(p) for p in self._pieces), initial=0))  # in the payload

    def wait_ready(self) -> None:
        """Wait for device->host copies still filling the buffers (see ``encode_message(defer=)``).
        Several sending threads may call it at once: each waits for every copy."""
        for event in self._pending:
            event.synchronize()  # cheap once the copy is done

    def frames(self) -> FrameIterator:
        """A fresh iterator over this message's Frames (may be called again, e.g. to resend)."""
        return FrameIterator(self)

    def fragment_parts(self, lo: int, hi: int) -> list[memoryview]:
        """The payload's bytes ``[lo, hi)`` as views of the meta and the buffers (nothing copied)."""
        parts: list[memoryview] = []
        pi = bisect.bisect_right(self._starts, lo) - 1  # the piece holding byte `lo`
        while lo < hi:
            piece, start = self._pieces[pi], self._starts[pi]
            part = piece[lo - start : min(hi, start + len(piece)) - start]
            parts.append(part)
            lo += len(part)
            pi += 1
        return parts

    def _frames(self) -> Iterator[pb.Frame]:
        self.wait_ready()
        for index in range(self.fragment_count):
            lo = index * self.chunk_size
            parts = self.fragment_parts(lo, min(lo + self.chunk_size, self.payload_bytes))
            data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)  # the one copy
            yield pb.Frame(header=self.header, fragment_index=index, fragment_count=self.fragment_count,
                           payload_bytes=self.payload_bytes, meta_bytes=self.meta_bytes,
                           crc32=zlib.crc32(data) if self.checksum else 0, data=data)


class FrameIterator(Iterator[pb.Frame]):
    """Iterator of Frames that also exposes the message's statistics."""

    def __init__(self, encoded: EncodedMessage) -> None:
        self.encoded = encoded
        self.wire_bytes = encoded.wire_bytes
        self.raw_bytes = encoded.raw_bytes
        self.payload_bytes = encoded.payload_bytes
        self.fragment_count = encoded.fragment_count
        self._it = encoded._frames()

    def __next__(self) -> pb.Frame:
        return next(self._it)

    def __len__(self) -> int:
        return self.fragment_count


def encode_message(msg: Message, compression: CompressionConfig | None = None, chunk_size: int = 1 << 20,
                   checksum: bool = True, *, limits: WireLimits | None = None,
                   defer: bool = False, stripes: int = 1) -> EncodedMessage:
    """Encode ``msg`` (header + body) for sending; raises WireError if it cannot be encoded.

    ``defer``: CUDA tensors' device->host copies are queued, not waited for; the frames wait for
    them when first iterated (``EncodedMessage.wait_ready``), typically on the sending thread.
    ``stripes``: cut the message into at least this many fragments (each of at least
    ``MIN_STRIPE_BYTES``, at most ``chunk_size``). A stream bonded over K connections deals
    fragment n to connection n mod K: a message of fewer fragments than K rides on fewer
    connections, each of which gets only its share of a link that the others fill with the messages
    behind it, so on a slow link it would arrive late (measured at 100 Mbit/s: a 0.4 MB first
    micro-batch took 172 ms, not 33). Cut into K, it crosses in the order it was sent.
    """
    header = message_header(msg)
    case = body_case(msg.type, msg.answers, msg.typed)
    meta, buffers, raw, pending = _encode(msg.body, compression, limits, defer, case)
    return EncodedMessage(header, meta, buffers, raw, chunk_size, checksum, pending, stripes)


def message_to_frames(msg: Message, compression: CompressionConfig | None = None, chunk_size: int = 1 << 20,
                      checksum: bool = True) -> FrameIterator:
    """Frames of ``msg``; the returned iterator has ``wire_bytes``, ``raw_bytes``,
    ``payload_bytes`` and ``fragment_count`` attributes. The body is encoded at call time."""
    return encode_message(msg, compression, chunk_size, checksum).frames()


class Reassembler:
    """Merges the Frames of one stream direction back into Messages.

    ``add`` returns a Message when a message's last fragment arrives, else None, and raises
    WireError on any violation (after which the partial message is dropped; the caller normally
    ends the stream). Codes: RESOURCE_EXHAUSTED for sizes/counts over ``limits``, DATA_LOSS for a
    CRC mismatch, FAILED_PRECONDITION for an unsupported protocol version, INVALID_ARGUMENT for
    anything else malformed. ``checksum`` must match the sender's setting. ``device``: decoded
    tensors are placed there. ``pin_memory``: payloads land in page-locked memory, so that their
    tensors can be copied to a GPU asynchronously (``.to(device, non_blocking=True)``).
    """

    def __init__(self, limits: WireLimits | None = None, checksum: bool = True,
                 compression_allowed: CompressionConfig | None = None, *,
                 device: torch.device | str | None = None, nthreads: int = 2,
                 protocol_versions: tuple[int, ...] = (PROTOCOL_VERSION,), pin_memory: bool = False,
                 charge: Callable[[int], None] | None = None) -> None:
        self.limits = limits or WireLimits()
        # Asked before memory is taken for a message: ``charge(n)`` means "the message being
        # received needs n bytes in all" (its payload buffer, then what decoding allocates on top);
        # it raises WireError to refuse. The caller releases the charge when done with the message.
        self.charge = charge
        self.checksum = checksum
        self.compression_allowed = compression_allowed
        self.device = device
        self.nthreads = nthreads
        self.protocol_versions = tuple(protocol_versions)
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA driver
        self._pool: tuple[torch.Tensor, int] | None = None  # (last payload buffer, its idle use count)
        self.reset()

    def pooled_bytes(self) -> int:
        """Bytes of the payload buffer kept for reuse by the next message (memory between messages)."""
        return 0 if self._pool is None else self._pool[0].numel()

    def close(self) -> None:
        """Drop the partial message and the pooled buffer: the stream is over."""
        self.reset()
        self._pool = None

    def reset(self) -> None:
        """Drop any partially received message."""
        self._first: pb.Frame | None = None  # fragment 0's frame minus data: the reference header
        self._next = 0
        self._buf: torch.Tensor | None = None
        self._mv: memoryview | None = None
        self._pad = 0
        self._pos = 0

    @property
    def in_progress(self) -> bool:
        return self._first is not None

    def add(self, frame: pb.Frame, data: bytes | memoryview | None = None) -> Message | None:
        """Take one fragment; returns the Message when it was the last one, else None.

        ``data``: the fragment's data given separately (any contiguous bytes-like object, e.g. a
        memoryview slice of the received gRPC message, see ``channel.framing.split_frame``), so
        a receiver need not have protobuf copy it into ``frame.data``; ``frame.data`` must then be
        empty. Every check is the same either way. ``data`` is only read during the call.
        """
        if data is None:
            data = frame.data
        elif frame.data:
            raise ValueError("Reassembler.add: data given both in the frame and separately")
        try:
            return self._add(frame, data)
        except WireError:
            self.reset()
            raise

    def _add(self, frame: pb.Frame, data: bytes | memoryview) -> Message | None:
        if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
            data = data.cast("B")  # lengths and slice assignment below count bytes
        if self.checksum and zlib.crc32(data) != frame.crc32:
            raise WireError(f"corrupt fragment {frame.fragment_index}: CRC-32 mismatch",
                            grpc.StatusCode.DATA_LOSS)
        if self._first is None:
            if frame.fragment_index != 0:
                raise invalid(f"fragment {frame.fragment_index} arrived while no message was in progress")
            self._start(frame)
        else:
            self._check_same(frame)
        first = self._first
        assert first is not None and self._mv is not None
        if self._pos + len(data) > first.payload_bytes:
            raise invalid(f"fragment {frame.fragment_index} overflows payload_bytes={first.payload_bytes}")
        start = self._pad + self._pos
        self._mv[start : start + len(data)] = data
        self._pos += len(data)
        self._next += 1
        if self._next < first.fragment_count:
            return None
        if self._pos != first.payload_bytes:
            raise invalid(f"payload short: {self._pos} of {first.payload_bytes} bytes in "
                          f"{first.fragment_count} fragments")
        return self._finish()

    def _start(self, frame: pb.Frame) -> None:
        lim, h = self.limits, frame.header
        if h.protocol_version not in self.protocol_versions:
            raise WireError(f"unsupported protocol version {h.protocol_version} (accepted: "
                            f"{list(self.protocol_versions)})", grpc.StatusCode.FAILED_PRECONDITION)
        if h.type not in _KNOWN_TYPES:
            raise invalid(f"Header.type: unknown or unspecified value {h.type}")
        payload, count, meta = frame.payload_bytes, frame.fragment_count, frame.meta_bytes
        if payload > lim.max_payload_bytes:
            raise exhausted(f"payload_bytes={payload} > max_payload_bytes={lim.max_payload_bytes}")
        if count > lim.max_fragments:
            raise exhausted(f"fragment_count={count} > max_fragments={lim.max_fragments}")
        if count < 1:
            raise invalid("fragment_count must be >= 1")
        if count > max(1, payload):
            raise invalid(f"fragment_count={count} > payload_bytes={payload}")
        if meta > payload:
            raise invalid(f"meta_bytes={meta} > payload_bytes={payload}")
        if meta > lim.max_meta_bytes:
            raise exhausted(f"meta_bytes={meta} > max_meta_bytes={lim.max_meta_bytes}")
        if self.charge is not None:
            self.charge(payload + ALIGN)
        buf = self._take_buffer(payload + ALIGN)  # padded so the buffer region can be aligned too
        self._pad = -(buf.data_ptr() + meta) % ALIGN
        self._buf, self._mv = buf, memoryview(buf.numpy())
        if count == 1 and not frame.data:  # the message is this frame: read now, never kept past add
            first = frame
        else:  # the reference the later fragments are checked against
            first = pb.Frame()
            first.CopyFrom(frame)
            first.ClearField("data")
        self._first, self._next, self._pos = first, 0, 0

    def _take_buffer(self, need: int) -> torch.Tensor:
        """A payload buffer of at least ``need`` bytes.

        RAW tensors are decoded as views of the payload buffer, so a buffer can only be reused
        once every tensor of the previous message is gone: that is when its storage has no
        references beyond those it had when idle. Reuse matters: first-touching fresh pages
        (what a new allocation of megabytes costs) runs at ~4 GB/s, rewriting warm ones at ~45.
        """
        if self.pin_memory:
            # Page-locked, so decoded tensors go to a GPU with non_blocking copies. No pool of our
            # own: a buffer may be reused only once those copies are done, and PyTorch's caching
            # host allocator, which recycles pinned blocks, tracks exactly that with CUDA events.
            try:
                return torch.empty(need, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:
                raise exhausted(f"cannot allocate {need} bytes of pinned memory: {e}") from e
        if self._pool is not None and _storage_use_count is not None:
            pooled, idle = self._pool
            fits = need <= pooled.numel() <= 4 * need + (1 << 20)  # don't pin a huge buffer for small ones
            if fits and _storage_use_count(pooled.untyped_storage()._cdata) == idle:
                return pooled
        try:  # torch.empty: no zero-fill, 64-byte aligned
            buf = torch.empty(need, dtype=torch.uint8)
        except RuntimeError as e:
            raise exhausted(f"cannot allocate {need} bytes: {e}") from e
        idle = _storage_use_count(buf.untyped_storage()._cdata) if _storage_use_count is not None else 0
        self._pool = (buf, idle)  # the previous pooled buffer lives on only while its tensors do
        return buf

    def _check_same(self, frame: pb.Frame) -> None:
        first = self._first
        assert first is not None
        if frame.fragment_index == 0 and self._next > 0:
            raise invalid(f"a new message started before fragment {self._next} of "
                          f"{first.fragment_count} of the previous one arrived")
        if frame.fragment_index != self._next:
            what = "duplicate" if frame.fragment_index < self._next else "out of order, or a gap"
            raise invalid(f"fragment {frame.fragment_index} ({what}); expected {self._next}")
        if (frame.fragment_count != first.fragment_count or frame.payload_bytes != first.payload_bytes
                or frame.meta_bytes != first.meta_bytes):
            raise invalid(f"fragment {frame.fragment_index}: count/payload_bytes/meta_bytes differ "
                          "from fragment 0")
        if frame.header != first.header:
            raise invalid(f"fragment {frame.fragment_index}: header differs from fragment 0 "
                          "(interleaved messages are not allowed)")

    def _finish(self) -> Message:
        first, buf, pad = self._first, self._buf, self._pad
        assert first is not None and buf is not None
        self.reset()
        meta_end = pad + first.meta_bytes
        meta = memoryview(buf.numpy())[pad:meta_end]
        region = buf[meta_end : pad + first.payload_bytes]
        charge = None
        if self.charge is not None:
            held, charge_total = first.payload_bytes + ALIGN, self.charge

            def charge(extra: int) -> None:
                charge_total(held + extra)
        body, raw, case = _decode(meta, region, self.limits, self.device, self.compression_allowed, self.nthreads,
                            charge)
        h = first.header
        return Message(type=h.type, body=body, session_id=h.session_id, step=h.step, sequence=h.sequence,
                       acked=h.acked, code=h.code, node_id=h.node_id, protocol_version=h.protocol_version,
                       reply_encoding=h.reply_encoding, server_us=h.server_us, wire_bytes=first.payload_bytes,
                       raw_bytes=raw, body_case=case)

