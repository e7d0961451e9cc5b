"""The arithmetic of cross-layer equalization: pure tensor functions, no modules.

For channels that flow from a producer layer to its consumers through ops that commute with a positive
per-channel scale (ReLU, max pooling, ...), dividing the producer's output channel ``i`` by ``s_i`` and
multiplying the consumers' input channel ``i`` by ``s_i`` computes the same function. With ``r1``, the
producer's per-output-channel weight range, and ``r2``, the consumers' per-input-channel range,
``s = sqrt(r1 * r2) / r2`` makes both ranges ``sqrt(r1 * r2)`` (Nagel et al., Data-Free Quantization, 2019).

The channel of each weight element follows the same layouts as folding (:mod:`.fold_arithmetic`): a Conv's
weight is ``(out, in/groups, *kernel)``, a ConvTranspose's ``(in, out/groups, *kernel)``, a Linear's
``(out, in)`` (a Linear reading a flattened ``(C, *spatial)`` map gives each channel a block of features).
Ranges are computed in float64, and quantization is measured as the signal-to-quantization-noise ratio of
symmetric 8-bit weights with one scale per tensor, the format many runtimes and accelerators support.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fold_arithmetic import Layout

__all__ = [
    "output_channel_ranges",
    "input_channel_ranges",
    "equalizing_scales",
    "range_spread",
    "per_tensor_sqnr",
]


def _abs64(weight: Tensor) -> Tensor:
    return weight.detach().to(dtype=torch.float64).abs()


def output_channel_ranges(weight: Tensor, layout: Layout, groups: int = 1) -> Tensor:
    """The largest ``|w|`` of each output channel, float64.

    >>> output_channel_ranges(torch.tensor([[1.0, -3.0], [0.5, 0.25]]), "linear").tolist()
    [3.0, 0.5]
    """
    w = _abs64(weight)
    if layout == "conv_transpose":
        # (in, out/groups, *k): output channel g * (out/groups) + j reads inputs of group g only
        per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
        return per_group.amax(dim=(1, 3)).reshape(-1)
    return w.reshape(w.shape[0], -1).amax(dim=1)


def input_channel_ranges(weight: Tensor, layout: Layout, groups: int = 1, channels: int | None = None) -> Tensor:
    """The largest ``|w|`` over the weights that read each input channel, float64. ``channels``: for a Linear
    reading a flattened ``(C, *spatial)`` map, ``C`` (each channel is a block of ``in / C`` features).

    >>> input_channel_ranges(torch.tensor([[1.0, -3.0], [0.5, 0.25]]), "linear").tolist()
    [1.0, 3.0]
    """
    w = _abs64(weight)
    if layout == "linear":
        per_feature = w.amax(dim=0)
        count = per_feature.numel() if channels is None else channels
        return per_feature.reshape(count, -1).amax(dim=1)
    if layout == "conv_transpose":
        return w.reshape(w.shape[0], -1).amax(dim=1)
    # (out, in/groups, *k): input channel g * (in/groups) + i feeds the outputs of group g only
    per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
    return per_group.amax(dim=(1, 3)).reshape(-1)


def equalizing_scales(producer: Tensor, consumers: Tensor) -> Tensor:
    """``s = sqrt(r1 * r2) / r2`` per channel (``r1``: the producer's ranges, ``r2``: the consumers'): after
    dividing the producer's channel by ``s`` and multiplying the consumers' by ``s``, both ranges are
    ``sqrt(r1 * r2)``. A channel with a zero or non-finite range on either side keeps ``s = 1``.

    >>> equalizing_scales(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0])).tolist()
    [2.0, 1.0]
    """
    r1, r2 = producer.to(torch.float64), consumers.to(torch.float64)
    s = torch.sqrt(r1 * r2) / r2
    usable = (r1 > 0) & (r2 > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(usable, s, torch.ones_like(s))


def range_spread(ranges: Tensor) -> float:
    """How far apart a layer's per-channel ranges are: largest over smallest non-zero (1 when all equal;
    ``inf`` when there is none).

    >>> range_spread(torch.tensor([0.5, 2.0, 0.0]))
    4.0
    """
    nonzero = ranges[ranges > 0]
    if nonzero.numel() == 0:
        return math.inf
    return float(nonzero.max() / nonzero.min())


def per_tensor_sqnr(weight: Tensor, bits: int = 8) -> float:
    """The signal-to-quantization-noise ratio, in dB, of ``weight`` quantized symmetrically with one scale for
    the whole tensor (``max |w| / (2^(bits-1) - 1)``, round to nearest): higher is better; ``inf`` when the
    rounding is exact.

    >>> per_tensor_sqnr(torch.tensor([127.0, -1.0, 2.0]))  # on the grid: no rounding at all
    inf
    """
    w = weight.detach().to(torch.float64).flatten()
    top = float(w.abs().max()) if w.numel() else 0.0
    if top == 0.0:
        return math.inf
    step = top / (2 ** (bits - 1) - 1)
    noise = float(((w / step).round() * step - w).pow(2).sum())
    signal = float(w.pow(2).sum())
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)
