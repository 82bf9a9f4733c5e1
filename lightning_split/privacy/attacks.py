"""The attacks the report runs: inverting the cut's activations, and inferring labels from gradients.

* Inversion (what the server could do with the activations it receives): a decoder trained on
  pairs (activation, input) that the server can make itself, from public data it owns run through
  the client's part (it shipped that part; the report uses the client's part as the run ends: the
  worst case) and through the same defenses (an attacker trained on undefended activations would
  overstate a defense). Text: per-position token classification, scored by token accuracy and
  ROUGE-L; other inputs: regression, scored by mean squared error.
* Label leakage (what the side without the labels learns from per-example gradients): the norm
  attack (the rarer class's examples get larger gradients) and the direction attack (an example's
  gradient points the way of others of its class: cosine with one known positive's gradient),
  each scored by ROC AUC (0.5: chance, 1: every label), Li et al., "Label Leakage and Protection in
  Two-party Split Learning", ICLR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """ROC AUC of ``scores`` for the boolean ``positive`` (Mann-Whitney: ties count a half); None
    without both classes."""
    scores, positive = scores.detach().double().flatten().cpu(), positive.bool().flatten().cpu()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for value in scores.unique()[torch.unique(scores, return_counts=True)[1] > 1]:  # average tied ranks
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rouge_l(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Mean ROUGE-L F-measure over rows of token ids (torchmetrics' LCS-based ROUGE-L on the ids
    written as words: the text's own tokens, whatever its tokenizer)."""
    from torchmetrics.functional.text.rouge import rouge_score

    words = lambda row: " ".join(f"t{int(t)}" for t in row)  # noqa: E731
    preds = [words(r) for r in predicted.reshape(-1, predicted.shape[-1])]
    targets = [words(r) for r in target.reshape(-1, target.shape[-1])]
    scores = rouge_score(preds, targets, rouge_keys="rougeL", accumulate="avg",
                         normalizer=lambda s: s, tokenizer=str.split)
    return float(scores["rougeL_fmeasure"])


class Decoder(nn.Module):
    """The inversion attacker: activation vector -> token logits (or input values), per position."""

    def __init__(self, width: int, outputs: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, outputs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class InversionResult:
    kind: str  # "text" or "inputs"
    metrics: dict[str, float]
    train_losses: list[float] = field(default_factory=list)


def _rows(activations: torch.Tensor, targets: torch.Tensor, text: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One training row per token (text: (B, T, d) with (B, T) ids), or per example (flattened)."""
    if text:
        return activations.reshape(-1, activations.shape[-1]).float(), targets.reshape(-1)
    return activations.reshape(len(activations), -1).float(), targets.reshape(len(targets), -1).float()


def train_inversion(public_h: torch.Tensor, public_x: torch.Tensor, text: bool, classes: int | None = None,
                    steps: int = 300, batch: int = 256, lr: float = 2e-3, hidden: int = 256, seed: int = 0,
                    device: str | torch.device = "cpu") -> tuple[Decoder, list[float]]:
    """Train a decoder from ``public_h`` (activations) to ``public_x`` (token ids, or input values)."""
    rows, targets = _rows(public_h, public_x, text)
    outputs = int(classes or int(targets.max()) + 1) if text else targets.shape[1]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = Decoder(rows.shape[1], outputs, hidden).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    rows, targets = rows.to(device), targets.to(device)
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(rows), (min(batch, len(rows)),), generator=g).to(device)
        out = decoder(rows[pick])
        loss = F.cross_entropy(out, targets[pick]) if text else F.mse_loss(out, targets[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return decoder.eval(), losses


@torch.no_grad()
def score_inversion(decoder: Decoder, held_h: torch.Tensor, held_x: torch.Tensor, text: bool,
                    public_x: torch.Tensor) -> dict[str, float]:
    """The decoder on the client's held-out activations, with the baseline of an attacker who only
    knows the public data (the most frequent token, or the mean input)."""
    device = next(decoder.parameters()).device
    rows, targets = _rows(held_h, held_x, text)
    out = torch.cat([decoder(rows[i:i + 4096].to(device)).cpu() for i in range(0, len(rows), 4096)])
    if text:
        guess = out.argmax(-1)
        common = torch.bincount(public_x.flatten()).argmax()
        seq = held_x.shape[-1]
        return {"token_accuracy": float((guess == targets).float().mean()),
                "rouge_l": rouge_l(guess.view(-1, seq), held_x.reshape(-1, seq)),
                "chance_token_accuracy": float((targets == common).float().mean()),
                "chance_rouge_l": rouge_l(torch.full_like(held_x.reshape(-1, seq), int(common)),
                                          held_x.reshape(-1, seq))}
    mse = float(F.mse_loss(out, targets))
    mean = public_x.reshape(len(public_x), -1).float().mean(0)
    baseline = float(F.mse_loss(mean.expand_as(targets), targets))
    return {"reconstruction_mse": mse, "baseline_mse": baseline, "relative_mse": mse / max(baseline, 1e-12)}


def invert(public_h: torch.Tensor, public_x: torch.Tensor, held_h: torch.Tensor, held_x: torch.Tensor,
           classes: int | None = None, **train_kw: Any) -> InversionResult:
    """Train the attacker on public pairs and score it on the client's held-out pairs."""
    text = not public_x.is_floating_point()
    decoder, losses = train_inversion(public_h, public_x, text, classes, **train_kw)
    metrics = score_inversion(decoder, held_h, held_x, text, public_x)
    return InversionResult("text" if text else "inputs", metrics, losses)


# -- label leakage ------------------------------------------------------------------------------

def per_example(grads: torch.Tensor) -> torch.Tensor:
    return grads.detach().reshape(grads.shape[0], -1).double()


def norm_scores(grads: torch.Tensor) -> torch.Tensor:
    """The norm attack's score: each example's gradient norm."""
    return per_example(grads).norm(dim=1)


def cosine_scores(grads: torch.Tensor, reference: int) -> torch.Tensor:
    """The direction attack's score: cosine similarity with the gradient of a known positive."""
    g = per_example(grads)
    return F.cosine_similarity(g, g[reference : reference + 1], dim=1)


class LabelLeakage:
    """Per-batch AUCs of the norm and direction attacks, accumulated over a run (Li et al. score
    batch by batch: a gradient's scale drifts as training goes, a batch's examples share one)."""

    def __init__(self) -> None:
        self.norm_aucs: list[float] = []
        self.cosine_aucs: list[float] = []
        self.examples = 0

    def add(self, grads: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: ``grads`` (batch first) and its binary labels (1: the positive class)."""
        labels = labels.detach().flatten().cpu()
        if grads.shape[0] != labels.shape[0] or not bool(((labels == 0) | (labels == 1)).all()):
            return  # not per-example gradients of a binary task: nothing to score
        positive = labels == 1
        self.examples += len(labels)
        value = auc(norm_scores(grads), positive)
        if value is not None:
            self.norm_aucs.append(value)
        ref = int(positive.nonzero()[0]) if positive.any() else None
        if ref is not None:
            rest = torch.arange(len(labels)) != ref
            value = auc(cosine_scores(grads, ref)[rest], positive[rest])
            if value is not None:
                self.cosine_aucs.append(value)

    def result(self) -> dict[str, Any] | None:
        if not self.norm_aucs and not self.cosine_aucs:
            return None
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        norm = mean(self.norm_aucs)
        # The attacker knows which way the norm points (the rarer class's gradients are larger):
        # the better of the two orientations, decided once over the run, not per batch.
        return {"norm_auc": None if norm is None else max(norm, 1 - norm), "cosine_auc": mean(self.cosine_aucs),
                "batches": len(self.norm_aucs), "examples": self.examples}
