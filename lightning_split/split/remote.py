"""The remote segment: a SegmentProxy's runner that talks to the server over the channel.

In training (autograd on), the call is an ``autograd.Function``: its forward sends the hidden
state and the block arguments (FORWARD) and returns the server's outputs; its backward sends the
outputs' gradients (BACKWARD) and returns the gradient of the hidden state. Without autograd it
is one INFER round trip, which also drives the server's KV cache during generation.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from lightning_split.split.surgery import GRAD_INPUT, KV_CACHE, SegmentProxy
from lightning_split.wire import MessageType


def _is_cache(value: Any) -> bool:
    # Hugging Face's Cache classes, recognised without importing transformers.
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


def wire_arguments(
    args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any], Any, list[torch.Tensor]]:
    """Block arguments as the wire can carry them.

    The cache object becomes a marker; tensors that need a gradient (a block argument computed
    from the client's trainable inputs) become markers too and are returned apart, so that the
    autograd function can give them their gradients back.
    """
    found: list[Any] = []
    differentiable: list[torch.Tensor] = []

    def fix(value: Any) -> Any:
        if _is_cache(value):
            found.append(value)
            return KV_CACHE
        if isinstance(value, torch.Tensor):
            if value.requires_grad and torch.is_grad_enabled():
                differentiable.append(value)
                return GRAD_INPUT.format(len(differentiable) - 1)
            return value.detach()
        if isinstance(value, tuple):
            return tuple(fix(v) for v in value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return value
        raise TypeError(f"a block argument of type {type(value).__name__} cannot be sent to the server")

    wired_args = tuple(fix(a) for a in args)
    wired_kwargs = {k: fix(v) for k, v in kwargs.items()}
    return wired_args, wired_kwargs, (found[0] if found else None), differentiable


class RemoteSegment:
    """Runs the server's blocks for one proxy through a connected ChannelClient."""

    def __init__(self, client: Any, proxy: SegmentProxy, cut: int) -> None:
        self.client = client
        self.proxy = proxy
        self.cut = cut
        self.step = 0  # the training step, stamped on every training message's header
        self._ids = itertools.count()
        self._keys: tuple[str, ...] = ()

    def __call__(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        args, kwargs, cache, differentiable = wire_arguments(args, kwargs)
        extra = self.proxy.extra
        body: dict[str, Any] = {"args": args, "kwargs": kwargs, "training": self.proxy.training}
        if torch.is_autocast_enabled(hidden.device.type):
            # The server runs its blocks under the same mixed precision as the client's forward.
            body["autocast"] = str(torch.get_autocast_dtype(hidden.device.type)).removeprefix("torch.")
        if self.proxy.hand_off:
            body["result"] = extra.get("result") or "logits"
            body["labels"] = extra.get("labels")
            body["top_k"] = int(extra.get("top_k", 0))
            body["logits_to_keep"] = int(extra.get("logits_to_keep", 0))
        self.proxy.last_cache = cache
        if torch.is_grad_enabled():
            outputs = _RemoteForward.apply(self, body, hidden, *differentiable)
            return self._unpack(dict(zip(self._keys, outputs)))
        body["hidden"] = hidden
        if cache is not None and kwargs.get("use_cache", True):
            body["cache"] = self._cache_info(cache, hidden)
        reply = self.client.request(MessageType.INFER, body)
        return self._unpack({k: v.to(hidden.device) for k, v in reply.body.items()})

    def _cache_info(self, cache: Any, hidden: torch.Tensor) -> dict[str, Any]:
        if self.cut == 0:
            raise RuntimeError("KV-cached generation needs at least one client block before the cut (cut >= 1)")
        self._follow_reorders(cache)
        new = hidden.shape[1]
        # The client's own layers already stored this call's tokens: the rest is the past.
        info: dict[str, Any] = {"past": int(cache.get_seq_length()) - new, "new": new}
        pending = getattr(cache, "_split_pending_reorder", None)
        if pending is not None:
            info["reorder"] = pending
            cache._split_pending_reorder = None
        return info

    @staticmethod
    def _follow_reorders(cache: Any) -> None:
        """Beam search reorders the client's cache; remember it and send it with the next step.

        Riding on the next request costs no extra round trip per generated token.
        """
        if getattr(cache, "_split_follows_reorders", False):
            return
        original = cache.reorder_cache

        def reorder_cache(beam_idx: torch.Tensor) -> Any:
            pending = getattr(cache, "_split_pending_reorder", None)
            # Two reorders before one step compose: new[i] = old[pending[beam_idx[i]]].
            cache._split_pending_reorder = beam_idx if pending is None else pending[beam_idx.to(pending.device)]
            return original(beam_idx)

        cache.reorder_cache = reorder_cache
        cache._split_follows_reorders = True

    def _unpack(self, outputs: dict[str, torch.Tensor]) -> Any:
        if not self.proxy.hand_off:
            return outputs["output"]
        return outputs

    def next_id(self) -> int:
        return next(self._ids)

    def remember_keys(self, keys: tuple[str, ...]) -> None:
        self._keys = keys


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, runner: RemoteSegment, body: dict[str, Any], hidden: torch.Tensor, *extra: torch.Tensor
    ) -> Any:
        micro_id = runner.next_id()
        request = dict(body, hidden=hidden.detach(), id=micro_id, input_grad=hidden.requires_grad)
        if extra:
            request["grad_inputs"] = [t.detach() for t in extra]
        ctx.extra_meta = [(t.device, t.dtype) for t in extra]
        reply = runner.client.request(MessageType.FORWARD, request, step=runner.step)
        keys = tuple(sorted(reply.body))
        runner.remember_keys(keys)
        ctx.runner, ctx.micro_id, ctx.keys = runner, micro_id, keys
        ctx.hidden_device, ctx.hidden_dtype = hidden.device, hidden.dtype
        ctx.set_materialize_grads(False)
        outputs = tuple(reply.body[k].to(hidden.device) for k in keys)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        payload = {k: g for k, g in zip(ctx.keys, grads) if g is not None}
        runner: RemoteSegment = ctx.runner
        reply = runner.client.request(MessageType.BACKWARD, {"id": ctx.micro_id, "grads": payload}, step=runner.step)
        grad_input = reply.body.get("grad_input")
        if grad_input is not None:
            grad_input = grad_input.to(ctx.hidden_device, ctx.hidden_dtype)
        extra = reply.body.get("grad_extra") or [None] * len(ctx.extra_meta)
        extra_grads = [
            g.to(device, dtype) if g is not None else None for g, (device, dtype) in zip(extra, ctx.extra_meta)
        ]
        return (None, None, grad_input, *extra_grads)
