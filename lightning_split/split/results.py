"""The result output instruction: what the server's segment returns for a two-part split.

Shared by the in-process runner and the server runtime so both give the same answers.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_split.split.surgery import IGNORE_INDEX, ServerSegment

LABEL_DTYPES = (torch.int64, torch.uint8)  # the class-index dtypes cross-entropy takes


def in_range(t: torch.Tensor, what: str, low: int, high: int, also: int | None = None) -> None:
    """Every value of the integer tensor ``t`` lies in ``[low, high)`` (or equals ``also``); else ValueError.

    On the server ``t`` is a CPU tensor from the wire: an index out of range that reached a CUDA
    kernel would be a device-side assert, fatal to every session of the process."""
    if not t.numel():
        return
    # numpy's elementwise ops cost a fraction of torch's on the few values a decode step sends
    values = t.numpy() if t.device.type == "cpu" and not t.requires_grad else t
    ok = (values >= low) & (values < high)
    if also is not None:
        ok |= values == also
    if not bool(ok.all()):
        bad = values[~ok].flatten()[0].item()
        allowed = f"[{low}, {high})" + (f" or {also}" if also is not None else "")
        raise ValueError(f"{what} holds {bad}, outside {allowed}")


def check_labels(labels: object, classes: int | None = None, shape: tuple[int, ...] | None = None) -> None:
    """Class indices the loss takes: int64 (or uint8), of the logits' ``shape`` without the class
    dimension, each in ``[0, classes)`` or the ignored -100; else ValueError.

    Only tensors on the CPU have their values checked (the server's arrive so); tensors already on
    a device are the server's own buffers (a training graph's), filled from checked ones."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in LABEL_DTYPES:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be int64 class indices, not {kind}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the logits' {tuple(shape)}")
    if classes is not None and labels.device.type == "cpu":
        in_range(labels, "labels", 0, classes, also=IGNORE_INDEX)


def segment_results(
    segment: ServerSegment,
    hidden: torch.Tensor,
    result: str | None = None,
    labels: torch.Tensor | None = None,
    top_k: int = 0,
    logits_to_keep: int = 0,
) -> dict[str, Any]:
    """Run the tail after the blocks and keep only what the instruction asks for.

    With labels and no explicit result type the answer is the loss alone: a training step needs
    nothing else, and the logits (batch x sequence x vocabulary) would dwarf every other transfer.

    ``logits_to_keep > 0`` runs the output layer on the last positions only (generation needs the
    last one): a prefill of T tokens then returns one row of logits, not T.
    """
    if result in (None, "auto"):
        result = "loss" if labels is not None else "logits"
    if result == "hidden_states":
        return {"hidden_states": hidden}
    if logits_to_keep > 0 and labels is None:
        hidden = hidden[..., -logits_to_keep:, :]
    logits = segment.head(hidden)
    out: dict[str, Any] = {}
    if result == "logits":
        out["logits"] = logits
    if labels is not None or result == "loss":
        if labels is None:
            raise ValueError("result type 'loss' needs labels")
        check_labels(labels, logits.shape[-1], logits.shape[:-1])  # shapes: no sync on a device
        out["loss"] = segment.loss(logits, labels)
    if result == "topk":
        k = top_k or 1
        if not 0 < k <= logits.shape[-1]:
            raise ValueError(f"top_k={top_k} is not within the {logits.shape[-1]} classes")
        scores, ids = torch.topk(logits[..., -1, :].float(), k, dim=-1)
        out["topk_scores"], out["topk_ids"] = scores, ids
    elif result not in ("logits", "loss"):
        raise ValueError(f"unknown result type {result!r}")
    return out


def segment_reply(segment: ServerSegment, out: torch.Tensor, body: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request: what its result instruction asks of the segment's output ``out``.

    A U-shaped middle (no ``result``) sends its hidden state back as it is, or only its last
    ``keep_last`` positions (all that generation's output layer reads on the client)."""
    if "result" not in body:
        keep = int(body.get("keep_last") or 0)
        if not 0 <= keep <= (out.shape[-2] if out.dim() >= 2 else 0):
            raise ValueError(f"keep_last={keep} is not within the output's {tuple(out.shape)} positions")
        return {"output": out[..., -keep:, :] if keep > 0 else out}
    # The labels stay where they are (on the server, on the CPU) until the loss has checked them.
    return segment_results(segment, out, body.get("result"), body.get("labels"),
                           int(body.get("top_k", 0)), int(body.get("logits_to_keep", 0)))


class LocalRunner:
    """Runs a ServerSegment in-process: the reference semantics of the remote runner."""

    def __init__(self, segment: ServerSegment, proxy: Any) -> None:
        self.segment = segment
        self.proxy = proxy

    def __call__(self, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
        out = self.segment(hidden, args, kwargs)
        if not self.proxy.hand_off:
            return out
        extra = self.proxy.extra
        return segment_results(
            self.segment, out, extra.get("result"), extra.get("labels"), 0, extra.get("logits_to_keep", 0)
        )
