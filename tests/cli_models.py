"""Small models for the command-line tests; importable by the subprocess that unpickles them."""

from __future__ import annotations

import time

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


class OnePair(nn.Module):
    """A single foldable pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ReluBetween(nn.Module):
    """``bn(torch.relu(conv(x)))``: the norm stays, and its reason names ``torch.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


class NoExport(OnePair):
    """Folds and runs, but refuses to be exported to ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this model cannot be exported")
        return super().forward(x)


class ExportsSomethingElse(OnePair):
    """Computes something else while being exported, so the exported file gives other outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 + 1 if torch.onnx.is_in_onnx_export() else y


class Jittery(OnePair):
    """Every other call takes 20 ms longer: run times too spread out to trust."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 2:
            time.sleep(0.02)
        return super().forward(x)
