"""What every planning pass shares: the context it reads, the signal to keep a norm, and the checks on
a layer that apply whatever the kind of fold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import Tensor, nn

from ..discover.graph import DataFlowGraph, readable_op_names
from ..rules.classes import layer_type
from ..rules.layers import channel_axis, output_ranks
from ..rules.norms import tensor_attr
from ..rules.table import FoldRule, RuleTable
from ..rules.weight_hooks import unknown_pre_hook_reason
from .fold_plan import Direction, PlanRow

__all__ = ["Kept", "PlanContext", "layer_reason", "rule_for", "symbolic_rank_check"]


class Kept(Exception):  # noqa: N818 - control flow inside the planner, never raised to users
    """A reason to keep a norm (or constant), with the partner layer it concerns."""

    def __init__(self, reason: str, partner: str | None = None) -> None:
        reason = readable_op_names(reason)
        super().__init__(reason)
        self.reason = reason
        self.partner = None if partner is None else readable_op_names(partner)


@dataclass
class PlanContext:
    """The model, its data-flow graph and the rules, with lookups every pass needs."""

    model: nn.Module
    graph: DataFlowGraph
    rules: RuleTable
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)  # named_modules(), walked once
    names: dict[int, str] = field(default_factory=dict)
    owners: dict[int, list[str]] = field(default_factory=dict)  # tensor id -> modules that hold it
    # norms folded backward that leave nothing behind: a later fold may read through them into the same layer
    transparent: set[str] = field(default_factory=set)
    # modules inside a block whose branches are merged (-> the block), and the calls the merges take
    claimed: dict[str, str] = field(default_factory=dict)
    claimed_calls: set[int] = field(default_factory=set)
    # folds to keep whatever the passes find (norm, constant or merged block -> the reason): folds that made
    # the folded model fail to run
    refused: dict[str, str] = field(default_factory=dict)
    # the rows the passes before this one decided, by name (a pass reads them; the planner adds to them)
    decided: dict[str, PlanRow] = field(default_factory=dict)
    # each norm's float64 map by the rule's function (see affine)
    _affines: dict[tuple[int, Callable[..., Any]], tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        # one walk: every path (a module may have aliases); the first path of each module is its name, and
        # those first paths in order are named_modules()
        for name, module in self.model.named_modules(remove_duplicate=False):
            if id(module) not in self.names:
                self.names[id(module)] = name
                self.modules.append((name, module))
        for name, module in self.modules:
            for t in dict.fromkeys(p for p in module._parameters.values() if p is not None):
                self.owners.setdefault(id(t), []).append(name)

    def name(self, module: nn.Module) -> str:
        return self.names.get(id(module), "?")

    def module(self, name: str) -> nn.Module:
        """The module named ``name`` (as ``model.get_submodule``, from the walk made once)."""
        return self.by_name[name]

    @cached_property
    def by_name(self) -> dict[str, nn.Module]:
        return dict(self.modules)

    def affine(self, rule: FoldRule, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """The norm's float64 ``(scale, shift)`` by ``rule``, worked out once per plan and map (the model does
        not change while it is planned)."""
        key = (id(norm), rule.affine)
        found = self._affines.get(key)
        if found is None:
            found = self._affines[key] = rule.affine(norm)
        return found

    def positive(self, rule: FoldRule, norm: nn.Module) -> bool:
        """Whether every channel's scale is positive (an order-keeping op such as max-pooling lets the map
        through only then)."""
        return bool((self.affine(rule, norm)[0] > 0).all())

    @cached_property
    def readers_inside(self) -> dict[str, str]:
        """Parameter or buffer name -> the outermost module that holds it and runs as one unit in the trace
        (its own forward may read the tensor where bnfold cannot see). Computed once per plan: the constants
        and the branches passes both read it."""
        found: dict[str, str] = {}
        by_id: dict[int, str] = {}  # the names named_parameters() and named_buffers() give
        for table in ("_parameters", "_buffers"):
            seen: set[int] = set()
            for prefix, module in self.modules:
                for key, t in getattr(module, table).items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        by_id[id(t)] = f"{prefix}.{key}" if prefix else key
        covered: str | None = None  # the last module taken: its descendants hold nothing it did not
        for module_name, module in self.modules:
            if covered is not None and (covered == "" or module_name.startswith(covered + ".")):
                continue
            if not self.graph.calls_of(module):
                continue
            covered = module_name
            label = module_name or type(module).__name__
            for sub in module.modules() if module._modules else (module,):
                for t in (*sub._parameters.values(), *sub._buffers.values()):
                    if t is not None and id(t) in by_id:
                        found.setdefault(by_id[id(t)], label)
        return found


def layer_reason(layer: nn.Module, ctx: PlanContext) -> str | None:
    """Why nothing may fold into ``layer`` at all, whatever the kind of fold."""
    name = ctx.name(layer)
    if name in ctx.claimed:
        return f"'{name}' is merged with its parallel branches into '{ctx.claimed[name]}'"
    calls = len(ctx.graph.calls_of(layer))
    if calls > 1:
        return f"'{name}' is called {calls} times in one forward pass (shared weights)"
    if id(layer) in ctx.graph.foreign_uses:
        return f"the parameters of '{name}' are also used outside it (by {ctx.graph.foreign_uses[id(layer)]})"
    # a layer rarely has children: its own dict is many times cheaper to read than parameters()
    for t in layer.parameters() if layer._modules else (p for p in layer._parameters.values() if p is not None):
        others = [o for o in ctx.owners.get(id(t), []) if o != name and not o.startswith(name + ".")]
        if others:
            return f"'{name}': its parameters are shared with '{others[0]}'"
    if len(layer._forward_hooks) > 0:
        return f"'{name}' has forward hooks that would see the folded output"
    hook_reason = unknown_pre_hook_reason(layer)
    if hook_reason:
        return f"'{name}': {hook_reason}"
    weight = tensor_attr(layer, "weight")
    if weight is None or not weight.is_floating_point():
        return f"'{name}' has no floating-point weight to fold into"
    return None


def rule_for(layer: nn.Module, norm: nn.Module, direction: Direction, ctx: PlanContext) -> FoldRule:
    """The rule that folds ``norm`` into ``layer``, once the pair and the layer pass their checks."""
    rule = ctx.rules.rule_for(layer, norm, direction)
    if rule is None:
        ltype, ntype = layer_type(layer).__name__, layer_type(norm).__name__
        where = "is fed by" if direction == "backward" else "feeds"
        arrow = "->" if direction == "backward" else "<-"
        raise Kept(
            f"it {where} '{ctx.name(layer)}' ({ltype}), and there is no {direction} fold rule for {ltype} {arrow} {ntype}",
            ctx.name(layer),
        )
    reason = rule.check(norm)
    if reason:
        raise Kept(reason, ctx.name(layer))
    reason = layer_reason(layer, ctx)
    if reason:
        raise Kept(reason, ctx.name(layer))
    return rule


def symbolic_rank_check(norm: nn.Module, layer: nn.Module, rule: FoldRule, ctx: PlanContext, flattened: bool) -> None:
    """Without example inputs there are no shapes: fold only where the ranks the norm and the layer accept
    fix the channel axis to the same place."""
    name = ctx.name(layer)
    layout = rule.weight_layout
    if flattened and layout == "linear":
        return  # Flatten(1, -1) of a (N, C, ...) norm output: C is the outer index of the features
    norm_ranks = ctx.rules.input_ranks(norm)
    layer_ranks = output_ranks(layer, layout)
    if norm_ranks is None:
        ranks: set[int] = set(layer_ranks or ())
    else:
        ranks = set(norm_ranks) & set(layer_ranks) if layer_ranks is not None else set(norm_ranks)
    if (
        norm_ranks is None
        or not ranks
        or any(rule.channel_axis(norm, r) != channel_axis(layer, layout, r) for r in ranks)
    ):
        raise Kept(
            f"without example_inputs bnfold cannot tell whether it normalizes the channels of '{name}'; "
            "pass example_inputs",
            name,
        )
