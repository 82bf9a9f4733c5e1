"""LightningModules for the demo, examples and tests. The same code runs locally and split.

Each takes ``model=None`` under SplitStrategy (the client's part arrives from the server) or a
whole model for a local run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F


class Classifier(L.LightningModule):
    """Cross-entropy classification; the loss stays on the client (U-shape) or the server returns logits."""

    def __init__(self, model: nn.Module | None = None, lr: float = 0.05, optimizer: str = "SGD") -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.optimizer_name)(self.parameters(), lr=self.lr)


class CausalLM(L.LightningModule):
    """Next-token training of a Hugging Face causal LM; ``model(input_ids, labels=...)`` gives the loss."""

    def __init__(self, model: nn.Module | None = None, lr: float = 1e-3, optimizer: str = "AdamW") -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.optimizer_name)(self.parameters(), lr=self.lr)


def digits_loaders(batch_size: int = 32, shuffle: bool = False) -> tuple[Any, Any]:
    """scikit-learn's bundled digits (8x8 images, 10 classes; no download), train/validation split."""
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train = TensorDataset(x[:1500], y[:1500])
    val = TensorDataset(x[1500:], y[1500:])
    return DataLoader(train, batch_size=batch_size, shuffle=shuffle), DataLoader(val, batch_size=256)
