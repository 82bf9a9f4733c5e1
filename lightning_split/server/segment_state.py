"""One session's view of the server's segment: its weights mode, autograd graphs, optimizer, KV cache.

The tail modes (the shared frozen segment, a trainable copy, LoRA adapters) are in ``tail.py``.
A FORWARD keeps the graph (input leaf and outputs) under the client's micro-batch id until its
BACKWARD, at most ``max_graphs`` of them, the oldest dropped first; OPTIMIZER_STEP steps and zeroes
the session's gradients once per training step: a step number already applied is acknowledged but
never applied twice, and the gradients computed for it again are discarded.

Generation (INFER with a cache) keeps the session's KV cache for the server's layers
(``kv_cache.SessionCache``). What the session keeps between requests, pending graphs and the KV
cache, is measured and charged to its node's memory budget (``session_memory.py``); the request's
values are checked before they touch any of it (``checks.py``, and here what needs the session).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Any

import torch

from lightning_split.server.batching import Batcher
from lightning_split.server.call_grads import CallGradients
from lightning_split.server.checks import AUTOCAST_DTYPES, SegmentError, embedding_rows, output_classes
from lightning_split.server.fast_decode import PROMPT_GRAPH_TOKENS, StaticDecoder
from lightning_split.server.kv_cache import MAX_CACHE_BYTES, SessionCache, causal_mask_if_none
from lightning_split.server.session_memory import (
    SavedBytes,
    SessionMemory,
    charge_tail,
    tail_bytes,
    trained_bytes,
)
from lightning_split.server.tail import make_optimizer, session_weights
from lightning_split.server.train_graphs import TrainGraphs
from lightning_split.split.results import check_labels, in_range, segment_reply
from lightning_split.split.surgery import ServerSegment, grad_input_index, map_leaves, squared_grad_norm
from lightning_split.wire.markers import KvCacheRef

log = logging.getLogger(__name__)

# Forwards awaiting their backward, per session: a pipelined step has a few; more is a client
# that never backpropagates, whose oldest graphs go first (their memory is charged meanwhile).
MAX_GRAPHS = 64


class SessionSegment:
    """The segment as one session sees it."""

    def __init__(
        self,
        base: ServerSegment,
        tail: dict[str, Any],
        hf_config: Any = None,
        max_graphs: int = MAX_GRAPHS,
        max_cache_tokens: int = 4096,
        fast_decode: bool | None = None,
        prompt_graph_tokens: int = PROMPT_GRAPH_TOKENS,
        train_graphs: bool = True,
        *,
        max_cache_bytes: int = MAX_CACHE_BYTES,
        account: Any = None,
        session_id: str = "",
        batcher: Batcher | None = None,
    ) -> None:
        """``account``: the node's share of the server's memory budget (``budget.NodeAccount``),
        charged under ``session_id`` for what the session holds; None: counted, not charged."""
        self.mode = tail.get("mode", "frozen")
        charge_tail(account, session_id, tail_bytes(base, tail))  # before the copy is made
        self.module, self.trainable = session_weights(base, tail)
        if self.mode == "lora":
            charge_tail(account, session_id, trained_bytes(self.trainable, tail))
        self.optimizer = make_optimizer(self.trainable, tail.get("optimizer")) if self.trainable else None
        self.optimizer_spec = tail.get("optimizer")  # as asked for (kept with the session, durable.py)
        self.call_grads = CallGradients(self.trainable)  # loss-only calls backpropagated at once
        # Where requests enter the segment (its first block); a spread segment moves them on itself.
        self.device = next(base.parameters()).device
        # The loss's classes (the output layer's width), known before the forward: labels replayed
        # by a training graph are checked against it. Unknown: the loss checks them, graphs stay off.
        self.classes = output_classes(self.module)
        self.token_rows = embedding_rows(self.module)  # an integer hidden state's range, if it indexes one
        self.train_graphs = TrainGraphs(self.module, self.call_grads, self.device)
        self.train_graphs.enabled &= (train_graphs and bool(tail.get("train_graphs", True))
                                      and self.classes is not None)
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[int, tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]] = (
            OrderedDict()
        )
        self.last_step = -1
        self.memory = SessionMemory(account, session_id, self.module)
        # The fast decode path: by default (None) where it pays, on a GPU, whose decode steps it
        # replays as CUDA graphs (on a CPU its static cache alone is slower than a DynamicCache);
        # True forces it (tests run it on CPU), False or the session's tail option turns it off.
        if fast_decode is None:
            fast_decode = self.device.type == "cuda"
        fast = None
        if fast_decode and tail.get("fast_decode", True) and StaticDecoder.supports(self.module, hf_config):
            fast = StaticDecoder(self.module, hf_config, self.device, max_cache_tokens,
                                 prompt_graph_tokens=prompt_graph_tokens)
        self.kv = SessionCache(self.module, hf_config, self.device, self.memory, max_cache_tokens, max_cache_bytes,
                               fast)
        # INFER steps of sessions on the shared (frozen) segment run batched with other sessions' (batching.py).
        self.batcher = batcher if self.mode == "frozen" else None

    @property
    def fast(self) -> StaticDecoder | None:
        """The static decoder (generation's fast path), None where it is off."""
        return self.kv.fast

    @property
    def cache(self) -> Any:
        """The DynamicCache holding the session's sequence, if one does."""
        return self.kv.dynamic

    # -- forward / backward -------------------------------------------------------------------

    def forward(self, body: dict[str, Any], train: bool, step: int = 0) -> dict[str, Any]:
        """FORWARD (``train``) or INFER; ``step``: the training step the request is stamped with."""
        self._check_inputs(body)
        grad_inputs = [t.to(self.device, non_blocking=True).requires_grad_(train)
                       for t in body.get("grad_inputs") or []]
        cache, past, new = None, 0, 0
        if body.get("cache") is not None:
            cache, past, new = self.kv.prepare(body["cache"], body["hidden"])
        training = bool(body.get("training", train))
        if self.mode != "frozen" and self.module.training != training:
            # A frozen segment is shared by every session and always runs in eval mode (no
            # dropout, fixed norm statistics): flipping a shared module's mode would race. Only on a
            # change: train() walks every submodule (~1 ms a request for a dozen blocks).
            self.module.train(training)
        if self.batcher is not None and not train and (cache is None or cache is self.kv.static()):
            out = self.batcher.run(self, body, None if cache is None else self.fast, past, new)
            if out is not None:
                return out
        with _autocast(body.get("autocast"), self.device):
            if cache is not None and cache is self.kv.static():
                out = None
                if not train:
                    with torch.no_grad():
                        out = self.fast.run(body, past, new)
                if out is not None:
                    return out
                # Declined (nothing changed): its tokens move to a DynamicCache and the step runs eagerly.
                cache = self.kv.to_dynamic()
            hidden = body["hidden"].to(self.device, non_blocking=True)
            args, kwargs = self._block_arguments(body, grad_inputs, cache)
            if cache is not None:
                args, kwargs = causal_mask_if_none(self.module.blocks[0], self.kv.hf_config, args, kwargs, past, new,
                                                   hidden.device)
            if not train:
                with torch.no_grad():
                    return self._run(hidden, args, kwargs, body)
            fused = body.get("fused")
            if fused is not None:
                call, weight = int(fused["call"]), self._fused_weight(fused)
                self.call_grads.open(call, step)
                graphed = self.train_graphs.run(hidden, grad_inputs, args, kwargs, body, weight, call)
                if graphed is not None:
                    return graphed
            else:
                micro_id = int(body["id"])
                if micro_id in self.graphs:
                    raise SegmentError(f"micro-batch {micro_id} already has a pending forward")
            hidden.requires_grad_(bool(body.get("input_grad", True)))
            # What autograd saves is counted as it is saved: a forward over the node's memory
            # budget stops there (BudgetExceeded), and its graph is freed with the exception.
            with torch.enable_grad(), self.memory.measure() as saved:
                out = self._run(hidden, args, kwargs, body)
        if fused is not None:  # the backward too, now, outside autocast (as torch advises)
            return self._backward_now(out, hidden, grad_inputs, call, weight)
        return self._keep_graph(micro_id, hidden, grad_inputs, out, saved)

    def _check_inputs(self, body: dict[str, Any]) -> None:
        """What needs the session to check (the request's form was checked by ``checks.check_request``)."""
        if body.get("labels") is not None:
            check_labels(body["labels"], self.classes)
        hidden = body["hidden"]
        if not hidden.is_floating_point():  # token ids: only into an embedding, and within its rows
            if self.token_rows is None:
                raise SegmentError(f"the hidden state must be floating point, not {hidden.dtype}")
            in_range(hidden, "the hidden state's token ids", 0, self.token_rows)

    def _keep_graph(self, micro_id: int, hidden: torch.Tensor, grad_inputs: list[torch.Tensor],
                    out: dict[str, torch.Tensor], saved: SavedBytes) -> dict[str, Any]:
        """Keep the forward's graph for its BACKWARD, charged; the reply gets detached outputs."""
        while len(self.graphs) >= self.max_graphs:
            # A forward whose backward never came (a loss not backpropagated): free the oldest, so
            # memory stays bounded; its backward, should it still come, gets a clear error.
            stale, _ = self.graphs.popitem(last=False)
            self.memory.drop_graph(stale)
            log.warning("dropping the autograd graph of micro-batch %d: %d forwards without a backward",
                        stale, self.max_graphs)
        self.memory.keep_graph(micro_id, saved, [hidden, *grad_inputs, *out.values()])
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
            scale = body.get("scale")  # a number (checks.check_request)
            self.call_grads.apply(call, None if scale is None else float(scale))
            return {}
        micro_id = int(body["id"])
        if micro_id not in self.graphs:
            raise SegmentError(f"no pending forward for micro-batch {micro_id}")
        hidden, grad_inputs, outputs = self.graphs[micro_id]
        grads = body.get("grads") or {}
        for k, g in grads.items():  # before the graph is let go: a bad request leaves it pending
            if k not in outputs:
                raise SegmentError(f"gradient for {k!r}, which is not a differentiable output")
            if g.shape != outputs[k].shape:
                raise SegmentError(f"gradient for {k!r} has shape {tuple(g.shape)}, not {tuple(outputs[k].shape)}")
        del self.graphs[micro_id]
        self.memory.drop_graph(micro_id)
        pairs = [(outputs[k], g.to(outputs[k].device, non_blocking=True)) for k, g in grads.items()]
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
        self.optimizer_spec = dict(spec)
        return {"optimizer": type(self.optimizer).__name__}

    def step(self, step: int, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one optimizer step for training step ``step``; a repeat applies nothing.

        A repeat is a client retrying a step (after a reconnect, say): the gradients it computed
        for it again are discarded, with the fused calls of the steps applied so far, so the next
        step gets exactly its own."""
        if step <= self.last_step:
            for p in self.trainable:
                p.grad = None
            self.call_grads.discard_through(self.last_step)
            return {"applied": False, "last_step": self.last_step}
        if self.optimizer is not None:
            if body.get("lr") is not None:  # follow the client's learning-rate schedule
                for group in self.optimizer.param_groups:
                    group["lr"] = float(body["lr"])
            scale = body.get("clip_coef")
            if scale is not None and float(scale) < 1.0:
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
        return segment_reply(self.module, self.module(hidden, args, kwargs), body)

    def _block_arguments(
        self, body: dict[str, Any], grad_inputs: list[torch.Tensor], cache: Any
    ) -> tuple[tuple, dict[str, Any]]:
        """The block's extra arguments, moved to our device, with the session's KV cache put in."""
        use_cache = body.get("cache") is not None

        def fix(value: Any) -> Any:
            if isinstance(value, KvCacheRef):
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

    def cache_control(self, body: dict[str, Any]) -> dict[str, Any]:
        """CACHE: ``reset``, ``reorder``, ``info`` (with ``held``: what the session holds, in bytes)."""
        reply = self.kv.control(body)
        if body.get("op") == "info" and body.get("held"):
            reply["held"] = self.held_bytes()
        return reply

    def held_bytes(self) -> dict[str, int]:
        """Bytes the session holds between requests, as charged: pending graphs, the KV cache."""
        return self.memory.held()

    def close(self) -> None:
        """The session ends: free what it holds at once (not at a later garbage collection), and
        give its charges back."""
        if self.batcher is not None:
            self.batcher.forget(self, self.fast)
        self.graphs.clear()
        self.call_grads.clear()
        self.train_graphs.release()
        self.kv.release()
        for p in self.trainable:
            p.grad = None
        self.memory.close()

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
        # Nothing of the steps after the saved one survives a restore: an interrupted step's
        # gradients would otherwise be added into the first step after it.
        for p in self.trainable:
            p.grad = None
        self.graphs.clear()
        self.memory.clear_graphs()
        self.call_grads.clear()


def _autocast(dtype: str | None, device: torch.device) -> Any:
    """The client's mixed precision for the segment's forward (bfloat16 or float16), or none."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise SegmentError(f"autocast dtype {dtype!r} is not supported")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
