"""The KV caches of sessions that decode together, in a pool, and the batched step that runs on them.

A ``DecodeStack`` is a pool of rows of static caches of one capacity: one tensor per server layer
with a row per session (and one scratch row). A session takes a row the first time it decodes in a
batch (its cache copied in once) and its ``StaticLayer`` keys and values become views of that row,
so from then on, decoding alone on its own graphs or together here, nothing is copied; it keeps
the row while its cache does (a new sequence resets it in place; a longer one moves to a bigger
cache and the row is free again). A step runs the **whole pool**: the rows present get their own
inputs and positions, the absent rows compute on stale inputs and write only into the scratch
row, and only the present rows' outputs are read. So a pool's step is always the same shape at
the same addresses, whoever comes: on a GPU it is captured once as a CUDA graph and replayed with
one launch (an eager batched step of a 1B model's segment is bound by its hundreds of kernel
launches). Decode steps are bound by reading the weights, so the absent rows cost little.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_split.server.cuda_graphs import capture, drop_oldest, tensor_leaves
from lightning_split.server.fast_decode import StaticDecoder
from lightning_split.split.results import segment_reply
from lightning_split.split.surgery import ServerSegment

log = logging.getLogger(__name__)

MAX_GRAPHS_PER_POOL = 2  # step signatures (result options) kept captured per pool


class _StackCache:
    """The KV cache the blocks see in a pool's step: each layer's ``update`` writes row b's new key
    and value at ``pos[b]`` of row ``index[b]`` (the scratch row for an absent one) and returns the
    pool's rows; the mask hides every position past a row's own."""

    def __init__(self, stack: DecodeStack, index: torch.Tensor, pos: torch.Tensor) -> None:
        self.stack, self.index, self.pos = stack, index, pos

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.stack.keys[layer_idx], self.stack.values[layer_idx]
        # The rows live beside their layer: on a segment spread over devices, the step's indices
        # follow (a no-op on the step's own device).
        index, pos = self.index.to(k.device, non_blocking=True), self.pos.to(k.device, non_blocking=True)
        k[index, :, pos] = keys[:, :, 0]
        v[index, :, pos] = values[:, :, 0]
        n = self.stack.size
        return k[:n], v[:n]


@dataclass
class _Step:
    """One step signature's input buffers on a pool (every row), and its graph once captured."""

    hidden: torch.Tensor
    leaves: list[torch.Tensor]  # the other tensor arguments, in leaf order
    pos: torch.Tensor  # (rows,) int64: the slot each row writes
    index: torch.Tensor  # (rows,) int64: the row each row writes (the scratch row if absent)
    runs: int = 0
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    replay: Any = None
    graph: Any = None


class DecodeStack:
    """A pool of ``rows`` rows (and a scratch row) of static caches of one capacity, per server
    layer; sessions take a row when they first decode in a batch and keep it while their cache
    does (see the module's doc)."""

    def __init__(self, template: StaticDecoder, rows: int, device: torch.device,
                 stats: Counter[str] | None = None) -> None:
        """``template``: a decoder whose cache gives the layers' shapes; ``stats``: where to count
        graph steps, captures and admissions (the batcher's)."""
        self.device, self.size = device, rows
        self.capacity = template.capacity
        self.layer_ids = list(template.layer_ids)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for i in self.layer_ids:
            layer = template.cache.layers[i]
            self.keys[i] = layer.keys.new_zeros((rows + 1, *layer.keys.shape[1:]))
            self.values[i] = layer.values.new_zeros((rows + 1, *layer.values.shape[1:]))
        self.members: list[StaticDecoder | None] = [None] * rows
        self.rows: dict[int, int] = {}  # id(decoder) -> its row
        self._views: list[tuple[Any, torch.Tensor] | None] = [None] * rows
        self._slots = torch.arange(self.capacity, device=device)  # read by graphs: made before them
        self.steps: OrderedDict[str, _Step] = OrderedDict()
        self.stats: Counter[str] = Counter() if stats is None else stats

    def admit(self, decoder: StaticDecoder) -> bool:
        """Give ``decoder`` a row if it has none (its cache copied in, its layers made views of the
        row, its own graphs dropped); False if every row is taken. Only for a decoder whose session
        waits on this step: nothing else may touch its cache meanwhile."""
        if self.holds(decoder):
            return True
        r = next((r for r, d in enumerate(self.members) if d is None or not self.holds(d)), None)
        if r is None:
            return False
        if self.members[r] is not None:
            self.rows.pop(id(self.members[r]), None)
        for i in self.layer_ids:
            layer = decoder.cache.layers[i]
            self.keys[i][r : r + 1].copy_(layer.keys)
            self.values[i][r : r + 1].copy_(layer.values)
            layer.keys, layer.values = self.keys[i][r : r + 1], self.values[i][r : r + 1]
        drop_oldest(decoder.graphs, len(decoder.graphs), decoder.device)  # captured on its old cache
        self.members[r], self.rows[id(decoder)] = decoder, r
        self._views[r] = (decoder.cache, decoder.cache.layers[self.layer_ids[0]].keys)
        self.stats["admitted"] += 1
        return True

    def leave(self, decoder: StaticDecoder) -> None:
        """The session ends: its row is free (what it holds is never read again)."""
        r = self.rows.pop(id(decoder), None)
        if r is not None:
            self.members[r], self._views[r] = None, None

    def holds(self, decoder: StaticDecoder) -> bool:
        """The decoder's cache is still a view of its row (not grown, not released since)."""
        r = self.rows.get(id(decoder))
        if r is None or decoder.cache is None or self._views[r] is None:
            return False
        cache, view = self._views[r]
        return decoder.cache is cache and decoder.cache.layers[self.layer_ids[0]].keys is view

    def run(self, module: ServerSegment, jobs: list[Any], graphs: bool, emulate: bool) -> list[dict[str, Any]]:
        """One step of ``jobs`` (decode jobs of decoders this pool holds, one signature): each job's
        reply, its rows of the pool's outputs."""
        first = jobs[0]
        key = first.key[2:]  # the signature: tree, options, hidden
        step = self.steps.get(key)
        if step is None:
            step = self._new_step(first)
            drop_oldest(self.steps, len(self.steps) + 1 - MAX_GRAPHS_PER_POOL, self.device)
            self.steps[key] = step
        self.steps.move_to_end(key)
        present = [self.rows[id(j.decoder)] for j in jobs]
        self._stage(step, jobs, present)
        step.runs += 1
        if graphs and step.runs > 1 and (emulate or self.device.type == "cuda"):
            if step.replay is None:
                self._capture(step, module, first, emulate)
        if step.replay is not None:
            step.replay()
            self.stats["graph_steps"] += 1
            outputs = step.outputs
        else:
            outputs = self._step_fn(step, module, first)()
        return [{k: v[r : r + 1].clone() for k, v in outputs.items()} for r in present]

    def _new_step(self, job: Any) -> _Step:
        n = self.size

        def rows_of(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=self.device)

        leaves = [rows_of(t) for t in tensor_leaves(job.tree)]
        return _Step(rows_of(job.hidden), leaves, torch.zeros(n, dtype=torch.long, device=self.device),
                     torch.full((n,), n, dtype=torch.long, device=self.device))

    def _stage(self, step: _Step, jobs: list[Any], present: list[int]) -> None:
        """The present rows' inputs into the step's buffers; the absent rows write to scratch."""
        rows = torch.tensor(present, device=self.device)
        step.hidden.index_copy_(0, rows, torch.cat([j.hidden for j in jobs]).to(self.device, non_blocking=True))
        columns = zip(*[tensor_leaves(j.tree) for j in jobs], strict=True)
        for buf, column in zip(step.leaves, columns, strict=True):
            buf.index_copy_(0, rows, torch.cat(column).to(self.device, non_blocking=True))
        pos, index = [0] * self.size, [self.size] * self.size
        for r, j in zip(present, jobs, strict=True):
            pos[r], index[r] = j.past, r
        step.pos.copy_(torch.tensor(pos), non_blocking=True)
        step.index.copy_(torch.tensor(index), non_blocking=True)

    def _step_fn(self, step: _Step, module: ServerSegment, job: Any) -> Any:
        decoder, options = job.decoder, job.options  # any decoder of the pool: where its blocks take the mask
        buffers = iter(step.leaves)
        args, kwargs = decoder.blocks_tree(job.tree, lambda t: next(buffers), _StackCache(self, step.index, step.pos))

        def run() -> dict[str, torch.Tensor]:
            # Row b attends to its slots 0 .. pos[b] (its new token written there by update).
            mask = (self._slots <= step.pos.unsqueeze(-1)).view(self.size, 1, 1, self.capacity)
            _, tree = decoder.swap_mask((args, kwargs), mask)
            return segment_reply(module, module(step.hidden, *tree), options)

        return run

    def _capture(self, step: _Step, module: ServerSegment, job: Any, emulate: bool) -> None:
        run = self._step_fn(step, module, job)
        if emulate:  # tests: the graph bookkeeping on CPU, the step rerun at each replay
            step.outputs = run()
            step.replay = lambda: [step.outputs[k].copy_(v) for k, v in run().items()]
            self.stats["captures"] += 1
            return
        try:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                step.graph, step.outputs = capture(run, self.device)
        except Exception:  # this pool's steps stay eager
            log.warning("CUDA graph capture of a batched decode step failed; it runs eagerly", exc_info=True)
            return
        step.replay = step.graph.replay
        self.stats["captures"] += 1
