"""A session's weights: the model owner's shared segment, a trainable copy, or LoRA adapters; its optimizer.

Tail modes:

* ``frozen``: every session shares the model owner's segment; only input gradients flow back.
* ``trainable``: the session trains its own copy of the segment with its own optimizer.
* ``lora``: the session trains LoRA adapters (``peft``) over the shared, frozen base weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from lightning_split.server.checks import SegmentError
from lightning_split.split.surgery import ServerSegment

TAIL_MODES = ("frozen", "trainable", "lora")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


def check_tail(tail: Any) -> dict[str, Any]:
    """The client's ``tail`` option (from its hello), checked for its form before anything is built."""
    tail = {"mode": "frozen"} if tail is None else tail
    if not isinstance(tail, dict):
        raise SegmentError(f"the tail option must be a dict, not {type(tail).__name__}")
    for key in ("lora", "optimizer"):
        if tail.get(key) is not None and not isinstance(tail[key], dict):
            raise SegmentError(f"tail.{key} must be a dict, not {type(tail[key]).__name__}")
    return dict(tail)


def make_optimizer(params: list[nn.Parameter], spec: dict[str, Any]) -> torch.optim.Optimizer:
    if spec is not None and not isinstance(spec, dict):
        raise SegmentError(f"an optimizer is a dict of its name and options, not {type(spec).__name__}")
    spec = dict(spec or {"name": "SGD", "lr": 1e-3})
    name = spec.pop("name", "SGD")
    if name not in OPTIMIZERS:
        raise SegmentError(f"optimizer {name!r} is not offered; choose one of {OPTIMIZERS}")
    allowed = {"lr", "momentum", "weight_decay", "betas", "eps", "nesterov", "dampening", "alpha",
               "amsgrad", "foreach", "maximize"}
    bad = set(spec) - allowed
    if bad:
        raise SegmentError(f"optimizer options {sorted(bad)} are not accepted")
    try:
        if "betas" in spec:
            spec["betas"] = tuple(spec["betas"])
        return getattr(torch.optim, name)(params, **spec)
    except (TypeError, ValueError) as e:  # options of the wrong type or out of range (a negative lr...)
        raise SegmentError(f"optimizer {name}: {e}") from None


MAX_LORA_RANK = 1024  # far above any useful rank; bounds what one hello can ask the server to build


def lora_config(base: nn.Module, lora: dict[str, Any]) -> Any:
    """The client's LoRA options as a ``peft.LoraConfig``, each checked for type and range."""
    from peft import LoraConfig

    modules = lora.get("target_modules")
    if not modules or not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
        raise SegmentError("lora.target_modules must be a non-empty list of module names")
    r, alpha, dropout = lora.get("r", 8), lora.get("alpha", 16), lora.get("dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_LORA_RANK:
        raise SegmentError(f"lora.r must be an integer from 1 to {MAX_LORA_RANK}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise SegmentError("lora.alpha must be a positive number")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise SegmentError("lora.dropout must be a number in [0, 1)")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(modules))


def lora_targets(base: nn.Module, config: Any) -> list[nn.Module]:
    """The segment's modules that ``config`` puts adapters on, found the way ``peft`` finds them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return [m for name, m in base.named_modules() if name and check_target_module_exists(config, name)]


def _lora_segment(base: ServerSegment, config: Any) -> ServerSegment:
    """A copy of the segment that shares the base weights, with LoRA adapters injected."""
    from peft import inject_adapter_in_model

    shared = {id(p): p for p in base.parameters()}
    shared.update({id(b): b for b in base.buffers()})
    segment = copy.deepcopy(base, memo=shared)
    try:
        return inject_adapter_in_model(config, segment)
    except ValueError as e:  # a matched module peft cannot adapt
        raise SegmentError(f"lora: {e}") from None


def session_weights(base: ServerSegment, tail: dict[str, Any]) -> tuple[ServerSegment, list[nn.Parameter]]:
    """(the module the session runs, the parameters it trains) for its tail mode."""
    mode = tail.get("mode", "frozen")
    if mode not in TAIL_MODES:
        raise SegmentError(f"tail mode {mode!r} is not one of {TAIL_MODES}")
    if mode == "frozen":
        return base, []
    if mode == "trainable":
        module = copy.deepcopy(base)
        trainable = list(module.parameters())
    else:
        module = _lora_segment(base, lora_config(base, tail.get("lora") or {}))
        trainable = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    return module, trainable
