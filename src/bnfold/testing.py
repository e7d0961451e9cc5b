"""Helpers for testing folding on models with random weights.

A freshly built model has BatchNorm statistics mean 0, variance 1, weight 1 and
bias 0, for which folding is trivially exact; :func:`randomize_norms` gives the
norms realistic statistics so that a wrong fold shows up in the outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .rules import third_party as compat

__all__ = ["randomize_norms"]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer (and layer scale) random statistics and affine parameters, in place:
    running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1);
    layer scales (parameters named ``gamma`` or ``layer_scale``) ~ U(0.5, 1.5). Returns the model.

    >>> m = randomize_norms(nn.BatchNorm2d(3))
    >>> bool((m.running_var >= 0.5).all())
    True
    """
    g = torch.Generator().manual_seed(seed)
    frozen = compat.frozen_batchnorm_types() + compat.frozen_norm_act_types()

    def fill(t: torch.Tensor, values: torch.Tensor) -> None:
        t.copy_(values.to(dtype=t.dtype, device=t.device))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] in ("gamma", "layer_scale"):
                fill(p, torch.rand(p.shape, generator=g) + 0.5)
        for m in model.modules():
            if not isinstance(m, (_NormBase, *frozen)):
                continue
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                fill(mean, torch.randn(mean.shape, generator=g) * 0.1)
                fill(var, torch.rand(var.shape, generator=g) * 1.5 + 0.5)
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor):
                fill(weight, torch.rand(weight.shape, generator=g) + 0.5)
                fill(bias, torch.randn(bias.shape, generator=g) * 0.1)
    return model
