"""Where the server's segment lives: on one device, spread block by block over several, or a
whole copy on each.

``SplitService(devices=[0, 1])`` (``server.devices=[0,1]`` in serve.yaml) spreads the segment the
way Hugging Face's big-model inference (accelerate's ``device_map``) spreads a model: consecutive
blocks on each device, so that a segment bigger than one GPU fits. The map makes the fullest device
as light as it can be, the tail of a two-part split (final norm, LM head) counted on the last
device. (accelerate's own planner keeps room on the first GPU for offloaded layers and for
generation's buffers, and with a large LM head it gave the last GPU nearly twice the first's
bytes.) ``device_map={block: device}`` still places blocks by hand.

``placement="replicate"`` puts a whole copy of a segment that fits on one GPU on each device
instead, for throughput: each new session goes to the copy with the fewest sessions, each copy
batches its own sessions' decode steps (its own CUDA graphs and KV pool), and a trainable
session's copy or LoRA adapters live with its replica.

The segment's forward (``ServerSegment.forward``) moves the hidden state and the block arguments
once at each device change. Why layer placement and not tensor parallelism: any decoder family
(the server knows its blocks only by their signature) and every tail mode (frozen, trainable,
LoRA: each session's copy or adapters live where the blocks do) work unchanged, and a decode step
crosses a device boundary once instead of all-reducing twice per block.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def as_devices(devices: Sequence[int | str | torch.device]) -> list[torch.device]:
    """``[0, 1]`` -> ``[cuda:0, cuda:1]``; names (``"cuda:1"``, ``"cpu"``) as they are."""
    if not devices:
        raise ValueError("devices: give at least one device")
    return [torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in devices]


def plan_blocks(segment: nn.Module, devices: Sequence[torch.device]) -> dict[int, torch.device]:
    """Block index -> device: consecutive blocks per device, the split that makes the fullest
    device as light as it can be (parameter and buffer bytes; the tail counted on the last)."""
    sizes = [_bytes(block) for block in segment.blocks]
    tail = _bytes(segment.tail) if len(segment.tail) else 0
    n, k = len(sizes), min(len(devices), len(sizes))
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    # best[d][i]: the least "fullest device" for blocks [0:i) on d devices (each given one block
    # or more), and where the last of those devices starts. The last device also holds the tail.
    inf = float("inf")
    best = [[(inf, 0)] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0, 0)
    for d in range(1, k + 1):
        for i in range(d, n + 1):
            extra = tail if (d == k and i == n) else 0
            best[d][i] = min((max(best[d - 1][j][0], prefix[i] - prefix[j] + extra), j) for j in range(d - 1, i))
    placement, i = {}, n
    for d in range(k, 0, -1):
        j = best[d][i][1]
        placement.update(dict.fromkeys(range(j, i), devices[d - 1]))
        i = j
    return dict(sorted(placement.items()))


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def spread(segment: nn.Module, devices: Sequence[int | str | torch.device]) -> dict[int, torch.device]:
    """Place the segment's blocks over ``devices`` (``plan_blocks``) and return the map."""
    placement = plan_blocks(segment, as_devices(devices))
    segment.place(placement)
    log.info("segment spread: blocks per device %s", dict(Counter(map(str, placement.values()))))
    return placement


def replicate(segment: nn.Module, devices: Sequence[int | str | torch.device]) -> list[nn.Module]:
    """A whole copy of ``segment`` on each device (copied from the one in host memory)."""
    targets = as_devices(devices)
    copies = [copy.deepcopy(segment).to(device) for device in targets[1:]]
    log.info("segment replicated on %s", ", ".join(map(str, targets)))
    return [segment.to(targets[0]), *copies]


@dataclass
class Replica:
    """One copy of the shared segment, its batcher (None: batching off), and its session count."""

    segment: nn.Module
    batcher: Any = None
    sessions: int = 0


class Replicas:
    """The copies of the segment; a new session goes to the one with the fewest sessions."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.all = replicas
        self._lock = threading.Lock()  # sessions open and close on gRPC worker threads

    def take(self) -> int:
        with self._lock:
            index = min(range(len(self.all)), key=lambda i: self.all[i].sessions)
            self.all[index].sessions += 1
            return index

    def give_back(self, index: int) -> None:
        with self._lock:
            self.all[index].sessions -= 1

    def batchers(self) -> list[Any]:
        return [r.batcher for r in self.all if r.batcher is not None]
