"""What the server did, for its operator: counters the service keeps and the periodic status line.

``SplitService.activity`` counts applied training steps, and generated and prompt tokens (INFER
steps with a KV cache); ``status_line`` turns two readings of it, the sessions and the process's
memory into one log line (``lightning-split serve`` writes one every ``server.status_every_s``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Reading:
    steps: int = 0  # optimizer steps applied, every session
    tokens: int = 0  # tokens generated: cached INFER steps after the prompt (past > 0), their new tokens
    prompt_tokens: int = 0  # tokens of prompts (cached INFER steps with past 0)
    at: float = field(default_factory=time.monotonic)
    batches: int = 0  # batched forwards of several sessions' steps (batching.py), and the steps they ran
    batched_steps: int = 0
    batch_wait_s: float = 0.0  # the steps' summed wait for their batch


class Activity:
    """Thread-safe counters of the service's work (requests of many sessions run at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = Reading()

    def stepped(self) -> None:
        with self._lock:
            self._now.steps += 1

    def inferred(self, body: dict[str, Any]) -> None:
        cache = body.get("cache")
        if not isinstance(cache, dict):
            return
        hidden = body.get("hidden")
        rows = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else 1
        with self._lock:
            if int(cache.get("past", 0)):
                self._now.tokens += rows * int(cache.get("new", 0))
            else:
                self._now.prompt_tokens += rows * int(cache.get("new", 0))

    def read(self) -> Reading:
        with self._lock:
            return Reading(self._now.steps, self._now.tokens, self._now.prompt_tokens, time.monotonic())


def rss_bytes() -> int:
    """The process's resident memory now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def status_line(server: Any, activity: Activity, since: Reading) -> tuple[str, Reading]:
    """One line: sessions and nodes, memory (host, and each GPU in use), steps/s and tokens/s since
    ``since``; and the reading to pass next time."""
    now = activity.read()
    replicas = getattr(server.handler, "replicas", None)
    for batcher in replicas.batchers() if replicas is not None else ():  # one per copy of the segment
        batches, steps, wait_s = batcher.stats.read()
        now.batches, now.batched_steps, now.batch_wait_s = (
            now.batches + batches, now.batched_steps + steps, now.batch_wait_s + wait_s)
    dt = max(now.at - since.at, 1e-9)
    sessions = server.sessions.snapshot()
    nodes = len({s.node_id for s in sessions.values()})
    gpus = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        each = [f"{torch.cuda.memory_allocated(i) / 2**30:.1f}" for i in range(torch.cuda.device_count())]
        gpus = f", GPU {' '.join(each)} GiB allocated"
    line = (f"status: {len(sessions)} session(s) of {nodes} node(s), RSS {rss_bytes() / 2**30:.2f} GiB{gpus}, "
            f"{(now.steps - since.steps) / dt:.2f} steps/s, {(now.tokens - since.tokens) / dt:.1f} tokens/s generated, "
            f"{(now.prompt_tokens - since.prompt_tokens) / dt:.0f} prompt tokens/s over {dt:.0f} s")
    caches = [s.state["segment"].kv.nbytes() for s in sessions.values() if "segment" in s.state]
    if caches:
        line += f", KV cache {sum(caches) / len(caches) / 2**20:.1f} MiB/session (max {max(caches) / 2**20:.1f})"
    batches = now.batches - since.batches
    if batches:
        steps = now.batched_steps - since.batched_steps
        line += (f", {batches} batches of {steps / batches:.1f} sessions' steps on average, "
                 f"{(now.batch_wait_s - since.batch_wait_s) / steps * 1e3:.2f} ms queue wait")
    return line, now
