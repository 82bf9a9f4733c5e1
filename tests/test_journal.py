"""The client's record of what a restarted server lacks (channel/journal.py): which requests are
kept, for how long, and what a server restored at a given step gets again. The end-to-end cases
(a server SIGKILLed in a step, in a generation) are in test_restart.py."""

from __future__ import annotations

import torch

from lightning_split.channel.journal import Journal
from lightning_split.wire import Message, MessageType

FORWARD, BACKWARD, STEP, INFER, STATE = (MessageType.FORWARD, MessageType.BACKWARD, MessageType.OPTIMIZER_STEP,
                                          MessageType.INFER, MessageType.STATE)


def _msg(type_: int, step: int = 0, body: dict | None = None, seq: int = 0, nbytes: int = 64) -> Message:
    body = {"hidden": torch.zeros(nbytes // 4)} if body is None else body
    return Message(type=type_, body=body, step=step, sequence=seq)


class Recorder:
    """A journal fed like ChannelClient feeds it: numbered requests, and which still wait."""

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.journal = Journal(max_bytes)
        self.seq = 0
        self.waiting: dict[int, Message] = {}

    def send(self, type_: int, step: int = 0, body: dict | None = None, nbytes: int = 64) -> int:
        self.seq += 1
        msg = _msg(type_, step, body, self.seq, nbytes)
        steps = [m.step for m in self.waiting.values() if m.type in (FORWARD, BACKWARD, STEP)]
        self.journal.record(self.seq, msg, min(steps, default=None))
        self.waiting[self.seq] = msg
        return self.seq

    def answer(self, *seqs: int) -> None:
        for seq in seqs:
            self.waiting.pop(seq)

    def plan(self, last_step: int, trains: bool = True):  # noqa: ANN201
        return self.journal.plan(last_step, trains, dict(self.waiting))


def _step(r: Recorder, step: int, answer: bool = True) -> list[int]:
    seqs = [r.send(FORWARD, step), r.send(BACKWARD, step), r.send(STEP, step, {"lr": 0.1})]
    if answer:
        r.answer(*seqs)
    return seqs


def test_a_step_is_kept_until_the_next_one_starts_and_replayed_after_the_servers_step() -> None:
    r = Recorder()
    s0 = _step(r, 0)
    s1 = _step(r, 1)  # step 0's requests go: all answered when step 1 started
    assert r.journal.floor == 1
    plan = r.plan(last_step=0)  # the server kept step 0: step 1 again
    assert [seq for seq, _ in plan.requests] == s1 and not plan.training_lost
    assert not r.plan(last_step=1).requests  # the server has it all
    assert r.plan(last_step=-1).training_lost  # step 0 is gone from the journal
    del s0


def test_an_unanswered_request_keeps_its_step() -> None:
    """A fused step's BACKWARD still waits while the next step starts: its step stays."""
    r = Recorder()
    s0 = _step(r, 0, answer=False)
    r.answer(s0[0], s0[1])
    f1 = r.send(FORWARD, 1)
    plan = r.plan(last_step=-1)
    assert [seq for seq, _ in plan.requests] == [*s0, f1] and not plan.training_lost


def test_a_request_the_server_ran_already_cannot_be_brought_back() -> None:
    """The server kept step 1 but its reply to step 1's BACKWARD never came: run again on the new
    weights it would answer differently, so it is lost, not replayed."""
    r = Recorder()
    _step(r, 0)
    fwd, bwd = r.send(FORWARD, 1), r.send(BACKWARD, 1)
    r.answer(fwd)
    plan = r.plan(last_step=1)
    assert plan.training_lost and bwd not in [seq for seq, _ in plan.requests]


def test_a_frozen_tail_gets_the_steps_under_way_whatever_its_step() -> None:
    r = Recorder()
    _step(r, 4)
    f5 = r.send(FORWARD, 5)
    plan = r.plan(last_step=-1, trains=False)
    assert [seq for seq, _ in plan.requests] == [f5] and not plan.training_lost


def test_a_checkpoint_load_starts_the_record_again() -> None:
    r = Recorder()
    _step(r, 7)
    r.answer(r.send(STATE, 0, {"op": "load", "tag": "t"}))
    assert r.journal.floor is None and not r.plan(last_step=3).requests
    s4 = _step(r, 4)
    assert [seq for seq, _ in r.plan(last_step=3).requests] == s4


def test_a_sequence_is_kept_from_its_prefill() -> None:
    r = Recorder()
    r.answer(r.send(INFER, body={"hidden": torch.zeros(8), "cache": {"past": 0, "new": 8}}))  # an old sequence
    prefill = r.send(INFER, body={"hidden": torch.zeros(8), "cache": {"past": 0, "new": 8}})
    tokens = [r.send(INFER, body={"hidden": torch.zeros(1), "cache": {"past": 8 + i, "new": 1}}) for i in range(3)]
    r.answer(prefill, *tokens[:2])
    r.send(INFER, body={"hidden": torch.zeros(2)})  # uncached: not kept (it changes nothing)
    plan = r.plan(last_step=-1, trains=False)
    assert [seq for seq, _ in plan.requests] == [prefill, *tokens] and not plan.sequence_lost


def test_past_its_bytes_a_kind_is_no_longer_replayable() -> None:
    r = Recorder(max_bytes=1000)
    r.send(INFER, body={"hidden": torch.zeros(200), "cache": {"past": 0, "new": 200}})
    token = r.send(INFER, body={"hidden": torch.zeros(100), "cache": {"past": 200, "new": 1}})  # 1,200 bytes
    assert r.journal.bytes == 0 and not r.journal.sequence_whole
    plan = r.plan(last_step=-1, trains=False)
    assert plan.sequence_lost and token not in [seq for seq, _ in plan.requests]
    r.answer(*list(r.waiting))
    big = _step(r, 0, answer=False)  # 3 x 64 bytes: fits
    assert not r.plan(last_step=-1).training_lost
    r.send(FORWARD, 0, nbytes=2000)
    assert r.plan(last_step=-1).training_lost and r.journal.floor == 1
    del big
