"""Gradients a training call computed ahead of its BACKWARD, kept apart until the client's scale comes.

A two-part split whose server returns the loss alone runs each micro-batch's backward right after
its forward (see ``split/remote_autograd.py``, ``RemoteLossStep``): the server does not wait a round trip
for the loss's gradient. What it cannot know yet is the scale the client's autograd gives that
loss (``1 / accumulate_grad_batches``, a loss weight, 0 for a loss never backpropagated). So
the call's parameter gradients accumulate into tensors of their own, not into ``.grad``; its
BACKWARD then brings the scale, and they join ``.grad`` as ``scale x gradient``: what a backward
with that scale would have accumulated (exactly for a scale of 1, within rounding otherwise).

Each call belongs to the training step its first micro-batch was stamped with: a step the
session has applied already (a client's retry) discards the calls of that step and earlier.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn

from lightning_split.split.remote_autograd import MAX_PENDING_LOSS_STEPS

log = logging.getLogger(__name__)


class CallGradients:
    """Per call id, the parameters' gradients of the backwards run so far; at most ``max_calls``."""

    def __init__(self, params: list[nn.Parameter], max_calls: int = MAX_PENDING_LOSS_STEPS) -> None:
        self.params = params
        self.max_calls = max_calls  # each holds up to one tensor per parameter: bounded memory
        self.calls: OrderedDict[int, list[torch.Tensor | None]] = OrderedDict()
        self.steps: dict[int, int] = {}  # call id -> the training step it belongs to

    def open(self, call: int, step: int) -> None:
        """A micro-batch of ``call`` in training step ``step`` comes: the call is kept from now on."""
        self.calls[call] = self._take(call)
        self.steps.setdefault(call, step)

    def backward_into(self, call: int, run_backward: Callable[[], None]) -> None:
        """Run ``run_backward`` with the parameters' ``.grad`` swapped for ``call``'s own gradients.

        Autograd then accumulates into them in place (no extra copies, no extra adds); the
        session's ``.grad`` (earlier calls of this training step) is put back untouched.
        """
        mine = self._take(call)
        saved = [p.grad for p in self.params]
        for p, g in zip(self.params, mine, strict=True):
            p.grad = g
        try:
            run_backward()
            mine = [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, saved, strict=True):
                p.grad = g
        self.calls[call] = mine

    def add(self, call: int, grads: list[torch.Tensor | None]) -> None:
        """Add one backward's gradients (a CUDA graph's outputs, rewritten by its next replay) to
        ``call``'s: copied the first time, added after that."""
        mine = self._take(call)
        into, added = [], []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if mine[i] is None:
                mine[i] = g.clone()
            else:
                into.append(mine[i])
                added.append(g)
        if into:
            torch._foreach_add_(into, added)
        self.calls[call] = mine

    def _take(self, call: int) -> list[torch.Tensor | None]:
        """``call``'s gradients so far (None each, for a new call), making room for it."""
        mine = self.calls.pop(call, None) or [None] * len(self.params)
        while len(self.calls) >= self.max_calls:
            stale, _ = self.calls.popitem(last=False)
            self.steps.pop(stale, None)
            log.warning("dropping the gradients of training call %d: %d calls without a BACKWARD",
                        stale, self.max_calls)
        return mine

    def __contains__(self, call: int) -> bool:
        return call in self.calls

    def apply(self, call: int, scale: float | None) -> None:
        """Add ``scale x`` the call's gradients to ``.grad``; ``None`` drops them (loss unused)."""
        mine = self.calls.pop(call)
        self.steps.pop(call, None)
        pairs = [(p, g) for p, g in zip(self.params, mine, strict=True) if g is not None]
        if scale is None or not pairs:
            return
        if scale != 1.0:
            torch._foreach_mul_([g for _, g in pairs], scale)
        into, added = [], []
        for p, g in pairs:
            if p.grad is None:  # the step's first gradient: the tensor itself becomes .grad, no copy
                p.grad = g
            else:
                into.append(p.grad)
                added.append(g)
        if into:
            torch._foreach_add_(into, added)

    def discard_through(self, step: int) -> None:
        """Forget the calls of training steps up to ``step``: their gradients must never be applied."""
        for call in [c for c, s in self.steps.items() if s <= step]:
            self.calls.pop(call, None)
            del self.steps[call]

    def clear(self) -> None:
        self.calls.clear()
        self.steps.clear()
