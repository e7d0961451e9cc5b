"""Match the rule table against the data-flow graph: the FoldPlan.

The plan is the one piece of data every later step reads: the sites to fold
and the norms kept, each with its reason in words. Building it changes nothing.

Each norm is first tried backward (into the layer that feeds it, always exact),
then forward (into every layer that reads it, exact when none of them pads its
input with zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize, prune

from . import channelwise
from .arithmetic import Layout
from .graph import Call, DataFlowGraph, Shape, TensorRef, ValueKey
from .rules import (
    Direction,
    FoldRule,
    RuleTable,
    find_rule,
    has_type,
    identity_replacement,
    in_channels,
    is_norm_layer,
    layer_type,
    layout_for,
    norm_act_replacement,
    out_channels,
    require_tensor,
    tensor_attr,
    type_chain,
    unfoldable_reason,
)

__all__ = ["FoldSite", "KeptNorm", "FoldPlan", "make_plan", "layer_types", "norm_types"]


@dataclass(frozen=True)
class FoldSite:
    """A norm layer that folds into its partner layer(s): the layer before it (``backward``) or every layer
    that reads it (``forward``)."""

    norm: str
    norm_type: str
    partners: tuple[str, ...]
    partner_types: tuple[str, ...]
    direction: Direction = "backward"
    # backward: norms already folded into the same layer that this one reads through (a chain
    # conv -> bn -> layer scale), in the order they apply
    via: tuple[str, ...] = ()

    @property
    def decision(self) -> str:
        return "folded"

    @property
    def partner(self) -> str:
        return ", ".join(self.partners)


@dataclass(frozen=True)
class KeptNorm:
    """A norm layer that stays in the model, and why."""

    norm: str
    norm_type: str
    reason: str
    partner: str | None = None

    @property
    def decision(self) -> str:
        return "kept"


@dataclass(frozen=True)
class FoldPlan:
    """Every norm layer of a model with its decision: folded into which layer, or kept and why.

    >>> import torch, bnfold
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> p = bnfold.plan(m, torch.randn(1, 3, 8, 8))
    >>> [(s.norm, s.partners, s.direction) for s in p.sites]
    [('1', ('0',), 'backward')]
    """

    model_type: str
    traced_with: str
    sites: tuple[FoldSite, ...]
    kept: tuple[KeptNorm, ...]
    order: tuple[str, ...]  # norm names in model order

    @property
    def rows(self) -> list[FoldSite | KeptNorm]:
        """One entry per norm layer, in the model's module order."""
        by_name: dict[str, FoldSite | KeptNorm] = {s.norm: s for s in self.sites}
        by_name.update({k.norm: k for k in self.kept})
        return [by_name[name] for name in self.order]

    def __str__(self) -> str:
        from .report import render_plan  # report imports this module

        return render_plan(self)


def layer_types(rules: RuleTable) -> set[type[nn.Module]]:
    return {layer for layer, _, _ in rules}


def norm_types(rules: RuleTable) -> set[type[nn.Module]]:
    return {norm for _, norm, _ in rules}


class _Kept(Exception):  # noqa: N818 - control flow inside the planner, never raised to users
    """Internal: a reason to keep the norm, with the partner it concerns."""

    def __init__(self, reason: str, partner: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partner = partner


@dataclass
class _Context:
    model: nn.Module
    graph: DataFlowGraph
    rules: RuleTable
    names: dict[int, str] = field(default_factory=dict)
    owners: dict[int, list[str]] = field(default_factory=dict)
    # norms folded backward that become nn.Identity: a later norm may read through them into the same layer
    transparent: set[str] = field(default_factory=set)

    def name(self, module: nn.Module) -> str:
        return self.names.get(id(module), "?")


def _fixed_input_ndim(norm: nn.Module) -> int | None:
    """The input rank a norm accepts, when it accepts only one (BatchNorm2d: 4)."""
    if isinstance(norm, nn.BatchNorm2d):
        return 4
    if isinstance(norm, nn.BatchNorm3d):
        return 5
    if not isinstance(norm, nn.modules.batchnorm._NormBase) and tensor_attr(norm, "running_mean") is not None:
        return 4  # frozen 2d batch norms (torchvision, timm) reshape their buffers to (1, C, 1, 1)
    return None


def _channel_axis(layer: nn.Module, layout: Layout, ndim: int) -> int:
    """The channel axis of a layer's input or output of rank ``ndim`` (convs accept unbatched input)."""
    if layout == "linear":
        return ndim - 1
    return 1 if ndim == require_tensor(layer, "weight").dim() else 0


def _pre_hook_reason(layer: nn.Module) -> str | None:
    for hook in list(layer._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            if getattr(hook, "_tensor_name", None) == "weight":
                continue
            return f"its {hook._tensor_name} is pruned (torch.nn.utils.prune); folding would not keep the mask"
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == "weight":
            continue
        name = getattr(hook, "__qualname__", type(hook).__name__)
        return f"it has a forward pre-hook ({name}) that bnfold does not know; it might rewrite the weight"
    return None


def _layer_reason(layer: nn.Module, ctx: _Context) -> str | None:
    """Why no norm may fold into ``layer`` at all, whatever the direction."""
    name = ctx.name(layer)
    calls = len(ctx.graph.calls_of(layer))
    if calls > 1:
        return f"'{name}' is called {calls} times in one forward pass (shared weights)"
    if id(layer) in ctx.graph.foreign_uses:
        return f"the parameters of '{name}' are also used outside it (by {ctx.graph.foreign_uses[id(layer)]})"
    for t in layer.parameters():
        others = [o for o in ctx.owners.get(id(t), []) if o != name and not o.startswith(name + ".")]
        if others:
            return f"'{name}': its parameters are shared with '{others[0]}'"
    if len(layer._forward_hooks) > 0:
        return f"'{name}' has forward hooks that would see the folded output"
    hook_reason = _pre_hook_reason(layer)
    if hook_reason:
        return f"'{name}': {hook_reason}"
    weight = tensor_attr(layer, "weight")
    if weight is None or not weight.is_floating_point():
        return f"'{name}' has no floating-point weight to fold into"
    return None


def _rule_for(layer: nn.Module, norm: nn.Module, direction: Direction, ctx: _Context) -> FoldRule:
    rule = find_rule(ctx.rules, layer, norm, direction)
    if rule is None:
        ltype = layer_type(layer).__name__
        where = "is fed by" if direction == "backward" else "feeds"
        raise _Kept(
            f"it {where} '{ctx.name(layer)}' ({ltype}), and there is no {direction} fold rule for "
            f"{ltype} {'->' if direction == 'backward' else '<-'} {layer_type(norm).__name__}",
            ctx.name(layer),
        )
    reason = rule.check(norm)
    if reason:
        raise _Kept(reason, ctx.name(layer))
    reason = _layer_reason(layer, ctx)
    if reason:
        raise _Kept(reason, ctx.name(layer))
    return rule


_RESHAPE_OPS = {
    "Tensor.reshape",
    "Tensor.view",
    "Tensor.flatten",
    "Tensor.unflatten",
    "Tensor.squeeze",
    "Tensor.unsqueeze",
    "Tensor.reshape_as",
    "Tensor.view_as",
    "Tensor.contiguous",
    "_VariableFunctionsClass.reshape",
    "_VariableFunctionsClass.flatten",
    "_VariableFunctionsClass.squeeze",
    "_VariableFunctionsClass.unsqueeze",
}
_TRANSPOSE_OPS = {"Tensor.transpose", "_VariableFunctionsClass.transpose", "Tensor.swapaxes", "Tensor.swapdims"}


def _reshaped_axis(before: Shape, after: Shape, axis: int) -> int | None:
    """The axis of ``before`` that a row-major reshape to ``after`` turns into ``axis``: the one with the same
    size and the same number of elements after it (so every element keeps its index along it)."""
    inner = math.prod(after[axis + 1 :])
    for a, size in enumerate(before):
        if size == after[axis] and math.prod(before[a + 1 :]) == inner:
            return a
    return None


def _axis_before(step: Call, axis: int, ctx: _Context) -> int | None:
    """Which axis of ``step``'s input becomes ``axis`` of its output (``None``: the channels are mixed)."""
    if step.kind == "module" and step.module is not None and ctx.name(step.module) in ctx.transparent:
        return axis
    ndim = step.input_ndims[0]
    if ndim is None:
        return None
    for candidate in range(ndim):
        if _axis_after(step, candidate) == (axis, False):
            return candidate
    return None


def _passes_back(source: Call, ctx: _Context) -> bool:
    """Whether a backward fold may look through ``source`` to what feeds it: a norm already folded into
    nn.Identity, or (with shapes) a reshape, permute or transpose, which move elements but never mix them."""
    if source.kind == "module" and source.module is not None and ctx.name(source.module) in ctx.transparent:
        return True
    return ctx.graph.has_shapes and _moves_elements(source)


def _backward(norm: nn.Module, call: Call, ctx: _Context) -> FoldSite:
    """Fold into the layer that produces the norm's input, or raise _Kept."""
    graph = ctx.graph
    if not call.inputs:
        raise _Kept("it was called without a tensor input")
    value, reader = call.inputs[0], call
    path: list[Call] = []  # the reshapes, permutes and folded norms between the layer and the norm
    while True:
        source_index = graph.producer.get(value)
        if source_index is None:
            raise _Kept("its input is not produced by any layer bnfold saw (a tensor changed in place, or a constant)")
        source = graph.calls[source_index]
        if not _passes_back(source, ctx) or len(source.outputs) != 1 or not source.inputs:
            break
        if graph.consumers.get(value, []) != [reader.index]:
            raise _Kept(f"the output of '{source.target}' before it is also read elsewhere")
        path.append(source)
        value, reader = source.inputs[0], source
    if source.kind == "input":
        raise _Kept("its input is a model input: there is no layer before it to fold into")
    if source.kind == "function" and source.target in _CAT_OPS and not path:
        return _backward_through_cat(norm, call, source, ctx)
    if source.kind != "module" or source.module is None:
        raise _Kept(
            f"its input comes from '{source.target}', not from a Conv/ConvTranspose/Linear layer", source.target
        )
    layer = source.module
    name = ctx.name(layer)
    rule = _rule_for(layer, norm, "backward", ctx)
    others = [graph.calls[i] for i in graph.consumers.get(value, []) if i != reader.index]
    if others:
        where = "the model's outputs" if others[0].kind == "output" else f"'{others[0].target}'"
        raise _Kept(f"the output of '{name}' also feeds {where}: folding would change what that sees", name)
    if len(source.outputs) != 1:
        raise _Kept(f"'{name}' returns several tensors", name)
    channels = rule.affine(norm)[0].numel()
    if channels != out_channels(layer, rule.weight_layout):
        raise _Kept(f"it has {channels} channels but '{name}' makes {out_channels(layer, rule.weight_layout)}", name)
    if graph.has_shapes:
        out_ndim, in_ndim = source.output_ndims[0], call.input_ndims[0]
        if out_ndim is None or in_ndim is None:
            raise _Kept("the shape of its input is unknown", name)
        norm_axis, layer_axis = rule.channel_axis(norm, in_ndim), _channel_axis(layer, rule.weight_layout, out_ndim)
        axis = norm_axis
        for step in path:
            before = _axis_before(step, axis, ctx)
            if before is None:
                raise _Kept(f"'{step.target}' between '{name}' and it mixes the channels", name)
            axis = before
        if axis != layer_axis:
            moved = f" (axis {axis} of the output of '{name}')" if path else ""
            raise _Kept(
                f"it normalizes axis {norm_axis} of its input{moved}, but the output channels of '{name}' are axis "
                f"{layer_axis}",
                name,
            )
    else:
        _symbolic_rank_check(norm, layer, rule, name, flattened=False)
    if parametrize.is_parametrized(layer, "bias") and tensor_attr(layer, "bias") is None:
        raise _Kept(f"'{name}' has a parametrized bias that is None", name)
    via = tuple(ctx.name(step.module) for step in reversed(path) if ctx.name(step.module) in ctx.transparent)  # type: ignore[arg-type]
    return FoldSite(ctx.name(norm), layer_type(norm).__name__, (name,), (layer_type(layer).__name__,), "backward", via)


_CAT_OPS = {"_VariableFunctionsClass.cat", "_VariableFunctionsClass.concat", "_VariableFunctionsClass.concatenate"}


def _backward_through_cat(norm: nn.Module, call: Call, cat: Call, ctx: _Context) -> FoldSite:
    """Fold into every layer of a channel-wise ``torch.cat``, each taking its slice of the norm's channels."""
    graph = ctx.graph
    what = "it reads a torch.cat"
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    in_ndim = call.input_ndims[0]
    if not graph.has_shapes or in_ndim is None or not isinstance(parts, tuple) or not isinstance(dim, int):
        raise _Kept(f"{what} that bnfold cannot follow")
    if not all(isinstance(p, TensorRef) for p in parts):
        raise _Kept(f"{what} of something other than tensors")
    if [i for i in graph.consumers.get(call.inputs[0], []) if i != call.index]:
        raise _Kept(f"{what} whose result is also read elsewhere")
    layers: list[nn.Module] = []
    total = channels = 0
    for part in parts:
        index = graph.producer.get(part.key)
        source = graph.calls[index] if index is not None else None
        if source is None or source.kind != "module" or source.module is None:
            where = "a model input" if source is None or source.kind == "input" else f"'{source.target}'"
            raise _Kept(f"{what}, and one of its inputs comes from {where}, not from a layer")
        layer, name = source.module, ctx.name(source.module)
        rule = _rule_for(layer, norm, "backward", ctx)
        if graph.consumers.get(part.key, []) != [cat.index] or len(source.outputs) != 1 or layer in layers:
            raise _Kept(f"{what}, and the output of '{name}' is also used elsewhere", name)
        out_ndim = source.output_ndims[0]
        axis = rule.channel_axis(norm, in_ndim)
        if out_ndim != in_ndim or dim % in_ndim != axis or _channel_axis(layer, rule.weight_layout, out_ndim) != axis:
            raise _Kept(f"{what} along axis {dim}, not along the channels of '{name}'", name)
        layers.append(layer)
        total += out_channels(layer, rule.weight_layout)
        channels = rule.affine(norm)[0].numel()
    if channels != total:
        raise _Kept(f"{what} of {total} channels, but it has {channels}")
    return FoldSite(
        ctx.name(norm),
        layer_type(norm).__name__,
        tuple(ctx.name(layer) for layer in layers),
        tuple(layer_type(layer).__name__ for layer in layers),
        "backward",
    )


def _symbolic_rank_check(norm: nn.Module, layer: nn.Module, rule: FoldRule, name: str, flattened: bool) -> None:
    """Without example inputs there are no shapes: fold only where the types alone fix the channel axis."""
    if flattened and rule.weight_layout == "linear":
        return  # Flatten(1, -1) of a (N, C, ...) norm output: C is the outer index of the features
    weight_rank = require_tensor(layer, "weight").dim() if rule.weight_layout != "linear" else None
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm) and weight_rank is not None:
        return  # InstanceNormNd and ConvNd accept the same (batched or unbatched) ranks
    fixed = _fixed_input_ndim(norm)
    if fixed is None or weight_rank is None or fixed != weight_rank:
        raise _Kept(
            f"without example_inputs bnfold cannot tell whether it normalizes the channels of '{name}'; "
            "pass example_inputs",
            name,
        )


def _is_transparent(module: nn.Module) -> bool:
    """Modules that are the identity on values in their current mode (Flatten is handled separately)."""
    return isinstance(module, nn.Identity) or (isinstance(module, _DropoutNd) and not module.training)


def _is_full_flatten(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _padding_reason(layer: nn.Module, rule: FoldRule, name: str) -> str | None:
    """Forward folding is exact only when no output reads padded zeros (they live in the norm's output
    space, where the folded layer would see them as a different value)."""
    padding = getattr(layer, "_reversed_padding_repeated_twice", None)
    padded = padding is not None and any(int(p) != 0 for p in padding)
    mode = getattr(layer, "padding_mode", "zeros")
    if rule.weight_layout == "conv" and padded and mode == "zeros":
        return (
            f"'{name}' pads its input with zeros (padding={getattr(layer, 'padding', None)}): the padded zeros "
            "would not pass through the folded norm, so folding it there is not exact"
        )
    if rule.weight_layout == "conv_transpose":
        kernel = tuple(getattr(layer, "kernel_size", ()))
        stride = tuple(getattr(layer, "stride", ()))
        pad = tuple(getattr(layer, "padding", ()))
        dilation = tuple(getattr(layer, "dilation", ()))
        out_pad = tuple(getattr(layer, "output_padding", ()))
        full = (
            all(s == 1 for s in stride)
            and all(p == d * (k - 1) for p, d, k in zip(pad, dilation, kernel, strict=True))
            and all(o == 0 for o in out_pad)
        )
        if not full:
            return (
                f"'{name}' is a ConvTranspose whose outputs see different numbers of inputs (stride or border), "
                "so the norm's shift would not become a per-channel bias"
            )
    return None


_MEAN_OPS = {"Tensor.mean", "_VariableFunctionsClass.mean"}
_AVG_POOLS: dict[type[nn.Module], int] = {
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_MAX_POOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def _pool_reason(module: nn.Module, positive: bool) -> str | None:
    """Why a pooling module does not commute with the norm's per-channel ``scale * x + shift``, or None.

    An average of a window commutes when it averages real elements only (no zero padding counted, no
    divisor override); a maximum commutes when every scale is positive (it would pick the minimum otherwise).
    """
    if type(module) in _AVG_POOLS:
        padding = getattr(module, "padding", 0)
        padded = any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
        if padded and getattr(module, "count_include_pad", False):
            return "averages padded zeros (count_include_pad=True)"
        if getattr(module, "divisor_override", None) is not None:
            return "divides by a fixed divisor_override"
        return None
    if getattr(module, "return_indices", False):
        return "also returns indices"
    return None if positive else "takes a maximum, and some of the norm's scales are not positive"


def _mean_axis(reader: Call, axis: int, ndim: int) -> int | None:
    """The channel axis after ``x.mean(dim, keepdim)`` when ``dim`` leaves the channels alone, else None."""
    args = list(reader.args[1:])
    dim = reader.kwargs.get("dim", args[0] if args else None)
    keepdim = reader.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if "dtype" in reader.kwargs or not isinstance(keepdim, bool):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    reduced = {d % ndim for d in dims}
    if axis in reduced:
        return None
    return axis if keepdim else axis - sum(1 for d in reduced if d < axis)


def _axis_after(step: Call, axis: int) -> tuple[int, bool] | None:
    """Where channel ``axis`` of ``step``'s input lands in its output (a reshape, permute or transpose), and
    whether the step flattened it with everything after it into (N, C * rest), channel-major; None when the
    channels are mixed with another axis."""
    before, after = step.input_shapes[0], step.output_shapes[0]
    if before is None or after is None:
        return None
    module = step.module if step.kind == "module" else None
    if module is not None and channelwise.is_permute_module(module):
        dims = [int(d) % len(after) for d in module.dims]  # type: ignore[union-attr]
        return (dims.index(axis), False) if axis in dims else None
    if step.target in channelwise._PERMUTE_OPS:
        moved = channelwise.permuted_axis(step, axis)
        return None if moved is None else (moved, False)
    if step.target in _TRANSPOSE_OPS:
        pair = [a for a in step.args[1:3] if isinstance(a, int)]
        if len(pair) != 2:
            return None
        d0, d1 = (d % len(before) for d in pair)
        return (d1 if axis == d0 else d0 if axis == d1 else axis), False
    if any(isinstance(a, torch.dtype) for a in step.args[1:]) or "dtype" in step.kwargs:
        return None
    same = _reshaped_axis(after, before, axis)
    if same is not None:
        return same, False
    if axis == 1 and len(after) == 2 and after[0] == before[0]:
        return 1, True  # x.flatten(1), x.view(N, -1): the features are channel-major blocks
    return None


def _moves_elements(step: Call) -> bool:
    """A reshape, flatten, permute or transpose (function or module): a fold may follow it by its shapes."""
    if step.kind == "module" and step.module is not None:
        module = step.module
        return isinstance(module, (nn.Flatten, nn.Unflatten)) or channelwise.is_permute_module(module)
    return step.kind == "function" and step.target in _RESHAPE_OPS | _TRANSPOSE_OPS | channelwise._PERMUTE_OPS


def _forward(norm: nn.Module, call: Call, ctx: _Context) -> FoldSite:
    """Fold into every layer that reads the norm's output, or raise _Kept."""
    graph = ctx.graph
    if len(call.outputs) != 1 or not call.inputs:
        raise _Kept("it does not map one tensor to one tensor")
    if graph.changed_later(call.inputs[0], call.index):
        raise _Kept(
            "its input is changed in place or read elsewhere later in the forward pass; after folding the "
            "next layer would read that tensor itself"
        )
    in_ndim = call.input_ndims[0]
    chain = type_chain(norm)
    rule = next(r for (_, kind, d), r in ctx.rules.items() if kind in chain and d == "forward")
    scale = rule.affine(norm)[0]
    positive = bool((scale > 0).all())
    axis = rule.channel_axis(norm, in_ndim) if in_ndim is not None else None
    partners: list[nn.Module] = []
    # (value, flattened, channel axis): the norm's output, or what it became through identities, a full
    # Flatten, pooling or a mean over other axes; the axis is None without shapes
    frontier: list[tuple[ValueKey, bool, int | None]] = [(call.outputs[0], False, axis)]
    seen: set[int] = set()
    while frontier:
        value, flattened, axis = frontier.pop()
        readers = graph.consumers.get(value, [])
        if not readers:
            raise _Kept("its output is not read by any layer")
        for index in readers:
            reader = graph.calls[index]
            if reader.kind == "output":
                raise _Kept("its output is also a model output")
            if index in seen:
                continue
            seen.add(index)
            if reader.inputs.count(value) != 1 or reader.inputs[0] != value or len(reader.outputs) != 1:
                what = ctx.name(reader.module) if reader.module is not None else reader.target
                raise _Kept(f"'{what}' reads its output in a way bnfold cannot follow", what)
            if reader.kind == "function" and reader.target in _MEAN_OPS and not flattened and axis is not None:
                ndim = reader.input_ndims[0]
                after = None if ndim is None else _mean_axis(reader, axis, ndim)
                if after is None:
                    raise _Kept(f"its output goes to '{reader.target}' over its channels, which it cannot fold into")
                frontier.append((reader.outputs[0], False, after))
                continue
            if _moves_elements(reader) and graph.has_shapes and not flattened and axis is not None:
                moved = _axis_after(reader, axis)
                if moved is None:
                    raise _Kept(f"'{reader.target}' after it mixes its channels with another axis", reader.target)
                frontier.append((reader.outputs[0], moved[1], moved[0]))
                continue
            if reader.kind != "module" or reader.module is None:
                raise _Kept(f"its output goes to '{reader.target}', which it cannot fold into", reader.target)
            module = reader.module
            pooled = type(module) in _AVG_POOLS or type(module) in _MAX_POOLS
            if _is_transparent(module) or _is_full_flatten(module) or (pooled and not flattened):
                name = ctx.name(module)
                if len(graph.calls_of(module)) > 1:
                    raise _Kept(f"'{name}' is called more than once", name)
                if pooled:
                    reason = _pool_reason(module, positive)
                    spatial = _AVG_POOLS.get(type(module)) or _MAX_POOLS[type(module)]
                    ndim = reader.input_ndims[0]
                    if reason is None and axis is not None and ndim is not None and axis >= ndim - spatial:
                        reason = "pools over its channels"
                    if reason:
                        raise _Kept(f"'{name}' between it and the next layer {reason}", name)
                if _is_full_flatten(module) and not flattened and axis not in (1, None):
                    raise _Kept(f"'{name}' flattens its channels together with the axes before them", name)
                frontier.append((reader.outputs[0], flattened or _is_full_flatten(module), axis))
                continue
            _check_forward_partner(norm, module, reader, flattened, axis, ctx)
            partners.append(module)
    names = tuple(ctx.name(p) for p in partners)
    return FoldSite(
        ctx.name(norm), layer_type(norm).__name__, names, tuple(layer_type(p).__name__ for p in partners), "forward"
    )


def _check_forward_partner(
    norm: nn.Module, layer: nn.Module, reader: Call, flattened: bool, axis: int | None, ctx: _Context
) -> None:
    """``axis``: where the norm's channels are in ``layer``'s input (None without shapes)."""
    name = ctx.name(layer)
    rule = _rule_for(layer, norm, "forward", ctx)
    reason = _padding_reason(layer, rule, name)
    if reason:
        raise _Kept(reason, name)
    channels = rule.affine(norm)[0].numel()
    in_features = in_channels(layer, rule.weight_layout)
    if flattened and rule.weight_layout == "linear":
        if in_features % channels:
            raise _Kept(
                f"'{name}' reads {in_features} features, not a whole number per channel of its {channels}", name
            )
    elif in_features != channels:
        raise _Kept(f"it has {channels} channels but '{name}' reads {in_features}", name)
    if ctx.graph.has_shapes:
        layer_ndim = reader.input_ndims[0]
        if axis is None or layer_ndim is None:
            raise _Kept("the shape of its output is unknown", name)
        if flattened:
            ok = axis == 1 and layer_ndim == 2 and rule.weight_layout == "linear"
        else:
            ok = axis == _channel_axis(layer, rule.weight_layout, layer_ndim)
        if not ok:
            raise _Kept(
                f"its channels reach '{name}' on axis {axis}, which is not the axis of its input channels", name
            )
    else:
        _symbolic_rank_check(norm, layer, rule, name, flattened)


def make_plan(model: nn.Module, graph: DataFlowGraph, rules: RuleTable) -> FoldPlan:
    """Decide, for every norm layer of ``model``, whether and where it folds."""
    ctx = _Context(model, graph, rules)
    for name, module in model.named_modules(remove_duplicate=False):
        ctx.names.setdefault(id(module), name)
    for name, module in model.named_modules():
        for t in module.parameters(recurse=False):
            ctx.owners.setdefault(id(t), []).append(name)

    sites: list[FoldSite] = []
    kept: list[KeptNorm] = []
    claimed: dict[tuple[str, str], str] = {}  # (layer, direction) -> last norm folding into it
    norms = [(name, norm) for name, norm in model.named_modules() if is_norm_layer(norm, rules)]
    order = [name for name, _ in norms]

    def first_call(item: tuple[str, nn.Module]) -> int:
        calls = [i for i in graph.calls_of(item[1]) if i >= 0]
        return calls[0] if calls else len(graph.calls)

    # in the order they run, so that a norm reading through one folded before it (conv -> bn -> scale)
    # finds it decided, and the folds apply in the order the norms did
    for name, norm in sorted(norms, key=first_call):
        try:
            site = _decide(norm, ctx)
            for partner in site.partners:
                taken = claimed.get((partner, site.direction))
                if taken is not None and taken not in site.via:
                    raise _Kept(f"'{partner}' already takes '{taken}'", partner)
            for partner in site.partners:
                claimed[(partner, site.direction)] = name
            sites.append(site)
            if site.direction == "backward" and len(site.partners) == 1:
                rule = find_rule(rules, model.get_submodule(site.partners[0]), norm, "backward")
                if rule is not None and _identity_once_folded(rule, norm):
                    ctx.transparent.add(name)  # a later norm may read through it into the same layer
        except _Kept as keep:
            kept.append(KeptNorm(name, layer_type(norm).__name__, keep.reason, keep.partner))
    for row in _channelwise_ops(ctx):
        if row.norm in order:
            continue  # a constant used by several ops is reported once (kept: used elsewhere)
        order.append(row.norm)
        (sites if isinstance(row, FoldSite) else kept).append(row)  # type: ignore[arg-type]
    return FoldPlan(type(model).__name__, graph.traced_with, tuple(sites), tuple(kept), tuple(order))


def _identity_once_folded(rule: FoldRule, norm: nn.Module) -> bool:
    """Whether what takes a folded norm's place computes nothing (not an activation it kept). Custom
    replacements are not looked into."""
    if rule.replacement is identity_replacement:
        return True
    if rule.replacement is norm_act_replacement:
        return all(isinstance(getattr(norm, n, None), (nn.Identity, type(None))) for n in ("drop", "act"))
    return False


def _decide(norm: nn.Module, ctx: _Context) -> FoldSite:
    reason = unfoldable_reason(norm, ctx.rules)
    if reason:
        raise _Kept(reason)
    calls = ctx.graph.calls_of(norm)
    if not calls:
        where = "on the example inputs" if ctx.graph.has_shapes else "in the traced forward pass"
        raise _Kept(f"it does not run {where} (an auxiliary head used only in training?): nothing shows what feeds it")
    if len(calls) > 1:
        raise _Kept(f"it is called {len(calls)} times in one forward pass (shared)")
    if len(norm._forward_hooks) > 0 or len(norm._forward_pre_hooks) > 0:
        raise _Kept("it has forward hooks, which would be lost")
    if id(norm) in ctx.graph.foreign_uses:
        raise _Kept(f"its parameters are also used outside it (by {ctx.graph.foreign_uses[id(norm)]})")
    if calls[0] < 0:
        raise _Kept("it runs inside another layer bnfold treats as a whole")
    chain = type_chain(norm)
    norm_rules = [rule for key, rule in ctx.rules.items() if key[1] in chain]
    own_reason = norm_rules[0].check(norm) if norm_rules else None
    if own_reason:
        raise _Kept(own_reason)
    call = ctx.graph.calls[calls[0]]
    try:
        return _backward(norm, call, ctx)
    except _Kept as backward:
        if not any(rule.direction == "forward" for rule in norm_rules):
            raise
        try:
            return _forward(norm, call, ctx)
        except _Kept as forward:
            raise _Kept(f"{backward.reason}; forward: {forward.reason}", backward.partner or forward.partner) from None


CHANNELWISE_PREFIX = "channel-wise "


def _channelwise_ops(ctx: _Context) -> list[FoldSite | KeptNorm]:
    """Rows, in graph order, for ``layer(x) <op> constant`` (mul/div/add/sub by a per-channel parameter
    or buffer): folded into the layer, or kept with the reason."""
    graph = ctx.graph
    if not graph.has_shapes:
        return []
    layers = layer_types(ctx.rules)
    # value -> (layer whose output it is, up to folded norms, permutes and folded ops; channel axis in it)
    source: dict[ValueKey, tuple[nn.Module, int]] = {}
    rows: list[FoldSite | KeptNorm] = []

    def only_reader(value: ValueKey, call: Call) -> bool:
        return graph.consumers.get(value, []) == [call.index]

    for call in graph.calls:
        if call.kind == "module" and call.module is not None and len(call.outputs) == 1 and call.inputs:
            module, out = call.module, call.outputs[0]
            shape = call.output_shapes[0]
            if has_type(module, layers) and shape is not None:
                source[out] = (module, _channel_axis(module, layout_for(module, ctx.rules), len(shape)))
            elif ctx.name(module) in ctx.transparent and call.inputs[0] in source:
                source[out] = source[call.inputs[0]]
            elif (
                channelwise.is_permute_module(module) and call.inputs[0] in source and only_reader(call.inputs[0], call)
            ):
                layer, channel = source[call.inputs[0]]
                dims = [int(d) % len(module.dims) for d in module.dims]  # type: ignore[union-attr, arg-type]
                if channel in dims:
                    source[out] = (layer, dims.index(channel))
            continue
        if call.kind != "function" or len(call.outputs) != 1:
            continue
        if call.target in channelwise._PERMUTE_OPS and call.inputs and call.inputs[0] in source:
            layer, channel = source[call.inputs[0]]
            new_axis = channelwise.permuted_axis(call, channel)
            if new_axis is not None and only_reader(call.inputs[0], call):
                source[call.outputs[0]] = (layer, new_axis)
            continue
        kind = channelwise.AFFINE_OPS.get(call.target)
        pair = channelwise.operands(call) if kind else None
        if kind is None or pair is None:
            continue
        shapes = dict(zip(call.inputs, call.input_shapes, strict=False))
        found = [
            (i, channelwise.find_constant(graph, ref.key, shapes.get(ref.key), call.index))
            for i, ref in enumerate(pair)
        ]
        constants = [(i, c) for i, c in found if c is not None]
        if len(constants) != 1:
            continue
        position, constant = constants[0]
        activation = pair[1 - position].key
        act_shape = shapes.get(activation)
        if act_shape is None:
            continue
        axis = channelwise.per_channel_axis(constant.shape, act_shape)
        if axis == "no":
            continue  # not a per-channel constant (e.g. a position embedding): not this rule's business
        if channelwise.is_neutral(kind, channelwise.constant_named(ctx.model, constant.name)):
            continue  # already the identity (folded before): nothing to fold, so folding twice is a no-op
        row_name, row_type = constant.name, CHANNELWISE_PREFIX + kind
        try:
            if kind in ("sub", "div") and position == 0:
                raise _Kept(f"it computes constant {kind} x, which is not an affine map of x's channels")
            if call.target.endswith("_") and position == 0:
                raise _Kept("it changes the constant in place")
            if constant.reason:
                raise _Kept(constant.reason)
            if activation not in source:
                producer = graph.producer.get(activation)
                what = graph.calls[producer].target if producer is not None else "a model input"
                raise _Kept(f"its input comes from '{what}', not from a Conv/ConvTranspose/Linear layer")
            layer, layer_axis = source[activation]
            name = ctx.name(layer)
            if not only_reader(activation, call):
                raise _Kept(f"the output of '{name}' is also read elsewhere", name)
            if axis is not None and axis != layer_axis:
                raise _Kept(f"it varies along axis {axis}, but the channels of '{name}' are axis {layer_axis}", name)
            reason = _layer_reason(layer, ctx)
            if reason:
                raise _Kept(reason, name)
            if call.output_shapes[0] != act_shape:
                raise _Kept("it changes the shape of its input", name)
            rows.append(FoldSite(row_name, row_type, (name,), (layer_type(layer).__name__,), "backward"))
            source[call.outputs[0]] = (layer, layer_axis)
        except _Kept as keep:
            rows.append(KeptNorm(row_name, row_type, keep.reason, keep.partner))
    return rows
