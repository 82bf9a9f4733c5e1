"""Error feedback for tensors sent lossy: what quantisation dropped is carried into the next send.

A gradient sent as int8 (or bf16) loses its small components every step, and always the same way:
a bias that plain quantisation never repays. With error feedback (Seide et al. 2014, "1-bit SGD";
Karimireddy et al. 2019, "EF-SGD"), the sender keeps the residual ``r = x - Q(x)`` of each send
and adds it to the next tensor of the same slot before quantising it, so that over steps what
arrives sums to what was meant. Slots are the sender's: here, a gradient's place in a training
step (the k-th micro-batch's gradient of a given name), whose shape stays the same from step to
step; a slot whose shape changes starts again from no residual.

The residual is computed with the codec's own lossy stage on the tensor's device
(``lossy_roundtrip``): exactly what the receiver will decode, at the cost of one extra
quantise-dequantise on the sender's GPU.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from .compression import CompressionConfig, lossy_roundtrip


class ErrorFeedback:
    """Residuals of one sender's lossy sends, by slot."""

    def __init__(self) -> None:
        self._residual: dict[Hashable, torch.Tensor] = {}

    def compensate(self, slot: Hashable, t: torch.Tensor, cfg: CompressionConfig) -> torch.Tensor:
        """The tensor to send in ``t``'s place: ``t`` plus the slot's residual; the new residual
        (what ``cfg``'s lossy stage will drop of it) is kept for the slot's next send."""
        if cfg.lossy == "none" or not cfg.error_feedback or not t.is_floating_point():
            return t
        t = t.detach()
        residual = self._residual.get(slot)
        if residual is not None and residual.shape == t.shape and residual.device == t.device:
            t = t + residual.to(t.dtype)
        sent = lossy_roundtrip(t, cfg)
        self._residual[slot] = (t.float() - sent.float()) if sent is not t else torch.zeros_like(t, dtype=torch.float32)
        return t

    def reset(self) -> None:
        self._residual.clear()

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self._residual.values())


class StepFeedback(ErrorFeedback):
    """Error feedback whose slots are numbered by arrival within a training step: the k-th
    gradient reply of a step has slot k (a step's micro-batches come in the same order each step)."""

    def __init__(self) -> None:
        super().__init__()
        self._step: int | None = None
        self._count = 0

    def next_slot(self, step: int) -> int:
        if step != self._step:
            self._step, self._count = step, 0
        self._count += 1
        return self._count - 1
