"""Forward folds: a norm into every layer that reads it, ``layer(norm(x))``.

The walk goes down from the norm's output through the op table (identities in
eval mode, reshapes, permutes, pooling, means over other axes) to the layers
that read it; each must take a forward fold (exact when it does not pad its
input with zeros). The channel axis is followed along each path with that
layer's own rule, so a pair rule speaks for its own pair only.
"""

from __future__ import annotations

from torch import nn

from ..discover.aliasing import changed_later
from ..discover.graph import Call, ValueKey
from ..rules.classes import layer_type
from ..rules.layers import channel_axis, in_channels
from ..rules.ops import OpEntry, entry_for
from ..rules.table import FoldRule
from .context import Kept, PlanContext, rule_for, symbolic_rank_check
from .fold_plan import FoldSite

__all__ = ["fold_forward"]

Path = tuple[tuple[Call, OpEntry], ...]


def fold_forward(norm: nn.Module, call: Call, ctx: PlanContext) -> FoldSite:
    """Fold into every layer that reads the norm's output, or raise Kept."""
    graph = ctx.graph
    if len(call.outputs) != 1 or not call.inputs:
        raise Kept("it does not map one tensor to one tensor")
    if changed_later(graph, call.inputs[0], call.index):
        raise Kept(
            "its input is changed in place or read elsewhere later in the forward pass; after folding the "
            "next layer would read that tensor itself"
        )
    partners: list[nn.Module] = []
    frontier: list[tuple[ValueKey, Path]] = [(call.outputs[0], ())]
    seen: set[int] = set()
    while frontier:
        value, path = frontier.pop()
        readers = graph.consumers.get(value, [])
        if not readers:
            raise Kept("its output is not read by any layer")
        for index in readers:
            reader = graph.calls[index]
            if reader.kind == "output":
                raise Kept("its output is also a model output")
            if index in seen:
                continue
            seen.add(index)
            what = ctx.name(reader.module) if reader.module is not None else reader.target
            if reader.inputs.count(value) != 1 or reader.inputs[0] != value or len(reader.outputs) != 1:
                raise Kept(f"'{what}' reads its output in a way bnfold cannot follow", what)
            entry = entry_for(reader)
            if entry is not None and len(reader.inputs) == 1:
                if reader.module is not None and len(graph.calls_of(reader.module)) > 1:
                    raise Kept(f"'{what}' is called more than once", what)
                if not graph.has_shapes and entry.without_shapes == "stop":
                    raise Kept(f"its output goes to '{what}', which it cannot fold into without example_inputs", what)
                frontier.append((reader.outputs[0], (*path, (reader, entry))))
                continue
            if reader.kind != "module" or reader.module is None:
                raise Kept(f"its output goes to '{reader.target}', which it cannot fold into", reader.target)
            _check_partner(norm, call, reader.module, reader, path, ctx)
            partners.append(reader.module)
    names = tuple(ctx.name(p) for p in partners)
    return FoldSite(
        ctx.name(norm),
        layer_type(norm).__name__,
        names,
        tuple(layer_type(p).__name__ for p in partners),
        "forward",
        direction="forward",
    )


def _follow(norm: nn.Module, call: Call, path: Path, rule: FoldRule, ctx: PlanContext) -> tuple[int | None, bool]:
    """The norm's channel axis where ``path`` ends, by ``rule``, and whether the path flattened it into
    channel-major blocks; the axis is ``None`` without shapes. Raise Kept where a step breaks it."""
    positive = ctx.positive(rule, norm)
    in_ndim = call.input_ndims[0]
    axis = rule.channel_axis(norm, in_ndim) if in_ndim is not None else None
    flattened = False
    for step, entry in path:
        target = ctx.name(step.module) if step.module is not None else step.target
        if axis is None:  # no shapes: only steps that cannot move the axis, and a full Flatten
            if flattened and entry.kind == "pooled":
                raise Kept(f"'{target}' after it pools the flattened channels", target)
            flattened = flattened or entry.without_shapes == "flatten"
        elif flattened:
            if step.input_shapes[0] != step.output_shapes[0]:
                raise Kept(f"'{target}' after it reshapes the flattened channels", target)
        else:
            move = entry.maps(step, axis)
            if move is None:
                raise Kept(f"'{target}' after it {entry.mixes}", target)
            axis, flattened = move.axis, move.flattened
        reason = entry.condition(step, positive)
        if reason:
            raise Kept(f"'{target}' between it and the next layer {reason}", target)
    return axis, flattened


def _check_partner(norm: nn.Module, call: Call, layer: nn.Module, reader: Call, path: Path, ctx: PlanContext) -> None:
    name = ctx.name(layer)
    rule = rule_for(layer, norm, "forward", ctx)
    layout = rule.weight_layout
    reason = ctx.rules.forward_reason(layer, layout)
    if reason:
        raise Kept(f"'{name}' {reason}", name)
    axis, flattened = _follow(norm, call, path, rule, ctx)
    channels = ctx.affine(rule, norm)[0].numel()
    in_features = in_channels(layer, layout)
    if flattened and layout == "linear":
        if in_features % channels:
            raise Kept(f"'{name}' reads {in_features} features, not a whole number per channel of its {channels}", name)
    elif in_features != channels:
        raise Kept(f"it has {channels} channels but '{name}' reads {in_features}", name)
    if not ctx.graph.has_shapes:
        symbolic_rank_check(norm, layer, rule, ctx, flattened)
        return
    layer_ndim = reader.input_ndims[0]
    if axis is None or layer_ndim is None:
        raise Kept("the shape of its output is unknown", name)
    ok = (
        (axis == 1 and layer_ndim == 2 and layout == "linear")
        if flattened
        else axis == channel_axis(layer, layout, layer_ndim)
    )
    if not ok:
        raise Kept(f"its channels reach '{name}' on axis {axis}, which is not the axis of its input channels", name)
