"""Parallel branches as one convolution: find them in the data-flow graph, and say how to rebuild them.

A sum of branches that all read the same tensor ``x`` (``a + b``, ``a + b + c``, ``+=``, ``a - b``, with
scalar or per-channel coefficients), each a linear chain from ``x`` (a convolution and the norms and affine
maps after it, a norm alone, nothing at all, an average pool, a 1x1 convolution before or after a kxk one),
and optionally a norm or affine map after the sum, is one convolution at inference.

The result of the analysis is a :data:`Recipe`: a small tree that names the modules and constants of the
branches. It is data (the plan carries it); :func:`evaluate` turns it into a :class:`~bnfold.kernels.ConvForm`
on whichever copy of the model surgery works on, reading the weights there.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from .checks import Kept, PlanContext, layer_reason
from .classes import layer_type, type_chain
from .constants import CONSTANT_OPS, constant_named, find_constant, readers_inside
from .graph import Call, TensorRef, ValueKey
from .kernels import ConvForm, NotExact, add_forms, affine_after, compose, identity_form, pool_form
from .norms import identity_replacement, norm_act_replacement, tensor_attr
from .rules import RuleTable
from .weights import effective_weight

__all__ = [
    "Source",
    "Layer",
    "Coefficient",
    "Sum",
    "Recipe",
    "Branches",
    "find_branches",
    "evaluate",
    "describe",
    "region_reason",
    "layer_names",
    "channels_and_dims",
    "is_sum",
    "sequence_cost",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADD = {
    "Tensor.add",
    "Tensor.add_",
    "Tensor.__add__",
    "Tensor.__iadd__",
    "Tensor.__radd__",
    "_VariableFunctionsClass.add",
}
_SUB = {"Tensor.sub", "Tensor.sub_", "Tensor.__sub__", "Tensor.__isub__", "_VariableFunctionsClass.sub"}


@dataclass(frozen=True)
class Source:
    """The tensor every branch reads, unchanged: ``x``."""


@dataclass(frozen=True)
class Layer:
    """A module applied to what ``inner`` computes: a convolution, a norm or an average pool."""

    kind: str  # "conv" | "norm" | "pool"
    name: str
    inner: Recipe


@dataclass(frozen=True)
class Coefficient:
    """``inner <op> c`` with ``c`` a number (``value``) or a parameter or buffer of the model (``name``)."""

    op: str  # "mul" | "div" | "add" | "sub"
    inner: Recipe
    name: str | None = None
    value: float | None = None


@dataclass(frozen=True)
class Sum:
    """``sum(sign * term)``."""

    terms: tuple[tuple[float, Recipe], ...]


Recipe = Source | Layer | Coefficient | Sum


@dataclass(frozen=True)
class Branches:
    """A merge the analysis found: the recipe, the tensor it reads, the calls and modules it spans, and
    the value it computes."""

    recipe: Recipe
    source: ValueKey
    calls: frozenset[int]
    modules: tuple[str, ...]  # in the order they run
    constants: tuple[str, ...]
    output: ValueKey


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


def evaluate(recipe: Recipe, model: nn.Module, rules: RuleTable, channels: int, dims: int) -> ConvForm:
    """The convolution ``recipe`` computes on ``model``'s weights (float64); ``channels``, ``dims``: of ``x``."""
    if isinstance(recipe, Source):
        return identity_form(channels, dims)
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
    if not isinstance(module, _AVG_POOLS):
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


# -- finding branches in the graph -------------------------------------------------------------------------


class _Stop(Exception):  # noqa: N818 - control flow: this value is where the branches start
    pass


@dataclass
class _Found:
    recipe: Recipe
    sources: set[ValueKey]
    calls: set[int]
    modules: list[str]
    constants: list[str]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _is_plain_conv(module: nn.Module) -> bool:
    return any(kind in _CONVS for kind in type_chain(module))


def _is_linear_norm(module: nn.Module, rules: RuleTable) -> bool:
    """A norm bnfold has a rule for, that applies nothing but its affine map."""
    norm_rule = rules.norm_rule(module)
    if norm_rule is None or norm_rule.check(module) is not None:
        return False
    if norm_rule.replacement is norm_act_replacement:
        return all(isinstance(getattr(module, n, None), (nn.Identity, type(None))) for n in ("drop", "act"))
    return norm_rule.replacement is identity_replacement


def _exact_pool(module: nn.Module) -> bool:
    """An average pool that is a convolution with weights ``1 / k^d``."""
    if not isinstance(module, _AVG_POOLS) or getattr(module, "ceil_mode", False):
        return False
    if getattr(module, "divisor_override", None) is not None:
        return False
    padding = module.padding
    padded = any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    return not padded or bool(getattr(module, "count_include_pad", True))


# How many linear steps one branch may chain before the analysis stops looking (a deep purely linear stack
# is not a block of branches, and the walk must neither recurse without bound nor cost more than linear time).
_MAX_DEPTH = 200


class _Analysis:
    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self.graph = ctx.graph
        self.inside = readers_inside(ctx)
        self.steps: dict[int, _Found | None] = {}  # call index -> its recipe (None: not a linear step)
        self.depth = 0

    def value(self, key: ValueKey, reader: int | None) -> _Found:
        """The recipe of ``key`` as read by call ``reader``: through linear steps back to where branches
        start (a value read by several calls, or made by a step that is not linear)."""
        graph = self.graph
        index = graph.producer.get(key)
        if index is None or (reader is not None and graph.consumers.get(key, []) != [reader]):
            return _Found(Source(), {key}, set(), [], [])
        found = self.step(graph.calls[index])
        return _Found(Source(), {key}, set(), [], []) if found is None else found

    def step(self, call: Call) -> _Found | None:
        """The recipe of ``call``'s output, or ``None`` when ``call`` is not a linear step (remembered)."""
        if call.index in self.steps:
            return self.steps[call.index]
        if self.depth >= _MAX_DEPTH:
            return None
        self.depth += 1
        try:
            found: _Found | None = self._step(call)
        except _Stop:
            found = None
        finally:
            self.depth -= 1
        self.steps[call.index] = found
        return found

    def _on_channels(self, norm: nn.Module, call: Call) -> bool:
        """Whether the norm acts on axis 1 of its input, the channels of a batched convolution."""
        norm_rule = self.ctx.rules.norm_rule(norm)
        ndim = call.input_ndims[0] if call.input_ndims else None
        return norm_rule is not None and ndim is not None and norm_rule.channel_axis(norm, ndim) == 1

    def _step(self, call: Call) -> _Found:
        if len(call.outputs) != 1:
            raise _Stop
        if call.kind == "module" and call.module is not None and len(call.inputs) == 1:
            module, name = call.module, self.ctx.name(call.module)
            kind = (
                "conv"
                if _is_plain_conv(module)
                else "norm"
                if _is_linear_norm(module, self.ctx.rules)
                else "pool"
                if _exact_pool(module)
                else None
            )
            if kind is None:
                raise _Stop
            if kind == "norm" and not self._on_channels(module, call):
                raise _Stop  # a channels-last LayerScale on (N, C, H, W) scales W: no convolution's map
            inner = self.value(call.inputs[0], call.index)
            return _Found(
                Layer(kind, name, inner.recipe),
                inner.sources,
                inner.calls | {call.index},
                [*inner.modules, name],
                inner.constants,
            )
        if call.kind != "function":
            raise _Stop
        if call.target in _ADD | _SUB and len(call.args) == 2 and not call.kwargs:
            sign = -1.0 if call.target in _SUB else 1.0
            a, b = call.args
            if isinstance(a, TensorRef) and isinstance(b, TensorRef):
                left, right = self.value(a.key, call.index), self.value(b.key, call.index)
                terms = (*_terms(left.recipe, 1.0), *_terms(right.recipe, sign))
                return _Found(
                    Sum(terms),
                    left.sources | right.sources,
                    left.calls | right.calls | {call.index},
                    [*left.modules, *right.modules],
                    [*left.constants, *right.constants],
                )
        op = CONSTANT_OPS.get(call.target)
        if op is not None and len(call.args) == 2 and not call.kwargs:
            return self._coefficient(call, op)
        raise _Stop

    def _coefficient(self, call: Call, op: str) -> _Found:
        """``branch <op> c``: a number, or a per-channel (or scalar) parameter nothing else reads."""
        graph = self.graph
        a, b = call.args
        for position, (this, other) in enumerate(((a, b), (b, a))):
            if not isinstance(this, TensorRef):
                continue
            number = _number(other)
            name = None
            if number is None:
                if not isinstance(other, TensorRef):
                    continue
                shapes = dict(zip(call.inputs, call.input_shapes, strict=False))
                constant = find_constant(graph, other.key, shapes.get(other.key), call.index, self.inside)
                if constant is None or constant.reason:
                    continue
                if not _per_channel(constant.shape, shapes.get(this.key)):
                    continue
                name = constant.name
            if position == 1 and op in ("sub", "div"):
                raise _Stop  # c - x, c / x: not affine in x's channels the same way
            inner = self.value(this.key, call.index)
            constants = [*inner.constants, name] if name else inner.constants
            recipe = Coefficient(op, inner.recipe, name=name, value=number)
            return _Found(recipe, inner.sources, inner.calls | {call.index}, inner.modules, constants)
        raise _Stop


def _per_channel(constant: tuple[int, ...], activation: tuple[int, ...] | None) -> bool:
    """Whether ``constant`` broadcasts as a scalar or along axis 1 of ``activation``."""
    if activation is None or len(constant) > len(activation):
        return False
    padded = (1,) * (len(activation) - len(constant)) + tuple(constant)
    varying = [i for i, size in enumerate(padded) if size != 1]
    return not varying or (varying == [1] and padded[1] == activation[1])


def _terms(recipe: Recipe, sign: float) -> tuple[tuple[float, Recipe], ...]:
    if isinstance(recipe, Sum):
        return tuple((sign * s, r) for s, r in recipe.terms)
    return ((sign, recipe),)


def _has_conv(recipe: Recipe) -> bool:
    if isinstance(recipe, Layer):
        return recipe.kind == "conv" or _has_conv(recipe.inner)
    if isinstance(recipe, Coefficient):
        return _has_conv(recipe.inner)
    if isinstance(recipe, Sum):
        return any(_has_conv(r) for _, r in recipe.terms)
    return False


def _has_sum(recipe: Recipe) -> bool:
    if isinstance(recipe, Sum):
        return len(recipe.terms) > 1
    if isinstance(recipe, (Layer, Coefficient)):
        return _has_sum(recipe.inner)
    return False


def is_sum(recipe: Recipe) -> bool:
    """Whether a recipe adds branches (else it is a sequence of convolutions with affine maps between)."""
    return _has_sum(recipe)


def _convs(recipe: Recipe) -> list[str]:
    """The convolutions of a recipe without sums, innermost first."""
    if isinstance(recipe, Layer):
        return [*_convs(recipe.inner), recipe.name] if recipe.kind == "conv" else _convs(recipe.inner)
    if isinstance(recipe, Coefficient):
        return _convs(recipe.inner)
    return []


def sequence_cost(recipe: Recipe, model: nn.Module) -> float:
    """Multiply-adds per final output position of a sequence of convolutions as it stands (a convolution
    before a strided one runs at more positions)."""
    cost, positions = 0.0, 1.0
    for name in reversed(_convs(recipe)):
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            continue
        weight = conv.weight
        cost += positions * weight.numel()  # out * in / groups * prod(kernel), per output position
        for s in conv.stride:
            positions *= int(s)
    return cost


def find_branches(ctx: PlanContext) -> list[Branches | Kept]:
    """Every sum of parallel branches of one tensor, and every sequence of two or more convolutions with
    only affine maps between them, latest first (not yet checked for exactness)."""
    analysis = _Analysis(ctx)
    graph = ctx.graph
    covered: set[int] = set()
    found: list[Branches | Kept] = []
    for call in reversed(graph.calls):
        if call.index in covered or len(call.outputs) != 1 or call.kind not in ("module", "function"):
            continue
        result = analysis.step(call)
        if result is None or not _has_conv(result.recipe):
            continue
        if not _has_sum(result.recipe) and len(_convs(result.recipe)) < 2:
            continue
        if len(result.sources) != 1:
            continue  # a residual sum of values from different places: not parallel branches
        covered |= result.calls
        found.append(
            Branches(
                result.recipe,
                next(iter(result.sources)),
                frozenset(result.calls),
                tuple(result.modules),
                tuple(result.constants),
                call.outputs[0],
            )
        )
    return found


def region_reason(branches: Branches, ctx: PlanContext) -> str | None:
    """Why the modules and constants of a merge cannot be merged as they are (shared, hooked...)."""
    for name in branches.modules:
        module = ctx.model.get_submodule(name)
        calls = ctx.graph.calls_of(module)
        if len(calls) != 1:
            return f"'{name}' is called {len(calls)} times in one forward pass (shared)"
        if module._forward_hooks or (module._forward_pre_hooks and not _is_plain_conv(module)):
            return f"'{name}' has forward hooks"
        if _is_plain_conv(module):
            reason = layer_reason(module, ctx)
            if reason:
                return reason
        elif id(module) in ctx.graph.foreign_uses:
            return f"the parameters of '{name}' are also used outside it (by {ctx.graph.foreign_uses[id(module)]})"
    return None


def layer_names(branches: Branches, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names and types of the modules a merge spans."""
    return branches.modules, tuple(layer_type(model.get_submodule(n)).__name__ for n in branches.modules)


def channels_and_dims(branches: Branches, ctx: PlanContext) -> tuple[int, int]:
    """The channels and spatial rank of the tensor the branches read."""
    for call in ctx.graph.calls:
        for key, shape in zip(call.outputs, call.output_shapes, strict=False):
            if key == branches.source and shape is not None:
                return int(shape[1]), len(shape) - 2
    for call in ctx.graph.calls:
        for key, shape in zip(call.inputs, call.input_shapes, strict=False):
            if key == branches.source and shape is not None:
                return int(shape[1]), len(shape) - 2
    raise NotExact("the shape of the tensor the branches read is unknown")
