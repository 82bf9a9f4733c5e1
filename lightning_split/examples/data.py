"""Synthetic token data for language-model examples (no download)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset


def random_token_loaders(
    vocab_size: int = 512, seq_len: int = 64, batch_size: int = 8, n_train: int = 512, n_val: int = 64, seed: int = 0
) -> tuple[Any, Any]:
    """Sequences with a learnable pattern (each token predicts the next: t+1 mod vocab, with noise)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (n_train + n_val, 1), generator=g)
    ids = (start + torch.arange(seq_len)) % vocab_size
    noise = torch.rand(ids.shape, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, vocab_size, ids.shape, generator=g), ids)
    train = TensorDataset(ids[:n_train])
    val = TensorDataset(ids[n_train:])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)
