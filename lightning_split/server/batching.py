"""Many sessions' INFER steps as one batched forward of the shared segment.

Why: a decode step moves one token per sequence through the server's blocks. On a GPU one token
leaves the chip idle (the step reads every weight to multiply one row), so sixteen sessions
decoding one after another pay sixteen reads of the weights, and batched they pay one. The model
owner's cost per token falls with the number of clients served at once.

What is batched: only sessions whose tail is frozen run the service's one shared segment (a
trainable or LoRA tail has weights of its own), so only their INFER steps join a batch:

* a **decode step** (one new token after the prompt, on the session's static KV cache,
  ``fast_decode.py``), of a session generating one sequence without a padding mask: each session
  keeps its own cache and position, the batch attends with a mask per row;
* a **stateless INFER** (no KV cache, no gradients): requests of the same shape and options.

Anything else (a prompt, a verify step, padded batches, training) runs as before, alone.

How steps meet: a session's worker thread hands its step to the batcher and waits. The batcher's
thread takes the first step queued and waits up to ``window_s`` for the other sessions whose next
step is due (a session sends one about every round trip; twice that without one, it is not
waited for), then runs each group of like steps as one forward, and hands each
session its rows. A session decoding alone is not batched at all: its step runs at once, on its own
CUDA graph.

The batch's KV cache (``batch_stack.py``): a pool of ``max_batch`` rows per cache capacity; a
session takes a row when it first decodes in a batch (its cache copied in once) and its cache
becomes a view of the row. A step runs the whole pool (the rows absent this time write to a scratch
row), so it is always the same shape at the same addresses: on a GPU one CUDA graph per pool.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_split.server.batch_stack import DecodeStack
from lightning_split.server.cuda_graphs import describe_leaf, on_one_device, tensor_leaves, tree_leaves
from lightning_split.server.fast_decode import RESULT_OPTIONS, StaticDecoder
from lightning_split.split.results import segment_reply
from lightning_split.split.surgery import ServerSegment, map_leaves
from lightning_split.wire.markers import KV_CACHE, GradInputRef, KvCacheRef

log = logging.getLogger(__name__)

WINDOW_S = 0.002  # how long the first step of a batch waits for the others
BUSY_S = 0.5  # longest interval between a session's steps that still counts it as sending them


def _holds_sequence(decoder: StaticDecoder, past: int) -> bool:
    """The decoder's static cache holds the session's sequence of ``past`` tokens, with room for one more."""
    return decoder.active and decoder.tokens == past and decoder.ready(1, past + 1)


@dataclass(eq=False)
class _Job:
    """One session's step, waiting for its batch."""

    key: tuple  # steps with equal keys run together
    hidden: torch.Tensor
    tree: tuple  # the block arguments, the mask taken out
    options: dict[str, Any]
    decoder: StaticDecoder | None = None  # a decode step's session cache; None: stateless
    past: int = 0
    queued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class BatchStats:
    """What the batcher did, for the operator's status line (thread-safe reads of plain counters)."""

    def __init__(self) -> None:
        self.batches = self.rows = self.solo = 0
        self.wait_s = 0.0
        self.sizes: Counter[int] = Counter()
        self.graphs: Counter[str] = Counter()  # admissions to pools, graph steps, captures (batch_stack.py)

    def read(self) -> tuple[int, int, float]:
        return self.batches, self.rows, self.wait_s


class Batcher:
    """Runs like INFER steps of sessions sharing ``module`` as one forward (see the module's doc)."""

    def __init__(self, module: ServerSegment, device: torch.device, window_s: float = WINDOW_S,
                 max_batch: int = 64, busy_s: float = BUSY_S) -> None:
        self.module, self.device = module, device
        self.window_s, self.max_batch, self.busy_s = float(window_s), int(max_batch), float(busy_s)
        self.stats = BatchStats()
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._busy: dict[int, tuple[float, float]] = {}  # id(session) -> (its last step's time, interval)
        self._pools: dict[int, DecodeStack] = {}  # by cache capacity
        # Batched decode steps replay CUDA graphs (one per pool, batch_stack.py), on a segment on one
        # device (a graph runs on one; a spread segment's batched steps run eagerly). Tests emulate
        # them on CPU.
        self.graphs = device.type == "cuda" and on_one_device(module)
        self.emulate_graphs = False
        self._thread: threading.Thread | None = None
        self.enabled = True  # an operator (or a benchmark) may pause batching: every step runs alone

    # -- a session's worker thread ------------------------------------------------------------

    def run(self, owner: object, body: dict[str, Any], decoder: StaticDecoder | None, past: int = 0,
            new: int = 0) -> dict[str, Any] | None:
        """This step's reply, run in a batch; None: not a step for a batch, or no other session is
        sending steps (nothing changed: the caller runs it as before). ``owner``: the session;
        ``decoder``: its static decoder, if the step is on its KV cache."""
        job = self._job(body, decoder, past, new) if self.enabled else None
        if job is None:
            return None
        with self._cv:
            now = time.monotonic()
            last, interval = self._busy.get(id(owner), (None, self.busy_s))
            if last is not None:  # how often this session sends a step (a round trip, on its link)
                interval = min(now - last, self.busy_s)
            self._busy[id(owner)] = (now, interval)
            if not self._queue and self._expected(now, but=id(owner)) == 0:
                self.stats.solo += 1
                return None  # alone: its own path (a CUDA graph for a decode step) is the fastest
            self._start()
            self._queue.append(job)
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # None: the pool had no row for it, the caller runs the step

    def _expected(self, now: float, but: int | None = None) -> int:
        """Sessions whose next step is due: each sends one about every ``interval`` while it generates."""
        return sum(1 for k, (last, interval) in self._busy.items()
                   if k != but and now - last < 2 * interval + self.window_s)

    def forget(self, owner: object, decoder: StaticDecoder | None) -> None:
        """A session ends: no batch waits for it, its pool row is free."""
        with self._cv:
            self._busy.pop(id(owner), None)
            for pool in self._pools.values():
                pool.leave(decoder)

    def _job(self, body: dict[str, Any], decoder: StaticDecoder | None, past: int, new: int) -> _Job | None:
        """The step as a job, or None if it cannot join a batch."""
        hidden = body.get("hidden")
        if (not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or not hidden.is_floating_point()
                or body.get("grad_inputs") or body.get("autocast") or body.get("labels") is not None
                or self.module.training):
            return None
        tree = (tuple(body.get("args", ())), dict(body.get("kwargs") or {}))
        leaves = tree_leaves(tree)
        if any(isinstance(v, GradInputRef) for v in leaves) or any(t.dim() == 0 or t.shape[0] != hidden.shape[0]
                                                                   for t in tensor_leaves(tree)):
            return None  # every tensor must have the batch's rows first, to stack
        options = {k: body[k] for k in RESULT_OPTIONS if k in body}
        signature = (repr(map_leaves(describe_leaf, tree)), repr(sorted(options.items())), describe_leaf(hidden))
        markers = [v for v in leaves if isinstance(v, KvCacheRef)]
        if decoder is None:  # stateless: each row's mask, if any, is a tensor stacked with the rest
            if body.get("cache") is not None or markers:
                return None
            return _Job(("infer", *signature), hidden, tree, options)
        # A decode step of one sequence without padding (sdpa's plain causal attention): the batch
        # gives each row its own mask over its own positions.
        mask, tree = decoder.swap_mask(tree)
        if (new != 1 or past < 1 or hidden.shape[:2] != (1, 1) or mask is not None or markers != [KV_CACHE]
                or not decoder.sdpa or not _holds_sequence(decoder, past)):
            return None
        return _Job(("decode", decoder.capacity, *signature), hidden, tree, options, decoder, past)

    # -- the batcher's thread -----------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="split-batcher", daemon=True)
            self._thread.start()

    def _take(self) -> list[_Job]:
        """The next batch's jobs: the first queued, and those that come within the window from the
        sessions decoding lately."""
        with self._cv:
            while not self._queue:
                self._cv.wait()
            deadline = self._queue[0].queued + self.window_s
            expected = self._expected(time.monotonic())
            while len(self._queue) < min(max(expected, 1), self.max_batch):
                left = deadline - time.perf_counter()
                if left <= 0 or not self._cv.wait(left):
                    break
            jobs = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        return jobs

    def _loop(self) -> None:
        device_ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device_ctx:
            while True:
                jobs = self._take()
                groups: dict[tuple, list[_Job]] = {}
                for job in jobs:
                    groups.setdefault(job.key, []).append(job)
                for group in groups.values():
                    self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        if jobs[0].decoder is not None:  # a session closed while its step waited: it alone fails
            for job in [j for j in jobs if not _holds_sequence(j.decoder, j.past)]:
                job.error = RuntimeError("the session's KV cache changed while its step waited")
                job.done.set()
                jobs.remove(job)
            if not jobs:
                return
        try:
            with torch.no_grad():
                if jobs[0].decoder is None:
                    replies = self._infer(jobs)
                else:
                    replies = self._decode(jobs)
            for job, reply in zip(jobs, replies, strict=True):
                job.result = reply
        except BaseException as e:  # every session of the batch hears of it; the batcher goes on
            log.warning("batched step of %d session(s) failed: %s", len(jobs), e)
            for job in jobs:
                job.error = e
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        self.stats.sizes[len(jobs)] += 1
        self.stats.wait_s += sum(started - job.queued for job in jobs)
        for job in jobs:
            job.done.set()

    def _infer(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """Stateless INFERs of one signature: every tensor argument stacked along the batch."""
        columns = zip(*[[j.hidden, *tensor_leaves(j.tree)] for j in jobs], strict=True)
        stacked = iter([torch.cat(c).to(self.device, non_blocking=True) for c in columns])
        hidden = next(stacked)
        tree = map_leaves(lambda v: next(stacked) if isinstance(v, torch.Tensor) else v, jobs[0].tree)
        out = segment_reply(self.module, self.module(hidden, *tree), jobs[0].options)
        sizes = [j.hidden.shape[0] for j in jobs]
        parts = {k: v.split(sizes) for k, v in out.items()}
        return [{k: parts[k][i] for k in out} for i in range(len(jobs))]

    def _decode(self, jobs: list[_Job]) -> list[dict[str, Any] | None]:
        """Decode steps of one capacity: on that capacity's pool (batch_stack.py), every row in one
        step. A job the pool has no row for gets None: its session runs the step on its own path."""
        pool = self._pools.get(jobs[0].decoder.capacity)
        if pool is None:
            pool = DecodeStack(jobs[0].decoder, self.max_batch, self.device, self.stats.graphs)
            self._pools[pool.capacity] = pool
        admitted = [j for j in jobs if pool.admit(j.decoder)]
        replies: dict[int, dict[str, Any]] = {}
        if admitted:
            for job, reply in zip(admitted, pool.run(self.module, admitted, self.graphs, self.emulate_graphs),
                                  strict=True):
                replies[id(job)] = reply
                job.decoder.tokens = job.past + 1
                job.decoder.stats["batched_steps"] += 1
        return [replies.get(id(j)) for j in jobs]
