"""A differential fuzzer for bnfold: random programs, folded, and checked against the original by an oracle
of their own.

    python bench/fuzz.py --programs 10000             # the long run (about 25 minutes on 2 cores); counts per class
    python bench/fuzz.py --replay 1234                # one program: its listing and its outcome
    python bench/fuzz.py --replay 1234 --shrink       # ... and the smallest program that still fails the same way
    python -m bench.fuzz ...                          # the same, from the repository root

A program is a list of genes, each one step drawn from the table ``STEPS``: every layer, norm, channel-wise
constant and look-through op bnfold knows (and some it must refuse), in-place ops directly and through aliases
(``.detach()``, ``.data``, views, ``as_strided``, ``set_``, Tensor subclasses, ``out=``), shared modules, tied
weights, weights and constants read elsewhere, cat/chunk/split, reshapes that keep or interleave channels,
pooling, several and integer outputs, ``nn.ReLU(inplace=True)``; some programs are folded with
``inplace=True``, some with ``reparameterize=True``, some without example inputs (``torch.fx`` traces them
and nothing checks the folded model's outputs, so the plan alone must be right; a program torch.fx cannot
trace is refused), and a few are in training mode. A new op is one new entry in ``STEPS``.

Each program is folded with the public API only (``bnfold.fold_with_report``) and classified:

- ``folded``: bnfold returned a model, and the oracle finds its outputs equal to the original's;
- ``refused``: bnfold raised a ``BnfoldError`` with a reason, and the original is as it was;
- ``crash``: bnfold raised anything else (a bug, whatever the model);
- ``wrong``: bnfold returned a model whose outputs differ (the worst bug bnfold can have);
- ``changed``: the original model is not as it was (``inplace=False``, or a refused ``inplace=True``).

The oracle does not use bnfold's own check: it runs float64 copies of the original and of the folded model
(so float32 rounding is not amplified) and compares every output, and for integer outputs (argmax, masks) the
floating-point values they were taken from. A failing seed replays exactly (``--replay``) and shrinks
(``--shrink``: genes are removed one at a time while the program still fails the same way).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnfold

__all__ = ["Gene", "Options", "Program", "STEPS", "Outcome", "random_case", "build", "classify", "shrink", "main"]


# -- genes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gene:
    """One step of a program, before it is fitted to the values that exist where it lands."""

    op: str  # a key of STEPS
    src: int  # which value it reads: 0 = the newest that fits, 1 = the one before, ...
    other: int  # a second value, same convention
    width: int  # output channels or features
    bits: int  # op-specific random choices
    seed: int  # seeds the step's own parameters


@dataclass(frozen=True)
class Options:
    """How a program is built and folded."""

    input_shape: tuple[int, ...]
    inplace: bool = False
    train: bool = False  # the model is in training mode (nothing may fold; nothing may change)
    leaves: bool = False  # every value no step reads is an output too (else the last and the marked ones)
    reparameterize: bool = False  # bnfold.fold(..., reparameterize=True): parallel branches merged too
    symbolic: bool = False  # folded without example inputs (torch.fx): no run, so no output check either
    equalize: bool = False  # bnfold.fold(..., equalize=True): weight ranges equalized across layers too


@dataclass(frozen=True)
class Case:
    seed: int
    genes: tuple[Gene, ...]
    options: Options


def random_case(seed: int) -> Case:
    """The program for ``seed``: the same seed always gives the same program."""
    r = random.Random(seed)
    rank = r.choices([4, 3, 2, 5], weights=[60, 20, 10, 10])[0]
    n = r.choice([2, 3, 4])
    channels = r.choice([2, 3, 4, 6])
    spatial = {2: (), 3: (r.randint(5, 9),), 4: (r.randint(4, 8), r.randint(4, 8)), 5: (3, r.randint(3, 5), 4)}
    shape = (n, channels, *spatial[rank])
    names = list(STEPS)
    weights = [STEPS[name].weight for name in names]
    genes = tuple(
        Gene(
            r.choices(names, weights)[0],
            min(int(r.expovariate(1.2)), 6),
            min(int(r.expovariate(0.6)), 12),
            r.randint(2, 6),
            r.getrandbits(20),
            r.getrandbits(31),
        )
        for _ in range(r.randint(2, 16))
    )
    inplace, train, leaves, reparameterize = (r.random() < p for p in (0.15, 0.03, 0.5, 0.25))
    symbolic = r.random() < 0.2  # merging branches needs example inputs: a symbolic program only folds
    equalize = r.random() < 0.3  # drawn last: the draws before it are what they always were
    options = Options(shape, inplace, train, leaves, reparameterize and not symbolic, symbolic, equalize)
    return Case(seed, genes, options)


# -- the program --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """The values of one forward pass, what it returns, and (for the oracle) the floats behind integers."""

    values: list[Tensor]
    outputs: list[Tensor] = field(default_factory=list)
    shadows: list[Tensor] = field(default_factory=list)

    def add(self, t: Tensor) -> None:
        self.values.append(t)


class Program(nn.Module):
    """Interprets its steps over a growing list of values. Every module a step owns is in ``mods`` and every
    constant in ``consts`` (or a buffer ``b<i>``), so that folding can replace and change them in place."""

    def __init__(self) -> None:
        super().__init__()
        self.mods = nn.ModuleList()
        self.consts = nn.ParameterList()
        self.steps: list[tuple[str, dict[str, Any]]] = []
        self.shadow = False  # the oracle's switch: also return the floats behind integer outputs
        self.buffer_count = 0
        self.training_mods: list[int] = []  # modules left in training mode in an eval-mode program
        self.leaves: list[int] = []  # values returned although no step marked them

    def forward(self, x: Tensor) -> Any:
        run = Run([x])
        execute(self, run, self.steps)
        outputs = list(run.outputs)
        for index in [*self.leaves, len(run.values) - 1]:
            if not any(o is run.values[index] for o in outputs):
                outputs.append(run.values[index])
        if self.shadow:
            return tuple(outputs), tuple(run.shadows)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def const(self, index: int) -> Tensor:
        return self.consts[index] if index >= 0 else getattr(self, f"b{-index - 1}")


def execute(program: Program, run: Run, steps: list[tuple[str, dict[str, Any]]]) -> None:
    for name, args in steps:
        STEPS[name].apply(program, run, args)


# -- building -----------------------------------------------------------------------------------------------
class Builder:
    """Fits genes to a program, running each new step on example values to learn the shapes it makes."""

    def __init__(self, program: Program, example: Tensor) -> None:
        self.program = program
        self.run = Run([example])

    @property
    def values(self) -> list[Tensor]:
        return self.run.values

    def pick(self, choice: int, fits: Callable[[Tensor], bool] = lambda t: True) -> int | None:
        """The index of a value that ``fits``: the newest for ``choice`` 0, older ones for larger choices."""
        found = [i for i in reversed(range(len(self.values))) if fits(self.values[i])]
        return found[choice % len(found)] if found else None

    def module(self, module: nn.Module) -> int:
        module.eval()
        self.program.mods.append(module)
        return len(self.program.mods) - 1

    def const(self, value: Tensor, buffer: bool = False) -> int:
        if buffer:
            self.program.register_buffer(f"b{self.program.buffer_count}", value)
            self.program.buffer_count += 1
            return -self.program.buffer_count
        self.program.consts.append(nn.Parameter(value))
        return len(self.program.consts) - 1

    def modules_of(self, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[int]:
        return [i for i, m in enumerate(self.program.mods) if isinstance(m, kind)]


def floating(rank: int | tuple[int, ...] | None = None, min_size: int = 1) -> Callable[[Tensor], bool]:
    ranks = (rank,) if isinstance(rank, int) else rank

    def fits(t: Tensor) -> bool:
        if not t.is_floating_point() or (ranks is not None and t.dim() not in ranks) or t.dim() < 2:
            return False
        return all(s >= min_size for s in t.shape[2:])

    return fits


def _randomize(module: nn.Module, g: torch.Generator, signs: bool) -> None:
    """Statistics and affine parameters far enough from the identity that a wrong fold shows."""
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(module, name, None)
            if not isinstance(t, Tensor) or t.dtype != torch.float32:
                continue
            if name == "running_mean" or name == "bias":
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) * 2.5 + 0.3)
            else:
                w = torch.rand(t.shape, generator=g) + 0.5
                if signs:
                    w = w * torch.where(torch.rand(t.shape, generator=g) < 0.3, -1.0, 1.0)
                t.copy_(w)


def build(case: Case) -> Program:
    """The program of ``case``, in eval mode (or training mode, if the case says so)."""
    program = Program()
    example = torch.randn(case.options.input_shape, generator=torch.Generator().manual_seed(case.seed))
    builder = Builder(program, example)
    with torch.no_grad():
        for gene in case.genes:
            mods, consts, buffers = len(program.mods), len(program.consts), program.buffer_count
            values, outputs, shadows = len(builder.values), len(builder.run.outputs), len(builder.run.shadows)
            try:
                torch.manual_seed(gene.seed)
                args = STEPS[gene.op].build(builder, gene)
                if args is None:
                    continue
                if not args.pop("applied", False):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        STEPS[gene.op].apply(program, builder.run, args)
                new = builder.values[values:]
                if any(t.numel() == 0 or (t.is_floating_point() and not t.abs().max() < 1e5) for t in new):
                    raise ValueError("values out of range")
            except Exception:  # the gene does not fit here: drop it and whatever it registered
                del builder.run.values[values:], builder.run.outputs[outputs:], builder.run.shadows[shadows:]
                while len(program.mods) > mods:
                    del program.mods[len(program.mods) - 1]
                if len(program.consts) > consts:
                    program.consts = nn.ParameterList(list(program.consts)[:consts])
                while program.buffer_count > buffers:
                    program.buffer_count -= 1
                    delattr(program, f"b{program.buffer_count}")
                program.training_mods = [i for i in program.training_mods if i < len(program.mods)]
                continue
            program.steps.append((gene.op, args))
    g = torch.Generator().manual_seed(case.seed + 1)
    for module in program.mods.modules():
        _randomize(module, g, signs=bool(case.seed % 2))
    if case.options.leaves:
        read = {a[k] for _, a in flat(program.steps) for k in ("src", "other") if k in a}
        program.leaves = [i for i in range(1, len(builder.values)) if i not in read]
    program.train(case.options.train)
    for index in program.training_mods:
        program.mods[index].train()
    return program


# -- the step table -----------------------------------------------------------------------------------------
STEPS: dict[str, Step] = {}


class Step:
    """One kind of step: ``build`` fits a gene to the program (registering modules and constants) and returns
    the step's arguments, or None when it does not fit; ``apply`` computes it in a forward pass."""

    weight: ClassVar[float] = 1.0

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        raise NotImplementedError

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        raise NotImplementedError

    def text(self, a: dict[str, Any]) -> str:
        shown = {k: v for k, v in a.items() if k not in ("src", "other")}
        sources = ", ".join(f"v{a[k]}" for k in ("src", "other") if k in a)
        return (
            f"{type(self).__name__}({sources}{', ' if shown else ''}{', '.join(f'{k}={v}' for k, v in shown.items())})"
        )


def step(name: str, weight: float = 1.0) -> Callable[[type[Step]], type[Step]]:
    def register(cls: type[Step]) -> type[Step]:
        cls.weight = weight
        STEPS[name] = cls()
        return cls

    return register


def _bit(g: Gene, i: int) -> bool:
    return bool((g.bits >> i) & 1)


def _choice(g: Gene, shift: int, options: list[Any]) -> Any:
    return options[(g.bits >> shift) % len(options)]


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LAZY = {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_ADAPTIVE_MAX = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}


class ModuleStep(Step):
    """Applies one registered module to one value."""

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        run.add(p.mods[a["mod"]](run.values[a["src"]]))

    def text(self, a: dict[str, Any]) -> str:
        return f"mods[{a['mod']}](v{a['src']})  # {a.get('what', '')}"


@step("conv", 6)
class Conv(ModuleStep):
    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        dims, c = x.dim() - 2, x.shape[1]
        k = _choice(g, 0, [1, 1, 3, 3, 2])
        k = min(k, *x.shape[2:])
        pad = _choice(g, 3, [0, 0, 1]) if k > 1 else 0
        mode = _choice(g, 5, ["zeros", "zeros", "zeros", "reflect", "replicate", "circular"])
        groups = _choice(g, 8, [1, 1, 1, 2, c])
        width = g.width
        if groups == c:
            width = c * _choice(g, 10, [1, 1, 2])
        if c % groups or width % groups:
            groups = 1
        stride = _choice(g, 12, [1, 1, 1, 2])
        layer = _CONV[dims](c, width, k, stride=stride, padding=pad, padding_mode=mode, groups=groups, bias=_bit(g, 14))
        return {"src": src, "mod": b.module(layer), "what": repr(layer)}


@step("conv_transpose", 2)
class ConvTranspose(ModuleStep):
    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        dims, c = x.dim() - 2, x.shape[1]
        k = _choice(g, 0, [1, 2, 3])
        stride = _choice(g, 2, [1, 1, 2])
        pad = _choice(g, 4, [0, 0, k - 1]) if k > 1 else 0
        groups = _choice(g, 6, [1, 1, c])
        width = g.width if groups == 1 else c
        if c % groups or width % groups:
            groups = 1
        if max(x.shape[2:]) > 10 and stride > 1:
            stride = 1
        layer = _CONV_T[dims](c, width, k, stride=stride, padding=pad, groups=groups, bias=_bit(g, 9))
        return {"src": src, "mod": b.module(layer), "what": repr(layer)}


@step("linear", 4)
class Linear(ModuleStep):
    """A Linear on the last axis: features of a (N, F) value, or channels-last / sequence values."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4)))
        if src is None:
            return None
        features = b.values[src].shape[-1]
        kind = nn.Linear
        if _bit(g, 0) and _bit(g, 1):
            from timm.layers.linear import Linear as TimmLinear

            kind = TimmLinear
        layer = kind(features, g.width, bias=_bit(g, 2))
        return {"src": src, "mod": b.module(layer), "what": repr(layer)}


@step("conv_same", 0.5)
class ConvSame(ModuleStep):
    """timm's Conv2dSame: padding computed at run time."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        from timm.layers.conv2d_same import Conv2dSame

        src = b.pick(g.src, floating(4))
        if src is None:
            return None
        c = b.values[src].shape[1]
        layer = Conv2dSame(c, g.width, 3, stride=_choice(g, 0, [1, 2]), bias=_bit(g, 2))
        return {"src": src, "mod": b.module(layer), "what": "Conv2dSame"}


def _norm_for(x: Tensor, g: Gene) -> nn.Module | None:
    """A BatchNorm relative that fits ``x`` (channels on axis 1)."""
    rank, c = x.dim(), x.shape[1]
    dims = max(rank - 2, 1)
    if rank == 2 or rank == 3:
        dims = 1
    choice = _choice(g, 0, ["batch"] * 6 + ["sync", "lazy", "instance", "frozen", "act", "frozen_act", "layer_scale2d"])
    eps = _choice(g, 4, [1e-5, 1e-3, 0.1])
    affine = _choice(g, 6, [True, True, True, False])
    running = _choice(g, 8, [True] * 7 + [False])
    if choice == "sync" and rank >= 2:
        return nn.SyncBatchNorm(c, eps=eps, affine=affine, track_running_stats=running)
    if choice == "lazy":
        return _LAZY[dims](eps=eps, affine=affine)
    if choice == "instance" and rank >= 3:
        return _INSTANCE[rank - 2](c, eps=eps, affine=affine, track_running_stats=running)
    if rank == 4 and choice == "frozen":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(c, eps=eps)
    if rank == 4 and choice in ("act", "frozen_act"):
        from timm.layers import BatchNormAct2d
        from timm.layers.norm_act import FrozenBatchNormAct2d

        act = _choice(g, 10, [nn.ReLU, nn.Identity, nn.SiLU])
        if choice == "act":
            return BatchNormAct2d(c, eps=eps, act_layer=act, drop_layer=_choice(g, 12, [None, nn.Dropout]))
        return FrozenBatchNormAct2d(c, eps=eps, act_layer=act)
    if rank == 4 and choice == "layer_scale2d":
        from timm.layers import LayerScale2d

        return LayerScale2d(c, init_values=1.0, inplace=_bit(g, 14))
    return _BATCH[dims](c, eps=eps, affine=affine, track_running_stats=running)


@step("norm", 8)
class Norm(ModuleStep):
    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4, 5)))
        if src is None:
            return None
        norm = _norm_for(b.values[src], g)
        if norm is None:
            return None
        index = b.module(norm)
        if _bit(g, 15) and _bit(g, 16) and _bit(g, 17) and _bit(g, 18):
            b.program.training_mods.append(index)  # one norm left in training mode: it must stay
        return {"src": src, "mod": index, "what": type(norm).__name__}


@step("layer_scale", 1)
class LayerScale(ModuleStep):
    """timm's LayerScale on the last axis (channels-last values)."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        from timm.layers import LayerScale as TimmLayerScale

        src = b.pick(g.src, floating((2, 3, 4)))
        if src is None:
            return None
        return {"src": src, "mod": b.module(TimmLayerScale(b.values[src].shape[-1], 1.0)), "what": "LayerScale"}


@step("stat_norm", 1)
class StatNorm(ModuleStep):
    """Norms that normalize with each input's own statistics: never folded."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4)))
        if src is None:
            return None
        x = b.values[src]
        norm = nn.GroupNorm(1, x.shape[1]) if _bit(g, 0) and x.dim() > 2 else nn.LayerNorm(x.shape[-1])
        return {"src": src, "mod": b.module(norm), "what": type(norm).__name__}


@step("conv_bn", 6)
class ConvNorm(Step):
    """The common pair: a layer, then a norm on its output."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        first = (Conv if b.pick(g.src, floating((3, 4, 5))) is not None and not _bit(g, 18) else Linear)()
        args = first.build(b, g)
        if args is None:
            return None
        with torch.no_grad():
            y = b.program.mods[args["mod"]](b.values[args["src"]])
        norm = _norm_for(y, replace(g, bits=g.bits >> 3)) if not isinstance(first, Linear) or y.dim() == 2 else None
        if norm is None:
            norm = nn.BatchNorm1d(y.shape[1])
        return {**args, "norm": b.module(norm), "what": f"{args['what']} -> {type(norm).__name__}"}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        run.add(p.mods[a["norm"]](p.mods[a["mod"]](run.values[a["src"]])))


@step("norm_conv", 3)
class NormConv(Step):
    """A norm before a layer (forward folding), possibly through identities, a flatten or a pooling."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        norm = _BATCH[max(x.dim() - 2, 1)](x.shape[1]) if not _bit(g, 0) else _norm_for(x, g)
        if norm is None:
            return None
        between = _choice(g, 2, ["", "", "identity", "dropout", "flatten", "avgpool", "maxpool", "mean"])
        mods: list[int] = [b.module(norm)]
        c = x.shape[1]
        if between == "identity":
            mods.append(b.module(nn.Identity()))
        elif between == "dropout":
            mods.append(b.module(nn.Dropout(0.3)))
        elif between == "avgpool" and x.dim() > 2:
            mods.append(
                b.module(_ADAPTIVE_AVG[x.dim() - 2](1) if _bit(g, 5) else _AVG[x.dim() - 2](2, 1, ceil_mode=_bit(g, 6)))
            )
        elif between == "maxpool" and x.dim() > 2:
            mods.append(b.module(_ADAPTIVE_MAX[x.dim() - 2](1) if _bit(g, 5) else _MAX[x.dim() - 2](2, 1)))
        if between == "flatten" or x.dim() == 2:
            mods.append(b.module(nn.Flatten()))
            features = math.prod(x.shape[1:])
            if between in ("avgpool", "maxpool") and _bit(g, 5):
                features = c
            layer: nn.Module = nn.Linear(features, g.width, bias=_bit(g, 7))
        elif between == "mean" and x.dim() > 2:
            layer = nn.Linear(c, g.width, bias=_bit(g, 7))
        else:
            dims = x.dim() - 2
            k = _choice(g, 8, [1, 1, 3])
            if between in ("avgpool", "maxpool") and _bit(g, 5):
                k = 1
            pad = _choice(g, 10, [0, 0, 1, 1]) if k > 1 else 0
            if _bit(g, 14):
                layer = _CONV_T[dims](c, g.width, k, padding=pad)
            else:
                mode = _choice(g, 12, ["zeros", "reflect", "replicate"])
                layer = _CONV[dims](c, g.width, k, padding=pad, padding_mode=mode)
        what = f"{type(norm).__name__} -> {between or '-'} -> {type(layer).__name__}"
        mean = between == "mean" and x.dim() > 2
        return {"src": src, "chain": mods, "mean": mean, "layer": b.module(layer), "what": what}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        y = run.values[a["src"]]
        for index in a["chain"]:
            y = p.mods[index](y)
        if a["mean"]:
            y = y.mean(tuple(range(2, y.dim())))
        run.add(p.mods[a["layer"]](y))


@step("constant", 4)
class Constant(Step):
    """``x <op> p`` with a per-channel (or scalar, or per-position) parameter or buffer, written several ways."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        channels_last = _bit(g, 0) and _bit(g, 1)
        axis = x.dim() - 1 if channels_last else 1
        c = x.shape[axis]
        form = _choice(g, 2, ["shaped", "shaped", "view", "reshape", "index", "unsqueeze", "scalar", "full"])
        op = _choice(g, 5, ["mul", "mul", "mul", "div", "add", "sub", "rsub", "mul_", "add_"])
        g_ = torch.Generator().manual_seed(g.seed)
        if form == "scalar":
            value = torch.rand(1, generator=g_) + 0.5
        elif form == "full":
            value = torch.rand(x.shape[1:], generator=g_) + 0.5
        elif form == "shaped":
            shape = [1] * x.dim()
            shape[axis] = c
            value = torch.rand(shape[1:] if _bit(g, 8) else shape, generator=g_) + 0.5
        else:
            value = torch.rand(c, generator=g_) + 0.5
        if op in ("add", "sub", "rsub", "add_"):
            value = value - 1.0
        existing = [i for i in range(len(b.program.consts)) if b.program.consts[i].shape == value.shape]
        if _bit(g, 9) and _bit(g, 10) and existing:
            index = existing[0]  # a constant read by two ops: it may not be folded into either
        else:
            index = b.const(value, buffer=_bit(g, 11))
        return {"src": src, "const": index, "op": op, "form": form, "axis": axis, "rank": x.dim()}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, c = run.values[a["src"]], p.const(a["const"])
        form, rank, axis = a["form"], a["rank"], a["axis"]
        if form == "view":
            shape = [1] * rank
            shape[axis] = -1
            c = c.view(shape)
        elif form == "reshape":
            shape = [1] * rank
            shape[axis] = -1
            c = c.reshape(shape)
        elif form == "index":
            c = c[(slice(None),) + (None,) * (rank - 1 - axis)] if axis != rank - 1 else c
        elif form == "unsqueeze":
            for _ in range(rank - 1 - axis):
                c = c.unsqueeze(-1)
        op = a["op"]
        if op == "mul":
            out = x * c
        elif op == "div":
            out = x / c
        elif op == "add":
            out = c + x
        elif op == "sub":
            out = x - c
        elif op == "rsub":
            out = c - x
        elif op == "mul_":
            out = x.clone().mul_(c) if x is run.values[0] else x.mul_(c)
        else:
            out = x.clone().add_(c) if x is run.values[0] else x.add_(c)
        run.add(out)


@step("scale_module", 1.5)
class ScaleModule(ModuleStep):
    """A user's small module applying a per-channel constant of its own (``x * self.gamma.view(-1, 1, 1)``...):
    folded into the layer before it when its forward reads the constant once, kept when it reads it again."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        form = _choice(g, 0, ["shaped", "view", "index", "reshape"])
        op = _choice(g, 2, ["mul", "mul", "div", "add", "sub"])
        again = _choice(g, 5, [None, None, None, None, "sum", "square", "returned"])
        module = Scale(x.shape[1], x.dim(), form, op, again, buffer=_bit(g, 8), generator=g.seed)
        return {"src": src, "mod": b.module(module), "what": f"Scale({form}, {op}, again={again})"}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        out = p.mods[a["mod"]](run.values[a["src"]])
        if isinstance(out, tuple):  # the module also returned its constant: the program returns it too
            out, gamma = out
            run.outputs.append(gamma)
        run.add(out)


class Scale(nn.Module):
    """``x <op> gamma`` over the channels (axis 1), gamma shaped to broadcast in one of several ways; with
    ``again``, the forward also reads gamma elsewhere (a sum of it, its square, or gamma returned beside the
    result), so that gamma may not be set to the op's neutral value."""

    def __init__(
        self, c: int, rank: int, form: str, op: str, again: str | None, buffer: bool = False, generator: int = 0
    ) -> None:
        super().__init__()
        value = torch.rand(
            c if form != "shaped" else (c, *[1] * (rank - 2)), generator=torch.Generator().manual_seed(generator)
        )
        value = value + 0.5 if op in ("mul", "div") else value - 0.5
        if buffer:
            self.register_buffer("gamma", value)
        else:
            self.gamma = nn.Parameter(value)
        self.rank, self.form, self.op, self.again = rank, form, op, again

    def shaped(self) -> Tensor:
        gamma, tail = self.gamma, [1] * (self.rank - 2)
        if self.form == "view":
            return gamma.view(-1, *tail)
        if self.form == "reshape":
            return gamma.reshape(1, -1, *tail)
        if self.form == "index":
            return gamma[(slice(None),) + (None,) * (self.rank - 2)]
        return gamma

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        gamma = self.shaped()
        if self.op == "mul":
            out = x * gamma
        elif self.op == "div":
            out = x / gamma
        elif self.op == "add":
            out = x + gamma
        else:
            out = x - gamma
        if self.again == "sum":
            out = out + self.gamma.sum()
        elif self.again == "square":
            out = out * (self.gamma * self.gamma).mean()
        elif self.again == "returned":
            return out, self.gamma
        return out


@step("norm_weight_elsewhere", 1)
class NormWeightElsewhere(Step):
    """``x * bn.weight.view(...)``: a norm's own parameter used as a constant by another op."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        norms = [
            i
            for i in b.modules_of(nn.modules.batchnorm._NormBase)
            if getattr(b.program.mods[i], "weight", None) is not None
        ]
        src = b.pick(g.src, floating((3, 4, 5)))
        if not norms or src is None:
            return None
        index = norms[g.other % len(norms)]
        if b.program.mods[index].weight.shape[0] != b.values[src].shape[1]:
            return None
        return {"src": src, "mod": index}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x = run.values[a["src"]]
        w = p.mods[a["mod"]].weight
        run.add(x * w.view(-1, *([1] * (x.dim() - 2))))


@step("weight_elsewhere", 1)
class WeightElsewhere(Step):
    """A layer's weight read outside the layer: a functional call with it, or a statistic of it."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        layers = b.modules_of((nn.Conv2d, nn.Linear))
        src = b.pick(g.src, floating())
        if not layers or src is None:
            return None
        index = layers[g.other % len(layers)]
        layer = b.program.mods[index]
        x = b.values[src]
        functional = (
            isinstance(layer, nn.Conv2d)
            and x.dim() == 4
            and x.shape[1] == layer.in_channels
            and layer.groups == 1
            and layer.padding_mode == "zeros"
        )
        return {"src": src, "mod": index, "functional": functional}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, layer = run.values[a["src"]], p.mods[a["mod"]]
        if a["functional"] and min(x.shape[2:]) >= layer.kernel_size[0]:
            run.add(F.conv2d(x, layer.weight, None, layer.stride, layer.padding))
        else:
            run.add(x + layer.weight.mean())


@step("shared", 1.5)
class Shared(ModuleStep):
    """An existing module called once more (shared weights)."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        if not b.program.mods:
            return None
        index = (len(b.program.mods) - 1 - g.other) % len(b.program.mods)
        module = b.program.mods[index]
        src = b.pick(g.src, floating())
        if src is None:
            return None
        try:
            with torch.no_grad():
                module(b.values[src].clone())
        except Exception:
            return None
        return {"src": src, "mod": index, "what": f"shared {type(module).__name__}"}


@step("tied", 1)
class Tied(ModuleStep):
    """A new layer whose weight is the same Parameter as an existing layer's (tied weights)."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        layers = b.modules_of((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        if not layers:
            return None
        old = b.program.mods[layers[g.other % len(layers)]]
        new = copy.deepcopy(old)
        new.weight = old.weight
        src = b.pick(g.src, floating())
        if src is None:
            return None
        try:
            with torch.no_grad():
                new(b.values[src].clone())
        except Exception:
            return None
        return {"src": src, "mod": b.module(new), "what": f"tied {type(new).__name__}"}


@step("activation", 3)
class Activation(Step):
    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        if src is None:
            return None
        kind = _choice(g, 0, ["relu", "relu_", "relu_module_inplace", "gelu", "sigmoid", "hardswish", "leaky_where"])
        index = None
        if kind == "relu_module_inplace":
            index = b.module(nn.ReLU(inplace=True))
        if kind == "hardswish":
            index = b.module(nn.Hardswish())
        return {"src": src, "kind": kind, "mod": index}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind = run.values[a["src"]], a["kind"]
        if x is run.values[0] and kind in ("relu_", "relu_module_inplace"):
            x = x.clone()  # the caller's input is not ours to change
        if kind == "relu":
            out = torch.relu(x)
        elif kind == "relu_":
            out = torch.relu_(x)
        elif kind == "gelu":
            out = F.gelu(x)
        elif kind == "sigmoid":
            out = torch.sigmoid(x)
        elif kind == "leaky_where":
            out = torch.where(x > 0, x, 0.1 * x)
        else:
            out = p.mods[a["mod"]](x)
        run.add(out)


_RECTIFIERS = ["ReLU", "LeakyReLU", "PReLU", "PReLU per channel", "F.relu", "Tensor.relu", "F.leaky_relu"]


@step("rectifier", 1)  # with activation: the weight it had, so other steps draw as before
class Rectifier(Step):
    """ReLU, LeakyReLU and PReLU (modules and functions) between layers and norms: a positive scale passes
    through them, a norm's shift does not, so no fold may cross one."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        if src is None:
            return None
        kind = _choice(g, 0, _RECTIFIERS)
        channels = b.values[src].shape[1]
        module = {
            "ReLU": lambda: nn.ReLU(inplace=_bit(g, 4)),
            "LeakyReLU": lambda: nn.LeakyReLU(0.1 + 0.2 * _bit(g, 5)),
            "PReLU": lambda: nn.PReLU(init=0.2),
            "PReLU per channel": lambda: _prelu(channels, g),
        }.get(kind)
        return {"src": src, "kind": kind, "mod": b.module(module()) if module else None}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind = run.values[a["src"]], a["kind"]
        if a["mod"] is not None:
            if x is run.values[0]:
                x = x.clone()  # an in-place ReLU must not change the caller's input
            out = p.mods[a["mod"]](x)
        elif kind == "F.relu":
            out = F.relu(x)
        elif kind == "Tensor.relu":
            out = x.relu()
        else:
            out = F.leaky_relu(x, 0.05)
        run.add(out)

    def text(self, a: dict[str, Any]) -> str:
        if a["mod"] is not None:
            return f"mods[{a['mod']}](v{a['src']})  # {a['kind']}"
        return f"{a['kind']}(v{a['src']})"


def _prelu(channels: int, g: Gene) -> nn.Module:
    prelu = nn.PReLU(channels)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.5, channels) * (1 if _bit(g, 6) else 0.3))
    return prelu


def _alias(kind: str, x: Tensor) -> Tensor:
    if kind == "detach":
        return x.detach()
    if kind == "data":
        return x.data
    if kind == "view":
        return x.view(-1)
    if kind == "slice":
        return x[:, : max(1, x.shape[1] // 2)]
    if kind == "as_strided":
        return x.as_strided((x.numel(),), (1,))
    if kind == "set_":
        return torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())
    if kind == "subclass":
        return x.as_subclass(Tagged)
    return x


class Tagged(Tensor):
    """A Tensor subclass: another alias of the same memory."""


@step("inplace", 3)
class InPlace(Step):
    """An in-place change of an existing value, directly or through an alias of its memory."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, lambda t: t.is_floating_point() and t.is_contiguous())
        if src is None or src == 0:
            return None
        kind = _choice(
            g, 0, ["direct", "detach", "data", "view", "slice", "as_strided", "set_", "subclass", "out", "setitem"]
        )
        return {"src": src, "kind": kind, "value": _choice(g, 4, [0.5, 2.0, -1.0])}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind, value = run.values[a["src"]], a["kind"], a["value"]
        if kind == "out":
            torch.mul(x, value, out=x)
        elif kind == "setitem":
            x[:, :1] = value
        else:
            _alias(kind, x).add_(value)
        run.add(x)


@step("reshape", 3)
class Reshape(Step):
    """Reshapes, permutes and transposes that keep the channels on an axis of their own, or interleave them."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((2, 3, 4, 5)))
        if src is None:
            return None
        x = b.values[src]
        kinds = {
            2: ["unsqueeze_last", "unflatten"],
            3: ["transpose", "flatten", "unsqueeze2", "module_flatten", "interleave", "unflatten_spatial", "view_flat"],
            4: [
                "flatten2",
                "flatten1",
                "to_channels_last",
                "from_channels_last",
                "interleave",
                "shuffle",
                "unsqueeze2",
                "contiguous",
                "module_flatten",
                "view_batch",
                "view_flat",
            ],
            5: ["squeeze2", "flatten2", "transpose", "view_flat"],
        }[x.dim()]
        kind = _choice(g, 0, kinds)
        if kind == "squeeze2" and x.shape[2] != 1:
            kind = "flatten2"
        if kind == "shuffle" and x.shape[1] % 2:
            kind = "interleave"
        if kind == "unflatten" and x.shape[1] % 2:
            kind = "unsqueeze_last"
        if kind == "unflatten_spatial" and x.shape[2] % 2:
            kind = "transpose"
        return {"src": src, "kind": kind}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind = run.values[a["src"]], a["kind"]
        n = x.shape[0]
        if kind == "unsqueeze_last":
            out = x.unsqueeze(-1)
        elif kind == "unflatten":
            out = x.unflatten(1, (2, -1))
        elif kind == "transpose":
            out = x.transpose(1, -1)
        elif kind == "flatten":
            out = x.flatten(1)
        elif kind == "unsqueeze2":
            out = x.unsqueeze(2)
        elif kind == "module_flatten":
            out = nn.Flatten()(x)
        elif kind == "interleave":
            out = (
                x.reshape(n, x.shape[2], x.shape[1], *x.shape[3:])
                if x.dim() > 3
                else x.reshape(n, x.shape[2], x.shape[1])
            )
        elif kind == "unflatten_spatial":
            out = x.unflatten(2, (2, -1))
        elif kind == "flatten2":
            out = x.flatten(2)
        elif kind == "flatten1":
            out = torch.flatten(x, 1)
        elif kind == "to_channels_last":
            out = x.permute(0, 2, 3, 1)
        elif kind == "from_channels_last":
            out = x.permute(0, 3, 1, 2)
        elif kind == "shuffle":
            c = x.shape[1]
            out = x.view(n, 2, c // 2, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
        elif kind == "contiguous":
            out = x.contiguous(memory_format=torch.channels_last)
        elif kind == "view_batch":
            out = x.reshape(n * x.shape[1], *x.shape[2:]).reshape(x.shape)
        elif kind == "view_flat":  # needs a contiguous input: a fold must keep the memory layout
            out = x.view(n, -1)
        else:  # squeeze2
            out = x.squeeze(2)
        run.add(out)


@step("pool", 2)
class Pool(Step):
    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating((3, 4, 5), min_size=2))
        if src is None:
            return None
        x = b.values[src]
        dims = x.dim() - 2
        kind = _choice(g, 0, ["avg", "max", "adaptive_avg", "adaptive_max", "mean", "mean_keep", "avg_pad", "amax"])
        module = None
        if kind == "avg":
            module = _AVG[dims](2, _choice(g, 4, [1, 2]))
        elif kind == "avg_pad":
            module = _AVG[dims](3, 1, padding=1, count_include_pad=_bit(g, 6))
        elif kind == "max":
            module = _MAX[dims](2, _choice(g, 4, [1, 2]))
        elif kind == "adaptive_avg":
            module = _ADAPTIVE_AVG[dims](_choice(g, 4, [1, 2]))
        elif kind == "adaptive_max":
            module = _ADAPTIVE_MAX[dims](_choice(g, 4, [1, 2]))
        return {"src": src, "kind": kind, "mod": None if module is None else b.module(module)}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind = run.values[a["src"]], a["kind"]
        spatial = tuple(range(2, x.dim()))
        if kind == "mean":
            out = x.mean(spatial)
        elif kind == "mean_keep":
            out = x.mean(spatial, keepdim=True)
        elif kind == "amax":
            out = x.amax(spatial[-1], keepdim=True)
        else:
            out = p.mods[a["mod"]](x)
        run.add(out)


def _same_except(axis: int) -> Callable[[Tensor, Tensor], bool]:
    def fits(x: Tensor, y: Tensor) -> bool:
        if x.dim() != y.dim() or not y.is_floating_point():
            return False
        return all(s == t for i, (s, t) in enumerate(zip(x.shape, y.shape, strict=True)) if i != axis)

    return fits


@step("binary", 3)
class Binary(Step):
    """Two values combined: a sum (residual), a product, or a concatenation along channels or another axis."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        if src is None:
            return None
        x = b.values[src]
        kind = _choice(g, 0, ["add", "add", "cat", "cat", "cat_other", "mul", "iadd"])
        axis = 1 if kind != "cat_other" else x.dim() - 1
        fits = _same_except(axis if kind.startswith("cat") else -99)
        other = b.pick(g.other, lambda t: fits(x, t))
        if other is None:
            return None
        return {"src": src, "other": other, "kind": kind, "axis": axis}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, y, kind = run.values[a["src"]], run.values[a["other"]], a["kind"]
        if kind == "add":
            out = x + y
        elif kind == "mul":
            out = x * y
        elif kind == "iadd":
            out = x.clone() if x is run.values[0] else x
            out += y
        else:
            out = torch.cat([x, y], dim=a["axis"])
        run.add(out)


@step("split", 2)
class Split(Step):
    """One part of ``chunk``/``split``/a slice along channels (views of the same memory)."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, lambda t: t.is_floating_point() and t.dim() >= 2 and t.shape[1] >= 2)
        if src is None:
            return None
        return {
            "src": src,
            "kind": _choice(g, 0, ["chunk", "split", "slice", "unbind_cat"]),
            "part": _choice(g, 3, [0, 1]),
        }

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind, part = run.values[a["src"]], a["kind"], a["part"]
        c = x.shape[1]
        if kind == "chunk":
            out = x.chunk(2, dim=1)[part]
        elif kind == "split":
            out = x.split([1, c - 1], dim=1)[part]
        elif kind == "slice":
            out = x[:, part:]
        else:
            out = torch.cat(list(x.unbind(1))[::-1], dim=-1) if x.dim() > 2 else x.flip(1)
        run.add(out)


@step("look_through", 2)
class LookThrough(ModuleStep):
    """Modules that are the identity in eval mode."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        if src is None:
            return None
        dropouts = [nn.Identity(), nn.Dropout(0.5), nn.AlphaDropout(0.2)]
        module = _choice(g, 0, dropouts + ([nn.Dropout2d(0.5)] if b.values[src].dim() == 4 else []))
        return {"src": src, "mod": b.module(module), "what": type(module).__name__}


class Parallel(nn.Module):
    """Branches of one input, summed (and maybe a ReLU): a block whose computation merges, whole or in part.
    The last branch may be scaled (by a learned per-channel ``alpha`` or a number) and subtracted."""

    def __init__(self, branches: list[nn.Module], relu: bool, coefficient: str = "", subtract: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.relu = relu
        self.coefficient = coefficient  # "" | "param" | "number"
        self.subtract = subtract
        if coefficient == "param":
            channels = next(m for m in self.modules() if isinstance(m, nn.Conv2d)).in_channels
            self.alpha = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        total = self.branches[0](x)
        last = len(self.branches) - 1
        for i, branch in enumerate(self.branches[1:], 1):
            y = branch(x)
            if i == last and self.coefficient:
                y = self.alpha * y if self.coefficient == "param" else 0.5 * y
            total = total - y if i == last and self.subtract else total + y
        return torch.relu(total) if self.relu else total


@step("branches", 3)
class Branches(ModuleStep):
    """Parallel branches of one value, summed (RepVGG, ACNet, DBB): what ``reparameterize=True`` merges; some
    kinds cannot merge with the others (an activation, reflect padding, another dilation, a pool that does not
    count its padding), so that only part of the branches merges."""

    KINDS: ClassVar[list[str]] = [
        "conv3_bn",
        "conv1_bn",
        "bn",
        "identity",
        "conv3",
        "conv1x3_bn",
        "avgpool_bn",
        "conv1_bn_relu",
        "conv3_reflect_bn",
        "conv3_dil2_bn",
        "avgpool_nopad",
    ]

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating(4, min_size=3))
        if src is None:
            return None
        c = b.values[src].shape[1]
        rng = random.Random(g.bits * 7919 + g.seed)
        branches: list[nn.Module] = []
        kinds = []
        for i in range(rng.choice([2, 3, 3, 4])):
            kind = rng.choice(self.KINDS)
            parts: list[nn.Module] = []
            if kind == "conv3_reflect_bn":
                parts.append(nn.Conv2d(c, c, 3, padding=1, bias=False, padding_mode="reflect"))
            elif kind == "conv3_dil2_bn":
                parts.append(nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False))
            elif kind.startswith("conv3"):
                parts.append(nn.Conv2d(c, c, 3, padding=1, bias=_bit(g, 12 + i % 3)))
            elif kind.startswith("conv1x3"):
                parts.append(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False))
            elif kind.startswith("conv1"):
                parts.append(nn.Conv2d(c, c, 1, bias=_bit(g, 12 + i % 3)))
            elif kind == "avgpool_nopad":
                parts.append(nn.AvgPool2d(3, 1, 1, count_include_pad=False))
            elif kind.startswith("avgpool"):
                parts.append(nn.AvgPool2d(3, 1, 1))
            if kind == "bn" or "_bn" in kind:
                parts.append(nn.BatchNorm2d(c))
            if kind.endswith("relu"):
                parts.append(nn.ReLU())
            branches.append(nn.Sequential(*parts) if parts else nn.Identity())
            kinds.append(kind)
        coefficient = rng.choice(["", "", "param", "number"]) if any(k.startswith("conv") for k in kinds) else ""
        subtract = rng.random() < 0.25
        block = Parallel(branches, relu=_bit(g, 16), coefficient=coefficient, subtract=subtract)
        what = " + ".join(kinds)
        if coefficient or subtract:
            what += f" (last {'-' if subtract else '+'}{' ' + coefficient if coefficient else ''})"
        return {"src": src, "mod": b.module(block), "what": what}


@step("reads_module", 1)
class ReadsModule(Step):
    """Code that reads a Python attribute of a norm, or the branches of a block, after they ran
    (``self.bn.num_features``): invisible to a trace, and gone once that norm folds or that block merges, so
    the fold must be set aside (kept, with the error) and the others made."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        norms = b.modules_of(nn.modules.batchnorm._NormBase)
        blocks = b.modules_of(Parallel)
        candidates = [(i, "num_features") for i in norms] + [(i, "branches") for i in blocks]
        src = b.pick(g.src, floating())
        if not candidates or src is None:
            return None
        index, attr = candidates[g.other % len(candidates)]
        return {"src": src, "mod": index, "attr": attr}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        getattr(p.mods[a["mod"]], a["attr"])
        run.add(run.values[a["src"]])


@step("sort", 0.5)
class Sort(Step):
    """Sorted values (continuous, but the order they come from is a discrete choice)."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        return None if src is None else {"src": src}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        run.add(torch.sort(run.values[a["src"]], dim=-1).values)


@step("integer", 2)
class Integer(Step):
    """An integer or boolean value computed from floats (argmax, a mask, indices); the oracle also keeps the
    floats it came from."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src, floating())
        if src is None:
            return None
        return {"src": src, "kind": _choice(g, 0, ["argmax", "mask", "max_indices", "topk", "argmax_int32"])}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        x, kind = run.values[a["src"]], a["kind"]
        if kind == "argmax":
            out = x.argmax(1)
        elif kind == "mask":
            out = x > 0
        elif kind == "max_indices":
            out = x.max(dim=-1).indices
        elif kind == "topk":
            out = x.topk(1, dim=1).indices
        else:
            out = x.argmax(1).to(torch.int32)
        run.shadows.append(x.clone())
        run.add(out)


@step("output", 3)
class Output(Step):
    """Marks a value as one of the program's outputs."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        src = b.pick(g.src)
        if src is None or any(o is b.values[src] for o in b.run.outputs):
            return None
        return {"src": src}

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        run.outputs.append(run.values[a["src"]])


# Sequences of steps, each reading what the one before made (or, with src 1, what the one before that
# made): the neighbourhoods where folds happen and go wrong. A new pattern is one line; a part may pin some of
# its step's arguments (``("reshape", 0, {"kind": "transpose"})``).
RECIPES: list[tuple[tuple[Any, ...], ...]] = [
    (("conv", 0), ("constant", 0)),
    (("linear", 0), ("constant", 0)),
    (("conv_transpose", 0), ("constant", 0)),
    (("conv", 0), ("norm", 0), ("constant", 0)),
    (("conv", 0), ("reshape", 0), ("norm", 0)),
    (("linear", 0), ("reshape", 0), ("norm", 0)),
    (("conv", 0), ("reshape", 0), ("constant", 0)),
    (("conv", 0), ("inplace", 0), ("norm", 0)),
    (("conv", 0), ("norm", 0), ("inplace", 1)),
    (("linear", 0), ("norm", 0), ("inplace", 1), ("linear", 1)),
    (("conv", 0), ("norm", 0), ("inplace", 1), ("conv", 1)),
    (("conv", 0), ("split", 0), ("norm", 0)),
    (("conv", 0), ("activation", 0), ("norm", 0)),
    (("conv", 0), ("conv", 1), ("binary", 0), ("norm", 0)),
    (("norm", 0), ("pool", 0), ("conv", 0)),
    (("norm", 0), ("reshape", 0), ("linear", 0)),
    (("norm", 0), ("look_through", 0), ("conv", 0)),
    (("norm", 0), ("conv", 0), ("conv", 1)),
    (("conv", 0), ("norm", 0), ("norm", 0)),
    (("conv", 0), ("norm", 0), ("output", 1)),
    (("conv", 0), ("norm", 0), ("integer", 0), ("output", 0)),
    (("conv", 0), ("scale_module", 0)),
    (("conv", 0), ("norm", 0), ("scale_module", 0)),
    (("linear", 0), ("reshape", 0, {"kind": "transpose"}), ("scale_module", 0)),
    (("conv", 0), ("norm", 0), ("norm_weight_elsewhere", 0)),
    (("conv", 0), ("constant", 0), ("constant", 0)),
    (("linear", 0), ("reshape", 0, {"kind": "transpose"}), ("norm", 0), ("reshape", 0, {"kind": "view_flat"})),
    (("conv", 0), ("reshape", 0), ("norm", 0), ("reshape", 0, {"kind": "view_flat"})),
    (("linear", 0), ("reshape", 0, {"kind": "transpose"}), ("norm", 0), ("activation", 0), ("conv", 0)),
    (("conv", 0), ("branches", 0), ("conv", 0)),
    (("branches", 0), ("norm", 0)),
]


@step("chain", 12)
class Chain(Step):
    """One of RECIPES, built part by part on what the part before made."""

    def build(self, b: Builder, g: Gene) -> dict[str, Any] | None:
        recipe = RECIPES[g.bits % len(RECIPES)]
        parts: list[tuple[str, dict[str, Any]]] = []
        for i, (op, src, *pinned) in enumerate(recipe):
            part = Gene(op, src, g.other, g.width, (g.bits * 2654435761 + i * 40503) % (1 << 20), g.seed + i)
            args = STEPS[op].build(b, part)
            if args is None:
                continue
            for overrides in pinned:
                args.update(overrides)
            if not args.pop("applied", False):
                STEPS[op].apply(b.program, b.run, args)
            parts.append((op, args))
        return {"parts": parts, "applied": True} if parts else None

    def apply(self, p: Program, run: Run, a: dict[str, Any]) -> None:
        execute(p, run, a["parts"])

    def text(self, a: dict[str, Any]) -> str:
        return " ; ".join(f"{op}: {STEPS[op].text(args)}" for op, args in a["parts"])


def flat(steps: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The steps with every chain spelled out."""
    return [part for name, args in steps for part in (flat(args["parts"]) if name == "chain" else [(name, args)])]


def listing(program: Program) -> str:
    """The program as lines of pseudo-code, one per step (every step but ``output`` makes one value)."""
    lines, n = [], 1
    for name, args in flat(program.steps):
        text = STEPS[name].text(args)
        produces = name != "output"
        lines.append(f"v{n} = {name}: {text}" if produces else f"output v{args['src']}")
        n += int(produces)
    return "\n".join(lines)


# -- classification -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    kind: str  # "folded" | "refused" | "crash" | "wrong" | "changed" | "invalid"
    detail: str = ""
    folded: int = 0  # sites bnfold folded
    kept: int = 0

    @property
    def signature(self) -> str:
        """What shrinking must keep: the kind, and for refusals and crashes the error type."""
        if self.kind in ("refused", "crash"):
            return f"{self.kind}:{self.detail.split(':', 1)[0]}"
        return self.kind


def _state(model: nn.Module) -> tuple[Any, ...]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    structure = [(name, type(m).__name__, m.training) for name, m in model.named_modules()]
    return tensors, structure


def _same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[1] != b[1] or list(a[0]) != list(b[0]):
        return False
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _leaves(item)]
    return []


def oracle(
    original: nn.Module, folded: nn.Module, x: Tensor, refold: Callable[[nn.Module, Tensor], nn.Module] | None = None
) -> str | None:
    """Why ``folded`` computes something else than ``original`` on ``x`` (None when it does not): float64 copies of
    both are compared output by output, integer outputs through the floats they were taken from.

    A program whose outputs amplify rounding (a LayerNorm over two nearly equal values) turns the float32
    rounding of the folded weights into a visible difference even in float64. With ``refold`` (the same fold
    call), such a difference is rounding, not a wrong fold, only when both hold: the fold made on a float64 copy
    of the original gives its outputs exactly, and ``folded`` is that float64 fold, structure and tensors, rounded
    to float32."""
    runs = []
    for model in (original, folded):
        twin = copy.deepcopy(model).double()
        twin.shadow = True
        torch.manual_seed(0)  # dropout in training mode draws the same masks in both
        with torch.no_grad():
            runs.append(twin(x.double().clone()))
        del twin
    (out_e, shadow_e), (out_a, shadow_a) = runs
    expected, actual = _leaves(out_e) + _leaves(shadow_e), _leaves(out_a) + _leaves(shadow_a)
    if len(expected) != len(actual):
        return f"{len(actual)} output tensors instead of {len(expected)}"
    peak = max((float(t.abs().max()) for t in expected if t.is_floating_point() and t.numel()), default=0.0)
    ties = False
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape or e.dtype != a.dtype:
            return f"output {i}: {tuple(a.shape)} {a.dtype} instead of {tuple(e.shape)} {e.dtype}"
        if not e.is_floating_point():
            ties = ties or not torch.equal(e, a)
            continue
        error = float((e - a).abs().max()) if e.numel() else 0.0
        scale = float(e.abs().max()) if e.numel() else 0.0
        if not error <= 1e-4 * scale + 1e-6 * peak + 1e-9:
            if refold is not None and _rounded_exact_fold(original, folded, x, refold):
                continue
            return f"output {i} differs by {error:.3g} (scale {scale:.3g})"
    del ties  # integer outputs may differ only where the floats they come from are equal within rounding
    with torch.no_grad():  # and the folded model must run as it is (float32)
        torch.manual_seed(0)
        got = folded(x.clone())
        torch.manual_seed(0)
        want = original(x.clone())
    if [(t.shape, t.dtype) for t in _leaves(got)] != [(t.shape, t.dtype) for t in _leaves(want)]:
        return "the folded float32 model returns outputs of other shapes or dtypes"
    return None


def _rounded_exact_fold(
    original: nn.Module, folded: nn.Module, x: Tensor, refold: Callable[[nn.Module, Tensor], nn.Module]
) -> bool:
    """Whether ``folded`` is an exact fold of ``original`` rounded to float32: the same fold of a float64 copy
    gives the original's float64 outputs to 1e-9, and has the same modules and, tensor by tensor, the values of
    ``folded`` within float32 rounding."""
    twin = copy.deepcopy(original).double()
    try:
        exact = refold(twin, x.double())
    except Exception:
        return False
    if [type(m) for m in exact.modules()] != [type(m) for m in folded.modules()]:
        return False
    wide, narrow = exact.state_dict(), folded.state_dict()
    if wide.keys() != narrow.keys():
        return False
    for key, value in wide.items():
        other = narrow[key]
        if value.shape != other.shape:
            return False
        if value.is_floating_point() and not torch.allclose(other.double(), value, rtol=2**-22, atol=1e-35):
            return False
    for model in (twin, exact):
        model.shadow = True
    with torch.no_grad():
        torch.manual_seed(0)
        (out_e, shadow_e) = twin(x.double().clone())
        torch.manual_seed(0)
        (out_a, shadow_a) = exact(x.double().clone())
    for e, a in zip(_leaves(out_e) + _leaves(shadow_e), _leaves(out_a) + _leaves(shadow_a), strict=True):
        if e.is_floating_point() and e.numel() and float((e - a).abs().max()) > 1e-9 * max(float(e.abs().max()), 1.0):
            return False
    return True


def classify(case: Case) -> Outcome:
    """Build, fold and judge one program."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the programs are odd on purpose; their warnings are noise
            return _classify(case)
    finally:
        torch.set_num_threads(threads)


def _classify(case: Case) -> Outcome:
    try:
        program = build(case)
        x = torch.randn(case.options.input_shape, generator=torch.Generator().manual_seed(case.seed))
        with torch.no_grad():
            program(x.clone())
            copy.deepcopy(program).double()(x.double())  # the oracle's float64 twin must run too
        pristine = copy.deepcopy(program)
    except Exception as error:  # the program itself is broken: not bnfold's business
        return Outcome("invalid", f"{type(error).__name__}: {error}")
    before = _state(program)
    inputs = () if case.options.symbolic else (x,)
    try:
        result = bnfold.fold_with_report(
            program,
            *inputs,
            inplace=case.options.inplace,
            reparameterize=case.options.reparameterize,
            equalize="all" if case.options.equalize else False,
        )
    except bnfold.BnfoldError as error:
        if not _same_state(_state(program), before):
            return Outcome("changed", f"after {type(error).__name__}")
        return Outcome("refused", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    except Exception as error:
        return Outcome("crash", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}")
    report = result.report
    counts = {"folded": report.folded, "kept": report.kept}
    if case.options.inplace and result.model is not program:
        return Outcome("wrong", "inplace=True returned another object", **counts)
    if not case.options.inplace and not _same_state(_state(program), before):
        return Outcome("changed", "inplace=False changed the original", **counts)
    try:
        why = oracle(
            pristine,
            result.model,
            x,
            lambda model, same_x: bnfold.fold(
                model,
                *(() if case.options.symbolic else (same_x,)),
                reparameterize=case.options.reparameterize,
                equalize="all" if case.options.equalize else False,
            ),
        )
    except Exception as error:
        why = f"the folded model fails: {type(error).__name__}: {error}"
    if why:
        return Outcome("wrong", why, **counts)
    return Outcome("folded", "", **counts)


def shrink(
    case: Case, outcome: Outcome | None = None, budget: int = 400, judge: Callable[[Case], Outcome] | None = None
) -> tuple[Case, Outcome]:
    """The smallest program (fewest genes) found that fails the same way as ``case`` (under ``judge``,
    :func:`classify` by default)."""
    judge = judge or classify
    best_outcome = outcome or judge(case)
    target = best_outcome.signature
    best = case
    tries = 0
    progress = True
    while progress and tries < budget:
        progress = False
        for i in reversed(range(len(best.genes))):
            candidate = replace(best, genes=best.genes[:i] + best.genes[i + 1 :])
            tries += 1
            result = judge(candidate)
            if result.signature == target:
                best, best_outcome, progress = candidate, result, True
                break
    return best, best_outcome


# -- the command line ---------------------------------------------------------------------------------------
BAD = ("crash", "wrong", "changed")


def fuzz(seeds: range, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Classify the programs of ``seeds``; counts per class, refusal reasons, and the seeds that went wrong."""
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, list[int]] = {}  # error type -> the first seeds refused with it
    bad: list[dict[str, Any]] = []
    sites = 0
    started = time.perf_counter()
    for n, seed in enumerate(seeds, 1):
        outcome = classify(random_case(seed))
        counts[outcome.kind] += 1
        sites += outcome.folded
        if outcome.kind == "refused":
            error = outcome.detail.split(":", 1)[0]
            reasons[error] += 1
            if len(examples.setdefault(error, [])) < 5:
                examples[error].append(seed)
        if outcome.kind in BAD:
            bad.append({"seed": seed, "kind": outcome.kind, "detail": outcome.detail.splitlines()[0][:300]})
            log(f"seed {seed}: {outcome.kind}: {outcome.detail.splitlines()[0][:200]}")
        if n % 500 == 0:
            log(f"{n} programs, {time.perf_counter() - started:.0f} s: {dict(counts)}")
    return {
        "programs": len(seeds),
        "counts": dict(counts),
        "refusals": dict(reasons),
        "refused_seeds": examples,
        "sites_folded": sites,
        "bad": bad,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=300, help="how many programs (seeds start..start+N-1)")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--replay", type=int, help="run the program of this seed only and show it")
    parser.add_argument("--shrink", action="store_true", help="with --replay: also find the smallest failing program")
    parser.add_argument("--json", type=Path, help="write the counts and the failing seeds here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the programs are odd on purpose; their warnings are noise
    if args.replay is not None:
        case = random_case(args.replay)
        outcome = classify(case)
        print(
            f"seed {args.replay}: input {case.options.input_shape}, inplace={case.options.inplace}, "
            f"train={case.options.train}, reparameterize={case.options.reparameterize}, "
            f"equalize={case.options.equalize}, "
            f"symbolic={case.options.symbolic}"
        )
        print(listing(build(case)))
        print(f"-> {outcome.kind} (folded {outcome.folded}, kept {outcome.kept}) {outcome.detail}")
        if args.shrink and outcome.kind != "folded":
            small, small_outcome = shrink(case, outcome)
            print(f"\nshrunk to {len(small.genes)} of {len(case.genes)} genes:")
            print(listing(build(small)))
            print(f"-> {small_outcome.kind} {small_outcome.detail}")
            print(f"genes: {list(small.genes)!r}")
        return 1 if outcome.kind in BAD else 0
    result = fuzz(range(args.start, args.start + args.programs), log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "bad"}, indent=1))
    for entry in result["bad"]:
        print(f"seed {entry['seed']}: {entry['kind']}: {entry['detail']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
