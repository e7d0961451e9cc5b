"""Module surgery: copy a model, and carry out each site of a plan on it: one step per kind of fold (a folded
norm is replaced, or made neutral where its rule leaves it in place).

Every change a step makes is an edit of :mod:`bnfold.apply.edits` (scale a weight where the layer reads it, map
a bias, replace a norm wherever it is registered), kept in the surgery's :class:`~bnfold.apply.edits.EditLog`:
a failed check puts the model back exactly as it was, and the log says what folding changed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import FoldError
from ..planning.channelwise import affine_of_op, constant_named, neutral_value
from ..planning.fold_plan import AppliedBy, ConcatSlices, FoldPlan, FoldSite
from ..reparam.merge_pass import kept_program
from ..reparam.merge_recipe import MergeRecipe
from ..reparam.merged_conv import MergedConv, build_conv
from ..reparam.recipes import evaluate
from ..rules.layers import CONVS, out_channels
from ..rules.norms import PURE_REPLACEMENTS, laid_out, require_tensor
from ..rules.table import FoldRule, RuleTable
from ..rules.weight_hooks import effective_weight
from .edits import EditLog, Place, Replaced, places
from .fold_arithmetic import input_shift_response

__all__ = [
    "clone_model",
    "apply_plan",
    "folded_copy",
    "undo_all",
    "copy_and_fold",
    "Surgery",
    "apply_backward",
    "apply_concat",
    "apply_forward",
    "apply_constant",
    "apply_merge",
    "apply_merged",
]


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


@dataclass
class Surgery:
    """What a surgery step works with: the model, its modules by name, where each module is registered,
    the rules the plan was made with, and the log of the edits made (each with its way back)."""

    model: nn.Module
    rules: RuleTable
    log: EditLog
    # folded norms a folded copy has replaced already (see folded_copy): name -> the original norm
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    parents: dict[int, list[Place]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self.parents = places(self.modules.values())

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
        original = self.replaced.get(site.norm)
        if original is not None:  # the copy was made with the replacement in place: say so
            new = self.modules[site.norm]
            self.log.note(Replaced(original, new, tuple(self.parents.get(id(new), ()))))
            return
        norm = self.modules[site.norm]
        if rule.neutral is not None:
            _make_neutral(norm, rule.neutral(norm), self.log)
            return
        self.log.replace(norm, laid_out(rule.replacement(norm), site.memory_format), self.parents.get(id(norm), ()))


def _make_neutral(norm: nn.Module, values: Mapping[str, Tensor], log: EditLog) -> None:
    """Write ``values`` into the norm's own tensors (its class and state_dict keys stay), through ``log``."""
    for name, value in values.items():
        if parametrize.is_parametrized(norm, name):
            raise ValueError(f"its {name} is parametrized: bnfold cannot make it neutral")
        target = norm._parameters.get(name, norm._buffers.get(name))
        if not isinstance(target, Tensor) or target.shape != value.shape:
            raise ValueError(
                f"its rule makes {name} neutral with a tensor of shape {tuple(value.shape)}, but it holds "
                f"{'no tensor ' + name if not isinstance(target, Tensor) else tuple(target.shape)}"
            )
    log.set_tensors(norm, dict(values))


def apply_backward(surgery: Surgery, site: FoldSite) -> None:
    """Scale the layer's output channels and map its bias; the norm gives way to its replacement."""
    (partner,) = site.partners
    rule = surgery.rule(site, partner)
    scale, shift = rule.affine(surgery.norm(site))
    surgery.log.map_output(surgery.modules[partner], scale, shift, rule.weight_layout)
    surgery.replace_norm(site, rule)


def apply_concat(surgery: Surgery, site: FoldSite) -> None:
    """Each layer of the torch.cat takes its slice of the norm's channels."""
    rule = None
    slices = site.payload_as(ConcatSlices).slices
    for partner, (start, stop) in zip(site.partners, slices, strict=True):
        rule = surgery.rule(site, partner)
        scale, shift = rule.affine(surgery.norm(site))
        surgery.log.map_output(surgery.modules[partner], scale[start:stop], shift[start:stop], rule.weight_layout)
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
        surgery.log.scale_weight(layer, scale, rule.weight_layout, "input")
        surgery.log.map_bias(layer, torch.ones_like(response), response)
    if rule is not None:
        surgery.replace_norm(site, rule)


def apply_constant(surgery: Surgery, site: FoldSite) -> None:
    """Fold the op's per-channel map into the layer, then make the constant the op's neutral value."""
    op = site.payload_as(AppliedBy).op
    constant = constant_named(surgery.model, site.norm)
    layer = surgery.modules[site.partners[0]]
    layout = surgery.rules.layout_for(layer)
    scale, shift = affine_of_op(op, constant, out_channels(layer, layout))
    surgery.log.map_output(layer, scale, shift, layout)
    owner, _, attr = site.norm.rpartition(".")
    surgery.log.set_tensors(surgery.model.get_submodule(owner), {attr: neutral_value(op, constant)})


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
    surgery.log.replace(block, merged, surgery.parents.get(id(block), ()))
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
    log: EditLog | None = None,
) -> EditLog:
    """Fold every site of ``plan`` into ``model`` in place; return the log of the edits made (see undo_all).
    With ``undoable=False`` the log keeps no way back: for a copy that is discarded if anything fails.
    ``replaced``: the folded norms :func:`folded_copy` replaced while copying (name -> the original norm).
    ``log``: make the edits in this log (after those it holds: a failure takes all of them back)."""
    log = EditLog(undoable) if log is None else log
    surgery = Surgery(model, rules, log, dict(replaced or {}))
    for site in plan.sites:
        try:
            plan.kind(site).step(surgery, site)
        except Exception as error:
            log.undo()
            raise FoldError(
                f"cannot fold '{site.norm}' ({site.norm_type}) into '{site.partner}' ({', '.join(site.partner_types)}): "
                f"{type(error).__name__}: {error}; the model was left unchanged",
                norm=site.norm,
            ) from error
    return log


def undo_all(log: EditLog) -> None:
    """Put the model back as it was before :func:`apply_plan`."""
    log.undo()


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


def copy_and_fold(model: nn.Module, plan: FoldPlan, rules: RuleTable) -> tuple[nn.Module, EditLog]:
    """A copy of ``model`` with ``plan`` applied (``model`` is not changed), and the log of what folding changed
    in it (with no way back: the copy is thrown away if anything fails). Made without copying what folding
    throws away: a folded norm is not copied but replaced as the model is copied."""
    memo: dict[int, Any] = {}
    replaced = _replacements(model, plan, rules, memo)
    folded = clone_model(model, memo)
    return folded, apply_plan(folded, plan, rules, undoable=False, replaced=replaced)


def folded_copy(model: nn.Module, plan: FoldPlan, rules: RuleTable) -> nn.Module:
    """A copy of ``model`` with ``plan`` applied (``model`` is not changed); see :func:`copy_and_fold`."""
    return copy_and_fold(model, plan, rules)[0]
