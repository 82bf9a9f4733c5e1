"""The remote segment: a SegmentProxy's runner that talks to the server over the channel.

In training (autograd on), the call is an ``autograd.Function``: its forward sends the hidden
state and the block arguments (FORWARD) and returns the server's outputs; its backward sends the
outputs' gradients (BACKWARD) and returns the gradient of the hidden state. When the server's
result is the loss alone (a two-part split given labels), the server backpropagates at once and
the input gradients come back with the loss (``RemoteLossStep``; both functions are in
``remote_autograd.py``): one round trip per
micro-batch instead of two. Without autograd it is one INFER round trip, which also drives the
server's KV cache during generation.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_split.channel.replies import body_bytes
from lightning_split.split import prefill
from lightning_split.split.adaptive import AdaptiveCompression
from lightning_split.split.block_args import to_neutral
from lightning_split.split.decode_stats import DecodeLog
from lightning_split.split.remote_autograd import (
    MAX_PENDING_LOSS_STEPS,
    RemoteForward,
    RemoteLossStep,
    batch_ranges,
    weighted_mean,
)
from lightning_split.split.surgery import SegmentProxy, map_leaves
from lightning_split.wire import CompressionConfig, MessageType
from lightning_split.wire.error_feedback import ErrorFeedback
from lightning_split.wire.markers import KV_CACHE, GradInputRef


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
                return GradInputRef(len(differentiable) - 1)
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
    # How many, for a fused loss step (the server replays a CUDA graph per micro-batch shape on a
    # GPU). Measured on an H200 host (GPT-2 small and medium, 8 x 1024, bf16): 4 ramped
    # micro-batches (1, 3, 3, 1 rows) took 81.6 and 159 ms per step; 4 equal ones 85.9 and 164; 2
    # equal ones 88.2 and 165; 5 and 6 ramped ones 83.5-86.7 and 168.
    PIPELINE_CHUNKS_FUSED = 4
    # Otherwise (a FORWARD and a BACKWARD per micro-batch, eager on the server): 2 beat 4 and 8,
    # whose extra kernel launches on the server cost more than the transfers they hide (GPT-2
    # small, same host, before the graphs).
    PIPELINE_CHUNKS = 2
    # Either kind, over a slow link (``AdaptiveCompression.slow_link``): the pipeline fills and drains
    # one micro-batch's transfer at each end, which more of them make shorter (figures in adaptive.py).
    PIPELINE_CHUNKS_SLOW_LINK = 8

    def __init__(self, client: Any, proxy: SegmentProxy, cut: int, causal_lm: bool = False,
                 micro_batches: int | None = None) -> None:
        self.client = client
        self.proxy = proxy
        self.cut = cut
        self.causal_lm = causal_lm
        self.micro_batches = micro_batches  # None: automatic (PIPELINE_*); 1: never cut
        self.fuse_loss_backward = True  # loss-only calls: the server backpropagates with its forward
        # Half-size first and last micro-batches (batch_ranges): less of the step waits for transfers.
        self.ramp_micro_batches = True
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
        self.pending_loss_steps: set[int] = set()  # fused call ids among them
        self._ids = itertools.count()
        # Gradients sent lossy carry what quantisation dropped into the next step (error_feedback.py).
        self.feedback = ErrorFeedback()
        # compression="auto": each request's encoding and its reply's, revised from the steps (adaptive.py).
        self.adaptive: AdaptiveCompression | None = None
        self.decode_log = DecodeLog()  # the cached calls of the sequence being generated (decode_stats.py)
        # A prompt's hidden state larger than this goes in chunks in flight together (prefill.py);
        # None: whole. open_split sets it for a server on another host.
        self.prefill_chunk_bytes: int | None = None
        self._observed_step: int | None = None
        self._keys: tuple[str, ...] = ()
        # What leaves for the server, seen (and changed) on the client first, in list order, with
        # autograd: the hidden state of every call, and each output gradient of a BACKWARD.
        # lightning_split/privacy/ puts its defenses first (noise, label protection) and its
        # report's tap last, so the tap sees what the server receives.
        self.send_hooks: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self.gradient_hooks: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def __call__(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        for hook in self.send_hooks:
            hidden = hook(hidden)
        args, kwargs, cache, differentiable = wire_arguments(args, kwargs)
        extra = self.proxy.extra
        body: dict[str, Any] = {"block": to_neutral(self.proxy.signature, args, kwargs),
                                "training": self.proxy.training}
        if torch.is_autocast_enabled(hidden.device.type):
            # The server runs its blocks under the same mixed precision as the client's forward.
            body["autocast"] = str(torch.get_autocast_dtype(hidden.device.type)).removeprefix("torch.")
        if self.proxy.hand_off:
            body["result"] = extra.get("result") or "auto"  # the loss with labels, else logits
            body["labels"] = extra.get("labels")
            body["top_k"] = int(extra.get("top_k", 0))
            body["logits_to_keep"] = int(extra.get("logits_to_keep", 0))
        self.proxy.last_cache = cache
        if torch.is_grad_enabled():
            self.confirm(wait=False)
            fuse = self._may_fuse(body, hidden.shape[0] if hidden.dim() >= 1 else 1)
            chunks = self._chunks_for(hidden, fuse)
            if fuse:
                counts = self._target_counts(body["labels"], chunks)
                return self._unpack({"loss": RemoteLossStep.apply(self, body, counts, hidden, *differentiable)})
            outputs = RemoteForward.apply(self, body, chunks, hidden, *differentiable)
            result = dict(zip(self._keys, outputs, strict=True))
            if "loss" in result and result["loss"].dim() == 1:
                result["loss"] = self._combine_losses(result["loss"], body.get("labels"), chunks)
            return self._unpack(result)
        body["hidden"] = hidden
        if cache is not None and kwargs.get("use_cache", True):
            body["cache"] = self._cache_info(cache, hidden)
            _mask_keys_held(body["block"], body["cache"])
        keep = int(extra.get("keep_last", 0)) if not self.proxy.hand_off else 0
        if 0 < keep < hidden.shape[-2]:
            body["keep_last"] = keep
        chunks = prefill.plan(body, self.prefill_chunk_bytes)
        if chunks:  # a long prompt: its chunks in flight together (prefill.py)
            futures = [self.client.submit(MessageType.INFER, chunk) for chunk in chunks]
            replied = prefill.join(chunks, [f.result().body for f in futures], body)
        else:
            replied = self.client.request(MessageType.INFER, body).body
        out = {k: v.to(hidden.device, non_blocking=True) for k, v in replied.items()}
        if body.get("keep_last"):  # the last positions only: in place in a full-length state
            last = out["output"]
            out["output"] = last.new_zeros((*hidden.shape[:-1], last.shape[-1]))
            out["output"][..., -keep:, :] = last
        return self._unpack(out)

    def _chunks_for(self, hidden: torch.Tensor, fused: bool) -> int:
        batch = hidden.shape[0] if hidden.dim() >= 1 else 1
        if self.micro_batches is not None:
            return max(1, min(self.micro_batches, batch))
        if hidden.numel() * hidden.element_size() < self.PIPELINE_MIN_BYTES:
            return 1
        chunks = self.PIPELINE_CHUNKS_FUSED if fused else self.PIPELINE_CHUNKS
        if self.adaptive is not None and self.adaptive.slow_link:
            chunks = max(chunks, self.PIPELINE_CHUNKS_SLOW_LINK)
        return max(1, min(chunks, batch))

    def micro_ranges(self, batch: int, chunks: int) -> list[tuple[int, int]]:
        """The micro-batches' row ranges: ramped (half-size first and last) if ``ramp_micro_batches``."""
        return batch_ranges(batch, chunks, self.ramp_micro_batches)

    def _combine_losses(self, losses: torch.Tensor, labels: torch.Tensor | None, chunks: int) -> torch.Tensor:
        """The batch's mean loss from the micro-batches' means, weighted by their counted targets."""
        if labels is None:
            return losses.mean()
        return weighted_mean(losses, self._target_counts(labels, chunks))

    def _target_counts(self, labels: torch.Tensor, chunks: int) -> torch.Tensor:
        """Each micro-batch's number of targets the loss averages over (labels not -100)."""
        targets = labels[..., 1:] if self.causal_lm else labels
        return torch.stack([(targets[a:b] != -100).sum() for a, b in self.micro_ranges(labels.shape[0], chunks)])

    def _may_fuse(self, body: dict[str, Any], batch: int) -> bool:
        """Whether this call may be fused (``RemoteLossStep``): a two-part call with labels whose
        result is the loss alone (Hugging Face's default with labels), cut into micro-batches along
        the labels' batch dimension."""
        labels = body.get("labels")
        return (self.fuse_loss_backward and self.proxy.hand_off and body.get("result") in (None, "auto", "loss")
                and isinstance(labels, torch.Tensor) and labels.dim() >= 1 and labels.shape[0] == batch
                and len(self.pending_loss_steps) < MAX_PENDING_LOSS_STEPS)

    def confirm(self, wait: bool = True) -> None:
        """Check the fused calls' BACKWARD replies: a server error there raises here. ``wait=False``
        checks only the replies that came (the rest stay for the next check): the client need not
        wait for the server's step before its next forward, which the server queues behind it."""
        while self.unconfirmed and (wait or self.unconfirmed[0].done()):
            self.unconfirmed.pop(0).result()

    def _cache_info(self, cache: Any, hidden: torch.Tensor) -> dict[str, Any]:
        if self.cut == 0:
            raise RuntimeError("KV-cached generation needs at least one client block before the cut (cut >= 1)")
        self._follow_reorders(cache)
        new = hidden.shape[1]
        # The client's own layers already stored this call's tokens: the rest is the past.
        info: dict[str, Any] = {"past": int(cache.get_seq_length()) - new, "new": new}
        # Speculative decoding crops the client's cache to the verified tokens (Hugging Face's
        # assisted generation); the server's, which held every drafted token, follows.
        if 0 < info["past"] < getattr(cache, "_split_server_tokens", 0):
            info["crop"] = True
        cache._split_server_tokens = info["past"] + new
        self.decode_log.record(info["past"], new)
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

    def submit(self, kind: int, request: dict[str, Any], sends: str, reply: str) -> Any:
        """Submit a training request that sends ``sends`` (activations or gradients) and gets
        ``reply``; with adaptive compression, in the encodings chosen now, and measured."""
        if self.adaptive is None:
            return self.client.submit(kind, request, step=self.step)
        sent_at, raw = time.perf_counter(), body_bytes(request)
        first = self._observed_step != self.step
        self._observed_step = self.step
        if first and self.adaptive.wants_sample():  # int8 or fp8 for this kind: measured on what it sends
            floats = [t for t in request.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if floats:
                self.adaptive.sample(sends, max(floats, key=torch.Tensor.numel))
        future = self.client.submit(kind, request, step=self.step, **self.adaptive.options(sends, reply))

        def observe(f: Any) -> None:
            if f.exception() is None:
                msg = f.result()
                self.adaptive.record(sends, raw, reply, msg.raw_bytes, msg.wire_bytes, time.perf_counter() - sent_at,
                                     msg.server_us / 1e6, first)

        future.add_done_callback(observe)
        return future

    def sending(self, kind: str) -> CompressionConfig:
        """How a tensor of ``kind`` goes to the server now (the residual of error feedback needs it)."""
        return self.adaptive.config(kind) if self.adaptive is not None else self.client.sending

    def next_id(self) -> int:
        return next(self._ids)

    def remember_keys(self, keys: tuple[str, ...]) -> None:
        self._keys = keys


def _mask_keys_held(block: dict[str, Any], info: dict[str, Any]) -> None:
    """A client generating on Hugging Face's static cache (``cache_implementation="static"``) masks
    keys up to the cache's capacity; the server's cache holds the sequence's ``past + new`` tokens.
    The columns after them stand for slots not filled yet, masked anyway: they are left out."""
    mask = block.get("attention_mask")
    held = int(info["past"]) + int(info["new"])
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] > held:
        block["attention_mask"] = mask[..., :held]
