"""Where a layer really reads its weight: which forward pre-hooks bnfold understands.

A weight may be recomputed before each forward by a pruning mask
(``torch.nn.utils.prune``: ``weight = weight_orig * weight_mask``) or by the
older hook-based ``torch.nn.utils.weight_norm`` (``weight = g * v / |v|``).
Planning asks whether a layer's pre-hooks are all of these kinds; surgery
asks where to write. Both read this module.
"""

from __future__ import annotations

from typing import Literal, cast

from torch import Tensor, nn
from torch.nn.utils import prune
from torch.nn.utils.weight_norm import WeightNorm

from .norms import require_tensor

__all__ = ["weight_hook", "unknown_pre_hook_reason", "effective_weight"]

HookKind = Literal["prune", "weight_norm"]


def _kind(hook: object) -> tuple[HookKind | None, str | None]:
    """What a forward pre-hook recomputes: ``(kind, tensor name)``, or ``(None, None)`` for other hooks."""
    if isinstance(hook, prune.BasePruningMethod):
        return "prune", getattr(hook, "_tensor_name", None)
    if isinstance(hook, WeightNorm):
        return "weight_norm", hook.name
    return None, None


def weight_hook(module: nn.Module, kind: HookKind) -> object | None:
    """The forward pre-hook of ``kind`` that recomputes ``module.weight``, if there is one."""
    for hook in module._forward_pre_hooks.values():
        if _kind(hook) == (kind, "weight"):
            return hook
    return None


def unknown_pre_hook_reason(layer: nn.Module) -> str | None:
    """Why ``layer``'s forward pre-hooks forbid folding into it, or ``None`` when bnfold knows them all."""
    for hook in list(layer._forward_pre_hooks.values()):
        kind, tensor = _kind(hook)
        if kind is not None and tensor == "weight":
            continue
        if kind == "prune":
            return f"its {tensor} is pruned (torch.nn.utils.prune); folding would not keep the mask"
        name = getattr(hook, "__qualname__", type(hook).__name__)
        return f"it has a forward pre-hook ({name}) that bnfold does not know; it might rewrite the weight"
    return None


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight the layer computes with right now (through pruning masks and weight-norm hooks)."""
    pruning = weight_hook(layer, "prune")
    if pruning is not None:
        return cast(Tensor, cast(prune.BasePruningMethod, pruning).apply_mask(layer))
    weight_norm = weight_hook(layer, "weight_norm")
    if weight_norm is not None:
        return cast(Tensor, cast(WeightNorm, weight_norm).compute_weight(layer))
    return require_tensor(layer, "weight")
