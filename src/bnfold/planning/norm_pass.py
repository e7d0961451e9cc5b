"""The per-norm pass: each norm layer folds backward (into the layer before it), else forward (into the
layers after it), else stays with the reason each direction failed (the norm's own rule may refuse either
direction outright)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..discover.graph import Call
from ..discover.memory_layout import MEMORY_FORMATS
from ..rules.classes import layer_type
from .backward import fold_backward
from .context import Kept, PlanContext
from .fold_plan import FoldSite, KeptNorm, PlanRow, ReadThrough
from .forward import fold_forward

__all__ = ["norm_rows"]


def norm_rows(ctx: PlanContext) -> list[PlanRow]:
    """One row per norm layer of the model, in the order the norms run (the order their folds apply)."""
    graph, rules = ctx.graph, ctx.rules
    rows: dict[str, PlanRow] = {}
    claimed: dict[tuple[str, str], str] = {}  # (layer, direction) -> last norm folding into it
    listed: dict[type[nn.Module], bool] = {}  # whether a norm layer is a question about its class alone

    def is_norm(module: nn.Module) -> bool:
        kind = type(module)
        if kind not in listed:
            listed[kind] = rules.is_norm_layer(module)
        return listed[kind]

    norms = [(name, norm) for name, norm in ctx.modules if is_norm(norm)]

    def first_call(item: tuple[str, nn.Module]) -> int:
        calls = [i for i in graph.calls_of(item[1]) if i >= 0]
        return calls[0] if calls else len(graph.calls)

    # in the order they run, so that a norm reading through one folded before it (conv -> bn -> scale)
    # finds it decided, and the folds apply in the order the norms did
    ordered = sorted(norms, key=first_call)
    for name, norm in ordered:
        try:
            site = _decide(norm, ctx)
            for partner in site.partners:
                taken = claimed.get((partner, site.direction))
                if taken is not None and taken not in _read_through(site):
                    raise Kept(f"'{partner}' already takes '{taken}'", partner)
            for partner in site.partners:
                claimed[(partner, site.direction)] = name
            rows[name] = site
            if site.kind == "backward":
                rule = rules.rule_for(ctx.module(site.partners[0]), norm, "backward")
                if rule is not None and rule.leaves_nothing(norm):
                    ctx.transparent.add(name)  # a later norm may read through it into the same layer
        except Kept as keep:
            rows[name] = KeptNorm(name, layer_type(norm).__name__, keep.reason, keep.partner)
    return [rows[name] for name, _ in ordered]


def _read_through(site: FoldSite) -> tuple[str, ...]:
    """The norms folded before ``site`` into the same layer that it reads through."""
    return site.payload.via if isinstance(site.payload, ReadThrough) else ()


def _decide(norm: nn.Module, ctx: PlanContext) -> FoldSite:
    refused = ctx.refused.get(ctx.name(norm))
    if refused is not None:
        raise Kept(refused)
    reason = ctx.rules.unfoldable_reason(norm)
    if reason:
        raise Kept(reason)
    calls = ctx.graph.calls_of(norm)
    if not calls:
        where = "on the example inputs" if ctx.graph.has_shapes else "in the traced forward pass"
        raise Kept(f"it does not run {where} (an auxiliary head used only in training?): nothing shows what feeds it")
    if len(calls) > 1:
        raise Kept(f"it is called {len(calls)} times in one forward pass (shared)")
    if len(norm._forward_hooks) > 0 or len(norm._forward_pre_hooks) > 0:
        raise Kept("it has forward hooks, which would be lost")
    if id(norm) in ctx.graph.foreign_uses:
        raise Kept(f"its parameters are also used outside it (by {ctx.graph.foreign_uses[id(norm)]})")
    if calls[0] < 0:
        raise Kept("it runs inside another layer bnfold treats as a whole")
    own_reason = ctx.rules.own_check(norm) or ctx.rules.nothing_to_fold(norm)
    if own_reason:
        raise Kept(own_reason)
    call = ctx.graph.calls[calls[0]]
    layout = _replacement_format(call)
    site = _fold(norm, call, ctx)
    return site if layout is None else replace(site, memory_format=layout)


def _replacement_format(call: Call) -> str | None:
    """The memory format the norm's replacement must give its output, when the norm gave it another layout
    than its input had (a replacement hands its input on as it is; code after it may rely on the layout,
    ``.view`` does)."""
    if not call.input_formats or not call.output_formats:
        return None  # a symbolic trace records no layouts
    given, returned = call.input_formats[0], call.output_formats[0]
    if given == returned:
        return None
    if returned not in MEMORY_FORMATS:
        raise Kept(f"it returns its output laid out with {returned}, which no replacement reproduces")
    return returned


def _fold(norm: nn.Module, call: Call, ctx: PlanContext) -> FoldSite:
    directions = ctx.rules.directions(norm)
    try:
        not_backward = directions["backward"]
        if not_backward is not None:
            raise Kept(not_backward)
        return fold_backward(norm, call, ctx)
    except Kept as backward:
        not_forward = directions["forward"]
        if not_forward is not None:
            raise Kept(f"{backward.reason}; forward: {not_forward}", backward.partner) from None
        try:
            return fold_forward(norm, call, ctx)
        except Kept as forward:
            raise Kept(f"{backward.reason}; forward: {forward.reason}", backward.partner or forward.partner) from None
