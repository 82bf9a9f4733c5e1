"""CUDA graphs for fused training micro-batches: the segment's forward, loss and backward in one launch.

Why: a training batch cut into micro-batches in flight hides the transfers behind the server's
compute, but each micro-batch launches as many kernels as a whole batch. Measured on an H200
(GPT-2 small, blocks 2-11 + output layer + loss, bf16): 2 x 1024 tokens take 20.7 ms eagerly, as
long as their launches alone, and 14.0 ms as a graph; the server's receiving threads, which hold
the GIL while they decode the next micro-batch, make eager launches slower still.

What is captured, per input signature (shapes and dtypes of the hidden state, of the block
arguments' tensors and of the labels, the arguments' other values, the result options, autocast
and training mode)::

    loss  = segment(hidden, *args, **kwargs) -> output layer -> loss     (segment_reply)
    grads = autograd.grad(loss, [hidden, grad inputs, trainable parameters], grad_outputs=weight)

on inputs copied into buffers allocated before the capture. ``autograd.grad`` rather than
``backward``: the graph never touches ``.grad``, so the parameters' gradients join the call's own
(``call_grads.py``) after each replay, exactly as the eager path's do, and the warm-up runs before
the capture change nothing (module buffers such as norm statistics, and the CUDA RNG state, are
put back after them).

When: a signature's second occurrence; the first runs eagerly (``SessionSegment``), so a one-off
shape such as an epoch's last short batch never pays for a capture. At most ``max_graphs`` per
session, least recently used out, and ``MAX_CAPTURES`` captures in all; they share one memory
pool: a session's replays never overlap and their outputs are copied out at once. A signature
whose capture fails (host syncs, data-dependent control flow) stays eager. Not used for
multi-device segments (a graph runs on one device).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_split.server.call_grads import CallGradients
from lightning_split.server.cuda_graphs import capture, describe_leaf, drop_oldest, on_one_device, tree_leaves
from lightning_split.split.results import segment_reply
from lightning_split.split.surgery import ServerSegment, map_leaves

log = logging.getLogger(__name__)

MAX_TRAIN_GRAPHS = 2  # per session: a training run has one batch shape, or two (the last batch)
TRAIN_WARMUP_STEPS = 2  # forward + backward runs before a capture (each costs one micro-batch's compute)
MAX_SIGNATURES = 1024  # signatures remembered (a count each) before the count starts over
# Captures per session, failed ones included: a client whose shapes keep changing would otherwise
# pay warm-ups and a capture at every evicted signature's return; after this many its new
# signatures run eagerly.
MAX_CAPTURES = 8
LOSS_OPTIONS = ("result", "top_k", "logits_to_keep")  # what segment_reply reads besides the labels


@dataclass
class _TrainGraph:
    inputs: list[torch.Tensor]  # hidden state, grad inputs, other tensor arguments, labels
    weight: torch.Tensor  # the micro-batch's share of the call's loss: the backward's grad_output
    input_grads: list[torch.Tensor | None] = field(default_factory=list)  # hidden (if asked), grad inputs
    param_grads: list[torch.Tensor | None] = field(default_factory=list)
    loss: torch.Tensor | None = None
    replay: Callable[[], Any] | None = None
    graph: Any = None  # keeps the CUDAGraph alive


class TrainGraphs:
    """One session's graphed fused training steps."""

    emulate = False  # tests: the graph bookkeeping on CPU, the step run at each replay

    def __init__(self, module: ServerSegment, call_grads: CallGradients, device: torch.device,
                 max_graphs: int = MAX_TRAIN_GRAPHS) -> None:
        self.module = module
        self.call_grads = call_grads  # its params are the session's trainable parameters
        self.device = device
        self.max_graphs = max_graphs
        # A graph runs on one device: a segment spread over several GPUs trains eagerly.
        self.enabled = device.type == "cuda" and on_one_device(module)
        self.seen: Counter[str] = Counter()
        self.failed: set[str] = set()
        self.graphs: OrderedDict[str, _TrainGraph] = OrderedDict()
        self.pool: Any = None
        self.stats: Counter[str] = Counter()  # graph_steps, captures, capture_failed

    def run(self, hidden: torch.Tensor, grad_inputs: list[torch.Tensor], args: tuple, kwargs: dict[str, Any],
            body: dict[str, Any], weight: torch.Tensor, call: int) -> dict[str, Any] | None:
        """The fused micro-batch's reply, its parameter gradients added to ``call``'s; or None when
        the eager path must run it (not CUDA, a first occurrence, not a loss-only step)."""
        loss_only = "result" in body and body["result"] in (None, "auto", "loss") and body.get("labels") is not None
        if not (self.enabled or self.emulate) or not loss_only:
            return None
        input_grad = bool(body.get("input_grad", True))
        if not (input_grad or grad_inputs or self.call_grads.params):
            return None  # nothing to differentiate: the eager path just computes the loss
        labels = body["labels"]
        tree = (args, kwargs)
        grad_ids = {id(t): i for i, t in enumerate(grad_inputs)}
        options = {k: body[k] for k in LOSS_OPTIONS if k in body}
        key = repr((describe_leaf(hidden), input_grad, [describe_leaf(t) for t in grad_inputs],
                    map_leaves(lambda v: ("grad", grad_ids[id(v)]) if id(v) in grad_ids else describe_leaf(v), tree),
                    describe_leaf(labels), sorted(options.items()), body.get("autocast"), self.module.training))
        attempts = self.stats["captures"] + self.stats["capture_failed"]
        if key in self.failed or (key not in self.graphs and attempts >= MAX_CAPTURES):
            return None
        if key not in self.graphs:
            if len(self.seen) >= MAX_SIGNATURES:
                self.seen.clear()
            self.seen[key] += 1
            if self.seen[key] < 2:
                return None
        leaves = [hidden, *grad_inputs, *(v for v in tree_leaves(tree) if isinstance(v, torch.Tensor)
                                          and id(v) not in grad_ids), labels]
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            g = self.graphs.get(key)
            if g is None:
                g = self._capture(key, tree, grad_ids, len(grad_inputs), input_grad, options, leaves, weight,
                                  body.get("autocast"))
                if g is None:
                    return None
            self.graphs.move_to_end(key)
            self._stage(g, leaves, weight)
            g.replay()
            self.stats["graph_steps"] += 1
            self.call_grads.add(call, g.param_grads)
            # The graph's outputs are rewritten by its next replay: the reply gets copies.
            grads = [None if t is None else t.clone() for t in g.input_grads]
            hidden_grad = grads.pop(0) if input_grad else None
            return {"loss": g.loss.clone(), "grad_input": hidden_grad, "grad_extra": grads}

    @staticmethod
    @torch.no_grad()  # the hidden state's and grad inputs' buffers are leaves that require grad
    def _stage(g: _TrainGraph, leaves: list[torch.Tensor], weight: torch.Tensor) -> None:
        for buf, t in zip(g.inputs, leaves, strict=True):
            buf.copy_(t, non_blocking=True)
        g.weight.copy_(weight, non_blocking=True)

    def _capture(self, key: str, tree: tuple[tuple, dict], grad_ids: dict[int, int], n_grad_inputs: int,
                 input_grad: bool, options: dict[str, Any], leaves: list[torch.Tensor], weight: torch.Tensor,
                 autocast: str | None) -> _TrainGraph | None:
        # Every tensor the graph reads is allocated here and never replaced while the graph lives.
        inputs = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in leaves]
        static_hidden, static_grad_inputs = inputs[0], inputs[1 : 1 + n_grad_inputs]
        others = iter(inputs[1 + n_grad_inputs : -1])
        static_body = {**options, "labels": inputs[-1]}
        static_tree = map_leaves(
            lambda v: static_grad_inputs[grad_ids[id(v)]] if id(v) in grad_ids
            else next(others) if isinstance(v, torch.Tensor) else v, tree)
        static_hidden.requires_grad_(input_grad)
        for t in static_grad_inputs:
            t.requires_grad_(True)
        g = _TrainGraph(inputs, torch.zeros((), dtype=weight.dtype, device=self.device))
        params = self.call_grads.params
        wrt = [static_hidden] * input_grad + static_grad_inputs + params
        # The autocast weight cache holds casts made during capture: off, the graph recasts each replay.
        precision = (torch.autocast(self.device.type, dtype=getattr(torch, autocast), cache_enabled=False)
                     if autocast else contextlib.nullcontext())

        def step() -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
            with torch.enable_grad():
                with precision:
                    out = self.module(static_hidden, *static_tree)
                    loss = segment_reply(self.module, out, static_body)["loss"]
                grads = torch.autograd.grad(loss, wrt, grad_outputs=g.weight.to(loss.dtype), allow_unused=True)
            return loss.detach(), grads

        self._stage(g, leaves, weight)
        try:
            if self.device.type != "cuda":  # emulation: the same buffers, the step run at each replay
                g.loss, grads = step()
                g.replay = lambda: _copy_into((g.loss, *g.input_grads, *g.param_grads), step())
            else:
                with _restored_state(self.module, self.device):
                    g.graph, (g.loss, grads) = capture(step, self.device, TRAIN_WARMUP_STEPS, self._pool())
                g.replay = g.graph.replay
        except Exception:
            log.warning("CUDA graph capture of a training step failed; this input signature trains eagerly",
                        exc_info=True)
            self.failed.add(key)
            self.stats["capture_failed"] += 1
            return None
        g.input_grads, g.param_grads = list(grads[: len(wrt) - len(params)]), list(grads[len(wrt) - len(params) :])
        drop_oldest(self.graphs, len(self.graphs) + 1 - self.max_graphs, self.device)
        self.graphs[key] = g
        self.stats["captures"] += 1
        return g

    def _pool(self) -> Any:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def release(self) -> None:
        """Drop every graph and the memory pool they share (the session ends)."""
        for g in self.graphs.values():
            g.replay = None  # an emulated graph's replay refers back to it: no cycle left for the GC
        drop_oldest(self.graphs, len(self.graphs), self.device)
        self.pool = None


@contextlib.contextmanager
def _restored_state(module: nn.Module, device: torch.device) -> Any:
    """The warm-up runs are real forwards: put the module's buffers and the RNG back after them."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.cuda.set_rng_state(rng, device)


def _copy_into(bufs: tuple[Any, ...], values: tuple[torch.Tensor, tuple[Any, ...]]) -> None:
    loss, grads = values
    for buf, value in zip(bufs, (loss, *grads), strict=True):
        if buf is not None:
            buf.copy_(value)

