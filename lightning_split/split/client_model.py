"""The client's side of a split model: building it, and the two-part forward.

``make_client_model`` turns the server's description of a split (model config, split, shipped
weights) into the client's part: the skeleton is built on the meta device, cut exactly as the
server cut its copy, then filled with the shipped tensors. Only the client's tensors ever exist.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.shipping import load_part
from lightning_split.split.spec import ResolvedSplit, SplitSpec
from lightning_split.split.surgery import HandOff, SegmentProxy, cut_model

RESULT_TYPES = ("logits", "hidden_states", "loss", "topk")


class SplitOutput(dict):
    """What a two-part split model returns: a dict with attribute access, like HF's ModelOutput."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            if name in ("loss", "logits", "hidden_states", "topk_ids", "topk_scores", "last_hidden_state"):
                return None
            raise AttributeError(name) from None


def build_client_skeleton(source: ModelSource, spec: SplitSpec) -> tuple[nn.Module, SegmentProxy, ResolvedSplit]:
    """The client part as a meta-device skeleton, cut like the server's (the segment is dropped)."""
    skeleton = build_model(source, device="meta")
    split = spec.resolve(skeleton)
    cut = cut_model(skeleton, split)
    del cut.segment  # the server's blocks were never materialised; let them go
    if split.shape == "two_part":
        install_two_part_forward(skeleton, cut.proxy)
    elif split.end == split.num_blocks:  # nothing after the server's blocks mixes positions
        install_keep_last_forward(skeleton, cut.proxy)
    return skeleton, cut.proxy, split


def materialise(skeleton: nn.Module, weights: bytes, sha256: str, device: str | torch.device = "cpu") -> nn.Module:
    """Load shipped weights into a skeleton; no meta tensor may remain."""
    load_part(skeleton, weights, sha256, device=device)
    left = [n for n, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"tensors left without values after loading: {left[:5]}")
    return skeleton


def install_two_part_forward(model: nn.Module, proxy: SegmentProxy) -> None:
    """Make ``model(...)`` of a two-part split return the server's result.

    ``labels`` travel with the instruction (the server computes the loss), ``result=`` names the
    result type (default: the loss alone when labels are given, else the logits; ``"topk"`` with
    ``top_k=k`` gives the last position's k best token ids and scores), and
    ``logits_to_keep`` (which Hugging Face's ``generate`` passes) tells the server to run the
    output layer on the last positions only. With ``proxy.decode_top_k = k`` such a one-position
    step asks for the k best logits only and rebuilds the row around them (``_sparse_logits``).
    The model's own forward runs until the proxy hands off. A Hugging Face model gets a
    ``CausalLMOutputWithPast`` carrying the client's KV cache, so ``model.generate()`` works
    unchanged; a plain module gets its one result tensor.
    """
    if getattr(model, "_split_original_forward", None) is not None:
        return
    original = model.forward
    model._split_original_forward = original
    hf_model = hasattr(model, "config")

    @functools.wraps(original)
    def forward(
        *args: Any, labels: torch.Tensor | None = None, result: str | None = None, logits_to_keep: int = 0,
        top_k: int = 0, **kwargs: Any,
    ) -> Any:
        sparse = hf_model and proxy.decode_top_k > 0 and labels is None and result is None and logits_to_keep == 1
        if sparse:  # a generation step: the k best logits stand for the whole row (see below)
            result, top_k = "topk", proxy.decode_top_k
        proxy.extra = {"labels": labels, "result": result, "logits_to_keep": int(logits_to_keep), "top_k": int(top_k)}
        try:
            original(*args, **kwargs)
        except HandOff as handoff:
            out = handoff.result
            if sparse:
                out = {"logits": _sparse_logits(out["topk_scores"], out["topk_ids"], model.config.vocab_size)}
            return _two_part_output(out, hf_model, proxy.last_cache)
        finally:
            proxy.extra = {}
        raise RuntimeError("the split model's forward never reached its server segment")

    model.forward = forward


def install_keep_last_forward(model: nn.Module, proxy: SegmentProxy) -> None:
    """U-shape generation: the server returns only the positions the client's output layer reads.

    Hugging Face's ``generate`` asks a causal LM for the last position's logits only
    (``logits_to_keep=1``). Then the server's hidden state comes back for those positions alone
    (a prompt of T tokens: 1/T of the bytes) and the proxy puts them in place in a zero-filled
    state of the full length, whose other positions nothing reads. Only where the server's blocks
    are the model's last (the client's final norm and output layer work position by position), and
    not with ``output_hidden_states`` or ``labels``, which read every position.
    """
    import inspect

    original = model.forward
    if (getattr(model, "_split_original_forward", None) is not None or not hasattr(model, "config")
            or "logits_to_keep" not in inspect.signature(original).parameters):
        return
    model._split_original_forward = original

    @functools.wraps(original)
    def forward(*args: Any, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
        every_position = (kwargs.get("labels") is not None or kwargs.get("output_hidden_states")
                          or getattr(model.config, "output_hidden_states", False))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0 and not every_position:
            proxy.extra = {"keep_last": logits_to_keep}
        try:
            return original(*args, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            proxy.extra = {}

    model.forward = forward


def _sparse_logits(scores: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """A (batch, 1, vocab) logits row that is -inf but for the k best tokens.

    Greedy decoding picks the same token from it, and sampling with ``top_k <= k`` draws from the
    same distribution (Hugging Face filters everything else to -inf anyway): exact tokens for a
    fraction of the bytes (k x 12 bytes a row instead of vocab x 2 or 4).
    """
    logits = torch.full((scores.shape[0], vocab), float("-inf"), dtype=scores.dtype, device=scores.device)
    return logits.scatter_(1, ids, scores).unsqueeze(1)


def _two_part_output(result: dict[str, Any], hf_model: bool, cache: Any) -> Any:
    if not hf_model:
        if len(result) == 1:  # a plain nn.Module returned a tensor locally: do the same
            return next(iter(result.values()))
        return SplitOutput(result)
    if set(result) <= {"logits", "loss"}:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=result.get("loss"), logits=result.get("logits"), cache=cache)
    return SplitOutput(result, cache=cache)
