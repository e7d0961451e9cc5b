"""Adapters that fold a model with each tool, the way its users call it."""

from __future__ import annotations

import copy
import importlib.metadata
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

import bnfold
from bnfold.rules import third_party as compat
from bnfold.rules.norms import FoldedNormAct


@dataclass
class Peer:
    name: str
    fold: Callable[[nn.Module, torch.Tensor], nn.Module]
    version: str
    unavailable: str | None = None  # why it cannot run here (e.g. the pip error)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _NormCounter(TorchFunctionMode):
    """Counts batch-norm computations in one forward pass, however the model is built (modules, a
    GraphModule with inlined functional calls, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (F.batch_norm, F.instance_norm, torch.batch_norm, torch.instance_norm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def norm_count(model: nn.Module, x: torch.Tensor) -> int:
    """Batch-norm computations run by one forward pass of ``model`` on ``x`` (frozen batch norms, which
    compute x * scale + shift themselves, are counted by module)."""
    frozen = (*compat.frozen_batchnorm_types(), *compat.frozen_norm_act_types())
    calls = [0]
    handles = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for m in model.modules()
        if isinstance(m, frozen)
    ]
    counter = _NormCounter()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counter.count + calls[0]


def fold_bnfold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return bnfold.fold(model, x)


def fold_fasterai(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from fasterai.misc.bn_folding import BN_Folder

    return BN_Folder().fold(model)


def fold_fx(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


def _ao_pairs(model: nn.Module, x: torch.Tensor) -> list[list[str]]:
    """The (layer, norm) name pairs a user would write by hand, as torch.ao accepts them: the backward pairs
    that really are adjacent in the data flow (found by bnfold), of types torch.ao knows."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    known = {key for key in _DEFAULT_OP_LIST_TO_FUSER_METHOD if len(key) == 2}
    pairs = []
    for site in bnfold.plan(model, x).sites:
        if site.kind != "backward":
            continue
        layer, norm = model.get_submodule(site.partners[0]), model.get_submodule(site.norm)
        if (type(layer), type(norm)) in known:
            pairs.append([site.partners[0], site.norm])
    return pairs


def fold_ao(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import fuse_modules

    pairs = _ao_pairs(model, x)
    if not pairs:  # fuse_modules asserts on an empty list: nothing to fuse is a result, not a failure
        return copy.deepcopy(model)
    return fuse_modules(model, pairs)


def fold_aimet(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    folded = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold_all_batch_norms(folded, tuple(x.shape), dummy_input=x)
    return folded


def delete_norms(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The speed limit: every BatchNorm-family layer removed (wrong outputs); activations of
    norm+activation layers kept."""
    stripped = copy.deepcopy(model)
    kinds = (_BatchNorm, *compat.frozen_batchnorm_types(), *compat.frozen_norm_act_types())
    for _, parent in list(stripped.named_modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, kinds):
                act, drop = getattr(child, "act", None), getattr(child, "drop", None)
                if isinstance(act, nn.Module):
                    parent._modules[name] = FoldedNormAct(drop if isinstance(drop, nn.Module) else nn.Identity(), act)
                else:
                    parent._modules[name] = nn.Identity()
    return stripped


def _probe(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # an optional peer that cannot be imported here
        return f"{type(error).__name__}: {error}"
    return None


def peers(names: Iterable[str] | None = None) -> list[Peer]:
    """The tools, or only those named: a fresh-process probe imports just the tool it measures (before
    measuring, so that no tool's import counts as memory of its fold)."""
    specs = [
        ("bnfold", fold_bnfold, lambda: bnfold.__version__, "bnfold"),
        ("fasterai", fold_fasterai, lambda: _version("fasterai"), "fasterai.misc.bn_folding"),
        ("torch.fx fuse", fold_fx, lambda: torch.__version__, "torch.fx.experimental.optimization"),
        ("torch.ao fuse_modules", fold_ao, lambda: torch.__version__, "torch.ao.quantization"),
        ("AIMET", fold_aimet, lambda: _version("aimet-torch"), "aimet_torch.batch_norm_fold"),
    ]
    wanted = None if names is None else set(names)
    return [
        Peer(name, fold, version(), _probe(module))
        for name, fold, version, module in specs
        if wanted is None or name in wanted
    ]


LIMIT = Peer("norms deleted (limit)", delete_norms, "-")
