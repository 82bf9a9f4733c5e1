"""The remote segment: a SegmentProxy's runner that talks to the server over the channel.

In training (autograd on), the call is an ``autograd.Function``: its forward sends the hidden
state and the block arguments (FORWARD) and returns the server's outputs; its backward sends the
outputs' gradients (BACKWARD) and returns the gradient of the hidden state. When the server's
result is the loss alone (a two-part split given labels), the server backpropagates at once and
the input gradients come back with the loss (``_RemoteLossStep``): one round trip per
micro-batch instead of two. Without autograd it is one INFER round trip, which also drives the
server's KV cache during generation.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from lightning_split.split.surgery import GRAD_INPUT, KV_CACHE, SegmentProxy, map_leaves
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
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return value
        raise TypeError(f"a block argument of type {type(value).__name__} cannot be sent to the server")

    wired_args, wired_kwargs = map_leaves(fix, (tuple(args), dict(kwargs)))
    return wired_args, wired_kwargs, (found[0] if found else None), differentiable


class RemoteSegment:
    """Runs the server's blocks for one proxy through a connected ChannelClient."""

    # Cut a training batch into micro-batches in flight once its hidden state is this large.
    PIPELINE_MIN_BYTES = 4 << 20
    # Measured on an H200 host (GPT-2 small, 8 x 1024): 2 beat 4 and 8, whose extra kernel
    # launches on the server cost more than the transfers they hide.
    PIPELINE_CHUNKS = 2

    def __init__(self, client: Any, proxy: SegmentProxy, cut: int, causal_lm: bool = False,
                 micro_batches: int | None = None) -> None:
        self.client = client
        self.proxy = proxy
        self.cut = cut
        self.causal_lm = causal_lm
        self.micro_batches = micro_batches  # None: automatic (PIPELINE_*); 1: never cut
        self.fuse_loss_backward = True  # loss-only calls: the server backpropagates with its forward
        # Fused calls' BACKWARDs (the scale for the server's gradients) are not waited for; their
        # replies are checked before the next call and by confirm().
        self.unconfirmed: list[Any] = []
        self.step = 0  # the training step, stamped on every training message's header
        # Set by the strategy just before the backward that precedes an optimizer step: the
        # server then steps right after that backward (see SplitStrategy.optimizer_step).
        self.pending_step: dict[str, Any] | None = None
        # Micro-batch ids forwarded with autograd on whose backward has not run yet: the step may
        # only ride on the backward that leaves none (a model called twice in one step has two).
        self.outstanding: set[int] = set()
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
            body["result"] = extra.get("result")
            body["labels"] = extra.get("labels")
            body["top_k"] = int(extra.get("top_k", 0))
            body["logits_to_keep"] = int(extra.get("logits_to_keep", 0))
        self.proxy.last_cache = cache
        if torch.is_grad_enabled():
            self.confirm()
            chunks = self._chunks_for(hidden)
            counts = self._loss_counts(body, chunks, hidden.shape[0])
            if counts is not None:
                return self._unpack({"loss": _RemoteLossStep.apply(self, body, counts, hidden, *differentiable)})
            outputs = _RemoteForward.apply(self, body, chunks, hidden, *differentiable)
            result = dict(zip(self._keys, outputs, strict=True))
            if "loss" in result and result["loss"].dim() == 1:
                result["loss"] = self._combine_losses(result["loss"], body.get("labels"), chunks)
            return self._unpack(result)
        body["hidden"] = hidden
        if cache is not None and kwargs.get("use_cache", True):
            body["cache"] = self._cache_info(cache, hidden)
        keep = int(extra.get("keep_last", 0)) if not self.proxy.hand_off else 0
        if 0 < keep < hidden.shape[-2]:
            body["keep_last"] = keep
        reply = self.client.request(MessageType.INFER, body)
        out = {k: v.to(hidden.device, non_blocking=True) for k, v in reply.body.items()}
        if body.get("keep_last"):  # the last positions only: in place in a full-length state
            last = out["output"]
            out["output"] = last.new_zeros((*hidden.shape[:-1], last.shape[-1]))
            out["output"][..., -keep:, :] = last
        return self._unpack(out)

    def _chunks_for(self, hidden: torch.Tensor) -> int:
        batch = hidden.shape[0] if hidden.dim() >= 1 else 1
        if self.micro_batches is not None:
            return max(1, min(self.micro_batches, batch))
        if hidden.numel() * hidden.element_size() < self.PIPELINE_MIN_BYTES:
            return 1
        return max(1, min(self.PIPELINE_CHUNKS, batch))

    def _combine_losses(self, losses: torch.Tensor, labels: torch.Tensor | None, chunks: int) -> torch.Tensor:
        """The batch's mean loss from the micro-batches' means, weighted by their counted targets."""
        if labels is None:
            return losses.mean()
        return _weighted_mean(losses, self._target_counts(labels, chunks))

    def _target_counts(self, labels: torch.Tensor, chunks: int) -> torch.Tensor:
        """Each micro-batch's number of targets the loss averages over (labels not -100)."""
        targets = labels[..., 1:] if self.causal_lm else labels
        return torch.stack([(targets[a:b] != -100).sum() for a, b in _batch_ranges(labels.shape[0], chunks)])

    def _loss_counts(self, body: dict[str, Any], chunks: int, batch: int) -> torch.Tensor | None:
        """The micro-batches' target counts if this call may be fused (``_RemoteLossStep``), else None.

        Fused: a two-part call with labels whose result is the loss alone (Hugging Face's default
        with labels), cut into micro-batches along the labels' batch dimension."""
        labels = body.get("labels")
        if (not self.fuse_loss_backward or not self.proxy.hand_off or body.get("result") not in (None, "loss")
                or not isinstance(labels, torch.Tensor) or labels.dim() < 1 or labels.shape[0] != batch):
            return None
        return self._target_counts(labels, chunks)

    def confirm(self) -> None:
        """Wait for the fused calls' BACKWARD replies: a server error there surfaces here."""
        unconfirmed, self.unconfirmed = self.unconfirmed, []
        for future in unconfirmed:
            future.result()

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


def _weighted_mean(losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    counts = counts.to(losses.device, losses.dtype)
    return (losses * counts).sum() / counts.sum()


def _batch_ranges(batch: int, chunks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of the batch, as equal as possible (like torch.tensor_split)."""
    bounds = [batch * i // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _slice_batch(value: Any, batch: int, start: int, stop: int) -> Any:
    """A request's share of one micro-batch: tensors whose first dim is the batch are cut,
    everything else (broadcast position ids, rotary tables, flags) is sent whole."""

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == batch:
            return leaf[start:stop]
        return leaf

    return map_leaves(cut, value)


def _merge(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One output from the micro-batches' replies on ``device``: batch outputs concatenated,
    scalars stacked. Each part is copied on its own, asynchronously from the pinned receive
    buffers, and joined on the device."""
    parts = [p.to(device, non_blocking=True) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)


def _release(runner: RemoteSegment, ids: list[int], futures: list[Any], call: int | None = None) -> None:
    """A micro-batch failed: free what the server kept for the others (an empty BACKWARD each,
    or for a fused call one that drops its gradients)."""
    for micro_id in ids:
        runner.outstanding.discard(micro_id)
    try:
        if call is not None:
            if any(f.exception() is None for f in futures):
                runner.client.request(MessageType.BACKWARD, {"id": call, "call": call, "scale": None}, step=runner.step)
            return
        for micro_id, future in zip(ids, futures, strict=True):
            if future.exception() is None:
                runner.client.request(MessageType.BACKWARD, {"id": micro_id, "grads": {}}, step=runner.step)
    except Exception:  # the stream itself is gone: the session's TTL frees them
        return


def _submit_micro_batches(runner: RemoteSegment, body: dict[str, Any], ranges: list[tuple[int, int]],
                          hidden: torch.Tensor, extra: tuple[torch.Tensor, ...],
                          fused: list[dict[str, Any]] | None = None) -> tuple[list[int], list[Any]]:
    """One FORWARD per micro-batch, all submitted before any reply is awaited: (ids, futures)."""
    batch = hidden.shape[0]
    ids, futures = [], []
    for i, (start, stop) in enumerate(ranges):
        request = _slice_batch(body, batch, start, stop) if len(ranges) > 1 else dict(body)
        micro_id = runner.next_id()
        request.update(hidden=hidden[start:stop].detach(), id=micro_id, input_grad=hidden.requires_grad)
        if extra:
            request["grad_inputs"] = [_slice_batch(t.detach(), batch, start, stop) for t in extra]
        if fused is not None:
            request["fused"] = fused[i]
        ids.append(micro_id)
        runner.outstanding.add(micro_id)
        futures.append(runner.client.submit(MessageType.FORWARD, request, step=runner.step))
    return ids, futures


def _await_replies(runner: RemoteSegment, ids: list[int], futures: list[Any], call: int | None = None) -> list[Any]:
    try:
        return [f.result() for f in futures]
    except BaseException:
        _release(runner, ids, futures, call)
        raise


def _input_grads(ctx: Any, replies: list[dict[str, Any]], many: bool) -> tuple[torch.Tensor | None, list[Any]]:
    """The hidden state's gradient and the extra differentiable arguments' from the micro-batches' replies."""
    grad_input = None
    if replies[0].get("grad_input") is not None:
        grad_input = _merge([r["grad_input"] for r in replies], ctx.hidden_device).to(dtype=ctx.hidden_dtype)
    extra_grads = []
    for j, (device, dtype, per_sample) in enumerate(ctx.extra_meta):
        parts = [(r.get("grad_extra") or [None] * len(ctx.extra_meta))[j] for r in replies]
        if any(p is None for p in parts):
            extra_grads.append(None)
            continue
        # A per-sample argument was cut, so its gradient is the concatenation; a broadcast one
        # reached every micro-batch whole, so its gradient is the sum.
        merged = torch.cat(parts) if (per_sample and many) else torch.stack(parts).sum(0)
        extra_grads.append(merged.to(device, dtype))
    return grad_input, extra_grads


def _remember_inputs(ctx: Any, hidden: torch.Tensor, extra: tuple[torch.Tensor, ...]) -> None:
    batch = hidden.shape[0]
    ctx.hidden_device, ctx.hidden_dtype = hidden.device, hidden.dtype
    ctx.extra_meta = [(t.device, t.dtype, t.dim() >= 1 and t.shape[0] == batch) for t in extra]
    ctx.set_materialize_grads(False)


def _take_pending_step(runner: RemoteSegment, request: dict[str, Any]) -> None:
    """The optimizer step rides on the backward that leaves no forward without its backward."""
    if runner.pending_step is not None and not runner.outstanding:
        request["then_step"], runner.pending_step = runner.pending_step, None


class _RemoteForward(torch.autograd.Function):
    """Forward and backward of the server's segment, as micro-batches in flight.

    With ``chunks > 1`` the batch is cut into micro-batches whose requests are all submitted before
    the first reply is awaited: while the server computes one, the next is on the wire, and the
    replies stream back the same way. The backward does the same with the gradients.
    """

    @staticmethod
    def forward(
        ctx: Any, runner: RemoteSegment, body: dict[str, Any], chunks: int, hidden: torch.Tensor,
        *extra: torch.Tensor,
    ) -> Any:
        ranges = _batch_ranges(hidden.shape[0], chunks) if chunks > 1 else [(0, hidden.shape[0])]
        ids, futures = _submit_micro_batches(runner, body, ranges, hidden, extra)
        replies = _await_replies(runner, ids, futures)
        keys = tuple(sorted(replies[0].body))
        runner.remember_keys(keys)
        ctx.runner, ctx.ids, ctx.ranges, ctx.keys = runner, ids, ranges, keys
        _remember_inputs(ctx, hidden, extra)
        ctx.stacked = {k for k in keys if replies[0].body[k].dim() == 0}
        outputs = tuple(_merge([r.body[k] for r in replies], hidden.device) for k in keys)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        runner: RemoteSegment = ctx.runner
        many = len(ctx.ranges) > 1
        futures = []
        for i, (micro_id, (start, stop)) in enumerate(zip(ctx.ids, ctx.ranges, strict=True)):
            payload = {}
            for key, grad in zip(ctx.keys, grads, strict=True):
                if grad is not None:
                    # Scalars (the loss) were stacked, one per micro-batch; the rest concatenated.
                    payload[key] = (grad[i] if key in ctx.stacked else grad[start:stop]) if many else grad
            request: dict[str, Any] = {"id": micro_id, "grads": payload}
            runner.outstanding.discard(micro_id)
            if i == len(ctx.ranges) - 1:
                _take_pending_step(runner, request)
            futures.append(runner.client.submit(MessageType.BACKWARD, request, step=runner.step))
        grad_input, extra_grads = _input_grads(ctx, [f.result().body for f in futures], many)
        return (None, None, None, grad_input, *extra_grads)


class _RemoteLossStep(torch.autograd.Function):
    """A loss-only call (two-part split, labels sent): forward and backward in one round trip.

    Each micro-batch's FORWARD asks the server to backpropagate ``weight x loss`` at once, where
    ``weight`` is the micro-batch's share of the batch's loss (its target count over the batch's),
    and the reply brings the loss with the input gradients. The function returns the batch's
    loss; its backward only has the loss's gradient ``g`` to apply: the input gradients are
    ``g x`` the ones received, and one BACKWARD, not waited for, tells the server the same ``g``
    for its parameters' gradients (and carries the optimizer step). So the server never idles
    between a forward and its backward, and a training step makes one round trip fewer.
    """

    @staticmethod
    def forward(
        ctx: Any, runner: RemoteSegment, body: dict[str, Any], counts: torch.Tensor, hidden: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        chunks = counts.shape[0]
        ranges = _batch_ranges(hidden.shape[0], chunks) if chunks > 1 else [(0, hidden.shape[0])]
        call = runner.next_id()
        weights = counts.float() / counts.sum().float()
        fused = [{"call": call, "weight": weights[i]} for i in range(len(ranges))]
        ids, futures = _submit_micro_batches(runner, body, ranges, hidden, extra, fused)
        replies = [r.body for r in _await_replies(runner, ids, futures, call)]
        runner.outstanding.difference_update(ids)
        runner.outstanding.add(call)
        ctx.runner, ctx.call, ctx.many = runner, call, len(ranges) > 1
        _remember_inputs(ctx, hidden, extra)
        ctx.grad_input, ctx.extra_grads = _input_grads(ctx, replies, ctx.many)
        losses = _merge([r["loss"] for r in replies], hidden.device)
        return _weighted_mean(losses, counts) if ctx.many else losses

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        runner: RemoteSegment = ctx.runner
        runner.outstanding.discard(ctx.call)
        request: dict[str, Any] = {"id": ctx.call, "call": ctx.call,
                                   "scale": None if grad_loss is None else grad_loss.detach()}
        _take_pending_step(runner, request)
        runner.unconfirmed.append(runner.client.submit(MessageType.BACKWARD, request, step=runner.step))
        if grad_loss is None:
            return (None, None, None, None, *[None] * len(ctx.extra_grads))
        grads = (ctx.grad_input, *ctx.extra_grads)
        return (None, None, None, *[None if g is None else g * grad_loss.to(g.device, g.dtype) for g in grads])
