"""Channel-wise constants: ``layer(x) * self.scale + self.shift``, folded like a norm.

A Conv/ConvTranspose/Linear layer whose output is multiplied (or divided) by,
or added to (or has subtracted), a constant per-output-channel tensor folds the
same way a norm does. "Constant" means a parameter or buffer of the model that
nothing else reads: no other op, no other constant site, and not the forward of
a module bnfold does not look into (its owner, say). It may reach the op through
reshapes (``view``, ``reshape``, ``unsqueeze``, ``g[:, None, None]``: the op
registry's ``reshaped`` entries). The op stays in the model's code, so after
folding the constant is set to its neutral value (1 for mul/div, 0 for
add/sub), which makes the op the exact identity.

Between the layer and the op, the walk up from the op
(:func:`~bnfold.planning.channel_walk.walk_up`) takes the same steps as a backward
fold (the op registry, norms already folded into the layer, constants already
folded into it), and every step must let a norm's scale and shift through: the
constant folds with a norm's arithmetic. Needs the shapes of an execution trace
(``example_inputs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..discover.graph import Call, DataFlowGraph, Shape, TensorRef, ValueKey
from ..rules.classes import has_type, layer_type
from ..rules.layers import channel_axis
from ..rules.ops import NORM_FOLD, POSITIVE_NORM_FOLD, OpEntry, entry_for
from .channel_walk import END, End, Look, Step, axis_down, first_block, walk_up
from .context import Kept, PlanContext, layer_reason
from .fold_plan import AppliedBy, ConstantOp, FoldSite, KeptNorm, PlanRow

__all__ = [
    "constant_op",
    "ConstantOperand",
    "find_constant",
    "per_channel_axis",
    "affine_of_op",
    "constant_named",
    "is_neutral",
    "neutral_value",
    "constant_rows",
    "readers_inside",
]


def constant_op(call: Call) -> ConstantOp | None:
    """What a recorded call applies when it is a binary op a channel-wise constant may take (the registry's
    ``applies``; Python's ``x += c`` is left alone), else ``None``."""
    entry = entry_for(call) if call.kind == "function" else None
    return entry.applies if entry is not None and not entry.augmented else None


_NONE = OpEntry("other")  # what an op outside the registry counts as


@dataclass(frozen=True)
class ConstantOperand:
    """A parameter or buffer reaching an op unchanged (up to reshapes)."""

    name: str
    key: ValueKey
    shape: Shape
    reason: str | None  # why it cannot be neutralized, if it cannot


def _is_reshape(call: Call) -> bool:
    """A step that only reshapes a constant (row-major order kept, no element dropped)."""
    entry = entry_for(call)
    if entry is None or entry.kind not in ("reshaped", "kept") or len(call.inputs) != 1 or len(call.outputs) != 1:
        return False
    before, after = call.input_shapes[0], call.output_shapes[0]
    return before is not None and after is not None and math.prod(before) == math.prod(after)


def find_constant(
    graph: DataFlowGraph, key: ValueKey, shape: Shape | None, reader: int, readers_inside: dict[str, str]
) -> ConstantOperand | None:
    """The parameter behind ``key`` when ``key`` is a parameter/buffer or a reshape of one, else ``None``.

    ``readers_inside``: constant name -> a module whose own forward reads it where the trace cannot see.
    """
    if shape is None:
        return None
    chain: list[tuple[ValueKey, int]] = []  # (value, its only allowed reader), from the op back to the constant
    value, value_reader = key, reader
    while value not in graph.constants:
        source = graph.producer.get(value)
        if source is None or not _is_reshape(graph.calls[source]):
            return None
        chain.append((value, value_reader))
        value, value_reader = graph.calls[source].inputs[0], source
    chain.append((value, value_reader))
    name = graph.constants[value]
    reason = None
    if any([i for i in graph.consumers.get(v, []) if i != r] for v, r in chain):
        reason = f"'{name}' is also used elsewhere in the forward pass"
    elif name in readers_inside:
        reason = f"'{name}' is also read by '{readers_inside[name]}', which bnfold does not look into"
    return ConstantOperand(name, key, shape, reason)


@dataclass(frozen=True)
class Varies:
    """How a constant broadcasts against an activation: along one ``axis``, or not at all (``None``: the
    same value everywhere)."""

    axis: int | None


def per_channel_axis(constant: Shape, activation: Shape) -> Varies | None:
    """How ``constant`` varies when broadcast against ``activation``; ``None`` when it is not a per-axis
    vector (or would grow the activation)."""
    if len(constant) > len(activation):
        return None
    padded = (1,) * (len(activation) - len(constant)) + tuple(constant)
    varying = [i for i, size in enumerate(padded) if size != 1]
    if not varying:
        return Varies(None)
    if len(varying) > 1 or padded[varying[0]] != activation[varying[0]]:
        return None
    return Varies(varying[0])


def _operands(call: Call) -> tuple[TensorRef, TensorRef] | None:
    """The two tensor operands of a binary op recorded without extra arguments (``alpha=`` etc.)."""
    if call.kwargs or len(call.args) != 2:
        return None
    a, b = call.args
    if isinstance(a, TensorRef) and isinstance(b, TensorRef):
        return a, b
    return None


def affine_of_op(kind: ConstantOp, values: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """The float64 per-channel ``(scale, shift)`` that ``x <op> values`` applies."""
    v = values.detach().to(torch.float64).flatten()
    if v.numel() == 1:
        v = v.expand(channels)
    zeros, ones = torch.zeros_like(v), torch.ones_like(v)
    if kind == "mul":
        return v, zeros
    if kind == "div":
        return 1.0 / v, zeros
    if kind == "add":
        return ones, v
    if kind == "sub":
        return ones, -v
    raise ValueError(f"unknown channel-wise op {kind!r}")


def constant_named(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` (a qualified name) of ``model``."""
    module_name, _, attr = name.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr, None)
    if not isinstance(value, Tensor):
        raise AttributeError(f"no parameter or buffer '{name}'")
    return value


def neutral_value(kind: ConstantOp, like: Tensor) -> Tensor:
    """What the constant becomes once folded: the op's identity element."""
    return torch.ones_like(like) if kind in ("mul", "div") else torch.zeros_like(like)


def is_neutral(kind: ConstantOp, value: Tensor) -> bool:
    """Whether ``x <kind> value`` is already the identity (a constant folded before)."""
    return bool(torch.equal(value, neutral_value(kind, value)))


def readers_inside(ctx: PlanContext) -> dict[str, str]:
    """Constant name -> a module that holds it and runs as one unit in the trace (its own forward may read
    the constant where bnfold cannot see); see :attr:`PlanContext.readers_inside`."""
    return ctx.readers_inside


def constant_rows(ctx: PlanContext) -> list[PlanRow]:
    """Rows, in graph order, for ``layer(x) <op> constant``: folded into the layer, or kept with the reason."""
    graph = ctx.graph
    if not graph.has_shapes:
        return []
    inside = readers_inside(ctx)
    folded: dict[int, ValueKey] = {}  # constant op folded into its layer -> its activation (looked through)
    rows: list[PlanRow] = []
    for call in graph.calls:
        if len(call.outputs) != 1 or call.index in ctx.claimed_calls:
            continue
        row = _constant_row(call, folded, inside, ctx)
        if isinstance(row, FoldSite) and row.norm in ctx.refused:
            row = KeptNorm(row.norm, row.norm_type, ctx.refused[row.norm], row.partner)
        if row is not None:
            rows.append(row)
    return rows


def _look(folded: dict[int, ValueKey], ctx: PlanContext) -> Look:
    """How the walk up from a constant op treats the calls it meets, beyond the registry: a norm already
    folded into nn.Identity and a constant op already folded pass through; a call claimed by another
    transform ends the walk."""

    def look(call: Call) -> ValueKey | End | None:
        if call.index in ctx.claimed_calls:
            return END
        if call.kind == "module" and call.module is not None and call.inputs:
            if ctx.name(call.module) in ctx.transparent:
                return call.inputs[0]
        return folded.get(call.index)

    return look


@dataclass(frozen=True)
class _Source:
    """The layer a value comes from, the channel axis there, and the steps between (from the layer down)."""

    layer: nn.Module
    axis: int
    steps: tuple[Step, ...]


def _source_of(activation: ValueKey, call: Call, folded: dict[int, ValueKey], ctx: PlanContext) -> _Source | None:
    """The layer whose output reaches ``activation`` through ops that keep its channels on one axis, each
    value on the way read by the next op only (values a pass looks through aside); ``None`` otherwise."""
    graph = ctx.graph
    walk = walk_up(graph, activation, call.index, look=_look(folded, ctx))
    source = walk.source
    if source is None or source.kind != "module" or source.module is None or not source.inputs:
        return None
    if source.index in ctx.claimed_calls:
        return None
    shape = source.output_shapes[0] if source.output_shapes else None
    if len(source.outputs) != 1 or shape is None or not has_type(source.module, ctx.rules.layer_types()):
        return None
    if any(not s.folded and graph.consumers.get(s.input, []) != [s.call.index] for s in walk.steps):
        return None
    down = tuple(reversed(walk.steps))
    layout = ctx.rules.layout_for(source.module)
    axis = axis_down(down, channel_axis(source.module, layout, len(shape)))
    if isinstance(axis, Step):
        return None
    return _Source(source.module, axis, tuple(s for s in down if not s.folded))


def _constant_row(call: Call, folded: dict[int, ValueKey], inside: dict[str, str], ctx: PlanContext) -> PlanRow | None:
    """The row for one op, when it applies a per-channel constant to an activation; ``None`` otherwise."""
    graph = ctx.graph
    kind = constant_op(call)
    pair = _operands(call) if kind else None
    if kind is None or pair is None:
        return None
    shapes = dict(zip(call.inputs, call.input_shapes, strict=False))
    found = [(i, find_constant(graph, ref.key, shapes.get(ref.key), call.index, inside)) for i, ref in enumerate(pair)]
    constants = [(i, c) for i, c in found if c is not None]
    if len(constants) != 1:
        return None
    position, constant = constants[0]
    activation = pair[1 - position].key
    act_shape = shapes.get(activation)
    if act_shape is None:
        return None
    varies = per_channel_axis(constant.shape, act_shape)
    if varies is None:
        return None  # not a per-channel constant (e.g. a position embedding): not this pass's business
    value = constant_named(ctx.model, constant.name)
    if is_neutral(kind, value):
        return None  # already the identity (folded before): nothing to fold, so folding twice is a no-op
    label = f"channel-wise {kind}"
    try:
        if kind in ("sub", "div") and position == 0:
            raise Kept(f"it computes constant {kind} x, which is not an affine map of x's channels")
        if call.target.endswith("_") and position == 0:
            raise Kept("it changes the constant in place")
        if constant.reason:
            raise Kept(constant.reason)
        source = _source_of(activation, call, folded, ctx)
        if source is None:
            producer = graph.producer.get(activation)
            what = graph.calls[producer].target if producer is not None else "a model input"
            if producer is not None and (entry_for(graph.calls[producer]) or _NONE).kind == "joined":
                what = "torch.cat"
            raise Kept(f"its input comes from '{what}', not from a Conv/ConvTranspose/Linear layer")
        name = ctx.name(source.layer)
        if graph.consumers.get(activation, []) != [call.index]:
            raise Kept(f"the output of '{name}' is also read elsewhere", name)
        if varies.axis is not None and varies.axis != source.axis:
            raise Kept(f"it varies along axis {varies.axis}, but the channels of '{name}' are axis {source.axis}", name)
        reason = layer_reason(source.layer, ctx)
        if reason:
            raise Kept(reason, name)
        if call.output_shapes[0] != act_shape:
            raise Kept("it changes the shape of its input", name)
        positive = kind in ("add", "sub") or bool((value.detach() > 0).all())
        # folded with a norm's arithmetic, so its walk carries what a norm fold carries
        blocked = first_block(source.steps, POSITIVE_NORM_FOLD if positive else NORM_FOLD)
        if blocked:
            raise Kept(f"'{blocked[0].call.target}' between '{name}' and it {blocked[1]}", name)
        folded[call.index] = activation
        return FoldSite(
            constant.name, label, (name,), (layer_type(source.layer).__name__,), "constant", AppliedBy(kind)
        )
    except Kept as keep:
        return KeptNorm(constant.name, label, keep.reason, keep.partner)
