"""What a restarted server must be told again: the client's requests its saved state lacks.

A server that restarts comes back from the session state it kept on disk (``server/durable.py``):
the tail's weights, optimizer and step number at the last step it wrote, and nothing of what was
in between: no saved graphs, no gradients of the step under way, no KV cache. The replies record
(``replies.py``) cannot help, it died with the process. But the client still has the requests
that built all of that, and a server fed the same requests in the same order rebuilds the same
state (same tensors in, same sums). So the client keeps:

* **training**: every FORWARD, BACKWARD and OPTIMIZER_STEP (the step itself, not a query) of the
  steps under way, whole steps at a time. A step's requests go once a later step starts and none
  of them waits for a reply: with ``persist_sessions_s: 0`` the server writes a step before its
  reply leaves, so from then on the server's disk has it.
* **generation**: every cached INFER since the sequence's prefill (``cache.past == 0``): the
  prompt's hidden state and one position per generated token, with any beam reorders.

After a reconnect to a server that says it was ``restored`` at step L, ``plan`` picks what to
send again: the training requests of the steps after L, if every one of them is kept (else none,
and the caller fails what waited: the client must resume from a checkpoint), and the sequence's
requests, if it is kept whole. Replies to requests answered before are dropped; the rest answer
their waiting callers as if nothing happened. A request keeps its tensors alive until it goes
(bounded by ``max_bytes``; past it the oldest kind is dropped and that kind is not replayable).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import Message

from .replies import body_bytes

TRAINING, SEQUENCE = "training", "sequence"


def kind_of(msg: Message) -> str | None:
    """Which record a request belongs to: TRAINING, SEQUENCE, or None (not kept)."""
    body = msg.body if isinstance(msg.body, dict) else {}
    if msg.type in (pb.FORWARD, pb.BACKWARD) or (msg.type == pb.OPTIMIZER_STEP and "op" not in body):
        return TRAINING
    if msg.type == pb.INFER and isinstance(body.get("cache"), dict):
        return SEQUENCE
    return None


@dataclass
class ReplayPlan:
    """What to send again after a restart, and which kinds of request could not be brought back."""

    requests: list[tuple[int, Message]]  # (sequence number, request), oldest first
    training_lost: bool  # steps after the server's were not all kept
    sequence_lost: bool  # the KV cache's sequence was not kept whole


class Journal:
    """The requests a restarted server would need again (see the module's docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._training: dict[int, tuple[int, Message, int]] = {}  # seq -> (step, request, bytes)
        self._sequence: dict[int, tuple[Message, int]] = {}  # seq -> (request, bytes)
        # Every training request of a step >= floor is kept; None: from the next step recorded.
        self.floor: int | None = None
        self.sequence_whole = False  # every request of the current sequence since its prefill is kept
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def record(self, seq: int, msg: Message, oldest_waiting_step: int | None) -> None:
        """Keep a request as it is sent. ``oldest_waiting_step``: the lowest step of the training
        requests still waiting for their reply (None: none)."""
        if msg.type == pb.STATE and isinstance(msg.body, dict) and msg.body.get("op") == "load":
            self._drop_training(None)  # the server's steps start again from a checkpoint
            return
        kind = kind_of(msg)
        if kind is None or self.max_bytes <= 0:
            return
        nbytes = body_bytes(msg.body)
        if kind == TRAINING:
            step = int(msg.step)
            first = min(step, oldest_waiting_step if oldest_waiting_step is not None else step)
            if self.floor is None or first > self.floor:
                self._drop_training(first)
            self._training[seq] = (step, msg, nbytes)
        else:
            if int(msg.body["cache"].get("past", 0)) == 0:  # a new sequence
                self._drop_sequence(whole=True)
            elif not self.sequence_whole:
                return
            self._sequence[seq] = (msg, nbytes)
        self._bytes += nbytes
        if self._bytes > self.max_bytes:
            # Too much to keep: the kind just grown stops being replayable (until its next start).
            if kind == TRAINING:
                self._drop_training(int(msg.step) + 1)
            else:
                self._drop_sequence(whole=False)

    def _drop_training(self, floor: int | None) -> None:
        """Forget the training requests of steps below ``floor`` (all of them if None)."""
        for seq in [s for s, (step, _, _) in self._training.items() if floor is None or step < floor]:
            self._bytes -= self._training.pop(seq)[2]
        self.floor = floor

    def _drop_sequence(self, whole: bool) -> None:
        self._bytes -= sum(n for _, n in self._sequence.values())
        self._sequence.clear()
        self.sequence_whole = whole

    def plan(self, last_step: int, trains: bool, waiting: dict[int, Message]) -> ReplayPlan:
        """What to send again to a server restored at ``last_step`` (``trains``: its tail has a
        state of its own; a frozen one has no step to catch up on). ``waiting``: the requests
        that had no reply, by sequence number; they are in the plan whenever their kind is."""
        steps = {seq: (step, msg) for seq, (step, msg, _) in self._training.items() if not trains or step > last_step}
        waiting_training = {seq: m for seq, m in waiting.items() if kind_of(m) == TRAINING}
        training_lost = bool(
            any(seq not in steps for seq in waiting_training)  # one the server may have run already
            or (trains and steps and (self.floor is None or self.floor > last_step + 1)))  # steps missing
        waiting_cached = [m for m in waiting.values() if kind_of(m) == SEQUENCE]
        sequence_lost = bool(waiting_cached) and not self.sequence_whole
        requests = {} if training_lost else {seq: msg for seq, (_, msg) in steps.items()}
        if not sequence_lost:
            requests.update((seq, msg) for seq, (msg, _) in self._sequence.items())
        return ReplayPlan(sorted(requests.items()), training_lost, sequence_lost)
