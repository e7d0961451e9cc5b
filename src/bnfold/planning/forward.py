"""Forward folds: a norm into every layer that reads it, ``layer(norm(x))``.

The walk goes down from the norm's output
(:func:`~bnfold.planning.channel_walk.walk_down`) through the op registry
(identities in eval mode, reshapes, permutes, pooling, means over other axes) to
the layers that read it, each of which must take a forward fold (exact when it
does not pad its input with zeros). Every op on the way must let the norm's scale
and shift through (a ReLU does not). The channel axis is followed along each path with that
layer's own rule, so a pair rule speaks for its own pair only.
"""

from __future__ import annotations

from torch import nn

from ..discover.aliasing import changed_later
from ..discover.graph import Call
from ..rules.classes import layer_type
from ..rules.layers import channel_axis, in_channels
from ..rules.ops import NORM_FOLD, POSITIVE_NORM_FOLD
from ..rules.table import FoldRule
from .channel_walk import Blocked, Step, follow_down, walk_down
from .context import Kept, PlanContext, rule_for, symbolic_rank_check
from .fold_plan import FoldSite

__all__ = ["fold_forward"]

_STOPS = {
    "output": "its output is also a model output",
    "unread": "its output is not read by any layer",
}


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
    for reached in walk_down(graph, call.outputs[0]):
        reader = reached.call
        if reader is None or reached.stop in _STOPS:
            raise Kept(_STOPS[reached.stop or "unread"])
        what = ctx.name(reader.module) if reader.module is not None else reader.target
        if reached.stop == "tangled":
            raise Kept(f"'{what}' reads its output in a way bnfold cannot follow", what)
        if reached.stop == "shared":
            raise Kept(f"'{what}' is called more than once", what)
        if reached.stop == "needs_shapes":
            raise Kept(f"its output goes to '{what}', which it cannot fold into without example_inputs", what)
        if reader.kind != "module" or reader.module is None:
            raise Kept(f"its output goes to '{reader.target}', which it cannot fold into", reader.target)
        _check_partner(norm, call, reader.module, reader, reached.path, ctx)
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


def _follow(
    norm: nn.Module, call: Call, path: tuple[Step, ...], rule: FoldRule, ctx: PlanContext
) -> tuple[int | None, bool]:
    """The norm's channel axis where ``path`` ends, by ``rule``, and whether the path flattened it into
    channel-major blocks; the axis is ``None`` without shapes. Raise Kept where a step breaks it, or does not
    let the norm's scale and shift through."""
    carried = POSITIVE_NORM_FOLD if ctx.positive(rule, norm) else NORM_FOLD
    in_ndim = call.input_ndims[0]
    axis = rule.channel_axis(norm, in_ndim) if in_ndim is not None else None
    followed = follow_down(path, axis, carried)
    if isinstance(followed, Blocked):
        step = followed.step
        target = ctx.name(step.call.module) if step.call.module is not None else step.call.target
        if followed.on_axis:
            raise Kept(f"'{target}' after it {followed.reason}", target)
        raise Kept(f"'{target}' between it and the next layer {followed.reason}", target)
    return followed.axis, followed.flattened


def _check_partner(
    norm: nn.Module, call: Call, layer: nn.Module, reader: Call, path: tuple[Step, ...], ctx: PlanContext
) -> None:
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
