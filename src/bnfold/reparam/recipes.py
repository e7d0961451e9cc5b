"""A recipe: parallel branches (or a sequence of convolutions) as data, and what one convolution they are.

A :data:`Recipe` is a small tree that names the modules and constants of the branches: :class:`Source` (the
tensor every branch reads), :class:`Layer` (a convolution, norm or average pool applied to what its ``inner``
computes), :class:`Coefficient` (``inner <op> c``), :class:`Sum` (signed terms) and :class:`Unknown` (a branch
code computes). It is data (the plan carries it); :func:`evaluate` turns it into a
:class:`~bnfold.kernels.ConvForm` on whichever copy of the model surgery works on, reading the weights there.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..planning.channelwise import constant_named
from ..rules.classes import layer_type
from ..rules.norms import tensor_attr
from ..rules.ops import AVG_POOLS
from ..rules.table import RuleTable
from ..rules.weight_hooks import effective_weight
from .merge_arithmetic import ConvForm, NotExact, add_forms, affine_after, compose, identity_form, pool_form

__all__ = [
    "Source",
    "Layer",
    "Coefficient",
    "Sum",
    "Unknown",
    "Recipe",
    "evaluate",
    "structure",
    "describe",
    "rebase",
    "unknown_reason",
    "has_conv",
    "is_sum",
    "conv_names",
    "sequence_cost",
    "not_linear",
    "exact_pool",
]


@dataclass(frozen=True)
class Source:
    """The tensor every branch reads, unchanged: ``x``."""


@dataclass(frozen=True)
class Layer:
    """A module applied to what ``inner`` computes: a convolution, a norm or an average pool, or (kind
    ``module``) any module, run as it is: a step of a branch that is not linear."""

    kind: str  # "conv" | "norm" | "pool" | "module"
    name: str
    inner: Recipe


@dataclass(frozen=True)
class Coefficient:
    """``inner <op> c`` with ``c`` a number (``value``) or a parameter or buffer of the model (``name``)."""

    op: str  # "mul" | "div" | "add" | "sub"
    inner: Recipe
    name: str | None = None
    value: float | None = None
    shape: tuple[int, ...] | None = None  # of the constant where the op reads it (it may reach it reshaped)


@dataclass(frozen=True)
class Sum:
    """``sum(sign * term)``."""

    terms: tuple[tuple[float, Recipe], ...]


@dataclass(frozen=True)
class Unknown:
    """A branch that no chain of modules computes from ``x`` (code in a ``forward``), and why."""

    reason: str


Recipe = Source | Layer | Coefficient | Sum | Unknown


def not_linear(name: str, module: nn.Module) -> str:
    """Why a module on a branch is not a step of one convolution, in words."""
    if isinstance(module, tuple(AVG_POOLS)):
        return (
            f"'{name}' ({type(module).__name__}) is an average pool that is not a convolution (it {pool_flaw(module)})"
        )
    return f"'{name}' ({layer_type(module).__name__}) is not linear"


def pool_flaw(module: nn.Module) -> str | None:
    """Why an average pool is not a convolution with weights ``1 / k^d``, or ``None`` when it is one."""
    if getattr(module, "ceil_mode", False):
        return "rounds its output size up (ceil_mode=True)"
    if getattr(module, "divisor_override", None) is not None:
        return "divides by divisor_override"
    padding = getattr(module, "padding", 0)
    padded = any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    if padded and not bool(getattr(module, "count_include_pad", True)):
        return "does not count its padding (count_include_pad=False)"
    return None


def exact_pool(module: nn.Module) -> bool:
    """An average pool that is a convolution with weights ``1 / k^d``."""
    return isinstance(module, tuple(AVG_POOLS)) and pool_flaw(module) is None


# -- evaluating a recipe on a model ------------------------------------------------------------------------


def _geometry(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stride, padding, dilation)`` of a torch convolution, with 'same' padding resolved."""
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise NotExact(f"{type(conv).__name__} is not a torch convolution")
    pairs = [int(p) for p in conv._reversed_padding_repeated_twice]
    left, right = pairs[0::2][::-1], pairs[1::2][::-1]
    if left != right:
        raise NotExact("a convolution pads its two sides differently")
    return tuple(int(s) for s in conv.stride), tuple(left), tuple(int(d) for d in conv.dilation)


def _conv_form(conv: nn.Module) -> ConvForm:
    weight = effective_weight(conv).detach().to(torch.float64)
    bias = tensor_attr(conv, "bias")
    stride, padding, dilation = _geometry(conv)
    return ConvForm(
        weight,
        torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if bias is None
        else bias.detach().to(torch.float64),
        stride,
        padding,
        dilation,
        int(getattr(conv, "groups", 1)),
        str(getattr(conv, "padding_mode", "zeros")),
    )


def structure(recipe: Recipe, model: nn.Module) -> Hashable:
    """All that :func:`evaluate`'s outcome depends on but the weights' values: the recipe's tree with each
    module as its type and its ``repr`` (sizes, strides, padding, groups...) and each named constant as its
    shape. Two recipes alike either both merge, into kernels of one shape, or both fail."""
    if isinstance(recipe, Source | Unknown):
        return recipe
    if isinstance(recipe, Sum):
        return ("sum", tuple((sign, structure(term, model)) for sign, term in recipe.terms))
    if isinstance(recipe, Coefficient):
        shape = None if recipe.name is None else tuple(constant_named(model, recipe.name).shape)
        return ("coefficient", recipe.op, recipe.value, shape, structure(recipe.inner, model))
    module = model.get_submodule(recipe.name)
    return ("layer", recipe.kind, type(module), repr(module), structure(recipe.inner, model))


def evaluate(recipe: Recipe, model: nn.Module, rules: RuleTable, channels: int, dims: int) -> ConvForm:
    """The convolution ``recipe`` computes on ``model``'s weights (float64); ``channels``, ``dims``: of ``x``."""
    if isinstance(recipe, Source):
        return identity_form(channels, dims)
    if isinstance(recipe, Unknown):
        raise NotExact(recipe.reason)
    if isinstance(recipe, Layer) and recipe.kind == "module":
        raise NotExact(not_linear(recipe.name, model.get_submodule(recipe.name)))
    if isinstance(recipe, Sum):
        (sign, first), *rest = recipe.terms
        form = evaluate(first, model, rules, channels, dims)
        if sign != 1.0:
            form = affine_after(form, torch.tensor(sign, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
        for sign, term in rest:
            form = add_forms(form, evaluate(term, model, rules, channels, dims), sign)
        return form
    inner = evaluate(recipe.inner, model, rules, channels, dims)
    if isinstance(recipe, Coefficient):
        if recipe.name is not None:
            value = constant_named(model, recipe.name).detach().to(torch.float64).flatten()
        else:
            value = torch.tensor(float(recipe.value or 0.0), dtype=torch.float64)
        zero, one = torch.zeros_like(value), torch.ones_like(value)
        scale, shift = {"mul": (value, zero), "div": (1.0 / value, zero), "add": (one, value), "sub": (one, -value)}[
            recipe.op
        ]
        return affine_after(inner, scale, shift)
    module = model.get_submodule(recipe.name)
    if recipe.kind == "conv":
        conv = _conv_form(module)
        return conv if isinstance(recipe.inner, Source) else compose(inner, conv)
    if recipe.kind == "norm":
        norm_rule = rules.norm_rule(module)
        if norm_rule is None:
            raise NotExact(f"no rule for the norm '{recipe.name}'")
        scale, shift = norm_rule.affine(module)
        return affine_after(inner, scale, shift)
    if not isinstance(module, tuple(AVG_POOLS)):
        raise NotExact(f"'{recipe.name}' is not an average pool")
    size = _tuple(module.kernel_size, dims)
    stride = _tuple(module.stride or module.kernel_size, dims)
    padding = _tuple(module.padding, dims)
    return compose(inner, pool_form(inner.out_channels, size, stride, padding))


def _tuple(value: object, dims: int) -> tuple[int, ...]:
    """A pooling size argument (an int, or one per axis) as one int per axis."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    if isinstance(value, int):
        return (value,) * dims
    raise NotExact(f"a pooling size {value!r} that is neither an int nor a tuple")


def describe(form: ConvForm) -> str:
    """What a merge became, in words: ``Conv2d(32 -> 64, 3x3, stride 2, groups 2)``."""
    parts = ["x".join(str(k) for k in form.size)]
    if any(s != 1 for s in form.stride):
        parts.append(f"stride {'x'.join(str(s) for s in form.stride)}")
    if any(d != 1 for d in form.dilation):
        parts.append(f"dilation {'x'.join(str(d) for d in form.dilation)}")
    if form.groups != 1:
        parts.append(f"groups {form.groups}")
    if form.padding_mode != "zeros":
        parts.append(f"{form.padding_mode} padding")
    return f"Conv{form.dims}d({form.in_channels} -> {form.out_channels}, {', '.join(parts)})"


def rebase(recipe: Recipe, base: Recipe) -> Recipe:
    """``recipe`` reading ``base`` where it read its input."""
    if isinstance(recipe, Source):
        return base
    if isinstance(recipe, (Layer, Coefficient)):
        return replace(recipe, inner=rebase(recipe.inner, base))
    if isinstance(recipe, Sum):
        return Sum(tuple((s, rebase(r, base)) for s, r in recipe.terms))
    return recipe


def unknown_reason(recipe: Recipe) -> str | None:
    """The reason of the first :class:`Unknown` in a recipe (a branch code computes), if it holds one."""
    if isinstance(recipe, Unknown):
        return recipe.reason
    if isinstance(recipe, (Layer, Coefficient)):
        return unknown_reason(recipe.inner)
    if isinstance(recipe, Sum):
        return next((r for r in (unknown_reason(t) for _, t in recipe.terms) if r is not None), None)
    return None


def has_conv(recipe: Recipe) -> bool:
    """Whether a recipe runs a convolution it would merge."""
    if isinstance(recipe, Layer):
        return recipe.kind == "conv" or has_conv(recipe.inner)
    if isinstance(recipe, Coefficient):
        return has_conv(recipe.inner)
    if isinstance(recipe, Sum):
        return any(has_conv(r) for _, r in recipe.terms)
    return False


def is_sum(recipe: Recipe) -> bool:
    """Whether a recipe adds branches (else it is a sequence of convolutions with affine maps between)."""
    if isinstance(recipe, Sum):
        return len(recipe.terms) > 1
    if isinstance(recipe, (Layer, Coefficient)):
        return is_sum(recipe.inner)
    return False


def conv_names(recipe: Recipe) -> list[str]:
    """The convolutions of a recipe without sums, innermost first."""
    if isinstance(recipe, Layer):
        return [*conv_names(recipe.inner), recipe.name] if recipe.kind == "conv" else conv_names(recipe.inner)
    if isinstance(recipe, Coefficient):
        return conv_names(recipe.inner)
    return []


def sequence_cost(recipe: Recipe, model: nn.Module) -> float:
    """Multiply-adds per final output position of a sequence of convolutions as it stands (a convolution
    before a strided one runs at more positions)."""
    cost, positions = 0.0, 1.0
    for name in reversed(conv_names(recipe)):
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            continue
        weight = conv.weight
        cost += positions * weight.numel()  # out * in / groups * prod(kernel), per output position
        for s in conv.stride:
            positions *= int(s)
    return cost
