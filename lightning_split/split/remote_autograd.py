"""The remote segment's autograd: micro-batches in flight through the server's blocks.

``RemoteForward`` is the general case (FORWARD now, BACKWARD with the outputs' gradients when
autograd gets there); ``RemoteLossStep`` the loss-only two-part call whose server backpropagates
with its forward. Both cut a batch into micro-batches whose requests are all submitted before
the first reply is awaited, so that the server computes one while the next is on the wire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_split.split.surgery import map_leaves
from lightning_split.wire import MessageType

if TYPE_CHECKING:
    from lightning_split.split.remote import RemoteSegment

# Loss-only calls whose BACKWARD has not come yet, at most, per session: the server keeps each
# one's parameter gradients apart (server/call_grads.py). A client with that many pending runs
# its next call unfused (a model called many times before one backward).
MAX_PENDING_LOSS_STEPS = 4


def weighted_mean(losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    counts = counts.to(losses.device, losses.dtype)
    return (losses * counts).sum() / counts.sum()


def batch_ranges(batch: int, chunks: int, ramp: bool = False) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of the batch, as equal as possible (like torch.tensor_split);
    at least one, so that an empty batch is still one (empty) request.

    ``ramp`` (3 chunks or more): the first and the last range are half the size of the others. The
    first micro-batch's transfer and the last one's reply are the parts of a pipelined step
    that nothing overlaps; the middle ones travel while the server computes."""
    if ramp and chunks >= 3:  # in half units: 1, 2, ..., 2, 1; each bound rounded to the nearest row
        total, cums = 2 * (chunks - 1), [0, *range(1, 2 * chunks - 2, 2), 2 * (chunks - 1)]
        bounds = [(2 * batch * c + total) // (2 * total) for c in cums]
    else:
        bounds = [batch * i // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a] or [(0, batch)]


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
                runner.client.request(MessageType.BACKWARD, {"call": call, "scale": None}, step=runner.step)
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
        # A fused call's reply brings the input gradients, a plain one the segment's outputs.
        futures.append(runner.submit(MessageType.FORWARD, request, "activations",
                                     "gradients" if fused is not None else "activations"))
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


class RemoteForward(torch.autograd.Function):
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
        ranges = runner.micro_ranges(hidden.shape[0], chunks)
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
        for hook in runner.gradient_hooks:  # per-example gradients of the whole batch, before the cut (privacy/)
            grads = tuple(g if g is None or key in ctx.stacked or not g.is_floating_point() else hook(g)
                          for key, g in zip(ctx.keys, grads, strict=True))
        futures = []
        for i, (micro_id, (start, stop)) in enumerate(zip(ctx.ids, ctx.ranges, strict=True)):
            payload = {}
            for key, grad in zip(ctx.keys, grads, strict=True):
                if grad is not None:
                    # Scalars (the loss) were stacked, one per micro-batch; the rest concatenated.
                    part = (grad[i] if key in ctx.stacked else grad[start:stop]) if many else grad
                    # Sent lossy: with the residual of this slot's last send (error feedback).
                    payload[key] = runner.feedback.compensate((i, key), part, runner.sending("gradients"))
            request: dict[str, Any] = {"id": micro_id, "grads": payload}
            runner.outstanding.discard(micro_id)
            if i == len(ctx.ranges) - 1:
                _take_pending_step(runner, request)
            futures.append(runner.submit(MessageType.BACKWARD, request, "gradients", "gradients"))
        grad_input, extra_grads = _input_grads(ctx, [f.result().body for f in futures], many)
        return (None, None, None, grad_input, *extra_grads)


class RemoteLossStep(torch.autograd.Function):
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
        ranges = runner.micro_ranges(hidden.shape[0], counts.shape[0])
        call = runner.next_id()
        weights = counts.float() / counts.sum().float()
        fused = [{"call": call, "weight": weights[i]} for i in range(len(ranges))]
        ids, futures = _submit_micro_batches(runner, body, ranges, hidden, extra, fused)
        replies = [r.body for r in _await_replies(runner, ids, futures, call)]
        runner.outstanding.difference_update(ids)
        runner.outstanding.add(call)
        runner.pending_loss_steps.add(call)
        ctx.runner, ctx.call, ctx.many = runner, call, len(ranges) > 1
        _remember_inputs(ctx, hidden, extra)
        ctx.grad_input, ctx.extra_grads = _input_grads(ctx, replies, ctx.many)
        losses = _merge([r["loss"] for r in replies], hidden.device)
        return weighted_mean(losses, counts) if ctx.many else losses

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        runner: RemoteSegment = ctx.runner
        runner.outstanding.discard(ctx.call)
        runner.pending_loss_steps.discard(ctx.call)
        request: dict[str, Any] = {"call": ctx.call, "scale": None if grad_loss is None else grad_loss.detach()}
        _take_pending_step(runner, request)
        runner.unconfirmed.append(runner.client.submit(MessageType.BACKWARD, request, step=runner.step))
        if grad_loss is None:
            return (None, None, None, None, *[None] * len(ctx.extra_grads))
        grads = (ctx.grad_input, *ctx.extra_grads)
        return (None, None, None, *[None if g is None else g * grad_loss.to(g.device, g.dtype) for g in grads])
