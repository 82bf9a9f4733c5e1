"""Capturing a CUDA graph of a server step: one way for the decode path and the training path.

A step captured once replays with one launch instead of hundreds: a small batch through the
server's blocks is bound by kernel launches on the CPU, and more so while the server's other
threads (receiving, decoding) hold the GIL. The caller owns the step's buffers; this module only
runs the warm-up PyTorch advises (lazy initialisations, cuBLAS workspaces, on the capture stream)
and the capture itself, one session at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from lightning_split.split.surgery import map_leaves

WARMUP_STEPS = 3  # eager runs on the capture stream before capturing, as PyTorch advises
_CAPTURE_LOCK = threading.Lock()  # sessions run on several threads: one capture at a time


def capture(step: Callable[[], Any], device: torch.device, warmup: int = WARMUP_STEPS,
            pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, what ``step()`` returned while captured): replaying the graph reruns ``step``'s kernels
    on the same buffers, and rewrites those outputs in place.

    ``step`` runs ``warmup`` times for real first, so it must be safe to repeat. ``pool``
    (``torch.cuda.graph_pool_handle()``) shares one memory pool between graphs that never replay
    concurrently. Raises whatever the warm-up or the capture raised; the default stream then
    still follows whatever the warm-up queued.
    """
    stream = torch.cuda.Stream(device=device)  # warm-up and capture: never the default stream
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with _CAPTURE_LOCK:
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other sessions' threads may go on with eager work meanwhile.
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                outputs = step()
    finally:
        current.wait_stream(stream)
    return graph, outputs


def describe_leaf(value: Any) -> Any:
    """A leaf as a graph's key sees it: a tensor's shape and dtype, any other value itself."""
    return ("tensor", tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else repr(value)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, in ``map_leaves`` order."""
    out: list[Any] = []
    map_leaves(out.append, tree)
    return out


def on_one_device(module: torch.nn.Module) -> bool:
    """Every parameter on one device: a CUDA graph runs on one, so a module spread over several
    (``placement.py``) runs eagerly."""
    return len({p.device for p in module.parameters()}) == 1


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors among ``tree``'s leaves, in ``map_leaves`` order."""
    return [v for v in tree_leaves(tree) if isinstance(v, torch.Tensor)]


def drop_oldest(graphs: OrderedDict[Any, Any], count: int, device: torch.device) -> None:
    """Forget the ``count`` least recently used of ``graphs`` (entries with a ``graph``
    attribute, None when emulated), once the device is done with them."""
    if count > 0 and any(g.graph is not None for g in graphs.values()):
        torch.cuda.current_stream(device).synchronize()  # no graph destroyed mid-replay
    for _ in range(max(0, count)):
        graphs.popitem(last=False)
