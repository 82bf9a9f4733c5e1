"""One session's view of the server's segment: its weights mode, autograd graphs, optimizer, KV cache.

Tail modes:

* ``frozen``: every session shares the model owner's segment; only input gradients flow back.
* ``trainable``: the session trains its own copy of the segment with its own optimizer.
* ``lora``: the session trains LoRA adapters (``peft``) over the shared, frozen base weights.

A FORWARD keeps the graph (input leaf and outputs) under the client's micro-batch id until its
BACKWARD; OPTIMIZER_STEP steps and zeroes the session's gradients once per training step: a step
number already applied is acknowledged but never applied twice.

Generation (INFER with a cache) keeps the session's KV cache for the server's layers: for GPT-2 and
Llama a static cache with CUDA-graph decode steps (``fast_decode.StaticDecoder``), else, or when
that path declines a step, Hugging Face's ``DynamicCache``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from lightning_split.server.call_grads import CallGradients
from lightning_split.server.fast_decode import PROMPT_GRAPH_TOKENS, StaticDecoder
from lightning_split.server.train_graphs import TrainGraphs
from lightning_split.split.results import segment_reply
from lightning_split.split.surgery import KV_CACHE, ServerSegment, grad_input_index, map_leaves, squared_grad_norm

log = logging.getLogger(__name__)

TAIL_MODES = ("frozen", "trainable", "lora")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


class SegmentError(ValueError):
    """A request this session cannot serve (bad ids, unknown options): INVALID_ARGUMENT."""


class CacheError(SegmentError):
    """The KV cache's length or memory limit: FAILED_PRECONDITION / RESOURCE_EXHAUSTED."""


def make_optimizer(params: list[nn.Parameter], spec: dict[str, Any]) -> torch.optim.Optimizer:
    spec = dict(spec or {"name": "SGD", "lr": 1e-3})
    name = spec.pop("name", "SGD")
    if name not in OPTIMIZERS:
        raise SegmentError(f"optimizer {name!r} is not offered; choose one of {OPTIMIZERS}")
    allowed = {"lr", "momentum", "weight_decay", "betas", "eps", "nesterov", "dampening", "alpha",
               "amsgrad", "foreach", "maximize"}
    bad = set(spec) - allowed
    if bad:
        raise SegmentError(f"optimizer options {sorted(bad)} are not accepted")
    if "betas" in spec:
        spec["betas"] = tuple(spec["betas"])
    return getattr(torch.optim, name)(params, **spec)


def _lora_segment(base: ServerSegment, lora: dict[str, Any]) -> ServerSegment:
    """A copy of the segment that shares the base weights, with LoRA adapters injected."""
    from peft import LoraConfig, inject_adapter_in_model

    shared = {id(p): p for p in base.parameters()}
    shared.update({id(b): b for b in base.buffers()})
    segment = copy.deepcopy(base, memo=shared)
    config = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora["target_modules"]),
    )
    return inject_adapter_in_model(config, segment)


class SessionSegment:
    """The segment as one session sees it."""

    def __init__(
        self,
        base: ServerSegment,
        tail: dict[str, Any],
        hf_config: Any = None,
        max_graphs: int = 256,
        max_cache_tokens: int = 4096,
        fast_decode: bool | None = None,
        prompt_graph_tokens: int = PROMPT_GRAPH_TOKENS,
        train_graphs: bool = True,
    ) -> None:
        mode = tail.get("mode", "frozen")
        if mode not in TAIL_MODES:
            raise SegmentError(f"tail mode {mode!r} is not one of {TAIL_MODES}")
        self.mode = mode
        if mode == "frozen":
            self.module = base
            self.trainable: list[nn.Parameter] = []
        elif mode == "trainable":
            self.module = copy.deepcopy(base)
            self.trainable = list(self.module.parameters())
            for p in self.trainable:
                p.requires_grad_(True)
        else:
            if not tail.get("lora", {}).get("target_modules"):
                raise SegmentError("tail mode 'lora' needs lora.target_modules")
            self.module = _lora_segment(base, tail["lora"])
            self.trainable = [p for n, p in self.module.named_parameters() if "lora_" in n]
            for p in self.trainable:
                p.requires_grad_(True)
        self.optimizer = make_optimizer(self.trainable, tail.get("optimizer")) if self.trainable else None
        self.call_grads = CallGradients(self.trainable)  # loss-only calls backpropagated at once
        # Where requests enter the segment (its first block); a spread segment moves them on itself.
        self.device = next(base.parameters()).device
        self.train_graphs = TrainGraphs(self.module, self.call_grads, self.device)
        self.train_graphs.enabled &= train_graphs and bool(tail.get("train_graphs", True))
        self.hf_config = hf_config
        self.max_graphs = max_graphs
        self.max_cache_tokens = max_cache_tokens
        self.graphs: OrderedDict[int, tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]] = (
            OrderedDict()
        )
        self.last_step = -1
        self.cache: Any = None  # a DynamicCache, when the static decoder does not hold the sequence
        # The fast decode path: by default (None) where it pays, on a GPU, whose decode steps it
        # replays as CUDA graphs (on a CPU its static cache alone is slower than a DynamicCache);
        # True forces it (tests run it on CPU), False or the session's tail option turns it off.
        if fast_decode is None:
            fast_decode = self.device.type == "cuda"
        self.fast: StaticDecoder | None = None
        if fast_decode and tail.get("fast_decode", True) and StaticDecoder.supports(self.module, hf_config):
            self.fast = StaticDecoder(self.module, hf_config, self.device, max_cache_tokens,
                                      prompt_graph_tokens=prompt_graph_tokens)

    # -- forward / backward -------------------------------------------------------------------

    def forward(self, body: dict[str, Any], train: bool) -> dict[str, Any]:
        grad_inputs = [t.to(self.device, non_blocking=True).requires_grad_(train)
                       for t in body.get("grad_inputs") or []]
        cache = self._session_cache(body["cache"]) if body.get("cache") is not None else None
        if self.mode != "frozen":
            # A frozen segment is shared by every session and always runs in eval mode (no
            # dropout, fixed norm statistics): flipping a shared module's mode would race.
            self.module.train(bool(body.get("training", train)))
        autocast = body.get("autocast")
        if autocast is not None:
            if autocast not in ("bfloat16", "float16"):
                raise SegmentError(f"autocast dtype {autocast!r} is not supported")
            context = torch.autocast(self.device.type, dtype=getattr(torch, autocast))
        else:
            context = contextlib.nullcontext()
        with context:
            if cache is not None and cache is self._static_cache():
                out = None
                if not train:
                    with torch.no_grad():
                        out = self.fast.run(body, int(body["cache"]["past"]), int(body["cache"]["new"]))
                if out is not None:
                    return out
                # Declined (nothing changed): its tokens move to a DynamicCache and the step runs eagerly.
                cache = self.cache = self.fast.to_dynamic()
            hidden = body["hidden"].to(self.device, non_blocking=True)
            args, kwargs = self._block_arguments(body, grad_inputs, cache)
            if not train:
                with torch.no_grad():
                    return self._run(hidden, args, kwargs, body)
            fused = body.get("fused")
            if fused is not None:
                call, weight = int(fused["call"]), self._fused_weight(fused)
                graphed = self.train_graphs.run(hidden, grad_inputs, args, kwargs, body, weight, call)
                if graphed is not None:
                    return graphed
            micro_id = int(body["id"])
            if micro_id in self.graphs:
                raise SegmentError(f"micro-batch {micro_id} already has a pending forward")
            hidden.requires_grad_(bool(body.get("input_grad", True)))
            with torch.enable_grad():
                out = self._run(hidden, args, kwargs, body)
        if fused is not None:  # the backward too, now, outside autocast (as torch advises)
            return self._backward_now(out, hidden, grad_inputs, call, weight)
        while len(self.graphs) >= self.max_graphs:
            # A forward whose backward never came (a loss not backpropagated): free the oldest, so
            # memory stays bounded; its backward, should it still come, gets a clear error.
            stale, _ = self.graphs.popitem(last=False)
            log.warning("dropping the autograd graph of micro-batch %d: %d forwards without a backward",
                        stale, self.max_graphs)
        self.graphs[micro_id] = (hidden, grad_inputs, {k: v for k, v in out.items() if v.requires_grad})
        return {k: v.detach() for k, v in out.items()}

    def _fused_weight(self, fused: dict[str, Any]) -> torch.Tensor:
        """A fused micro-batch's share of its call's loss, checked: a floating-point scalar."""
        weight = torch.as_tensor(fused["weight"])
        if weight.dim() != 0 or not weight.is_floating_point():
            raise SegmentError("a fused call's loss weight must be a floating-point scalar")
        return weight.to(self.device, non_blocking=True)

    def _backward_now(self, out: dict[str, Any], hidden: torch.Tensor, grad_inputs: list[torch.Tensor],
                      call: int, weight: torch.Tensor) -> dict[str, Any]:
        """A loss-only micro-batch of fused call ``call``: backpropagate ``weight x loss`` at once.

        ``weight`` is the micro-batch's share of the call's loss. The input gradients go back with
        the loss; the parameters' gradients wait for the call's BACKWARD (call_grads.py). A signature
        seen before runs as one CUDA graph instead (train_graphs.py)."""
        if set(out) != {"loss"}:
            raise SegmentError("a fused forward and backward needs the loss as its only result")
        loss = out["loss"]
        weight = weight.to(loss.dtype)
        # Nothing to backpropagate if nothing upstream is trainable (a frozen tail, no input gradient).
        run = (lambda: torch.autograd.backward(loss, weight)) if loss.requires_grad else (lambda: None)
        self.call_grads.backward_into(call, run)
        return {
            "loss": loss.detach(),
            "grad_input": hidden.grad if hidden.requires_grad else None,
            "grad_extra": [t.grad for t in grad_inputs],
        }

    def backward(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("call") is not None:  # a fused call: its gradients join .grad, scaled
            call = int(body["call"])
            if call not in self.call_grads:
                raise SegmentError(f"no pending fused call {call}")
            scale = body.get("scale")
            if scale is not None and not (isinstance(scale, (int, float)) or
                                          (isinstance(scale, torch.Tensor) and scale.numel() == 1)):
                raise SegmentError("a fused call's scale must be a number")
            self.call_grads.apply(call, None if scale is None else float(scale))
            return {}
        micro_id = int(body["id"])
        if micro_id not in self.graphs:
            raise SegmentError(f"no pending forward for micro-batch {micro_id}")
        hidden, grad_inputs, outputs = self.graphs.pop(micro_id)
        grads = body.get("grads") or {}
        pairs = [(outputs[k], g.to(outputs[k].device, non_blocking=True)) for k, g in grads.items() if k in outputs]
        for k, g in grads.items():
            if k not in outputs:
                raise SegmentError(f"gradient for {k!r}, which is not a differentiable output")
            if g.shape != outputs[k].shape:
                raise SegmentError(f"gradient for {k!r} has shape {tuple(g.shape)}, not {tuple(outputs[k].shape)}")
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
        return {
            "grad_input": hidden.grad if hidden.requires_grad else None,
            "grad_extra": [t.grad for t in grad_inputs],
        }

    def configure_optimizer(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Replace the session's optimizer (the client's optimizer class and hyper-parameters)."""
        if not self.trainable:
            raise SegmentError("a frozen tail has no optimizer")
        self.optimizer = make_optimizer(self.trainable, spec)
        return {"optimizer": type(self.optimizer).__name__}

    def step(self, step: int, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one optimizer step for training step ``step``; a repeat is a no-op."""
        if step <= self.last_step:
            return {"applied": False, "last_step": self.last_step}
        if self.optimizer is not None:
            if body.get("lr") is not None:  # follow the client's learning-rate schedule
                for group in self.optimizer.param_groups:
                    group["lr"] = float(body["lr"])
            scale = body.get("clip_coef")
            if scale is not None and scale < 1.0:
                for p in self.trainable:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.last_step = step
        return {"applied": True, "last_step": step}

    def grad_sq_norm(self) -> dict[str, Any]:
        """Sum of squared gradient entries: the client combines it into a global clipping norm."""
        return {"sq_norm": squared_grad_norm(self.trainable)}

    # -- helpers ------------------------------------------------------------------------------

    def _run(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any], body: dict[str, Any]) -> dict:
        return segment_reply(self.module, self.module(hidden, args, kwargs), body, self.device)

    def _block_arguments(
        self, body: dict[str, Any], grad_inputs: list[torch.Tensor], cache: Any
    ) -> tuple[tuple, dict[str, Any]]:
        """The block's extra arguments, moved to our device, with the session's KV cache put in."""
        use_cache = body.get("cache") is not None

        def fix(value: Any) -> Any:
            if isinstance(value, str) and value == KV_CACHE:
                return cache
            index = grad_input_index(value)
            if index is not None:
                if not 0 <= index < len(grad_inputs):
                    raise SegmentError(f"block argument refers to a missing grad input {index}")
                return grad_inputs[index]
            if isinstance(value, torch.Tensor):
                return value.to(self.device, non_blocking=True)
            return value

        args, kwargs = map_leaves(fix, (tuple(body.get("args", ())), dict(body.get("kwargs") or {})))
        if "use_cache" in kwargs:
            kwargs["use_cache"] = use_cache
        return args, kwargs

    def _session_cache(self, info: dict[str, Any]) -> Any:
        """This step's cache (the static decoder or a DynamicCache), checked against the client's count."""
        from transformers import DynamicCache

        past, new = int(info["past"]), int(info["new"])
        if info.get("reorder") is not None and past > 0:
            # Beam search reordered the client's cache since the last step: follow it.
            self._reorder(info["reorder"])
        if past == 0 or not self._holds_cache():
            if past != 0:
                raise CacheError(f"the client expects {past} cached tokens, the server holds none")
            self.cache = None
            if self.fast is not None:
                self.fast.begin()
            else:
                self.cache = DynamicCache(config=self.hf_config)
        held = self.cached_tokens()
        if held != past:
            raise CacheError(f"KV cache out of step: the server holds {held} tokens, the client {past}")
        if past + new > self.max_cache_tokens:
            raise CacheError(f"KV cache limit: {past + new} tokens > max_cache_tokens={self.max_cache_tokens}")
        return self._static_cache() or self.cache

    def _static_cache(self) -> StaticDecoder | None:
        """The static decoder while it holds the session's sequence (it makes its cache lazily)."""
        return self.fast if self.fast is not None and self.fast.active else None

    def _holds_cache(self) -> bool:
        return self.cache is not None or self._static_cache() is not None

    def _reorder(self, beam_idx: torch.Tensor) -> None:
        if not self._holds_cache():
            raise CacheError("no KV cache to reorder")
        if self._static_cache() is not None and not self.fast.reorder(beam_idx):
            self.cache = self.fast.to_dynamic()  # a reorder that changes the batch size
        if self.cache is not None:
            self.cache.reorder_cache(beam_idx.to(self.device))

    def cached_tokens(self) -> int:
        if self._static_cache() is not None:
            return self.fast.tokens
        if self.cache is None:
            return 0
        first = self.module.blocks[0]
        layer_idx = getattr(getattr(first, "attn", None), "layer_idx", None)
        if layer_idx is None:
            layer_idx = getattr(getattr(first, "self_attn", None), "layer_idx", 0)
        return int(self.cache.get_seq_length(layer_idx))

    def cache_bytes(self) -> int:
        if self._static_cache() is not None:
            return self.fast.nbytes()
        if self.cache is None:
            return 0
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def cache_control(self, body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op == "reset":
            self.cache = None
            if self.fast is not None:
                self.fast.release()
        elif op == "reorder":
            self._reorder(body["beam_idx"])
        elif op != "info":
            raise SegmentError(f"unknown cache op {op!r}")
        return {"tokens": self.cached_tokens(), "bytes": self.cache_bytes()}

    # -- state save / restore -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad} if self.trainable else {}
        return {
            "mode": self.mode,
            "last_step": self.last_step,
            "params": {n: p.detach().clone() for n, p in trainable.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise SegmentError(f"saved state is for tail mode {state['mode']!r}, this session is {self.mode!r}")
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, value in state["params"].items():
                params[n].copy_(value)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.last_step = int(state["last_step"])
        self.graphs.clear()
        self.call_grads.clear()
