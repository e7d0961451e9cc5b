"""Small models for the command-line tests; importable by the subprocess that unpickles them."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Two foldable pairs, a residual pair that must stay, and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.head_bn = nn.BatchNorm1d(4)
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for bn in (self.stem_bn, self.bn, self.head_bn):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = self.conv(x)
        x = self.bn(y) + y  # the conv output is also used directly: this norm stays
        x = x.mean((2, 3))
        return self.norm(self.head_bn(self.head(x)))


class Amplifier(nn.Module):
    """A foldable pair followed by a step that turns float rounding into large output differences."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            self.bn.running_mean.copy_(torch.randn(8, generator=g))
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.bn(self.conv(x)) * 1e6)
