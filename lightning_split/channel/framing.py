"""Frames straight to gRPC bytes, without building a protobuf message around the data.

``wire.message_to_frames`` yields ``pb.Frame`` objects; putting megabytes into one costs a copy
into the protobuf arena and another one in ``SerializeToString``. Here each Frame is serialized
as its small fields (a ``pb.Frame`` without ``data``, serialized by protobuf) followed by field 7
(``data``) written by hand, and the fragment's data is gathered from the encoded message's
buffers by the single ``bytes.join`` that produces the gRPC message. The bytes are exactly what
``pb.Frame(...).SerializeToString()`` would give (``data`` is the last field; the tests check it),
so the peer parses them with the ordinary generated code.

Receiving is the mirror image: both ends let gRPC hand over the raw bytes of each Frame (identity
deserializer) and :func:`split_frame` cuts field 7 out of them: the small remaining fields are
parsed by protobuf (so protobuf still validates everything but ``data``), and ``data`` goes to
``Reassembler.add(frame, data)`` as a memoryview slice of the received bytes, copied once, into
the payload buffer (instead of three times: gRPC bytes -> protobuf ``data`` -> payload buffer).

Frames are produced lazily: the gRPC sender thread cuts and checksums fragment k+1 while gRPC's
core (no GIL) encrypts and writes fragment k.

Fragments are balanced: a data part of ``chunk_size`` + a few bytes (a power-of-two activation plus
its PayloadMeta) goes as one fragment of up to ``chunk_size + FRAGMENT_SLACK`` rather than a full
one and a 60-byte straggler, which would cost a whole extra gRPC message (~0.7 ms each way).
Both ends accept gRPC messages of ``chunk_size + FRAME_HEADROOM`` (config.py), which covers it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

from google.protobuf.message import DecodeError

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, EncodedMessage, Message, encode_message
from lightning_split.wire.errors import invalid

_DATA_TAG = b"\x3a"  # field 7, wire type 2 (length-delimited)
FRAGMENT_SLACK = 32 * 1024  # < FRAME_HEADROOM, which also has to hold the Frame's other fields
SMALL_FRAME_BYTES = 16 * 1024  # a received Frame up to this size is parsed whole by protobuf (split_frame)


def fragment_plan(payload_bytes: int, chunk_size: int) -> tuple[int, int]:
    """(fragment size, fragment count): as few fragments of at most chunk_size + slack as possible,
    all of the same size but the last."""
    count = max(1, -(-payload_bytes // (chunk_size + FRAGMENT_SLACK)))
    return max(1, -(-payload_bytes // count)), count


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class EncodedFrames:
    """The serialized Frames of one message, each produced on demand; with the message's statistics.

    ``frame(i)`` serializes fragment ``i`` alone, so the fragments of one message can be sent by
    several threads at once (bonded connections, bond.py); iterating gives them all in order.
    """

    def __init__(self, encoded: EncodedMessage) -> None:
        self.encoded = encoded
        self.wire_bytes = encoded.wire_bytes
        self.raw_bytes = encoded.raw_bytes
        self.fragment_size, self.fragment_count = fragment_plan(encoded.payload_bytes, encoded.chunk_size)
        self.on_sent: Callable[[], None] | None = None  # called once the last fragment is sent

    def __iter__(self) -> Iterator[bytes]:
        for index in range(self.fragment_count):
            yield self.frame(index)

    def frame(self, index: int) -> bytes:
        enc = self.encoded
        enc.wait_ready()  # device->host copies queued by encode_frames(defer=True)
        lo = index * self.fragment_size
        parts = enc.fragment_parts(lo, min(lo + self.fragment_size, enc.payload_bytes))
        crc = 0
        for part in parts if enc.checksum else ():
            crc = zlib.crc32(part, crc)  # releases the GIL on large parts
        head = pb.Frame(header=enc.header, fragment_index=index, fragment_count=self.fragment_count,
                        payload_bytes=enc.payload_bytes, meta_bytes=enc.meta_bytes, crc32=crc).SerializeToString()
        if not parts:
            return head
        size = sum(len(p) for p in parts)
        return b"".join([head, _DATA_TAG, _varint(size), *parts])  # the one copy of the data


def encode_frames(msg: Message, compression: CompressionConfig | None, chunk_size: int,
                  checksum: bool, defer: bool = True, stripes: int = 1) -> EncodedFrames:
    """Encode ``msg`` now (errors raise here) and return its frames, serialized lazily.

    CUDA tensors are copied to pinned host memory asynchronously (``defer``): the frames wait for
    the copies when first iterated, on the gRPC sending thread, so the thread that encoded the
    message is free to launch more GPU work meanwhile. ``stripes``: the connections the stream is
    bonded over; a message is cut into at least that many fragments (``encode_message``).
    """
    return EncodedFrames(encode_message(msg, compression, chunk_size, checksum, defer=defer, stripes=stripes))


def passthrough(data: bytes) -> bytes:
    """The gRPC serializer for frames that are already bytes."""
    return data


_DATA_FIELD = 7


class _Unusual(Exception):
    """The bytes are not a plain top-level field sequence the fast path knows: let protobuf judge."""


def _skip_varint(buf: bytes, pos: int, end: int) -> int:
    for i in range(pos, min(pos + 10, end)):
        if buf[i] < 0x80:
            return i + 1
    raise _Unusual  # truncated, or over 10 bytes


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(pos, min(pos + 10, end)):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    raise _Unusual


def _data_span(buf: bytes) -> tuple[int, int, int] | None:
    """(record start, data start, data end) of the one field-7 record of a serialized Frame;
    None if there is none. _Unusual for anything but well-formed fields of wire types 0, 1, 2
    and 5 with field numbers in range, or for a repeated field 7 (protobuf semantics decide)."""
    end, pos, span = len(buf), 0, None
    while pos < end:
        record = pos
        tag, pos = _read_varint(buf, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if not 0 < field < 2**29:
            raise _Unusual
        if wire_type == 0:
            pos = _skip_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            start, pos = pos, pos + length
            if field == _DATA_FIELD:
                if span is not None:
                    raise _Unusual
                span = (record, start, pos)
        else:  # groups, invalid wire types
            raise _Unusual
        if pos > end:
            raise _Unusual
    return span


def _parse(buf: bytes) -> pb.Frame:
    try:
        return pb.Frame.FromString(buf)
    except (DecodeError, ValueError, TypeError) as e:  # ValueError: e.g. bad UTF-8 in a string
        raise invalid(f"malformed Frame ({len(buf)} bytes): {e}") from e


def _parse_whole(raw: bytes) -> tuple[pb.Frame, bytes]:
    """(the Frame without ``data``, a copy of its ``data``), by protobuf's own parse of all of it."""
    frame = _parse(raw)
    data = frame.data
    frame.ClearField("data")
    return frame, data


def split_frame(raw: bytes) -> tuple[pb.Frame, memoryview | bytes]:
    """A received, serialized Frame -> (the Frame without ``data``, its ``data``).

    ``data`` is a memoryview slice of ``raw`` (no copy) in the usual case; for unusual but possibly
    valid encodings (field 7 twice, groups) the whole Frame is parsed by protobuf and ``data`` is
    ``frame.data``. Malformed input raises WireError(INVALID_ARGUMENT), exactly where protobuf's
    own parse of ``raw`` would fail: the fields besides ``data`` are always parsed by protobuf,
    and the span of ``data`` is only taken when the whole of ``raw`` is a valid field sequence.
    Pass both to ``Reassembler.add(frame, data)``.
    """
    if not isinstance(raw, bytes):
        raise invalid(f"a Frame must arrive as bytes, not {type(raw).__name__}")
    if len(raw) <= SMALL_FRAME_BYTES:  # copying a few KiB costs less than our scan of the fields
        return _parse_whole(raw)
    try:
        span = _data_span(raw)
    except _Unusual:
        return _parse_whole(raw)
    if span is None:
        return _parse(raw), b""
    record, start, end = span
    rest = raw[:record] if end == len(raw) else raw[:record] + raw[end:]
    return _parse(rest), memoryview(raw)[start:end]


def identity(data: bytes) -> bytes:
    """The gRPC deserializer for frames parsed by :func:`split_frame`."""
    return data
