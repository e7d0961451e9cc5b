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


def _scaled_input_f64(w: Tensor, s: Tensor, layout: Layout, groups: int) -> Tensor:
    """``w`` (float64) with input feature ``i`` multiplied by ``s[i]``.

    A Linear whose input is a flattened (C, *spatial) map has ``C * r`` input features for ``C`` scales:
    feature ``f`` belongs to channel ``f // r``.
    """
    kernel = (1,) * (w.dim() - 2)
    if layout == "linear":
        repeat = w.shape[1] // s.numel()
        return w * s.repeat_interleave(repeat).reshape(1, -1)
    if layout == "conv_transpose":
        return w * s.reshape(-1, 1, *kernel)
    # (out, in/groups, *k): input channel = group * (in/groups) + i, for the outputs of that group
    grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    return (grouped * s.reshape(groups, 1, w.shape[1], *kernel)).reshape(w.shape)


def _per_output_sum_f64(w: Tensor, layout: Layout, groups: int) -> Tensor:
    """Sum a (scaled) weight over everything but its output channels: the response to a constant input."""
    if layout == "conv_transpose":
        grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        dims = (1, *range(3, grouped.dim()))
        return grouped.sum(dim=dims).reshape(-1)
    return w.reshape(w.shape[0], -1).sum(dim=1)


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
    w = weight.detach().to(device)
    factor = _channel_factor(w.shape, _f64(scale, device), layout, groups, axis)
    factor = factor.reshape(*factor.shape, *([1] * (w.dim() - 2)))
    target = out.detach() if out is not None and out.device == device else None
    result = target if target is not None else torch.empty(w.shape, dtype=w.dtype, device=device)
    # on an accelerator one pass is faster than many small ones
    step = max(1, _CHUNK // max(1, w[0].numel())) if device.type == "cpu" else max(1, w.shape[0])
    buffer = torch.empty((min(step, w.shape[0]), *w.shape[1:]), dtype=torch.float64, device=device)
    for i in range(0, w.shape[0], step):
        n = min(step, w.shape[0] - i)
        part = buffer[:n]
        # the product of the weight's values (widened exactly) and the factor, in float64, in one pass
        torch.mul(w[i : i + n], factor if factor.shape[0] == 1 else factor[i : i + n], out=part)
        result[i : i + n].copy_(part)
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
    scaled = _scaled_input_f64(_f64(weight, device), _f64(shift, device), layout, groups)
    return _per_output_sum_f64(scaled, layout, groups)


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
