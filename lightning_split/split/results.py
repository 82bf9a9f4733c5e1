"""The result output instruction: what the server's segment returns for a two-part split.

Shared by the in-process runner and the server runtime so both give the same answers.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_split.split.surgery import ServerSegment


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
    if result is None:
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
        out["loss"] = segment.loss(logits, labels)
    if result == "topk":
        k = top_k or 1
        scores, ids = torch.topk(logits[..., -1, :].float(), k, dim=-1)
        out["topk_scores"], out["topk_ids"] = scores, ids
    elif result not in ("logits", "loss"):
        raise ValueError(f"unknown result type {result!r}")
    return out


def segment_reply(segment: ServerSegment, out: torch.Tensor, body: dict[str, Any],
                  device: torch.device) -> dict[str, Any]:
    """The reply to one request: what its result instruction asks of the segment's output ``out``.

    A U-shaped middle (no ``result``) sends its hidden state back as it is, or only its last
    ``keep_last`` positions (all that generation's output layer reads on the client)."""
    if "result" not in body:
        keep = int(body.get("keep_last") or 0)
        if not 0 <= keep <= (out.shape[-2] if out.dim() >= 2 else 0):
            raise ValueError(f"keep_last={keep} is not within the output's {tuple(out.shape)} positions")
        return {"output": out[..., -keep:, :] if keep > 0 else out}
    labels = body.get("labels")
    labels = None if labels is None else labels.to(device, non_blocking=True)
    return segment_results(segment, out, body.get("result"), labels,
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
