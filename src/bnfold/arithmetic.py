"""The folding arithmetic: pure tensor functions, no modules.

A norm in inference mode is the per-channel affine map ``y = scale * x + shift``
with ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.
Folding it into the layer that produces ``x`` (backward folding) multiplies the
layer's weight along its output-channel axis by ``scale`` and maps its bias to
``bias * scale + shift``.

Everything is computed in float64 and cast back to the dtype and device of the
tensor it replaces, so folding adds one rounding per weight, not one per step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Layout", "affine_from_stats", "scale_output_channels", "fold_bias", "fold_backward"]

#: How a producer stores its weight: ``conv`` is ``(out, in/groups, *kernel)``,
#: ``conv_transpose`` is ``(in, out/groups, *kernel)``, ``linear`` is ``(out, in)``.
Layout = Literal["conv", "conv_transpose", "linear"]


def _work_device(t: Tensor) -> torch.device:
    # float64 is not available on every accelerator (MPS); the CPU always has it.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _f64(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def affine_from_stats(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Return the float64 ``(scale, shift)`` of a norm that uses fixed statistics.

    ``weight``/``bias`` are ``None`` for a norm without affine parameters.

    >>> scale, shift = affine_from_stats(torch.zeros(2), torch.ones(2), None, None, 0.0)
    >>> scale.tolist(), shift.tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    device = _work_device(running_mean)
    mean = _f64(running_mean, device)
    var = _f64(running_var, device)
    scale = torch.rsqrt(var + float(eps))
    if weight is not None:
        scale = scale * _f64(weight, device)
    shift = -mean * scale
    if bias is not None:
        shift = shift + _f64(bias, device)
    return scale, shift


def _output_axis_shape(layout: Layout, weight_shape: torch.Size, groups: int) -> tuple[int, ...]:
    """The shape that ``scale`` takes to broadcast along the output channels of a grouped weight view."""
    kernel = (1,) * (len(weight_shape) - 2)
    if layout == "conv":
        return (-1, 1, *kernel)
    if layout == "conv_transpose":
        return (groups, 1, weight_shape[1], *kernel)
    if layout == "linear":
        return (-1, 1)
    raise ValueError(f"unknown weight layout {layout!r}; expected 'conv', 'conv_transpose' or 'linear'")


def scale_output_channels(weight: Tensor, scale: Tensor, layout: Layout, groups: int = 1) -> Tensor:
    """Return ``weight`` with each output channel multiplied by ``scale`` (float64 math, weight's dtype).

    >>> w = torch.ones(3, 2)
    >>> scale_output_channels(w, torch.tensor([1.0, 2.0, 3.0]), "linear")[:, 0].tolist()
    [1.0, 2.0, 3.0]
    """
    device = _work_device(weight)
    w = _f64(weight, device)
    s = _f64(scale, device)
    shape = _output_axis_shape(layout, weight.shape, groups)
    if layout == "conv_transpose":
        in_channels = weight.shape[0]
        grouped = w.reshape(groups, in_channels // groups, *weight.shape[1:])
        out = (grouped * s.reshape(shape)).reshape(weight.shape)
    else:
        out = w * s.reshape(shape)
    return out.to(device=weight.device, dtype=weight.dtype)


def fold_bias(bias: Tensor | None, scale: Tensor, shift: Tensor, like: Tensor) -> Tensor:
    """Return ``bias * scale + shift`` (a missing bias counts as zero), in the dtype and device of ``like``.

    >>> fold_bias(None, torch.ones(2), torch.tensor([0.5, 1.0]), torch.zeros(1)).tolist()
    [0.5, 1.0]
    """
    device = _work_device(like)
    s = _f64(scale, device)
    out = _f64(shift, device).clone()
    if bias is not None:
        out = out + _f64(bias, device) * s
    return out.to(device=like.device, dtype=like.dtype)


def fold_backward(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    layout: Layout,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y = scale * layer(x) + shift`` into the layer's ``(weight, bias)``.

    >>> w, b = fold_backward(torch.ones(2, 1), None, torch.tensor([2.0, 3.0]), torch.ones(2), "linear")
    >>> w.flatten().tolist(), b.tolist()
    ([2.0, 3.0], [1.0, 1.0])
    """
    return scale_output_channels(weight, scale, layout, groups), fold_bias(bias, scale, shift, weight)
