"""The server's fast decode path: a static KV cache and, on CUDA, one CUDA graph per decode step.

Why: a decode step moves one token per sequence through the server's blocks. In eager PyTorch it
is bound by kernel launches on the CPU (about 0.5 ms per block on an H100), not by the GPU. A CUDA
graph launches the whole segment (blocks, and in a two-part split the final norm and output
layer) at once, but it replays fixed addresses and shapes: the KV cache must not grow
(``transformers.StaticCache``: preallocated, written in place) and every input is copied into a
buffer the graph was captured with.

* The cache has room for ``capacity`` tokens (a power of two, at least ``min_tokens``, at most
  ``max_tokens`` rounded up to 64); a longer sequence moves to a cache twice the size. Only the
  server's layers are allocated; the blocks keep their model-wide ``layer_idx``.
* The client's attention mask covers its own cache (``past + new`` slots): it is padded to the
  capacity with masked slots. No mask (sdpa without padding) means plain causal attention.
* A prompt (prefill) the first time its shape comes runs exactly as on the eager path, on a
  DynamicCache with the client's own mask, and its keys and values are then copied into the
  static cache. A short prompt (at most ``prompt_graph_tokens`` tokens in all) whose shape came
  before is a graph too: eagerly it is as launch-bound as a decode step, and a capture (a few
  eager runs) is paid only for shapes that recur (fixed-length prompts, padded batches).
* CPU steps run eagerly on the static cache; CUDA steps replay a graph, captured once per input
  signature (batch size, prompt length, capacity, mask kind, result options).
* A step this path does not recognise is declined before any state changes; the caller then moves
  the tokens held here into a ``DynamicCache`` (``to_dynamic``) and runs the eager blocks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_split.server.cuda_graphs import (
    capture,
    describe_leaf,
    drop_oldest,
    on_one_device,
    tensor_leaves,
    tree_leaves,
)
from lightning_split.split.results import segment_reply
from lightning_split.split.surgery import ServerSegment, map_leaves
from lightning_split.wire.markers import KV_CACHE, GradInputRef, KvCacheRef

log = logging.getLogger(__name__)

FAMILIES = ("gpt2", "llama")  # model types whose block arguments and masks this path was checked on
ATTENTION = ("sdpa", "eager")  # attention implementations whose masks we know how to pad
# Steps after the prompt with up to this many tokens (batch x new) replay graphs.
MULTI_TOKEN_GRAPH_TOKENS = 64
# Prompts up to this many tokens (batch x length), by default, replay graphs once their shape
# recurs; longer ones keep GPU kernels busy enough eagerly, and would attend over the static
# cache's empty slots.
PROMPT_GRAPH_TOKENS = 4096
MAX_PROMPT_SHAPES = 1024  # prompt shapes remembered (a count each) before the count starts over
RESULT_OPTIONS = ("result", "top_k", "logits_to_keep", "keep_last")  # what a step returns: part of a graph

Tree = tuple[tuple, dict]  # a block's (args, kwargs)


def layer_index(block: nn.Module) -> int | None:
    """The block's model-wide layer index (its place in a KV cache), None if it has no attention:
    the ``layer_idx`` Hugging Face gives a block's attention, whatever the module is called (``attn``,
    ``self_attn``, GPT-NeoX's ``attention``...), or the block's own."""
    for module in block.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            return idx
    return None


def causal_allowed(slots: torch.Tensor, pos: int | torch.Tensor, new: int) -> torch.Tensor:
    """A (1, 1, new, len(slots)) bool mask: query i (position pos + i) sees slots 0 .. pos + i."""
    return (slots <= (pos + slots[:new]).unsqueeze(-1)).view(1, 1, new, slots.numel())


def mask_arg(block: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the block's positional arguments after the hidden state."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(block.forward).parameters.values() if p.kind in kinds]
    return names.index("attention_mask") - 1 if "attention_mask" in names[1:] else None


@dataclass
class _Graph:
    """One captured decode step and the static tensors it reads and writes."""

    inputs: list[torch.Tensor]  # the hidden state, then every other tensor argument, in leaf order
    pos: torch.Tensor  # tokens held before the step (0-dim int64): the slot the step writes
    mask: torch.Tensor | None  # the padded attention mask, or None: causal, computed in the graph
    fill: Any  # the mask's "masked" value
    mask_high: int = 0  # mask slots [mask_high:] are known to hold `fill`
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    replay: Any = None  # CUDAGraph.replay, or (emulation on CPU, for tests) the step itself
    graph: Any = None  # keeps the CUDAGraph, and its memory pool, alive


class StaticDecoder:
    """A session's static KV cache for its server layers, and the graphs that decode on it."""

    def __init__(self, module: ServerSegment, hf_config: Any, device: torch.device, max_tokens: int,
                 min_tokens: int = 256, graphs: bool = True, max_graphs: int = 8,
                 prompt_graph_tokens: int = PROMPT_GRAPH_TOKENS) -> None:
        self.module, self.hf_config, self.device = module, hf_config, device
        self.prompt_graph_tokens = prompt_graph_tokens
        self.max_tokens, self.min_tokens, self.max_graphs = max_tokens, min_tokens, max_graphs
        self.layer_ids = [layer_index(b) for b in module.blocks]
        self.mask_arg = mask_arg(module.blocks[0])
        self.sdpa = hf_config._attn_implementation == "sdpa"
        # A graph runs on one device: a segment spread over several GPUs decodes eagerly.
        self.use_graphs = graphs and on_one_device(module)
        self.emulate_graphs = False  # tests: the graph bookkeeping on CPU, the step run on replay
        self.cache: Any = None
        self.batch = self.capacity = self.tokens = 0
        self.active = False  # this decoder holds the session's sequence (not a DynamicCache)
        self.graphs: OrderedDict[str, _Graph] = OrderedDict()
        self.prompt_shapes: Counter[tuple] = Counter()  # how often each prompt shape came
        self.stats: Counter[str] = Counter()  # static_steps, graph_steps, graph_prompts, captures, declined

    @staticmethod
    def supports(module: ServerSegment, hf_config: Any) -> bool:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        ids = [layer_index(b) for b in module.blocks]
        if (getattr(hf_config, "model_type", None) not in FAMILIES or not ids or None in ids
                or getattr(hf_config, "_attn_implementation", None) not in ATTENTION
                or getattr(hf_config, "add_cross_attention", False) or mask_arg(module.blocks[0]) is None):
            return False
        layers = StaticCache(config=hf_config, max_cache_len=1).layers  # allocates nothing yet
        # Plain full-attention layers only (a sliding-window layer would need another mask).
        return all(i < len(layers) and type(layers[i]) is StaticLayer for i in ids)

    # -- the session's bookkeeping ------------------------------------------------------------

    def begin(self) -> None:
        """A new sequence starts (past == 0); the cache and graphs are kept for reuse."""
        self.active, self.tokens = True, 0

    def release(self) -> None:
        """Free the cache and the graphs (their memory pools with them)."""
        for g in self.graphs.values():
            g.replay = None  # an emulated graph's replay refers back to it: no cycle left for the GC
        drop_oldest(self.graphs, len(self.graphs), self.device)
        self.cache, self.batch, self.capacity, self.tokens, self.active = None, 0, 0, 0, False

    def _layers(self) -> list[Any]:
        return [self.cache.layers[i] for i in self.layer_ids]

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self._layers() if layer.is_initialized
                   for t in (layer.keys, layer.values))

    def reorder(self, beam_idx: torch.Tensor) -> bool:
        """Beam search: reorder the held tokens in place, so graphs keep their addresses. False if
        the index changes the batch size, which only a DynamicCache can follow."""
        if self.cache is None or self.tokens == 0:
            return True
        if beam_idx.dim() != 1 or beam_idx.shape[0] != self.batch:
            return False
        for layer in self._layers():
            for t in (layer.keys[:, :, : self.tokens], layer.values[:, :, : self.tokens]):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))
        return True

    def to_dynamic(self) -> Any:
        """The held tokens as a DynamicCache (this path declined a step); this decoder lets go."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf_config)
        if self.cache is not None and self.tokens:
            for idx, layer in zip(self.layer_ids, self._layers(), strict=True):
                cache.update(layer.keys[:, :, : self.tokens].clone(), layer.values[:, :, : self.tokens].clone(), idx)
        self.release()
        return cache

    # -- one INFER step -----------------------------------------------------------------------

    def run(self, body: dict[str, Any], past: int, new: int) -> dict[str, Any] | None:
        """Serve one INFER step on the static cache, or None (nothing changed) to decline it."""
        hidden = body["hidden"]
        mask, tree = self.swap_mask((tuple(body.get("args", ())), dict(body.get("kwargs") or {})), None)
        kind = self._mask_kind(mask, hidden, past, new)
        markers = [v for v in tree_leaves(tree) if isinstance(v, (KvCacheRef, GradInputRef))]
        if (kind is None or body.get("grad_inputs") or body.get("autocast") or KV_CACHE not in markers
                or any(isinstance(m, GradInputRef) for m in markers) or (past and hidden.shape[0] != self.batch)):
            self.stats["declined"] += 1
            return None
        graphs = (body.get("labels") is None and not self.module.training
                  and (self.emulate_graphs or (self.use_graphs and self.device.type == "cuda")))
        prompt = past == 0 and new > 1
        if past and new > 1:
            # Several tokens after held ones: speculative decoding's verify step (k drafts and the
            # last token; k varies round to round) or a long prompt's later chunk (prefill.py). A
            # graph only for few tokens whose shape came before: a capture costs several eager runs,
            # and a session keeps at most max_graphs of them, the decode step's among them.
            graphs = (graphs and hidden.shape[0] * new <= MULTI_TOKEN_GRAPH_TOKENS
                      and self._recurring_shape(hidden, kind, body))
        if prompt and not (graphs and self._recurring_shape(hidden, kind, body) and self.ready(hidden.shape[0], new)):
            # Hugging Face's own path, then the keys and values move over.
            out = self._prefill(hidden, self.swap_mask(tree, mask)[1], body, new)
            self.tokens = new
            self.stats["static_steps"] += 1
            return out
        self._reserve(hidden.shape[0], past, new)
        out = None
        if graphs and self.ready(hidden.shape[0], past + new):
            out = self._graph_step(hidden, tree, mask, kind, past, body)
            self.stats["graph_prompts"] += int(prompt and out is not None)
        if out is None:
            out = self._eager_step(hidden, tree, mask, kind, past, new, body)
        self.tokens = past + new
        self.stats["static_steps"] += 1
        return out

    def _recurring_shape(self, hidden: torch.Tensor, kind: str, body: dict[str, Any]) -> bool:
        """Count this multi-token step's shape (a prompt, a verify step); True if it is short and came
        before (it may replay a graph)."""
        if hidden.shape[0] * hidden.shape[1] > self.prompt_graph_tokens:
            return False
        if len(self.prompt_shapes) >= MAX_PROMPT_SHAPES:
            self.prompt_shapes.clear()
        options = repr([body.get(k) for k in RESULT_OPTIONS])
        shape = (tuple(hidden.shape), kind, options)
        self.prompt_shapes[shape] += 1
        return self.prompt_shapes[shape] > 1

    def swap_mask(self, tree: Tree, mask: Any = None) -> tuple[Any, Tree]:
        """The attention mask found in ``tree``, and ``tree`` with ``mask`` in its place."""
        args, kwargs = tree
        if "attention_mask" in kwargs or self.mask_arg >= len(args):
            return kwargs.get("attention_mask"), (args, {**kwargs, "attention_mask": mask})
        i = self.mask_arg
        return args[i], ((*args[:i], mask, *args[i + 1 :]), kwargs)

    def _mask_kind(self, mask: Any, hidden: torch.Tensor, past: int, new: int) -> str | None:
        if hidden.dim() != 3 or hidden.shape[1] != new:
            return None
        if mask is None:  # sdpa without padding: causal attention over the tokens held
            return "causal"
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
            return None
        if mask.shape[0] not in (1, hidden.shape[0]) or tuple(mask.shape[2:]) != (new, past + new):
            return None
        # sdpa takes a bool mask (True = attend) or an additive float one; eager adds it.
        return "given" if (mask.dtype == torch.bool and self.sdpa) or mask.dtype.is_floating_point else None

    def _reserve(self, batch: int, past: int, new: int) -> None:
        """A cache for ``batch`` sequences with room for ``past + new`` tokens (the session has
        checked ``past + new <= max_tokens``). A new cache drops every graph: they point at the old."""
        from transformers import StaticCache

        needed = past + new
        if self._fits(batch, needed):
            if past == 0:  # a new sequence: no stale keys (even masked ones) from the last one
                self.cache.reset()
            return
        capacity = self.capacity_for(batch, needed)
        drop_oldest(self.graphs, len(self.graphs), self.device)  # they point at the old cache
        old, self.cache = self.cache, StaticCache(config=self.hf_config, max_cache_len=capacity)
        self.batch, self.capacity = batch, capacity
        self._slots = torch.arange(self.capacity, device=self.device)  # read by graphs: made before them
        if old is not None and past:  # grown mid-sequence: carry the held tokens over
            for idx in self.layer_ids:
                src, dst = old.layers[idx], self.cache.layers[idx]
                dst.lazy_initialization(src.keys[:, :, :0], src.values[:, :, :0])
                dst.keys[:, :, :past].copy_(src.keys[:, :, :past])
                dst.values[:, :, :past].copy_(src.values[:, :, :past])

    def capacity_for(self, batch: int, tokens: int) -> int:
        """Room per sequence once the cache holds ``tokens`` of ``batch`` sequences: the present capacity if
        that fits, else a power of two in [min_tokens, max_tokens rounded up to 64], never below ``tokens``."""
        if self._fits(batch, tokens):
            return self.capacity
        capacity = min(max(self.min_tokens, 1 << (tokens - 1).bit_length()), -(-self.max_tokens // 64) * 64)
        return max(capacity, tokens)

    def _fits(self, batch: int, tokens: int) -> bool:
        """The cache is allocated for ``batch`` sequences and has room for ``tokens``."""
        return self.cache is not None and batch == self.batch and tokens <= self.capacity

    def ready(self, batch: int, tokens: int) -> bool:
        """A graph may run now: the cache fits and every layer is allocated (a capture needs them)."""
        return self._fits(batch, tokens) and all(layer.is_initialized for layer in self._layers())

    def _causal(self, pos: int | torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
        """Query i (position pos + i) sees slots 0..pos + i. ``pos`` may be a device tensor: a graph
        computes its mask from its input, with no host round trip."""
        allowed = causal_allowed(self._slots, pos, new)
        if self.sdpa:
            return allowed
        additive = torch.zeros(allowed.shape, dtype=dtype, device=self.device)  # eager attention adds it
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)

    def _padded(self, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """A mask of the cache's width, every slot masked: the client's mask goes in front."""
        fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        return torch.full((*mask.shape[:-1], self.capacity), fill, dtype=mask.dtype, device=self.device), fill

    def blocks_tree(self, tree: Tree, tensor: Any, cache: Any = None) -> Tree:
        """The block arguments: the cache marker becomes ``cache`` (default: the static cache), a
        tensor ``tensor(t)``."""
        cache = self.cache if cache is None else cache

        def fix(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return tensor(v)
            return cache if isinstance(v, KvCacheRef) else v

        args, kwargs = map_leaves(fix, tree)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = True
        return args, kwargs

    def _results(self, out: torch.Tensor, body: dict[str, Any]) -> dict[str, Any]:
        return segment_reply(self.module, out, body)

    def _eager_step(self, hidden: torch.Tensor, tree: Tree, mask: Any, kind: str, past: int, new: int,
                    body: dict[str, Any]) -> dict[str, Any]:
        hidden = hidden.to(self.device, non_blocking=True)  # payloads are pinned on a GPU server
        if kind == "causal":
            padded = self._causal(past, new, hidden.dtype)
        else:
            padded, _ = self._padded(mask)
            padded[..., : past + new].copy_(mask, non_blocking=True)
        for layer in self._layers():  # where each layer writes (StaticLayer keeps it on the device)
            layer.cumulative_length.fill_(past)
        _, tree = self.swap_mask(self.blocks_tree(tree, lambda t: t.to(self.device, non_blocking=True)), padded)
        return self._results(self.module(hidden, *tree), body)

    def _prefill(self, hidden: torch.Tensor, tree: Tree, body: dict[str, Any], new: int) -> dict[str, Any]:
        """``tree``: the block arguments as the client sent them, its mask included.

        A prompt runs eagerly on a DynamicCache with the client's own mask, exactly as the eager
        path would (so at its speed: no attention over the static cache's empty slots), and its
        keys and values are then copied into the static cache for the decode steps."""
        from transformers import DynamicCache

        dynamic = DynamicCache(config=self.hf_config)
        args, kwargs = self.blocks_tree(tree, lambda t: t.to(self.device, non_blocking=True), dynamic)
        out = self.module(hidden.to(self.device, non_blocking=True), args, kwargs)
        self._reserve(hidden.shape[0], 0, new)
        for idx, layer in zip(self.layer_ids, self._layers(), strict=True):
            keys, values = dynamic.layers[idx].keys, dynamic.layers[idx].values
            if not layer.is_initialized:
                layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
            layer.keys[:, :, :new].copy_(keys)
            layer.values[:, :, :new].copy_(values)
        return self._results(out, body)

    # -- CUDA graphs --------------------------------------------------------------------------

    def _graph_step(self, hidden: torch.Tensor, tree: Tree, mask: Any, kind: str, past: int,
                    body: dict[str, Any]) -> dict[str, Any] | None:
        options = {k: body[k] for k in RESULT_OPTIONS if k in body}
        # The mask's last dim (past + new) grows every step: its buffer has the capacity instead.
        mask_sig = None if mask is None else (tuple(mask.shape[:-1]), str(mask.dtype))
        key = repr((self.capacity, kind, describe_leaf(hidden), map_leaves(describe_leaf, tree), mask_sig,
                    sorted(options.items())))
        leaves = [hidden, *tensor_leaves(tree)]
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            g = self.graphs.get(key)
            if g is None:
                g = self._capture(tree, kind, options, leaves, mask, past)
                if g is None:
                    return None
                drop_oldest(self.graphs, len(self.graphs) + 1 - self.max_graphs, self.device)
                self.graphs[key] = g
            self.graphs.move_to_end(key)
            self._stage(g, leaves, mask, past)
            g.replay()
            self.stats["graph_steps"] += 1
            # The outputs are the graph's own buffers, rewritten by the next replay: hand out copies.
            return {k: v.clone() for k, v in g.outputs.items()}

    @staticmethod
    def _stage(g: _Graph, leaves: list[torch.Tensor], mask: Any, past: int) -> None:
        """Copy one step's inputs into the graph's buffers: copies and fills, no host sync."""
        for buf, t in zip(g.inputs, leaves, strict=True):
            buf.copy_(t, non_blocking=True)  # pinned payloads; a pageable source is staged by the driver
        if g.mask is not None:
            n = mask.shape[-1]
            g.mask[..., :n].copy_(mask, non_blocking=True)
            if g.mask_high > n:  # shorter than the last sequence: mask its slots again
                g.mask[..., n : g.mask_high].fill_(g.fill)
            g.mask_high = n
        g.pos.fill_(past)

    def _capture(self, tree: Tree, kind: str, options: dict[str, Any], leaves: list[torch.Tensor], mask: Any,
                 past: int) -> _Graph | None:
        # Every tensor the graph reads is allocated before capture and never replaced while the
        # graph lives: the cache and _slots (_reserve, the prefill), these buffers, pos, the mask.
        inputs = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in leaves]
        buffers = iter(inputs[1:])
        static_tree = self.blocks_tree(tree, lambda t: next(buffers))  # same leaf order as `leaves`
        mask_buf, fill = self._padded(mask) if kind == "given" else (None, False)
        g = _Graph(inputs, torch.zeros((), dtype=torch.long, device=self.device), mask_buf, fill)
        layers, new = self._layers(), inputs[0].shape[1]  # a decode step's one token, or a prompt

        def step() -> dict[str, torch.Tensor]:
            # Idempotent for given inputs: each layer's write slot comes from pos, so the warm-up
            # runs, the capture and every replay write the same slot.
            for layer in layers:
                layer.cumulative_length.copy_(g.pos)
            attn_mask = g.mask if kind == "given" else self._causal(g.pos, new, inputs[0].dtype)
            _, args = self.swap_mask(static_tree, attn_mask)
            return self._results(self.module(inputs[0], *args), options)

        self._stage(g, leaves, mask, past)
        if self.device.type != "cuda":  # emulation: the same buffers, the step run at each replay
            g.outputs = step()
            g.replay = lambda: [g.outputs[k].copy_(v) for k, v in step().items()]
            self.stats["captures"] += 1
            return g
        try:
            g.graph, g.outputs = capture(step, self.device)
        except Exception:  # no graphs for this session: its steps run eagerly on the static cache
            log.warning("CUDA graph capture failed; this session decodes eagerly", exc_info=True)
            self.use_graphs = False
            self.stats["capture_failed"] += 1
            return None
        g.replay = g.graph.replay
        self.stats["captures"] += 1
        return g

