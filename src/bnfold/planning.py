"""Match the rule table against the data-flow graph: the FoldPlan.

The plan is the one piece of data every later step reads: the sites to fold
and the norms kept, each with its reason in words. Building it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize, prune

from .graph import Call, DataFlowGraph
from .rules import FoldRule, RuleTable, is_norm_layer, layer_type, require_tensor, tensor_attr, unfoldable_reason

__all__ = ["FoldSite", "KeptNorm", "FoldPlan", "make_plan", "producer_types", "norm_types"]

TRAINING_REASON_PREFIX = "in training mode"


@dataclass(frozen=True)
class FoldSite:
    """A norm layer that folds into its partner layer."""

    norm: str
    norm_type: str
    producer: str
    producer_type: str
    direction: Literal["backward"] = "backward"

    @property
    def decision(self) -> str:
        return "folded"


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
    >>> [(s.norm, s.producer) for s in p.sites]
    [('1', '0')]
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
        from .report import render_plan

        return render_plan(self)


def producer_types(rules: RuleTable) -> set[type[nn.Module]]:
    return {producer for producer, _ in rules}


def norm_types(rules: RuleTable) -> set[type[nn.Module]]:
    return {norm for _, norm in rules}


def _fixed_input_ndim(norm: nn.Module) -> int | None:
    """The input rank a norm accepts, when it accepts only one (BatchNorm2d: 4)."""
    if isinstance(norm, nn.BatchNorm2d):
        return 4
    if isinstance(norm, nn.BatchNorm3d):
        return 5
    running_mean = getattr(norm, "running_mean", None)
    if not isinstance(norm, nn.modules.batchnorm._NormBase) and running_mean is not None and hasattr(norm, "eps"):
        return 4  # frozen 2d batch norms (torchvision, timm) reshape their buffers to (1, C, 1, 1)
    return None


def _producer_channels(producer: nn.Module, rule: FoldRule) -> int:
    weight = require_tensor(producer, "weight")
    if rule.weight_layout == "conv_transpose":
        return int(weight.shape[1]) * int(getattr(producer, "groups", 1))
    return int(weight.shape[0])


def _producer_channel_axis(producer: nn.Module, rule: FoldRule, output_ndim: int) -> int:
    if rule.weight_layout == "linear":
        return output_ndim - 1
    kernel_dims = require_tensor(producer, "weight").dim() - 2
    return 1 if output_ndim == kernel_dims + 2 else 0


def _pre_hook_reason(producer: nn.Module) -> str | None:
    for hook in list(producer._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            if getattr(hook, "_tensor_name", None) == "weight":
                continue
            return f"its {hook._tensor_name} is pruned (torch.nn.utils.prune); folding would not keep the mask"
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == "weight":
            continue
        return (
            f"it has a forward pre-hook ({getattr(hook, '__qualname__', type(hook).__name__)}) that bnfold does "
            "not know; it might rewrite the weight"
        )
    return None


def _shared_parameter_reason(producer: nn.Module, owners: dict[int, list[str]], name: str) -> str | None:
    for t in producer.parameters():
        others = [o for o in owners.get(id(t), []) if o != name and not o.startswith(name + ".")]
        if others:
            return f"its parameters are shared with '{others[0]}'"
    return None


def _backward_reason(
    norm: nn.Module,
    norm_call: Call,
    graph: DataFlowGraph,
    model_names: dict[int, str],
    rules: RuleTable,
    owners: dict[int, list[str]],
) -> tuple[str | None, str | None, FoldRule | None]:
    """(reason kept or None, partner name, rule) for folding ``norm`` into the layer that feeds it."""
    if not norm_call.inputs:
        return "it was called without a tensor input", None, None
    value = norm_call.inputs[0]
    source_index = graph.producer.get(value)
    if source_index is None:
        return (
            "its input is not produced by any layer bnfold saw (a model input, or a tensor changed in place)",
            None,
            None,
        )
    source = graph.calls[source_index]
    if source.kind == "input":
        return "its input is a model input: there is no layer before it to fold into", None, None
    if source.kind != "module" or source.module is None:
        return (
            f"its input comes from '{source.target}', not from a Conv/ConvTranspose/Linear layer",
            source.target,
            None,
        )
    producer = source.module
    pname = model_names.get(id(producer), source.target)
    ptype = layer_type(producer).__name__
    rule = rules.get((layer_type(producer), layer_type(norm)))
    if rule is None:
        return (
            f"it is fed by '{pname}' ({ptype}), and there is no fold rule for {ptype} -> {type(norm).__name__}",
            pname,
            None,
        )
    reason = rule.check(norm)
    if reason:
        return reason, pname, None
    producer_calls = len(graph.calls_of(producer))
    if producer_calls > 1:
        return f"'{pname}' is called {producer_calls} times in one forward pass (shared weights)", pname, None
    others = [graph.calls[i] for i in graph.consumers.get(value, []) if i != norm_call.index]
    if others:
        other = others[0]
        where = "the model's outputs" if other.kind == "output" else f"'{other.target}'"
        return f"the output of '{pname}' also feeds {where}: folding would change what that sees", pname, None
    if len(source.outputs) != 1:
        return f"'{pname}' returns several tensors", pname, None
    if id(producer) in graph.foreign_uses:
        return (
            f"the parameters of '{pname}' are also used outside it (by {graph.foreign_uses[id(producer)]})",
            pname,
            None,
        )
    shared = _shared_parameter_reason(producer, owners, pname)
    if shared:
        return f"'{pname}': {shared}", pname, None
    if len(producer._forward_hooks) > 0:
        return f"'{pname}' has forward hooks that would see the folded output", pname, None
    hook_reason = _pre_hook_reason(producer)
    if hook_reason:
        return f"'{pname}': {hook_reason}", pname, None
    weight = tensor_attr(producer, "weight")
    if weight is None or not weight.is_floating_point():
        return f"'{pname}' has no floating-point weight to fold into", pname, None
    scale, _ = rule.affine(norm)
    if scale.numel() != _producer_channels(producer, rule):
        return f"it has {scale.numel()} channels but '{pname}' makes {_producer_channels(producer, rule)}", pname, None
    if graph.has_shapes:
        out_ndim = source.output_ndims[0]
        in_ndim = norm_call.input_ndims[0]
        if out_ndim is None or in_ndim is None:
            return "the shape of its input is unknown", pname, None
        if rule.channel_axis(norm, in_ndim) != _producer_channel_axis(producer, rule, out_ndim):
            return (
                (
                    f"it normalizes axis {rule.channel_axis(norm, in_ndim)} of its input, but the output channels of "
                    f"'{pname}' are axis {_producer_channel_axis(producer, rule, out_ndim)}"
                ),
                pname,
                None,
            )
    else:
        fixed = _fixed_input_ndim(norm)
        producer_rank = weight.dim() if rule.weight_layout != "linear" else None
        same_kind_instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm) and producer_rank is not None
        if not same_kind_instance and (fixed is None or producer_rank is None or fixed != producer_rank):
            return (
                (
                    "without example_inputs bnfold cannot tell whether it normalizes the output channels of "
                    f"'{pname}'; pass example_inputs"
                ),
                pname,
                None,
            )
    if parametrize.is_parametrized(producer, "bias") and getattr(producer, "bias", None) is None:
        return f"'{pname}' has a parametrized bias that is None", pname, None
    return None, pname, rule


def _has_hooks(module: nn.Module) -> bool:
    return len(module._forward_hooks) > 0 or len(module._forward_pre_hooks) > 0


def make_plan(model: nn.Module, graph: DataFlowGraph, rules: RuleTable) -> FoldPlan:
    """Decide, for every norm layer of ``model``, whether and where it folds."""
    names: dict[int, str] = {}
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    for name, module in model.named_modules():
        for t in module.parameters(recurse=False):
            owners.setdefault(id(t), []).append(name)

    sites: list[FoldSite] = []
    kept: list[KeptNorm] = []
    order: list[str] = []
    claimed: dict[int, str] = {}  # producer id -> norm already folding into it
    for name, norm in model.named_modules():
        if not is_norm_layer(norm, rules):
            continue
        order.append(name)
        ntype = layer_type(norm).__name__
        reason = unfoldable_reason(norm, rules)
        partner: str | None = None
        rule = None
        calls = [i for i in graph.calls_of(norm)]
        if reason is None:
            if not calls:
                reason = "it is not called in the forward pass"
            elif len(calls) > 1:
                reason = f"it is called {len(calls)} times in one forward pass (shared)"
            elif _has_hooks(norm):
                reason = "it has forward hooks, which would be lost"
            elif calls[0] < 0:
                reason = "it runs inside another layer bnfold treats as a whole"
            else:
                reason, partner, rule = _backward_reason(norm, graph.calls[calls[0]], graph, names, rules, owners)
        if reason is None and rule is not None and partner is not None:
            producer_id = id(model.get_submodule(partner))
            if producer_id in claimed:
                reason = f"'{partner}' already takes '{claimed[producer_id]}'"
            else:
                claimed[producer_id] = name
                sites.append(FoldSite(name, ntype, partner, rule.producer.__name__))
                continue
        kept.append(KeptNorm(name, ntype, reason or "no rule applies", partner))
    return FoldPlan(type(model).__name__, graph.traced_with, tuple(sites), tuple(kept), tuple(order))
