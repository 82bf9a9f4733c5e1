"""The logical message: a header (claim 5: type, node id, code, ...) and a body (the data part)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Message", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 3  # 2: typed bodies (PayloadMeta.body is a oneof); 3: block arguments by meaning (BlockArguments)


@dataclass
class Message:
    type: int  # a MessageType value (pb enum int)
    body: Any = None  # nested: tensors, tuple/list/dict (str keys), int, float, bool, str, bytes, None
    session_id: str = ""
    step: int = 0
    sequence: int = 0
    acked: int = 0  # client: every reply up to this sequence arrived (the server may forget them)
    code: int = 0  # 0 = OK; in ERROR replies a grpc.StatusCode value[0]
    reply_encoding: int = 0  # request: the lossy pb.Encoding wanted for the reply (0, RAW: as agreed)
    server_us: int = 0  # reply: the server's handling time in microseconds
    node_id: str = ""
    protocol_version: int = PROTOCOL_VERSION
    wire_bytes: int = 0  # set by the receiver: bytes of the data part as they crossed the wire
    raw_bytes: int = 0  # set by the receiver: bytes of the tensors before compression
    answers: int = 0  # a RESULT: the type of the request it answers, which picks its body's message
    typed: bool = False  # the sender writes an instruction's body as its typed message (typed_body.py)
    body_case: str | None = None  # set by the receiver: the PayloadMeta.body message the body came as
