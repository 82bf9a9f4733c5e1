"""Frames straight to gRPC bytes, without building a protobuf message around the data.

``wire.message_to_frames`` yields ``pb.Frame`` objects; putting megabytes into one costs a copy
into the protobuf arena and another one in ``SerializeToString``. Here each Frame is serialized
as its small fields (a ``pb.Frame`` without ``data``, serialized by protobuf) followed by field 7
(``data``) written by hand, and the fragment's data is gathered from the encoded message's
buffers by the single ``bytes.join`` that produces the gRPC message. The bytes are exactly what
``pb.Frame(...).SerializeToString()`` would give (``data`` is the last field; the tests check it),
so the peer parses them with the ordinary generated code.

Frames are produced lazily: the gRPC sender thread cuts and checksums fragment k+1 while gRPC's
core (no GIL) encrypts and writes fragment k.

Fragments are balanced: a data part of ``chunk_size`` + a few bytes (a power-of-two activation plus
its PayloadMeta) goes as one fragment of up to ``chunk_size + FRAGMENT_SLACK`` rather than a full
one and a 60-byte straggler, which would cost a whole extra gRPC message (~0.7 ms each way).
Both ends accept gRPC messages of ``chunk_size + FRAME_HEADROOM`` (config.py), which covers it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, EncodedMessage, Message, encode_message

_DATA_TAG = b"\x3a"  # field 7, wire type 2 (length-delimited)
FRAGMENT_SLACK = 32 * 1024  # < FRAME_HEADROOM, which also has to hold the Frame's other fields


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
    """The serialized Frames of one message, produced on iteration; with the message's statistics."""

    def __init__(self, encoded: EncodedMessage) -> None:
        self.encoded = encoded
        self.wire_bytes = encoded.wire_bytes
        self.raw_bytes = encoded.raw_bytes
        self.fragment_size, self.fragment_count = fragment_plan(encoded.payload_bytes, encoded.chunk_size)

    def __iter__(self) -> Iterator[bytes]:
        enc = self.encoded
        pieces = [memoryview(enc.meta)] + [memoryview(b).cast("B") for b in enc.buffers if len(b)]
        pi, po = 0, 0  # current piece, offset in it
        chunk, total, count = self.fragment_size, enc.payload_bytes, self.fragment_count
        for index in range(count):
            want = min(chunk, total - index * chunk)
            parts: list[memoryview] = []
            crc = 0
            while want:
                piece = pieces[pi]
                take = min(want, len(piece) - po)
                part = piece[po : po + take]
                parts.append(part)
                if enc.checksum:
                    crc = zlib.crc32(part, crc)  # releases the GIL on large parts
                want -= take
                po += take
                if po == len(piece):
                    pi, po = pi + 1, 0
            size = sum(len(p) for p in parts)
            head = pb.Frame(header=enc.header, fragment_index=index, fragment_count=count,
                            payload_bytes=total, meta_bytes=enc.meta_bytes, crc32=crc).SerializeToString()
            if size:
                yield b"".join([head, _DATA_TAG, _varint(size), *parts])  # the one copy of the data
            else:
                yield head


def encode_frames(msg: Message, compression: CompressionConfig | None, chunk_size: int,
                  checksum: bool) -> EncodedFrames:
    """Encode ``msg`` now (errors raise here) and return its frames, serialized lazily."""
    return EncodedFrames(encode_message(msg, compression, chunk_size, checksum))


def passthrough(data: bytes) -> bytes:
    """The gRPC serializer for frames that are already bytes."""
    return data
