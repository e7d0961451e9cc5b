"""Backward folds: a norm into the layer that feeds it, ``norm(layer(x))``, always exact.

The walk goes up from the norm's input (:func:`~bnfold.planning.channel_walk.walk_up`)
through ops that move or pool elements without mixing channels (the op registry),
and through norms already folded into the same layer, to a Conv/ConvTranspose/Linear
layer; or to a channel-wise ``torch.cat`` of such layers, each taking its slice of
the norm's channels. Every op on the way must let the norm's scale and shift through
(a ReLU lets a positive scale through, never a shift: a norm after it stays).
"""

from __future__ import annotations

import torch
from torch import nn

from ..discover.graph import Call, TensorRef, ValueKey
from ..rules.classes import layer_type
from ..rules.layers import channel_axis, out_channels
from ..rules.norms import tensor_attr
from ..rules.ops import NORM_FOLD, POSITIVE_NORM_FOLD, entry_for
from ..rules.table import FoldRule
from .channel_walk import Step, axis_up, walk_up
from .context import Kept, PlanContext, rule_for, symbolic_rank_check
from .fold_plan import ConcatSlices, FoldSite, ReadThrough

__all__ = ["fold_backward"]


def _is_cat(call: Call) -> bool:
    entry = entry_for(call) if call.kind == "function" else None
    return entry is not None and entry.kind == "joined"


def fold_backward(norm: nn.Module, call: Call, ctx: PlanContext) -> FoldSite:
    """Fold into the layer that produces the norm's input, or raise Kept."""
    graph = ctx.graph
    if not call.inputs:
        raise Kept("it was called without a tensor input")

    def folded_norm(source: Call) -> ValueKey | None:  # a norm already folded into nn.Identity: look through
        if source.kind == "module" and source.module is not None and ctx.name(source.module) in ctx.transparent:
            return source.inputs[0]
        return None

    walk = walk_up(graph, call.inputs[0], call.index, look=folded_norm)
    shared = walk.shared(graph)
    if shared is not None:
        raise Kept(f"the output of '{shared.call.target}' before it is also read elsewhere")
    source, value, path = walk.source, walk.value, walk.steps
    if source is None:
        raise Kept("its input is not produced by any layer bnfold saw (a tensor changed in place, or a constant)")
    if source.kind == "input":
        raise Kept("its input is a model input: there is no layer before it to fold into")
    if _is_cat(source) and not path:
        return _fold_into_cat(norm, call, source, ctx)
    if source.kind != "module" or source.module is None:
        raise Kept(f"its input comes from '{source.target}', not from a Conv/ConvTranspose/Linear layer", source.target)
    layer = source.module
    name = ctx.name(layer)
    rule = rule_for(layer, norm, "backward", ctx)
    others = [graph.calls[i] for i in graph.consumers.get(value, []) if i != walk.reader]
    if others:
        where = "the model's outputs" if others[0].kind == "output" else f"'{others[0].target}'"
        raise Kept(f"the output of '{name}' also feeds {where}: folding would change what that sees", name)
    if len(source.outputs) != 1:
        raise Kept(f"'{name}' returns several tensors", name)
    channels = ctx.affine(rule, norm)[0].numel()
    if channels != out_channels(layer, rule.weight_layout):
        raise Kept(f"it has {channels} channels but '{name}' makes {out_channels(layer, rule.weight_layout)}", name)
    if graph.has_shapes:
        _check_axis(norm, call, source, layer, rule, path, ctx)
    else:
        symbolic_rank_check(norm, layer, rule, ctx, flattened=False)
    carried = POSITIVE_NORM_FOLD if not path or ctx.positive(rule, norm) else NORM_FOLD
    blocked = walk.blocked(carried)
    if blocked:
        raise Kept(f"'{blocked[0].call.target}' between '{name}' and it {blocked[1]}", name)
    if tensor_attr(layer, "bias") is None and _parametrized_bias(layer):
        raise Kept(f"'{name}' has a parametrized bias that is None", name)
    via = tuple(ctx.name(s.call.module) for s in reversed(path) if s.folded and s.call.module is not None)
    return FoldSite(
        ctx.name(norm), layer_type(norm).__name__, (name,), (layer_type(layer).__name__,), "backward", ReadThrough(via)
    )


def _parametrized_bias(layer: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(layer, "bias")


def _check_axis(
    norm: nn.Module,
    call: Call,
    source: Call,
    layer: nn.Module,
    rule: FoldRule,
    path: tuple[Step, ...],
    ctx: PlanContext,
) -> None:
    """The norm's channel axis, followed back through the path, must be the layer's output channels."""
    name = ctx.name(layer)
    out_ndim, in_ndim = source.output_ndims[0], call.input_ndims[0]
    if out_ndim is None or in_ndim is None:
        raise Kept("the shape of its input is unknown", name)
    norm_axis = rule.channel_axis(norm, in_ndim)
    axis = axis_up(path, norm_axis)
    if isinstance(axis, Step):
        raise Kept(f"'{axis.call.target}' between '{name}' and it {axis.entry.mixes}", name)
    layer_axis = channel_axis(layer, rule.weight_layout, out_ndim)
    if axis != layer_axis:
        moved = f" (axis {axis} of the output of '{name}')" if path else ""
        raise Kept(
            f"it normalizes axis {norm_axis} of its input{moved}, but the output channels of '{name}' are axis "
            f"{layer_axis}",
            name,
        )


def _fold_into_cat(norm: nn.Module, call: Call, cat: Call, ctx: PlanContext) -> FoldSite:
    """Fold into every layer of a channel-wise ``torch.cat``, each taking its slice of the norm's channels."""
    graph = ctx.graph
    what = "it reads a torch.cat"
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    in_ndim = call.input_ndims[0]
    if not graph.has_shapes or in_ndim is None or not isinstance(parts, tuple) or not isinstance(dim, int):
        raise Kept(f"{what} that bnfold cannot follow")
    if not all(isinstance(p, TensorRef) for p in parts):
        raise Kept(f"{what} of something other than tensors")
    if [i for i in graph.consumers.get(call.inputs[0], []) if i != call.index]:
        raise Kept(f"{what} whose result is also read elsewhere")
    layers: list[nn.Module] = []
    slices: list[tuple[int, int]] = []
    total = channels = 0
    # every input that stops the fold, so that the reason names them all (DenseNet reads many)
    not_layers: list[str] = []
    shared: list[str] = []
    wrong_axis: list[str] = []
    problems: list[str] = []
    for part in parts:
        index = graph.producer.get(part.key)
        source = graph.calls[index] if index is not None else None
        if source is None or source.kind != "module" or source.module is None:
            not_layers.append("a model input" if source is None or source.kind == "input" else f"'{source.target}'")
            continue
        layer, name = source.module, ctx.name(source.module)
        if ctx.rules.rule_for(layer, norm, "backward") is None:
            not_layers.append(f"'{name}' ({layer_type(layer).__name__})")
            continue
        try:
            rule = rule_for(layer, norm, "backward", ctx)
        except Kept as keep:
            problems.append(keep.reason)
            continue
        if graph.consumers.get(part.key, []) != [cat.index] or len(source.outputs) != 1 or layer in layers:
            shared.append(f"'{name}'")
            continue
        out_ndim = source.output_ndims[0]
        axis = rule.channel_axis(norm, in_ndim)
        layout = rule.weight_layout
        if out_ndim != in_ndim or dim % in_ndim != axis or channel_axis(layer, layout, out_ndim) != axis:
            wrong_axis.append(f"'{name}'")
            continue
        layers.append(layer)
        width = out_channels(layer, layout)
        slices.append((total, total + width))
        total += width
        channels = ctx.affine(rule, norm)[0].numel()
    if not_layers:
        verb = "is not a layer" if len(not_layers) == 1 else "are not layers"
        problems.insert(0, f"{_listed(not_layers)} {verb} it can fold into")
    if shared:
        outputs, verb = ("the output", "is") if len(shared) == 1 else ("the outputs", "are")
        problems.append(f"{outputs} of {_listed(shared)} {verb} also read elsewhere")
    if wrong_axis:
        problems.append(f"it concatenates along axis {dim}, not along the channels of {_listed(wrong_axis)}")
    if problems:
        count = f"{len(parts)} tensor{'s' if len(parts) != 1 else ''}"
        raise Kept(
            f"{what} of {count}, and folds into each only when it is a layer's output that nothing else reads: "
            + "; ".join(problems)
        )
    if channels != total:
        raise Kept(f"{what} of {total} channels, but it has {channels}")
    return FoldSite(
        ctx.name(norm),
        layer_type(norm).__name__,
        tuple(ctx.name(layer) for layer in layers),
        tuple(layer_type(layer).__name__ for layer in layers),
        "concat",
        ConcatSlices(tuple(slices)),
    )


def _listed(names: list[str], shown: int = 3) -> str:
    """'a', 'b' and 'c'; or 'a', 'b', 'c' and 4 more."""
    if len(names) == 1:
        return names[0]
    if len(names) <= shown:
        return f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"
