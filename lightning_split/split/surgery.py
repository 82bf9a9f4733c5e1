"""Cutting a model in two: the server's segment out, a proxy in its place.

The client keeps the user's own model object and its own ``forward``. The first server block is
replaced by a :class:`SegmentProxy` that receives exactly what that block would have received
(hidden state, attention mask, position ids, rotary embeddings, the KV cache) and hands it to a
*runner* (in-process for tests, remote for real runs). The other server blocks become
:class:`PassThrough` placeholders so the model's loop and layer count are unchanged. In a two-part
split the proxy ends the client's forward early with :class:`HandOff`, since what follows the
blocks (final norm, output layer, loss) lives on the server.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_split.split.block_args import BlockSignature
from lightning_split.split.spec import ResolvedSplit
from lightning_split.wire.markers import GradInputRef

IGNORE_INDEX = -100  # a label the loss skips (padding, the prompt), as in Hugging Face's losses


def grad_input_index(value: Any) -> int | None:
    """The index a grad-input marker refers to, or None if ``value`` is no such marker."""
    return value.index if isinstance(value, GradInputRef) else None


def squared_grad_norm(params: Any) -> float:
    """Sum of the squared gradient entries of ``params``, with one device sync rather than one per tensor.

    Both sides of a split compute it; the client adds them for a global clipping norm.
    """
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(squares).sum()) if squares else 0.0


def map_leaves(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every leaf of nested tuples, lists and dicts (block arguments, request bodies)."""
    if isinstance(value, tuple):
        return tuple(map_leaves(fn, v) for v in value)
    if isinstance(value, list):
        return [map_leaves(fn, v) for v in value]
    if isinstance(value, dict):
        return {k: map_leaves(fn, v) for k, v in value.items()}
    return fn(value)


class SegmentRunner(Protocol):
    """Runs the server's blocks on a hidden state; autograd must flow back through the call."""

    def __call__(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any: ...


class HandOff(BaseException):  # noqa: N818 - a control-flow signal, not an error
    """Ends the client's forward of a two-part split early, carrying the server's result.

    A BaseException so that no ``except Exception`` inside a model's forward can swallow it.
    """

    def __init__(self, result: Any) -> None:
        super().__init__("split hand-off")
        self.result = result


class SegmentProxy(nn.Module):
    """Stands where the server's first block stood; forwards its inputs to a runner."""

    def __init__(self, hand_off: bool) -> None:
        super().__init__()
        self.hand_off = hand_off
        self.runner: SegmentRunner | None = None  # attached once a server (or test) is known
        self.extra: dict[str, Any] = {}  # per-call extras set by the wrapper (labels, result type)
        self.last_cache: Any = None  # the client's KV cache of the last call, for a two-part output
        # Two-part decode steps ask for the k best logits only (0: the whole vocabulary row).
        self.decode_top_k = 0
        self.signature: BlockSignature | None = None  # the server's first block's parameters (cut_model)

    # Never traced: Hugging Face compiles a model's forward on its own (generate on a static cache,
    # on a GPU), and the network call is no graph. Dynamo breaks the graph here and runs the call
    # eagerly; the client's blocks around it stay compiled.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.runner is None:
            raise RuntimeError("this model's server segment is not connected (no runner attached)")
        result = self.runner(hidden_states, args, kwargs)
        if self.hand_off:
            raise HandOff(result)
        return result


class PassThrough(nn.Module):
    """Holds a server block's place in the client's block list: the proxy already ran it."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class ServerSegment(nn.Module):
    """The server's part: blocks ``[cut:end)`` and, in a two-part split, the tail modules."""

    def __init__(self, blocks: list[nn.Module], tail: list[nn.Module], causal_lm: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.tail = nn.ModuleList(tail)
        self.causal_lm = causal_lm
        self._devices: list[torch.device | None] | None = None  # each block's, once known

    def forward(self, hidden: torch.Tensor, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self._devices is None:  # looked up once: a per-token decode step must not pay for it
            self._devices = [_device_of(block) for block in self.blocks]
        for block, device in zip(self.blocks, self._devices, strict=True):
            # Blocks may live on different devices (a segment spread over several GPUs): the
            # hidden state and the block arguments follow them.
            if device is not None and hidden.device != device:
                hidden = hidden.to(device)
                args, kwargs = map_leaves(functools.partial(_to, device=device), (args, kwargs))
            hidden = block(hidden, *args, **kwargs)
        return hidden

    def _apply(self, fn: Any, recurse: bool = True) -> ServerSegment:
        self._devices = None  # .to() / .cuda() may move blocks: look their devices up again
        return super()._apply(fn, recurse)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer (two-part splits only)."""
        for module in self.tail:
            device = _device_of(module)
            hidden = module(hidden if device is None else hidden.to(device))
        return hidden

    def place(self, device_map: dict[int, str | torch.device]) -> None:
        """Put the blocks from ``i`` on ``device_map[i]`` up to the next key (``{0: "cuda:0", 6:
        "cuda:1"}``: blocks 0-5 on the first GPU, the rest on the second); the tail follows the
        last block. Blocks before the first key stay where they are."""
        starts = sorted(device_map)
        for i, block in enumerate(self.blocks):
            start = max((k for k in starts if k <= i), default=None)
            if start is not None:
                block.to(device_map[start])
        self._devices = None
        last = _device_of(self.blocks[-1])
        if last is not None:
            self.tail.to(last)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hugging Face's loss: next-token cross-entropy for causal LMs, plain otherwise; -100 ignored."""
        logits, labels = logits.float(), labels.to(logits.device, non_blocking=True)
        if self.causal_lm:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def _device_of(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class CutResult:
    proxy: SegmentProxy
    segment: ServerSegment


def cut_model(model: nn.Module, split: ResolvedSplit) -> CutResult:
    """Remove the server's part from ``model`` in place; return it and the proxy standing for it.

    Works the same on a real model (the server) and on a skeleton on the meta device (the client).
    """
    blocks = model.get_submodule(split.blocks) if split.blocks else model
    server_blocks = [blocks[i] for i in range(split.cut, split.end)]
    tail = [model.get_submodule(path) for path in split.tail]

    proxy = SegmentProxy(hand_off=split.shape == "two_part")
    proxy.signature = BlockSignature.of(server_blocks[0])  # names the arguments it is called with
    blocks[split.cut] = proxy
    for i in range(split.cut + 1, split.end):
        blocks[i] = PassThrough()
    for path in split.tail:
        model.set_submodule(path, nn.Identity())
    return CutResult(proxy=proxy, segment=ServerSegment(server_blocks, tail, split.causal_lm))


def find_proxy(model: nn.Module) -> SegmentProxy:
    """The one SegmentProxy inside a client model."""
    proxies = [m for m in model.modules() if isinstance(m, SegmentProxy)]
    if len(proxies) != 1:
        raise ValueError(f"expected one SegmentProxy in the client model, found {len(proxies)}")
    return proxies[0]
