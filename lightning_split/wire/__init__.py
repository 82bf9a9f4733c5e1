"""Wire format of lightning_split: tensor codec, compression, chunking (layer 2 of docs/contracts.md).

Imports torch, numpy, blosc2 and protobuf only; nothing here opens a socket.
"""

from lightning_split._proto.split_pb2 import MessageType

from .chunking import EncodedMessage, FrameIterator, Reassembler, encode_message, message_to_frames
from .compression import CompressionConfig
from .errors import WireError
from .limits import WireLimits
from .message import PROTOCOL_VERSION, Message
from .tensor_codec import decode_body, encode_body

__all__ = [
    "Message",
    "MessageType",
    "WireLimits",
    "CompressionConfig",
    "WireError",
    "encode_body",
    "decode_body",
    "message_to_frames",
    "Reassembler",
    "PROTOCOL_VERSION",
    # extras (sending-side statistics)
    "encode_message",
    "EncodedMessage",
    "FrameIterator",
]
