"""The arithmetic of merging branches: a linear map of a tensor written as one convolution.

A :class:`ConvForm` is ``y = conv(x, kernel, bias, stride, padding, dilation, groups, padding_mode)`` in
float64. Branches become forms (a convolution, a norm or affine map after it, an identity, an average
pool), forms compose (a 1x1 conv before or after a kxk one) and add (kernels embedded at their offset in
the largest one). Each step either is exact or raises :class:`NotExact` with the reason in words. Pure
tensor functions, no modules; every kernel is computed in float64 and cast back once, by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["NotExact", "ConvForm", "identity_form", "pool_form", "affine_after", "add_forms", "compose"]


class NotExact(Exception):  # noqa: N818 - a reason to keep the branches, never raised to users
    """A merge that would not compute exactly what the branches did, and why."""


@dataclass(frozen=True)
class ConvForm:
    """``y = conv(x; kernel, bias, ...)`` with ``kernel`` of shape ``(out, in / groups, *k)``, float64.

    ``diagonal``: a per-channel map (identity, norm, average pool) that may be written with any groups.
    """

    kernel: Tensor
    bias: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    diagonal: bool = False

    @property
    def dims(self) -> int:
        return self.kernel.dim() - 2

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.kernel.shape[2:])

    @property
    def out_channels(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.kernel.shape[1]) * self.groups

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel, stride 1, no padding: a per-position channel mix."""
        return all(k == 1 for k in self.size) and all(s == 1 for s in self.stride) and not any(self.padding)

    @property
    def reads_padding(self) -> bool:
        return any(p > 0 for p in self.padding)


def _diagonal(values: Tensor, size: tuple[int, ...], dims: int) -> Tensor:
    """A depthwise kernel ``(C, 1, *size)`` holding ``values`` (``(C,)`` or ``(C, *size)``)."""
    if values.dim() == 1:
        kernel = torch.zeros(values.shape[0], 1, *size, dtype=torch.float64, device=values.device)
        kernel.view(values.shape[0], -1)[:, _centre_offset(size)] = values
        return kernel
    return values.reshape(values.shape[0], 1, *size)


def _centre_offset(size: tuple[int, ...]) -> int:
    """The flat index of the centre of a kernel of ``size`` (row-major)."""
    offset = 0
    for k in size:
        offset = offset * k + k // 2
    return offset


def identity_form(channels: int, dims: int, device: torch.device | None = None) -> ConvForm:
    """``y = x`` as a 1x1 depthwise convolution."""
    ones = torch.ones(channels, dtype=torch.float64, device=device)
    return ConvForm(
        _diagonal(ones, (1,) * dims, dims),
        torch.zeros_like(ones),
        (1,) * dims,
        (0,) * dims,
        (1,) * dims,
        channels,
        diagonal=True,
    )


def pool_form(
    channels: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    device: torch.device | None = None,
) -> ConvForm:
    """An average pool that counts padded zeros (``count_include_pad=True``): weights ``1 / k^d`` per channel."""
    kernel = torch.full((channels, 1, *size), 1.0 / math.prod(size), dtype=torch.float64, device=device)
    zeros = torch.zeros(channels, dtype=torch.float64, device=device)
    return ConvForm(kernel, zeros, stride, padding, (1,) * len(size), channels, diagonal=True)


def affine_after(form: ConvForm, scale: Tensor, shift: Tensor) -> ConvForm:
    """``scale * form(x) + shift`` per output channel (a norm, a layer scale, a coefficient)."""
    for values in (scale, shift):
        if values.numel() not in (1, form.out_channels):
            raise NotExact(f"a map of {values.numel()} values does not act on the {form.out_channels} channels")
    scale = scale.to(torch.float64).reshape(-1).expand(form.out_channels)
    shift = shift.to(torch.float64).reshape(-1).expand(form.out_channels)
    view = (-1,) + (1,) * (form.kernel.dim() - 1)
    return replace(form, kernel=form.kernel * scale.reshape(view), bias=form.bias * scale + shift)


def _with_groups(form: ConvForm, groups: int) -> ConvForm:
    """The same map written with ``groups`` (only a diagonal map can change its groups)."""
    if form.groups == groups:
        return form
    channels = form.out_channels
    if not form.diagonal or form.in_channels != channels or channels % groups:
        raise NotExact(f"its branches have different groups ({form.groups} and {groups})")
    per_group = channels // groups
    dense = torch.zeros(channels, per_group, *form.size, dtype=torch.float64, device=form.kernel.device)
    rows = torch.arange(channels, device=form.kernel.device)
    dense[rows, rows % per_group] = form.kernel[:, 0]
    return replace(form, kernel=dense, groups=groups)


def add_forms(a: ConvForm, b: ConvForm, sign: float = 1.0) -> ConvForm:
    """``a(x) + sign * b(x)`` as one convolution: kernels embedded at their offset in the largest one."""
    if a.dims != b.dims or a.out_channels != b.out_channels or a.in_channels != b.in_channels:
        raise NotExact("its branches do not map the same channels")
    if a.stride != b.stride:
        raise NotExact(f"its branches have different strides ({a.stride} and {b.stride})")
    if a.groups != b.groups:
        if a.diagonal and not b.diagonal:
            a = _with_groups(a, b.groups)
        elif b.diagonal and not a.diagonal:
            b = _with_groups(b, a.groups)
        else:
            raise NotExact(f"its branches have different groups ({a.groups} and {b.groups})")
    modes = {f.padding_mode for f in (a, b) if f.reads_padding}
    if len(modes) > 1:
        raise NotExact(f"its branches pad in different ways ({' and '.join(sorted(modes))})")
    size, padding, dilation = [], [], []
    offsets: tuple[list[int], list[int]] = ([], [])
    for axis in range(a.dims):
        ka, kb = a.size[axis], b.size[axis]
        big = a if ka >= kb else b
        k, p = big.size[axis], big.padding[axis]
        dilations = {f.dilation[axis] for f in (a, b) if f.size[axis] > 1}
        if len(dilations) > 1:
            raise NotExact(f"its branches have different dilations ({sorted(dilations)})")
        d = dilations.pop() if dilations else 1
        for form, found in ((a, offsets[0]), (b, offsets[1])):
            shift = p - form.padding[axis]
            if shift % d or not 0 <= shift // d <= k - form.size[axis]:
                raise NotExact(
                    f"a {form.size} kernel with padding {form.padding} does not sit inside a {k} one with padding {p}"
                )
            found.append(shift // d)
        size.append(k)
        padding.append(p)
        dilation.append(d)
    kernel = torch.zeros(a.out_channels, a.kernel.shape[1], *size, dtype=torch.float64, device=a.kernel.device)
    for form, found, weight in ((a, offsets[0], 1.0), (b, offsets[1], sign)):
        window = tuple(slice(o, o + k) for o, k in zip(found, form.size, strict=True))
        kernel[(slice(None), slice(None), *window)] += weight * form.kernel
    return ConvForm(
        kernel,
        a.bias + sign * b.bias,
        a.stride,
        tuple(padding),
        tuple(dilation),
        a.groups,
        modes.pop() if modes else "zeros",
        a.diagonal and b.diagonal,
    )


def _mix(outer: Tensor, inner: Tensor, outer_groups: int, inner_groups: int) -> tuple[Tensor, int]:
    """The kernel of ``outer(inner(x))`` when one of them is 1x1 (their spatial kernels multiply out)."""
    if outer_groups == 1 and inner_groups == 1:
        if all(k == 1 for k in inner.shape[2:]):  # 1x1 then kxk
            return torch.einsum("om...,mc->oc...", outer, inner.flatten(1)), 1
        return torch.einsum("om,mc...->oc...", outer.flatten(1), inner), 1  # kxk then 1x1
    raise NotExact("a grouped convolution before or after a 1x1 one does not merge into one convolution here")


def compose(inner: ConvForm, outer: ConvForm) -> ConvForm:
    """``outer(inner(x))`` as one convolution, when one of the two is pointwise (1x1, stride 1, no padding).

    A pointwise map before a padding one is exact when its bias reaches the padding unchanged: no bias, or
    padding that copies the input (reflect, replicate, circular) rather than zeros.
    """
    if outer.in_channels != inner.out_channels:
        raise NotExact("the two convolutions do not chain")
    if inner.pointwise:
        if outer.reads_padding and outer.padding_mode == "zeros" and bool(inner.bias.abs().max() > 0):
            raise NotExact(
                "a 1x1 convolution with a bias comes before a zero-padded one: the padded zeros would not "
                "carry the bias"
            )
    elif not outer.pointwise:
        raise NotExact("two convolutions in a row, neither of them 1x1, do not merge into one convolution")
    bias = outer.bias + _response(outer, inner.bias)
    if inner.pointwise and inner.diagonal:  # a per-channel scale of outer's inputs
        scales = _input_scales(inner.kernel.reshape(-1), outer)
        return replace(outer, kernel=outer.kernel * scales.reshape(*scales.shape, *([1] * outer.dims)), bias=bias)
    if not inner.pointwise and outer.diagonal:  # a per-channel scale of inner's outputs
        return affine_after(inner, outer.kernel.reshape(-1), outer.bias)
    if outer.diagonal:  # a 1x1 channel mix, then a per-channel filter
        kernel = inner.kernel * outer.kernel.reshape(outer.out_channels, 1, *outer.size)
        return replace(outer, kernel=kernel, bias=bias, groups=inner.groups, diagonal=False)
    if inner.diagonal:  # a per-channel filter, then a 1x1 channel mix
        if outer.groups != 1:
            raise NotExact("a grouped 1x1 convolution after a depthwise map does not merge here")
        kernel = outer.kernel.reshape(outer.out_channels, -1, *([1] * inner.dims)) * inner.kernel.reshape(
            1, -1, *inner.size
        )
        return replace(inner, kernel=kernel, bias=bias, groups=1, diagonal=False)
    kernel, groups = _mix(outer.kernel, inner.kernel, outer.groups, inner.groups)
    spatial = outer if inner.pointwise else inner  # the result keeps the geometry of the one that is not 1x1
    return replace(spatial, kernel=kernel, bias=bias, groups=groups, diagonal=False)


def _input_scales(scale: Tensor, outer: ConvForm) -> Tensor:
    """``(out, in / groups)``: the entry of the per-input-channel ``scale`` that each weight of ``outer``
    multiplies (weight ``[o, j]`` reads input channel ``(o // (out / groups)) * (in / groups) + j``)."""
    per_group = int(outer.kernel.shape[1])
    out_per_group = outer.out_channels // outer.groups
    rows = torch.arange(outer.out_channels, device=scale.device)[:, None]
    cols = torch.arange(per_group, device=scale.device)[None, :]
    return scale[(rows // out_per_group) * per_group + cols]


def _response(outer: ConvForm, constant: Tensor) -> Tensor:
    """``outer``'s response (without bias) to a constant per-channel input ``constant``."""
    if constant.numel() == 0 or not bool(constant.abs().max() > 0):
        return torch.zeros_like(outer.bias)
    kernel = outer.kernel.sum(dim=tuple(range(2, outer.kernel.dim())))  # (out, in / groups)
    per_group = kernel.shape[1]
    groups = outer.groups
    grouped = constant.reshape(groups, per_group)
    out_per_group = outer.out_channels // groups
    return torch.einsum("gom,gm->go", kernel.reshape(groups, out_per_group, per_group), grouped).reshape(-1)
