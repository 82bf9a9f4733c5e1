"""Small models for examples, the demo and tests: importable by both sides as ``module:factory``."""

from __future__ import annotations

import torch
import torch.nn as nn


def mlp(in_features: int = 64, hidden: int = 128, depth: int = 4, out_features: int = 10) -> nn.Sequential:
    """A plain ``nn.Sequential`` MLP: Linear+GELU blocks, then a classifier layer."""
    layers: list[nn.Module] = [nn.Sequential(nn.Linear(in_features, hidden), nn.GELU())]
    layers += [nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth - 1)]
    layers.append(nn.Linear(hidden, out_features))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ff(self.norm(x))
        return x + (y * scale if scale is not None else y)


class TinyResNet(nn.Module):
    """A user's own module with a block list whose blocks take an extra tensor argument."""

    def __init__(self, in_features: int = 32, width: int = 64, depth: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList([ResidualBlock(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        scale = torch.sigmoid(x.mean(dim=-1, keepdim=True))  # reaches every block as an argument
        for block in self.blocks:
            h = block(h, scale=scale)
        return self.head(self.norm(h))


def tiny_resnet(**kwargs: int) -> TinyResNet:
    return TinyResNet(**kwargs)
