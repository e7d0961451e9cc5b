"""The folding arithmetic: pure tensor functions, no modules.

A norm in inference mode is the per-channel affine map ``y = scale * x + shift``
with ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.
Folding it into the layer that produces ``x`` (backward folding) multiplies the
layer's weight along its output-channel axis by ``scale`` and maps its bias to
``bias * scale + shift``.

Folding it into the layer that reads ``y`` (forward folding) scales the layer's
weight along its input channels and adds the layer's response to ``shift`` to
its bias.

Everything is computed in float64 and cast back to the dtype and device of the
tensor it replaces, so folding adds one rounding per weight, not one per step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Layout",
    "affine_from_stats",
    "scale_output_channels",
    "scale_input_channels",
    "input_shift_response",
    "fold_bias",
]

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
    >>> scale.tolist() == [1.0, 1.0] and shift.tolist() == [0.0, 0.0]
    True
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


def _check_layout(layout: str) -> None:
    if layout not in ("conv", "conv_transpose", "linear"):
        raise ValueError(f"unknown weight layout {layout!r}; expected 'conv', 'conv_transpose' or 'linear'")


# Elements per float64 temporary when scaling a weight on the CPU: small enough to stay in cache, so that scaling
# costs about one read and one write of the weight instead of several passes over float64 copies of it.
_CHUNK = 1 << 16


def _channel_factor(shape: torch.Size, s: Tensor, layout: Layout, groups: int, axis: str) -> Tensor:
    """The float64 factor each element of a weight of ``shape`` is multiplied by, as a matrix over its first two
    axes (one row when every row gets the same factor, one column when every column does)."""
    rows, cols = shape[0], shape[1]
    if axis == "output":
        if layout == "conv_transpose":
            # (in, out/groups, *k): output channel group * (out/groups) + j, for the inputs of that group
            return s.reshape(groups, 1, cols).expand(groups, rows // groups, cols).reshape(rows, cols)
        return s.reshape(rows, 1)
    if layout == "linear":
        # a Linear reading a flattened (C, *spatial) map: feature f belongs to channel f // (features / C)
        return s.repeat_interleave(cols // s.numel()).reshape(1, cols)
    if layout == "conv_transpose":
        return s.reshape(rows, 1)
    # (out, in/groups, *k): input channel group * (in/groups) + i, for the outputs of that group
    return s.reshape(groups, 1, cols).expand(groups, rows // groups, cols).reshape(rows, cols)


def _scaled(weight: Tensor, scale: Tensor, layout: Layout, groups: int, axis: str, out: Tensor | None) -> Tensor:
    """``weight`` times its channel factor, each element computed in float64 and rounded once to its dtype;
    written into ``out`` when given (``weight`` itself included: each chunk is read before it is written)."""
    _check_layout(layout)
    device = _work_device(weight)
    w = weight.detach() if weight.device == device else weight.detach().to(device)
    factor = _channel_factor(w.shape, _f64(scale, device), layout, groups, axis)
    factor = factor.reshape(*factor.shape, *([1] * (w.dim() - 2)))
    target = out.detach() if out is not None and out.device == device else None
    result = target if target is not None else torch.empty(w.shape, dtype=w.dtype, device=device)
    # on an accelerator one pass is faster than many small ones
    rows = w.shape[0]
    step = max(1, _CHUNK // max(1, math.prod(w.shape[1:]))) if device.type == "cpu" else max(1, rows)
    buffer = torch.empty((min(step, rows), *w.shape[1:]), dtype=torch.float64, device=device)
    # widen the weight's values exactly, multiply in float64, round once: three vectorized passes in cache
    # (faster than one mixed-dtype multiply)
    if step >= rows:  # one chunk
        result.copy_(buffer.copy_(w).mul_(factor))
    else:
        sources, dests = w.split(step), result.split(step)
        factors = [factor] * len(sources) if factor.shape[0] == 1 else factor.split(step)
        for source, f, dest in zip(sources, factors, dests, strict=True):
            part = buffer if source.shape[0] == buffer.shape[0] else buffer[: source.shape[0]]
            dest.copy_(part.copy_(source).mul_(f))
    if out is not None and target is None:
        out.detach().copy_(result)
        return out
    return result if target is not None else result.to(weight.device)


def scale_output_channels(
    weight: Tensor, scale: Tensor, layout: Layout, groups: int = 1, out: Tensor | None = None
) -> Tensor:
    """Return ``weight`` with each output channel multiplied by ``scale`` (float64 math, weight's dtype), in
    ``out`` when given (it may be ``weight`` itself).

    >>> w = torch.ones(3, 2)
    >>> scale_output_channels(w, torch.tensor([1.0, 2.0, 3.0]), "linear")[:, 0].tolist()
    [1.0, 2.0, 3.0]
    """
    return _scaled(weight, scale, layout, groups, "output", out)


def scale_input_channels(
    weight: Tensor, scale: Tensor, layout: Layout, groups: int = 1, out: Tensor | None = None
) -> Tensor:
    """Return ``weight`` with each input channel multiplied by ``scale`` (float64 math, weight's dtype), in
    ``out`` when given (it may be ``weight`` itself).

    >>> w = torch.ones(1, 4)
    >>> scale_input_channels(w, torch.tensor([1.0, 2.0]), "linear").tolist()  # 2 channels x 2 positions
    [[1.0, 1.0, 2.0, 2.0]]
    """
    return _scaled(weight, scale, layout, groups, "input", out)


def input_shift_response(weight: Tensor, shift: Tensor, layout: Layout, groups: int = 1) -> Tensor:
    """The float64 per-output-channel response of the layer (without bias) to the constant input ``shift``.

    >>> input_shift_response(torch.ones(2, 3), torch.tensor([1.0, 2.0, 3.0]), "linear").tolist()
    [6.0, 6.0]
    """
    _check_layout(layout)
    device = _work_device(weight)
    w, s = _f64(weight, device), _f64(shift, device)
    # sum each (output, input) pair's kernel first: a matrix over the first two axes, then one product per group
    # (a Linear reading a flattened (C, *spatial) map: feature f belongs to channel f // (features / C))
    cols = s.numel() if layout == "linear" else w.shape[1]
    pairs = w.reshape(w.shape[0], cols, -1)
    pairs = pairs[:, :, 0] if pairs.shape[2] == 1 else pairs.sum(2)
    rows = pairs.shape[0]
    if layout == "conv_transpose":  # (in, out/groups): the inputs of each group feed its outputs
        per_group = pairs.reshape(groups, rows // groups, cols).transpose(1, 2)
    else:  # (out, in/groups): the outputs of each group read its inputs
        per_group = pairs.reshape(groups, rows // groups, cols)
    return torch.bmm(per_group, s.reshape(groups, -1, 1)).reshape(-1)


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
