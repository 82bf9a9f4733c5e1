"""Exactly-once over reconnects: a session's answered requests, kept until the client has them.

A link that drops takes with it the replies in flight: the client cannot tell whether the server
ran a FORWARD, a BACKWARD or an OPTIMIZER_STEP whose reply it never got. So after a reconnect it
sends every unanswered request again, with its original sequence number, and the server answers
a request it already ran from this record instead of running it twice (a second BACKWARD would add
its gradients twice, a second decode step would grow the KV cache twice).

Sequence numbers go up within a session (the client numbers across its streams); each request
tells the server how far the client got (``Header.acked``: every reply up to it arrived), and
those records are forgotten. What the record holds is charged to the node's memory budget; a
reply that does not fit is not kept, and its replay is refused with FAILED_PRECONDITION rather
than run again. Sequence 0 means unnumbered: such requests run every time and are never kept,
and so are the read-only SPLIT and LOAD (LOAD's reply is the client part's weights: keeping it
would cost memory for nothing).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import grpc
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import Message

from .budget import BudgetExceeded
from .session import HandlerError

log = logging.getLogger(__name__)

# Far above the client's requests in flight (streams.ReplyWindow): the count bound only matters
# for a client that never acknowledges.
MAX_KEPT = 256
RERUNNABLE = frozenset({pb.SPLIT, pb.LOAD})  # read-only: run again rather than kept


def body_bytes(body: Any) -> int:
    """Bytes of the tensors in a message body (what keeping its reply holds)."""
    if isinstance(body, torch.Tensor):
        return body.numel() * body.element_size()
    if isinstance(body, dict):
        return sum(body_bytes(v) for v in body.values())
    if isinstance(body, (list, tuple)):
        return sum(body_bytes(v) for v in body)
    return len(body) if isinstance(body, (bytes, str)) else 0


def _owned(body: Any) -> Any:
    """The body with its device tensors copied: a reply may view a CUDA graph's static output, which
    the next replay overwrites, and a replay of this reply must send what was sent the first time."""
    if isinstance(body, torch.Tensor):
        return body.clone() if body.device.type != "cpu" else body
    if isinstance(body, dict):
        return {k: _owned(v) for k, v in body.items()}
    if isinstance(body, (list, tuple)):
        return type(body)(_owned(v) for v in body)
    return body


class ReplyRecord:
    """One session's replies not yet acknowledged, by request sequence number."""

    def __init__(self, account: Any = None, key: Any = "replies") -> None:
        self.last = 0  # the highest sequence answered
        self.replayed = 0  # requests answered from the record
        self._kept: OrderedDict[int, tuple[Message, int]] = OrderedDict()
        self._bytes = 0
        self._account, self._key = account, key

    def acknowledge(self, acked: int) -> None:
        """The client has every reply up to ``acked``: forget them."""
        while self._kept and next(iter(self._kept)) <= acked:
            _, (_, nbytes) = self._kept.popitem(last=False)
            self._bytes -= nbytes
        self._charge()

    def replay(self, sequence: int, type_: int) -> Message | None:
        """The kept reply to ``sequence`` if it was answered already, None for a new request."""
        if sequence == 0 or sequence > self.last or type_ in RERUNNABLE:
            return None
        kept = self._kept.get(sequence)
        if kept is None:
            raise HandlerError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {sequence} was answered already and its reply is not kept "
                               f"(acknowledged, or over the memory budget); it is not run twice")
        self.replayed += 1
        return kept[0]

    def keep(self, sequence: int, type_: int, reply: Message) -> None:
        """Record the reply to a request just run (numbered requests only)."""
        self.last = max(self.last, sequence)
        if sequence == 0 or type_ in RERUNNABLE:
            return
        nbytes = body_bytes(reply.body)
        kept = Message(type=reply.type, body=_owned(reply.body), session_id=reply.session_id, step=reply.step,
                       sequence=reply.sequence, code=reply.code, node_id=reply.node_id)
        self._kept[sequence] = (kept, nbytes)
        self._bytes += nbytes
        while len(self._kept) > MAX_KEPT:
            _, (_, dropped) = self._kept.popitem(last=False)
            self._bytes -= dropped
        try:
            self._charge()
        except BudgetExceeded:
            self._kept.pop(sequence)
            self._bytes -= nbytes
            log.warning("reply to request %d (%d bytes) not kept for a replay: over the memory budget",
                        sequence, nbytes)

    def _charge(self) -> None:
        if self._account is not None:
            self._account.set(self._key, self._bytes, "replies kept for a reconnect")
