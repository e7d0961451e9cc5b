"""Module surgery: copy a model, write folded weights where layers really read them, swap out norms.

Weights can live in a plain parameter, behind ``torch.nn.utils.parametrize``
(weight_norm, spectral_norm, any user parametrization), behind a pruning mask
(``torch.nn.utils.prune``: ``weight_orig * weight_mask`` recomputed by a forward
pre-hook) or behind the older hook-based ``weight_norm``. Every change is logged
so that a failed check can put the model back exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from .arithmetic import Layout, fold_bias, scale_output_channels
from .errors import FoldError
from .planning import FoldPlan
from .rules import RuleTable, layer_type, require_tensor, tensor_attr

__all__ = ["clone_model", "apply_plan", "Undo", "ChannelScale", "ChannelAffine"]

Undo = list[Callable[[], None]]


def clone_model(model: nn.Module) -> nn.Module:
    """One deep copy of ``model``, also for models that ``copy.deepcopy`` refuses.

    Right after pruning with autograd on, a module's ``weight`` attribute is a non-leaf tensor
    (``weight_orig * weight_mask``), which deepcopy rejects; such derived tensors are copied detached
    (the pruning hook recomputes them on the next forward anyway).
    """
    memo: dict[int, Any] = {}
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
    """A parametrization that multiplies a weight along its output channels (float64 scale kept)."""

    def __init__(self, scale: Tensor, layout: Layout, groups: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.layout: Layout = layout
        self.groups = groups

    def forward(self, weight: Tensor) -> Tensor:
        return scale_output_channels(weight, require_tensor(self, "scale"), self.layout, self.groups)


class ChannelAffine(nn.Module):
    """A parametrization that maps a bias ``b`` to ``b * scale + shift``."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, bias: Tensor) -> Tensor:
        return fold_bias(bias, require_tensor(self, "scale"), require_tensor(self, "shift"), bias)


def _weight_hook(module: nn.Module, kind: str) -> Any:
    for hook in module._forward_pre_hooks.values():
        if kind == "prune" and isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight":
            return hook
        if kind == "weight_norm" and type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == "weight":
            return hook
    return None


def _copy_into(t: Tensor, value: Tensor, undo: Undo) -> None:
    old = t.detach().clone()
    with torch.no_grad():
        t.copy_(value)

    def restore() -> None:
        with torch.no_grad():
            t.copy_(old)

    undo.append(restore)


def _append_parametrization(module: nn.Module, name: str, parametrization: nn.Module, undo: Undo) -> None:
    parametrize.register_parametrization(module, name, parametrization)
    plist = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[name])

    def drop_last() -> None:
        del plist[len(plist) - 1]

    undo.append(drop_last)


def _write_weight(producer: nn.Module, scale: Tensor, layout: Layout, undo: Undo) -> None:
    groups = int(getattr(producer, "groups", 1))
    if parametrize.is_parametrized(producer, "weight"):
        _append_parametrization(producer, "weight", ChannelScale(scale, layout, groups), undo)
        return
    pruning = _weight_hook(producer, "prune")
    if pruning is not None:
        # A per-channel scale keeps zeros zero: fold into weight_orig and keep the mask.
        orig = require_tensor(producer, "weight_orig")
        _copy_into(orig, scale_output_channels(orig, scale, layout, groups), undo)
        old_weight = require_tensor(producer, "weight")
        producer.weight = pruning.apply_mask(producer)
        undo.append(lambda: setattr(producer, "weight", old_weight))
        return
    weight_norm = _weight_hook(producer, "weight_norm")
    if weight_norm is not None:
        target = scale_output_channels(weight_norm.compute_weight(producer), scale, layout, groups)
        _copy_into(require_tensor(producer, "weight_v"), target, undo)
        _copy_into(require_tensor(producer, "weight_g"), torch.norm_except_dim(target, 2, weight_norm.dim), undo)
        old_weight = require_tensor(producer, "weight")
        producer.weight = weight_norm.compute_weight(producer)
        undo.append(lambda: setattr(producer, "weight", old_weight))
        return
    weight = require_tensor(producer, "weight")
    _copy_into(weight, scale_output_channels(weight, scale, layout, groups), undo)


def _write_bias(producer: nn.Module, scale: Tensor, shift: Tensor, undo: Undo) -> None:
    if parametrize.is_parametrized(producer, "bias"):
        _append_parametrization(producer, "bias", ChannelAffine(scale, shift), undo)
        return
    bias = tensor_attr(producer, "bias")
    weight = require_tensor(producer, "weight")
    if bias is None:
        new = nn.Parameter(fold_bias(None, scale, shift, weight), requires_grad=weight.requires_grad)
        producer.register_parameter("bias", new)

        def drop_bias() -> None:
            producer.register_parameter("bias", None)

        undo.append(drop_bias)
    else:
        _copy_into(bias, fold_bias(bias, scale, shift, bias), undo)


def _locations(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) under which ``target`` is registered (a module may have aliases)."""
    found = []
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is target:
                found.append((parent, attr))
    return found


def _setter(parent: nn.Module, attr: str, module: nn.Module) -> Callable[[], None]:
    def put_back() -> None:
        parent._modules[attr] = module

    return put_back


def _replace(model: nn.Module, old: nn.Module, new: nn.Module, undo: Undo) -> None:
    new.train(old.training)
    for parent, attr in _locations(model, old):
        parent._modules[attr] = new
        undo.append(_setter(parent, attr, old))


def apply_plan(model: nn.Module, plan: FoldPlan, rules: RuleTable) -> Undo:
    """Fold every site of ``plan`` into ``model`` in place; return the log that undoes it (run in reverse)."""
    undo: Undo = []
    for site in plan.sites:
        try:
            norm = model.get_submodule(site.norm)
            producer = model.get_submodule(site.producer)
            rule = rules[(layer_type(producer), layer_type(norm))]
            scale, shift = rule.affine(norm)
            _write_weight(producer, scale, rule.weight_layout, undo)
            _write_bias(producer, scale, shift, undo)
            _replace(model, norm, rule.replacement(norm), undo)
        except Exception as error:
            undo_all(undo)
            raise FoldError(
                f"cannot fold '{site.norm}' ({site.norm_type}) into '{site.producer}' ({site.producer_type}): "
                f"{type(error).__name__}: {error}; the model was left unchanged"
            ) from error
    return undo


def undo_all(undo: Undo) -> None:
    """Put the model back as it was before :func:`apply_plan`."""
    for step in reversed(undo):
        step()
    undo.clear()
