"""The models the benchmark measures: torchvision, timm and Hugging Face transformers architectures with
random weights and randomized norm statistics, a fastai-built model, and models torch.fx cannot trace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bnfold.cli.zoo import build_named_model
from bnfold.testing import randomize_norms


@dataclass(frozen=True)
class BenchModel:
    name: str
    build: Callable[[], nn.Module]
    size: int = 224
    frames: int | None = None  # video models take (N, C, frames, H, W)


def _named(spec: str) -> Callable[[], nn.Module]:
    """A builder for a torchvision:/timm: architecture, built as the bnfold command builds it."""
    return lambda: build_named_model(spec).model


def _torchvision(name: str) -> Callable[[], nn.Module]:
    return _named(f"torchvision:{name}")


def _timm(name: str) -> Callable[[], nn.Module]:
    return _named(f"timm:{name}")


def _hf_resnet50() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig())  # the default configuration is ResNet-50


def _fastai_resnet34() -> nn.Module:
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet34

    return create_vision_model(resnet34, 10, pretrained=False)


class BranchyNet(nn.Module):
    """A hand-written model with data-dependent control flow (torch.fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()) for _ in range(6)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(32), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            y = block(x)
            x = y + x if y.mean() > -1e9 else y  # decided by the data
        return self.head(x.mean((2, 3), keepdim=True))


ZOO: list[BenchModel] = [
    BenchModel("tv/resnet18", _torchvision("resnet18")),
    BenchModel("tv/resnet50", _torchvision("resnet50")),
    BenchModel("tv/mobilenet_v2", _torchvision("mobilenet_v2")),
    BenchModel("tv/mobilenet_v3_large", _torchvision("mobilenet_v3_large")),
    BenchModel("tv/efficientnet_b0", _torchvision("efficientnet_b0")),
    BenchModel("tv/regnet_y_400mf", _torchvision("regnet_y_400mf")),
    BenchModel("tv/densenet121", _torchvision("densenet121")),
    BenchModel("tv/googlenet", _torchvision("googlenet")),
    BenchModel("tv/inception_v3", _torchvision("inception_v3"), 299),
    BenchModel("tv/shufflenet_v2_x1_0", _torchvision("shufflenet_v2_x1_0")),
    BenchModel("tv/vgg11_bn", _torchvision("vgg11_bn")),
    BenchModel("tv/convnext_tiny", _torchvision("convnext_tiny")),
    BenchModel("timm/efficientnet_b0", _timm("efficientnet_b0")),
    BenchModel("timm/tf_efficientnet_b0", _timm("tf_efficientnet_b0")),
    BenchModel("timm/cspresnet50", _timm("cspresnet50")),
    BenchModel("timm/repvgg_a0", _timm("repvgg_a0")),
    BenchModel("timm/rexnet_100", _timm("rexnet_100")),
    # a Conv3d subclass (Conv3DSimple) throughout
    BenchModel("tv/r3d_18", _torchvision("r3d_18"), 64, frames=4),
    # Linear + BatchNorm1d over flatten(0, 1) of the tokens
    BenchModel("timm/levit_128s", _timm("levit_128s")),
    BenchModel("hf/resnet50", _hf_resnet50),
    BenchModel("fastai/resnet34", _fastai_resnet34),
    BenchModel("custom/branchy", BranchyNet),
]

QUICK = ["tv/resnet18", "timm/efficientnet_b0", "custom/branchy"]


def build(entry: BenchModel, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(entry.build(), seed).eval()


def by_name(name: str) -> BenchModel:
    for entry in ZOO + SCALING:
        if entry.name == name:
            return entry
    raise KeyError(name)


class NestedStack(nn.Module):
    """``depth`` conv-bn-relu blocks, each nested inside the previous one (deep module nesting)."""

    def __init__(self, depth: int, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.inner = NestedStack(depth - 1, width) if depth > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.relu(self.bn(self.conv(x))))


def _nested(depth: int) -> Callable[[], nn.Module]:
    return lambda: NestedStack(depth)


SCALING_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
SCALING_DEPTHS = [8, 16, 32, 64, 128]
SCALING: list[BenchModel] = [BenchModel(f"tv/{n}", _torchvision(n), 64) for n in SCALING_RESNETS] + [
    BenchModel(f"nested/{d}", _nested(d), 16) for d in SCALING_DEPTHS
]


def input_for(entry: BenchModel) -> torch.Tensor:
    channels = 16 if entry.name.startswith("nested/") else 3
    frames = () if entry.frames is None else (entry.frames,)
    return torch.randn(1, channels, *frames, entry.size, entry.size, generator=torch.Generator().manual_seed(1))
