"""What a peer sends, checked on the host before any of it reaches the session or a kernel.

Why on the host: the wire hands the server CPU tensors, and an index out of range in a CUDA
kernel (a label past the vocabulary in the loss, a beam index in a cache reorder) is a
device-side assert, which leaves the process's CUDA context unusable: every tenant's session
would fail with it. A CPU comparison before the copy to the device costs little and fails
only the one request, with INVALID_ARGUMENT.

Why before the state: a request refused half-way must not leave its traces behind (gradients
added before a bad step number is noticed, a NaN in a trainable tail's weights), so everything
that can be checked from the request alone is checked before it is served (``check_request``);
what needs the session (its cached batch size, its number of classes) is checked by the session
with the functions below, still before the first change.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn as nn

from lightning_split.split.results import check_labels, in_range
from lightning_split.wire import MessageType

MAX_ID = 2**63 - 1  # micro-batch and call ids: what an int64 holds
# Step numbers: far beyond any training run, and every reply that echoes one still fits an int64
# (a step of 2**63 or more, which the header's uint64 can carry, could never be answered).
MAX_STEP = 2**62 - 1
MAX_COUNT = 2**31 - 1  # token counts, positions, top_k and the like
INDEX_DTYPES = (torch.int64, torch.int32)  # what index_select takes
POSITION_ARGUMENTS = ("position_ids", "cache_position")  # integer block arguments that index positions
AUTOCAST_DTYPES = ("bfloat16", "float16")  # the mixed precisions a forward may ask for
STEP_OPS = (None, "step")
OPTIMIZER_OPS = (*STEP_OPS, "grad_norm", "configure")


class SegmentError(ValueError):
    """A request this session cannot serve (bad ids, unknown options): INVALID_ARGUMENT."""


class CacheError(SegmentError):
    """The KV cache's length or memory limit: FAILED_PRECONDITION / RESOURCE_EXHAUSTED."""


# -- single values ------------------------------------------------------------------------------


def integer(value: Any, what: str, low: int = 0, high: int = MAX_ID) -> int:
    """``value`` as an int in ``[low, high]``: a Python int or a one-element integer tensor."""
    if isinstance(value, bool):
        raise SegmentError(f"{what} must be an integer, not a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise SegmentError(f"{what} must be an integer, not {type(value).__name__}") from None
    if not low <= n <= high:
        raise SegmentError(f"{what}={n} is out of range [{low}, {high}]")
    return n


def step_number(value: Any, what: str = "step") -> int:
    return integer(value, what, 0, MAX_STEP)


def number(value: Any, what: str, allow_nonfinite: bool, low: float | None = None) -> float:
    """``value`` as a float: a Python number or a one-element real tensor; finite (unless allowed)
    and at least ``low``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise SegmentError(f"{what} must be a real number, not a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SegmentError(f"{what} must be a number, not {type(value).__name__}")
    x = float(value)
    if not allow_nonfinite and not math.isfinite(x):
        raise SegmentError(f"{what} is not finite ({x})")
    if low is not None and x < low:
        raise SegmentError(f"{what}={x} is below {low}")
    return x


def finite(t: Any, what: str, allow_nonfinite: bool) -> torch.Tensor:
    """``t``, a tensor whose floating-point values are all finite (unless allowed): one NaN in an
    activation or a gradient would spread through every weight a trainable tail updates with it."""
    if not isinstance(t, torch.Tensor):
        raise SegmentError(f"{what} must be a tensor, not {type(t).__name__}")
    if not allow_nonfinite and (t.is_floating_point() or t.is_complex()) and not _all_finite(t):
        raise SegmentError(f"{what} holds NaN or infinite values")
    return t


# A float is NaN or infinite exactly when its exponent bits are all ones: its bits without the sign,
# read as an integer, are then at least the bits of infinity.
_INFINITY_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_CHUNK = 1 << 18  # values per pass: the masked copy stays in the cache


def _all_finite(t: torch.Tensor) -> bool:
    """Whether no value of ``t`` is NaN or infinite, in one read of its bits on the host.

    This runs on every activation and gradient a server receives, before anything is copied to the
    device, so it must cost little: numpy on the integer view, on the calling thread. A reduction
    in torch spreads over OpenMP threads that compete with the client's on a shared host: on the
    H200 host the float32 sum of a 2 x 1024 x 768 bf16 activation took ~4 ms of each FORWARD's
    handler (py-spy), the largest part of a same-host step's regression. Here: 0.2 ms on one core.
    Other dtypes (complex, 8-bit floats) and device tensors: one torch reduction."""
    if t.numel() == 0:
        return True
    bits = _INFINITY_BITS.get(t.dtype)
    if bits is not None and t.device.type == "cpu":
        int_dtype, infinity = bits
        values = t.contiguous().view(int_dtype).reshape(-1).numpy()
        magnitude = torch.iinfo(int_dtype).max  # every bit but the sign
        return all(int((values[i:i + _CHUNK] & magnitude).max()) < infinity for i in range(0, values.size, _CHUNK))
    total = t.sum(dtype=torch.float32) if t.is_floating_point() else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


# -- tensors the session checks against what it holds -------------------------------------------


def check_beam_idx(beam_idx: Any, batch: int) -> torch.Tensor:
    """A cache reorder: a 1-D int64/int32 index of at least one row, each row one of the ``batch``
    sequences held (``batch`` 0: none held, nothing is read, only the form is checked)."""
    if not isinstance(beam_idx, torch.Tensor) or beam_idx.dtype not in INDEX_DTYPES:
        raise SegmentError("beam_idx must be an int64 (or int32) tensor")
    if beam_idx.dim() != 1 or not 1 <= beam_idx.shape[0] <= MAX_COUNT:
        raise SegmentError(f"beam_idx must be 1-D and not empty, not of shape {tuple(beam_idx.shape)}")
    if batch:
        in_range(beam_idx, "beam_idx", 0, batch)
    return beam_idx


def output_classes(module: nn.Module) -> int | None:
    """The width of the segment's output (logits): the last linear layer's, None if it has none."""
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else None


def embedding_rows(module: nn.Module) -> int | None:
    """Rows of the segment's first embedding, which an integer hidden state would index."""
    return next((m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)), None)


# -- one request, on its own --------------------------------------------------------------------


def check_request(kind: int, body: dict[str, Any], step: int, allow_nonfinite: bool) -> None:
    """Everything that can be checked from the request alone, before any of it is served."""
    if kind in (MessageType.FORWARD, MessageType.INFER):
        _check_forward(body, allow_nonfinite)
    elif kind == MessageType.BACKWARD:
        _check_backward(body, allow_nonfinite)
    elif kind == MessageType.OPTIMIZER_STEP:
        op = body.get("op")
        if op not in OPTIMIZER_OPS:
            raise SegmentError(f"unknown OPTIMIZER_STEP op {op!r}; one of {OPTIMIZER_OPS}")
        if op in STEP_OPS:
            step_number(step)
            _check_step_options(body, allow_nonfinite)
    elif kind == MessageType.CACHE and body.get("op") == "reorder":
        check_beam_idx(body.get("beam_idx"), 0)


def _check_forward(body: dict[str, Any], allow_nonfinite: bool) -> None:
    finite(body.get("hidden"), "the hidden state", allow_nonfinite)
    grad_inputs = body.get("grad_inputs") or []
    if not isinstance(grad_inputs, (list, tuple)):
        raise SegmentError("grad_inputs must be a list of tensors")
    for i, t in enumerate(grad_inputs):
        finite(t, f"grad input {i}", allow_nonfinite)
    if body.get("id") is not None:
        integer(body["id"], "micro-batch id")
    fused = body.get("fused")
    if fused is not None:
        if not isinstance(fused, dict):
            raise SegmentError("fused must be a dict with the call id and the loss weight")
        integer(fused.get("call"), "fused call id")
        number(fused.get("weight"), "a fused call's loss weight", allow_nonfinite)
    if body.get("labels") is not None:
        check_labels(body["labels"], None)
    if body.get("autocast") not in (None, *AUTOCAST_DTYPES):
        raise SegmentError(f"autocast dtype {body['autocast']!r} is not one of {AUTOCAST_DTYPES}")
    for key in ("top_k", "logits_to_keep", "keep_last"):
        if body.get(key) is not None:
            integer(body[key], key, 0, MAX_COUNT)
    cache = body.get("cache")
    if cache is not None:
        if not isinstance(cache, dict):
            raise SegmentError("cache must be a dict with past, new and an optional reorder and crop")
        integer(cache.get("past"), "cache past", 0, MAX_COUNT)
        if cache.get("new") is not None:
            integer(cache["new"], "cache new", 0, MAX_COUNT)
        if cache.get("reorder") is not None:
            check_beam_idx(cache["reorder"], 0)
        if cache.get("crop") is not None and not isinstance(cache["crop"], bool):
            raise SegmentError("cache crop must be a bool")
    kwargs = body.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SegmentError("kwargs must be a dict")
    for name in POSITION_ARGUMENTS:
        _check_positions(kwargs.get(name), name)


def _check_positions(value: Any, name: str) -> None:
    """Position ids a block may index with (rotary tables, cache slots, flash attention's sequence
    starts): never negative."""
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        in_range(value, name, 0, MAX_COUNT)


def _check_backward(body: dict[str, Any], allow_nonfinite: bool) -> None:
    if body.get("call") is not None:
        integer(body["call"], "fused call id")
        if body.get("scale") is not None:
            number(body["scale"], "a fused call's scale", allow_nonfinite)
    else:
        integer(body.get("id"), "micro-batch id")
        grads = body.get("grads") or {}
        if not isinstance(grads, dict):
            raise SegmentError("grads must be a dict of output name to gradient")
        for name, g in grads.items():
            finite(g, f"the gradient for {name!r}", allow_nonfinite)
    then = body.get("then_step")
    if then is not None:
        if not isinstance(then, dict):
            raise SegmentError("then_step must be a dict with the step number")
        step_number(then.get("step"), "then_step step")
        _check_step_options(then, allow_nonfinite)


def _check_step_options(body: dict[str, Any], allow_nonfinite: bool) -> None:
    if body.get("lr") is not None:
        number(body["lr"], "the learning rate", allow_nonfinite, low=0.0)
    if body.get("clip_coef") is not None:
        number(body["clip_coef"], "the clipping coefficient", allow_nonfinite, low=0.0)
