"""Cross-layer equalization, planned: every channel path from a producer layer to the layers that read it
through ops that let a positive per-channel scale through (ReLU, LeakyReLU, PReLU, pooling, dropout in eval
mode, identities, reshapes that keep the channels, fan-out to several readers).

Dividing the producer's output channel ``i`` by ``s_i > 0`` and multiplying each reader's input channel ``i``
by ``s_i`` computes the same function; the step (:mod:`bnfold.apply.equalization`) picks ``s`` so that the
per-channel weight ranges on both sides are equal. The pass runs on the folded model (after every fold and
merge), so a folded norm is gone and a merged block is one convolution. A path is kept, with the reason,
where the channels reach anything but such layers: a model output, a residual add, a concatenation, an
activation that does not commute with a scale (ReLU6, SiLU, GELU, sigmoid...), a norm, a layer whose
weight is shared or parametrized.

Pairs that share a layer (conv -> depthwise conv -> conv) form one chain, one row of the plan, whose step
iterates the pairs until the scales no longer move.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from ..discover.graph import Call
from ..rules.classes import layer_type
from ..rules.layers import channel_axis, in_channels, out_channels
from ..rules.ops import POSITIVE_SCALE
from .channel_walk import Blocked, follow_down, walk_down
from .context import Kept, PlanContext, layer_reason
from .fold_plan import FoldSite, KeptNorm, PlanRow

__all__ = ["EqualizedPair", "EqualizedChain", "equalize_rows", "EQUALIZED_TYPE"]

EQUALIZED_TYPE = "equalized"  # what a kept path's row says it is, in the plan

_STOPS = {
    "output": "its output is also a model output: scaling it would change what the model returns",
    "tangled": "combines it with another input, which does not take the scale",
    "shared": "is called more than once",
    "needs_shapes": "can move the channels, and there are no recorded shapes (pass example_inputs)",
}


@dataclass(frozen=True)
class EqualizedPair:
    """One producer and every layer that reads its output channels. ``blocks``: per reader, ``None`` when it
    reads the channels on its channel axis, or the number of channels ``C`` when it is a Linear reading them
    flattened into ``C`` blocks of features (``x.flatten(1)``). ``through``: the ops between them."""

    producer: str
    readers: tuple[str, ...]
    blocks: tuple[int | None, ...]
    through: tuple[str, ...]


@dataclass(frozen=True)
class EqualizedChain:
    """An equalization row's payload: the pairs of one chain, in the model's order."""

    pairs: tuple[EqualizedPair, ...]


def _label(ctx: PlanContext, call: Call) -> str:
    return ctx.name(call.module) if call.module is not None else call.target


def _own_reason(layer: nn.Module, ctx: PlanContext) -> str | None:
    reason = layer_reason(layer, ctx)
    if reason:
        return reason
    if parametrize.is_parametrized(layer):
        return f"'{ctx.name(layer)}' has a parametrized weight or bias"
    return None


def _pair(call: Call, ctx: PlanContext) -> EqualizedPair | None:
    """The pair that ``call`` (a layer) produces for, ``None`` when nothing reads it; raise Kept when a path
    from it does not let a positive per-channel scale through."""
    graph, layer = ctx.graph, call.module
    if layer is None:  # equalize_rows passes module calls only
        return None
    name = ctx.name(layer)
    reason = _own_reason(layer, ctx)
    if reason:
        raise Kept(reason, name)
    layout = ctx.rules.layout_for(layer)
    out_ndim = call.output_ndims[0] if call.output_ndims else None
    axis = channel_axis(layer, layout, out_ndim) if out_ndim is not None else None
    channels = out_channels(layer, layout)
    readers: list[str] = []
    blocks: list[int | None] = []
    through: dict[str, None] = {}
    # an op module called more than once (one ReLU for a whole block) lets each call's scale through alike
    for reached in walk_down(graph, call.outputs[0], POSITIVE_SCALE, through_shared=True):
        reader = reached.call
        if reached.stop == "unread" or reader is None:
            continue
        what = _label(ctx, reader)
        if reached.stop == "blocked":
            raise Kept(f"its output reaches '{what}', which {reached.why}", what)
        if reached.stop is not None:
            raise Kept(f"'{what}' {_STOPS[reached.stop]}" if reached.stop != "output" else _STOPS["output"], what)
        consumer = reader.module
        rule = ctx.rules.layer_rule(consumer) if consumer is not None else None
        if consumer is None or rule is None or reader.kind != "module":
            kind = f" ({type(consumer).__name__})" if consumer is not None else ""
            raise Kept(f"its output reaches '{what}'{kind}, which does not let a per-channel scale through", what)
        reason = _own_reason(consumer, ctx)
        if reason:
            raise Kept(reason, what)
        followed = follow_down(reached.path, axis, POSITIVE_SCALE)
        if isinstance(followed, Blocked):
            raise Kept(f"'{_label(ctx, followed.step.call)}' on the way to '{what}' {followed.reason}", what)
        consumer_layout = rule.weight_layout
        in_ndim = reader.input_ndims[0] if reader.input_ndims else None
        if followed.flattened:
            features = in_channels(consumer, consumer_layout)
            if consumer_layout != "linear" or features % channels:
                raise Kept(f"'{what}' reads the channels flattened, and is not a Linear over whole blocks", what)
            blocks.append(channels)
        else:
            if followed.axis is not None and in_ndim is not None:
                if followed.axis != channel_axis(consumer, consumer_layout, in_ndim):
                    raise Kept(f"the channels reach '{what}' on axis {followed.axis}, not its input channels", what)
            elif followed.axis is None and layout != consumer_layout and "linear" in (layout, consumer_layout):
                raise Kept(f"without example_inputs bnfold cannot tell where the channels reach '{what}'", what)
            if in_channels(consumer, consumer_layout) != channels:
                raise Kept(f"'{what}' reads {in_channels(consumer, consumer_layout)} channels, not {channels}", what)
            blocks.append(None)
        readers.append(ctx.name(consumer))
        through.update({_label(ctx, step.call): None for step in reached.path})
    if not readers:
        return None
    return EqualizedPair(name, tuple(readers), tuple(blocks), tuple(through))


def _chains(pairs: list[EqualizedPair]) -> list[list[EqualizedPair]]:
    """Pairs grouped into chains: two pairs share a chain when they share a layer."""
    owner: dict[str, int] = {}
    groups: list[list[EqualizedPair]] = []
    for pair in pairs:
        layers = (pair.producer, *pair.readers)
        joined = sorted({owner[layer] for layer in layers if layer in owner})
        if not joined:
            groups.append([])
            target = len(groups) - 1
        else:
            target = joined[0]
            for other in joined[1:]:  # this pair links two chains: merge them
                groups[target].extend(groups[other])
                for p in groups[other]:
                    for layer in (p.producer, *p.readers):
                        owner[layer] = target
                groups[other] = []
        groups[target].append(pair)
        for layer in layers:
            owner[layer] = target
    return [g for g in groups if g]


def equalize_rows(ctx: PlanContext) -> list[PlanRow]:
    """One row per chain of equalized pairs, and one kept row per producer whose channels cannot be scaled
    (named for the producer, with the reason)."""
    pairs: list[EqualizedPair] = []
    rows: list[PlanRow] = []
    for call in ctx.graph.calls:
        if call.kind != "module" or call.module is None or ctx.rules.layer_rule(call.module) is None:
            continue
        if len(call.outputs) != 1:
            continue
        try:
            pair = _pair(call, ctx)
        except Kept as keep:
            rows.append(KeptNorm(ctx.name(call.module), EQUALIZED_TYPE, keep.reason, keep.partner, kind="equalize"))
            continue
        if pair is not None:
            pairs.append(pair)
    for chain in _chains(pairs):
        order = {name: i for i, (name, _) in enumerate(ctx.modules)}
        layers = sorted({layer for p in chain for layer in (p.producer, *p.readers)}, key=order.__getitem__)
        types = tuple(layer_type(ctx.module(layer)).__name__ for layer in layers)
        payload = EqualizedChain(tuple(sorted(chain, key=lambda p: order[p.producer])))
        rows.append(FoldSite(payload.pairs[0].producer, EQUALIZED_TYPE, tuple(layers), types, "equalize", payload))
    return rows
