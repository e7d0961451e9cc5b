"""Module surgery: copy a model, write folded weights where layers really read them, swap out norms (or
make them neutral, where their rule leaves them in place).

Weights can live in a plain parameter, behind ``torch.nn.utils.parametrize``
(weight_norm, spectral_norm, any user parametrization), behind a pruning mask
(``torch.nn.utils.prune``: ``weight_orig * weight_mask`` recomputed by a forward
pre-hook) or behind the older hook-based ``weight_norm``. Every change is logged
so that a failed check can put the model back exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from ..errors import FoldError
from ..planning.channelwise import affine_of_op, constant_named, neutral_value
from ..planning.fold_plan import AppliedBy, ConcatSlices, FoldPlan, FoldSite
from ..reparam.merge_pass import kept_program
from ..reparam.merge_recipe import MergeRecipe
from ..reparam.merged_conv import MergedConv, build_conv
from ..reparam.recipes import evaluate
from ..rules.layers import CONVS, out_channels
from ..rules.norms import PURE_REPLACEMENTS, laid_out, require_tensor, tensor_attr
from ..rules.table import FoldRule, RuleTable
from ..rules.weight_hooks import effective_weight, weight_hook
from .fold_arithmetic import Layout, fold_bias, input_shift_response, scale_input_channels, scale_output_channels

__all__ = [
    "clone_model",
    "apply_plan",
    "folded_copy",
    "undo_all",
    "Undo",
    "ChannelScale",
    "ChannelAffine",
    "Surgery",
    "apply_backward",
    "apply_concat",
    "apply_forward",
    "apply_constant",
    "apply_merge",
    "apply_merged",
]


class Undo:
    """The steps that put a model back as it was, in the order they were taken. A disabled log records
    nothing (folding a copy that is thrown away on failure needs no way back, nor the memory for it)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.steps: list[Callable[[], None]] = []

    def append(self, step: Callable[[], None]) -> None:
        if self.enabled:
            self.steps.append(step)


def clone_model(model: nn.Module, made: dict[int, Any] | None = None) -> nn.Module:
    """One deep copy of ``model``, also for models that ``copy.deepcopy`` refuses. ``made``: parts of the
    copy made already (a deep-copy memo: id of the original's tensor or module -> what takes its place).

    Right after pruning with autograd on, a module's ``weight`` attribute is a non-leaf tensor
    (``weight_orig * weight_mask``), which deepcopy rejects; such derived tensors are copied detached
    (the pruning hook recomputes them on the next forward anyway).
    """
    memo: dict[int, Any] = dict(made or {})
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf and not isinstance(value, nn.Parameter):
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # some attribute of the user's model cannot be copied
        raise TypeError(
            f"cannot copy {type(model).__name__} ({type(error).__name__}: {error}); "
            "fold it in place with inplace=True, or make it deep-copyable"
        ) from error


class ChannelScale(nn.Module):
    """A parametrization that multiplies a weight along its output (``axis="output"``) or input channels."""

    def __init__(self, scale: Tensor, layout: Layout, groups: int, axis: str = "output") -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.layout: Layout = layout
        self.groups = groups
        self.axis = axis

    def forward(self, weight: Tensor) -> Tensor:
        scale = require_tensor(self, "scale")
        if self.axis == "output":
            return scale_output_channels(weight, scale, self.layout, self.groups)
        return scale_input_channels(weight, scale, self.layout, self.groups)


class ChannelAffine(nn.Module):
    """A parametrization that maps a bias ``b`` to ``b * scale + shift``."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, bias: Tensor) -> Tensor:
        return fold_bias(bias, require_tensor(self, "scale"), require_tensor(self, "shift"), bias)


def _copy_into(t: Tensor, value: Tensor, undo: Undo) -> None:
    old = t.detach().clone() if undo.enabled else t
    with torch.no_grad():
        t.copy_(value)

    def restore() -> None:
        with torch.no_grad():
            t.copy_(old)

    undo.append(restore)


def _set_attribute(module: nn.Module, name: str, value: Tensor, undo: Undo) -> None:
    old = require_tensor(module, name)
    setattr(module, name, value)
    undo.append(lambda: setattr(module, name, old))


def _append_parametrization(module: nn.Module, name: str, parametrization: nn.Module, undo: Undo) -> None:
    parametrize.register_parametrization(module, name, parametrization)
    plist = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[name])

    def drop_last() -> None:
        del plist[len(plist) - 1]

    undo.append(drop_last)


def _write_weight(layer: nn.Module, scale: Tensor, layout: Layout, axis: str, undo: Undo) -> None:
    """Multiply the layer's weight by ``scale`` along ``axis`` ("output" or "input" channels)."""
    groups = int(getattr(layer, "groups", 1))
    scaled = scale_output_channels if axis == "output" else scale_input_channels
    if parametrize.is_parametrized(layer, "weight"):
        _append_parametrization(layer, "weight", ChannelScale(scale, layout, groups, axis), undo)
        return
    pruning = cast(prune.BasePruningMethod | None, weight_hook(layer, "prune"))
    if pruning is not None:
        # A per-channel scale keeps zeros zero: fold into weight_orig and keep the mask.
        orig = require_tensor(layer, "weight_orig")
        _copy_into(orig, scaled(orig, scale, layout, groups), undo)
        _set_attribute(layer, "weight", pruning.apply_mask(layer), undo)
        return
    weight_norm = cast(Any, weight_hook(layer, "weight_norm"))
    if weight_norm is not None:
        # weight = g * v / |v|: with v = target and g = |target|, weight = target, whatever the norm's dim
        target = scaled(weight_norm.compute_weight(layer), scale, layout, groups)
        _copy_into(require_tensor(layer, "weight_v"), target, undo)
        _copy_into(require_tensor(layer, "weight_g"), torch.norm_except_dim(target, 2, weight_norm.dim), undo)
        _set_attribute(layer, "weight", weight_norm.compute_weight(layer), undo)
        return
    weight = require_tensor(layer, "weight")
    if undo.enabled:
        _copy_into(weight, scaled(weight, scale, layout, groups), undo)
    else:  # a copy, dropped if anything fails: scale the weight where it is
        with torch.no_grad():
            scaled(weight, scale, layout, groups, out=weight)


def _write_bias(layer: nn.Module, scale: Tensor, shift: Tensor, undo: Undo) -> None:
    """Map the layer's bias ``b`` (zero when missing) to ``b * scale + shift``."""
    if parametrize.is_parametrized(layer, "bias"):
        _append_parametrization(layer, "bias", ChannelAffine(scale, shift), undo)
        return
    bias = tensor_attr(layer, "bias")
    weight = require_tensor(layer, "weight")
    if bias is None:
        new = nn.Parameter(fold_bias(None, scale, shift, weight), requires_grad=weight.requires_grad)
        layer.register_parameter("bias", new)
        undo.append(lambda: layer.register_parameter("bias", None))
    else:
        _copy_into(bias, fold_bias(bias, scale, shift, bias), undo)


def _parents(modules: Iterable[nn.Module]) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) under which each of ``modules`` (a model's ``modules()``) registers a child
    (a module may have aliases)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in modules:
        for attr, child in parent._modules.items():
            if child is not None:
                found.setdefault(id(child), []).append((parent, attr))
    return found


def _setter(parent: nn.Module, attr: str, module: nn.Module) -> Callable[[], None]:
    def put_back() -> None:
        parent._modules[attr] = module

    return put_back


def _replace(parents: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module, undo: Undo) -> None:
    new.train(old.training)
    for parent, attr in parents.get(id(old), []):
        parent._modules[attr] = new
        undo.append(_setter(parent, attr, old))


@dataclass
class Surgery:
    """What a surgery step works with: the model, its modules by name, where each module is registered,
    the rules the plan was made with, and the undo log."""

    model: nn.Module
    rules: RuleTable
    undo: Undo
    # folded norms a folded copy has replaced already (see folded_copy): name -> the original norm
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    parents: dict[int, list[tuple[nn.Module, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self.parents = _parents(self.modules.values())

    def norm(self, site: FoldSite) -> nn.Module:
        """The norm ``site`` folds (the original's, where the copy holds its replacement already)."""
        original = self.replaced.get(site.norm)
        return self.modules[site.norm] if original is None else original

    def rule(self, site: FoldSite, partner: str) -> FoldRule:
        rule = self.rules.rule_for(self.modules[partner], self.norm(site), site.direction)
        if rule is None:  # the plan was made with these rules
            raise KeyError(f"no {site.direction} rule for '{partner}' and '{site.norm}'")
        return rule

    def replace_norm(self, site: FoldSite, rule: FoldRule) -> None:
        """What remains of the folded norm: its replacement in its place, or the norm made neutral."""
        if site.norm in self.replaced:
            return
        norm = self.modules[site.norm]
        if rule.neutral is not None:
            _make_neutral(norm, rule.neutral(norm), self.undo)
            return
        _replace(self.parents, norm, laid_out(rule.replacement(norm), site.memory_format), self.undo)


def _make_neutral(norm: nn.Module, values: Mapping[str, Tensor], undo: Undo) -> None:
    """Write ``values`` into the norm's own tensors (its class and state_dict keys stay), through ``undo``."""
    for name, value in values.items():
        if parametrize.is_parametrized(norm, name):
            raise ValueError(f"its {name} is parametrized: bnfold cannot make it neutral")
        target = norm._parameters.get(name, norm._buffers.get(name))
        if not isinstance(target, Tensor) or target.shape != value.shape:
            raise ValueError(
                f"its rule makes {name} neutral with a tensor of shape {tuple(value.shape)}, but it holds "
                f"{'no tensor ' + name if not isinstance(target, Tensor) else tuple(target.shape)}"
            )
        _copy_into(target, value, undo)


def apply_backward(surgery: Surgery, site: FoldSite) -> None:
    """Scale the layer's output channels and map its bias; the norm gives way to its replacement."""
    (partner,) = site.partners
    rule = surgery.rule(site, partner)
    scale, shift = rule.affine(surgery.norm(site))
    _fold_output(surgery.modules[partner], scale, shift, rule.weight_layout, surgery.undo)
    surgery.replace_norm(site, rule)


def apply_concat(surgery: Surgery, site: FoldSite) -> None:
    """Each layer of the torch.cat takes its slice of the norm's channels."""
    rule = None
    slices = site.payload_as(ConcatSlices).slices
    for partner, (start, stop) in zip(site.partners, slices, strict=True):
        rule = surgery.rule(site, partner)
        scale, shift = rule.affine(surgery.norm(site))
        _fold_output(surgery.modules[partner], scale[start:stop], shift[start:stop], rule.weight_layout, surgery.undo)
    if rule is not None:
        surgery.replace_norm(site, rule)


def apply_forward(surgery: Surgery, site: FoldSite) -> None:
    """Scale every partner's input channels and add its response to the norm's shift to its bias."""
    rule = None
    for partner in site.partners:
        rule = surgery.rule(site, partner)
        scale, shift = rule.affine(surgery.norm(site))
        layer = surgery.modules[partner]
        groups = int(getattr(layer, "groups", 1))
        response = input_shift_response(effective_weight(layer), shift, rule.weight_layout, groups)
        _write_weight(layer, scale, rule.weight_layout, "input", surgery.undo)
        _write_bias(layer, torch.ones_like(response), response, surgery.undo)
    if rule is not None:
        surgery.replace_norm(site, rule)


def apply_constant(surgery: Surgery, site: FoldSite) -> None:
    """Fold the op's per-channel map into the layer, then make the constant the op's neutral value."""
    op = site.payload_as(AppliedBy).op
    constant = constant_named(surgery.model, site.norm)
    layer = surgery.modules[site.partners[0]]
    layout = surgery.rules.layout_for(layer)
    scale, shift = affine_of_op(op, constant, out_channels(layer, layout))
    _fold_output(layer, scale, shift, layout, surgery.undo)
    _copy_into(constant, neutral_value(op, constant), surgery.undo)


def _fold_output(layer: nn.Module, scale: Tensor, shift: Tensor, layout: Layout, undo: Undo) -> None:
    """Map the layer's output channels ``y`` to ``scale * y + shift``."""
    _write_weight(layer, scale, layout, "output", undo)
    _write_bias(layer, scale, shift, undo)


def apply_merge(surgery: Surgery, site: FoldSite) -> None:
    """The block around merged branches becomes one convolution and the modules after the sum."""
    merge = site.payload_as(MergeRecipe)
    block = surgery.modules[site.norm]
    form = evaluate(merge.recipe, surgery.model, surgery.rules, merge.channels, merge.dims)
    first = next(surgery.modules[name] for name in site.partners if _is_conv(surgery.modules[name]))
    conv = build_conv(form, require_tensor(first, "weight"))
    post = [(name, block.get_submodule(name)) for name in merge.post]
    pre = [(name, block.get_submodule(name)) for name in merge.pre]
    kept, held = kept_program(merge.kept, site.norm, block)
    merged = MergedConv(conv, post, site.partners, pre, kept, held)
    modes = {id(m): m.training for m in merged.modules()}
    _replace(surgery.parents, block, merged, surgery.undo)
    for module in merged.modules():  # what it keeps runs in the mode it ran in (a norm left in training mode)
        module.training = modes.get(id(module), merged.training) if module is not merged else merged.training
    # what it keeps is registered there now too: a later fold that replaces one of them must replace it there
    for path, thing, kind in [(n, m, "module") for n, m in (*pre, *post)] + held:
        if kind == "module":
            owner, _, attr = path.rpartition(".")
            surgery.parents.setdefault(id(thing), []).append((merged.get_submodule(owner) if owner else merged, attr))


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, tuple(CONVS.values()))


def apply_merged(surgery: Surgery, site: FoldSite) -> None:
    """A norm inside merged branches: the merge of its block takes it with the block."""


def apply_plan(
    model: nn.Module,
    plan: FoldPlan,
    rules: RuleTable,
    *,
    undoable: bool = True,
    replaced: dict[str, nn.Module] | None = None,
) -> Undo:
    """Fold every site of ``plan`` into ``model`` in place; return the log that undoes it (see undo_all).
    With ``undoable=False`` nothing is recorded: for a copy that is discarded if anything fails.
    ``replaced``: the folded norms :func:`folded_copy` replaced while copying (name -> the original norm)."""
    undo = Undo(undoable)
    surgery = Surgery(model, rules, undo, dict(replaced or {}))
    for site in plan.sites:
        try:
            plan.kind(site).step(surgery, site)
        except Exception as error:
            undo_all(undo)
            raise FoldError(
                f"cannot fold '{site.norm}' ({site.norm_type}) into '{site.partner}' ({', '.join(site.partner_types)}): "
                f"{type(error).__name__}: {error}; the model was left unchanged",
                norm=site.norm,
            ) from error
    return undo


def undo_all(undo: Undo) -> None:
    """Put the model back as it was before :func:`apply_plan`."""
    for step in reversed(undo.steps):
        step()
    undo.steps.clear()


def _replacements(model: nn.Module, plan: FoldPlan, rules: RuleTable, memo: dict[int, Any]) -> dict[str, nn.Module]:
    """Put, in the deep-copy ``memo``, each folded norm's replacement in the norm's place, so that copying
    ``model`` does not copy the norm only to throw it away. Only for replacements that build a new module and
    change nothing (:data:`~bnfold.norms.PURE_REPLACEMENTS`); the modules they take from the norm (its
    activation) are copied with the same memo, as copying the model would. Returns name -> the original norm."""
    replaced: dict[str, nn.Module] = {}
    for site in plan.sites:
        if plan.kind(site).residue != "rule" or not site.partners:
            continue
        norm = model.get_submodule(site.norm)
        # surgery replaces the norm by the rule of its last partner
        rule = rules.rule_for(model.get_submodule(site.partners[-1]), norm, site.direction)
        if rule is None or rule.neutral is not None or rule.replacement not in PURE_REPLACEMENTS or id(norm) in memo:
            continue
        try:
            made = laid_out(rule.replacement(norm), site.memory_format)
            _copy_taken(made, {id(m) for m in norm.modules()}, memo)
        except Exception:  # apply_plan meets it again and says why
            continue
        made.train(norm.training)
        memo[id(norm)] = made
        replaced[site.norm] = norm
    return replaced


def _copy_taken(module: nn.Module, taken: set[int], memo: dict[int, Any]) -> None:
    """Swap each module under ``module`` that is one of ``taken`` (the norm's) for its copy, made with
    ``memo``."""
    for key, child in module._modules.items():
        if child is None:
            continue
        if id(child) in taken:
            module._modules[key] = copy.deepcopy(child, memo)
        else:
            _copy_taken(child, taken, memo)


def folded_copy(model: nn.Module, plan: FoldPlan, rules: RuleTable) -> nn.Module:
    """A copy of ``model`` with ``plan`` applied (``model`` is not changed), made without copying what
    folding throws away: a folded norm is not copied but replaced as the model is copied."""
    memo: dict[int, Any] = {}
    replaced = _replacements(model, plan, rules, memo)
    folded = clone_model(model, memo)
    apply_plan(folded, plan, rules, undoable=False, replaced=replaced)
    return folded
