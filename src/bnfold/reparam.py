"""Structural re-parameterization: parallel branches merged into one convolution, on any model.

The pass (:func:`merge_rows`) finds sums of branches of one tensor (:mod:`bnfold.branches`), checks that
one convolution computes them exactly (:mod:`bnfold.kernels`), and finds the smallest enclosing module
whose whole forward is those branches and what follows the sum inside it (an activation, a dropout). A sum
cannot become one conv by swapping modules (the Python ``forward`` still adds), so surgery replaces that
module by a :class:`MergedConv`: the merged convolution, then the modules that followed the sum.
Everything else keeps its class and attribute path.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .branches import (
    Branches,
    channels_and_dims,
    describe,
    evaluate,
    find_branches,
    is_sum,
    layer_names,
    region_reason,
    sequence_cost,
)
from .checks import Kept, PlanContext
from .classes import layer_type
from .graph import Span
from .kernels import ConvForm, NotExact
from .plan import FoldSite, KeptNorm, MergeRecipe, PlanRow

__all__ = ["MergedConv", "merge_rows", "merge_hints", "build_conv"]

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class MergedConv(nn.Module):
    """What a block of parallel branches became: the modules before the branches inside the block, one
    convolution (``merged_conv``), then the modules after their sum. The modules around the branches keep
    the attribute names they had in the block (so their paths, and their state_dict keys, do not move)."""

    def __init__(
        self,
        conv: nn.Module,
        post: list[tuple[str, nn.Module]],
        merged_from: tuple[str, ...] = (),
        pre: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        for name, module in pre or []:
            self.add_module(name, module)
        self.merged_conv = conv  # registered between them, so that repr and state_dict read in order
        for name, module in post:
            self.add_module(name, module)
        self.merged_from = merged_from
        self.pre_names = tuple(name for name, _ in pre or [])
        self.post_names = tuple(name for name, _ in post)

    @property
    def survivors(self) -> tuple[str, ...]:
        """The modules of the block it replaced that it keeps, under the same names."""
        return (*self.pre_names, *self.post_names)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready description, from which :meth:`from_record` rebuilds this structure."""
        conv = cast(nn.modules.conv._ConvNd, self.merged_conv)
        return {
            "dims": len(conv.kernel_size),
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": list(cast(tuple[int, ...], conv.padding)),
            "dilation": list(conv.dilation),
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
            "dtype": str(conv.weight.dtype).removeprefix("torch."),
            "pre": list(self.pre_names),
            "post": list(self.post_names),
            "merged_from": list(self.merged_from),
        }

    @classmethod
    def from_record(cls, spec: dict[str, Any], replaced: nn.Module) -> MergedConv:
        """The structure :meth:`to_record` described, on ``replaced`` (the block of a freshly built model):
        its modules before and after the branches are kept, the convolution is new (its weights load next)."""
        dims = int(spec["dims"])
        dtype = getattr(torch, str(spec["dtype"]))
        conv = cast(Any, _CONV_TYPES[dims])(
            int(spec["in_channels"]),
            int(spec["out_channels"]),
            tuple(spec["kernel_size"]),
            stride=tuple(spec["stride"]),
            padding=tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]),
            groups=int(spec["groups"]),
            padding_mode=spec["padding_mode"],
            dtype=dtype,
        )
        pre = [(name, replaced.get_submodule(name)) for name in spec["pre"]]
        post = [(name, replaced.get_submodule(name)) for name in spec["post"]]
        return cls(conv, post, tuple(spec["merged_from"]), pre)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.pre_names:
            x = self._modules[name](x)  # type: ignore[misc]  # registered in __init__, never None
        x = self.merged_conv(x)
        for name in self.post_names:
            x = self._modules[name](x)  # type: ignore[misc]  # registered in __init__, never None
        return x

    def extra_repr(self) -> str:
        return f"merged from: {', '.join(self.merged_from)}" if self.merged_from else ""


def build_conv(form: ConvForm, like: Tensor) -> nn.Module:
    """A torch convolution holding ``form``, its weights cast once to ``like``'s dtype and device."""
    conv_type = cast(Any, _CONV_TYPES[form.dims])  # Conv1d/2d/3d take tuples for every size argument
    conv: nn.Module = conv_type(
        form.in_channels,
        form.out_channels,
        form.size,
        stride=form.stride,
        padding=form.padding,
        dilation=form.dilation,
        groups=form.groups,
        bias=True,
        padding_mode=form.padding_mode,
        device=like.device,
        dtype=like.dtype,
    )
    for name, value in (("weight", form.kernel), ("bias", form.bias)):
        target = cast(Tensor, getattr(conv, name))
        with torch.no_grad():
            target.copy_(value.to(device=like.device, dtype=like.dtype))
        target.requires_grad_(like.requires_grad)
    return conv


@dataclass(frozen=True)
class _Block:
    name: str
    module: nn.Module
    pre: tuple[str, ...]
    post: tuple[str, ...]


def _enclosing(branches: Branches, ctx: PlanContext) -> _Block:
    """The smallest module around the branches whose forward is a chain: modules before the branches
    (``pre``), the branches and their sum, modules after it (``post``); or Kept with the reason."""
    graph = ctx.graph
    region = branches.calls
    first, last = min(region), max(region)
    around = [s for s in graph.spans if s.start <= first and last < s.end and s.module is not ctx.model]
    if not around:
        raise Kept("no module around them but the model itself (merging replaces the module around the branches)")
    span = min(around, key=lambda s: s.end - s.start)
    name = ctx.name(span.module)
    if sum(1 for s in graph.spans if s.module is span.module) != 1:
        raise Kept(f"'{name}', the module around them, is called more than once", name)
    if span.module._forward_hooks or span.module._forward_pre_hooks:
        raise Kept(f"'{name}', the module around them, has forward hooks", name)
    if len(span.inputs) != 1:
        raise Kept(f"'{name}', the module around them, takes {len(span.inputs)} tensors", name)
    pre, post = _chains(branches, span, name, ctx)
    return _Block(name, span.module, pre, post)


def _chains(branches: Branches, block: Span, name: str, ctx: PlanContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The modules before and after the branches inside ``block``: one chain from the block's input to the
    tensor the branches read, and one from their sum to the block's output."""
    graph = ctx.graph
    inner = [s for s in graph.spans if block.start <= s.start and s.end <= block.end and s is not block]
    first, last = min(branches.calls), max(branches.calls)
    current = block.inputs[0]
    chains: tuple[list[str], list[str]] = ([], [])
    index = block.start
    while index < block.end:
        call = graph.calls[index]
        if first <= index <= last:
            if index not in branches.calls and not (call.inputs and call.inputs == call.outputs):
                raise Kept(f"'{name}' computes '{call.target}' between its branches", name)
            if index == first:
                if current != branches.source:
                    raise Kept(
                        f"'{name}' reads its branches' input through something that is not a chain of modules", name
                    )
                current = branches.output
            index += 1
            continue
        if call.inputs and call.inputs == call.outputs:
            index += 1  # the identity in eval mode (Identity, Dropout, DropPath)
            continue
        step = max(
            (s for s in inner if s.start == index and not (set(range(s.start, s.end)) & branches.calls)),
            key=lambda s: s.end - s.start,
            default=None,
        )
        if step is None:
            raise Kept(f"'{name}' also computes '{call.target}', which is not part of the branches", name)
        child = ctx.name(step.module)
        if not child.startswith(name + ".") or step.inputs != [current] or len(step.outputs) != 1:
            raise Kept(f"'{name}' applies '{child}' to something other than the chain through its branches", name)
        if "." in child[len(name) + 1 :]:
            raise Kept(f"'{name}' calls '{child}', which is not one of its own children, around its branches", name)
        chains[index > last].append(child[len(name) + 1 :])
        current = step.outputs[0]
        index = step.end
    if block.outputs != [current]:
        raise Kept(f"'{name}' returns something other than the sum and what follows it", name)
    return tuple(chains[0]), tuple(chains[1])


def _analyse(branches: Branches, ctx: PlanContext) -> tuple[_Block, ConvForm]:
    reason = region_reason(branches, ctx)
    if reason:
        raise Kept(reason)
    channels, dims = channels_and_dims(branches, ctx)
    form = evaluate(branches.recipe, ctx.model, ctx.rules, channels, dims)
    if not is_sum(branches.recipe):
        before, after = sequence_cost(branches.recipe, ctx.model), float(form.kernel.numel())
        if after > before:
            raise NotExact(
                f"one convolution would cost more multiply-adds than the sequence ({after:.0f} > {before:.0f})"
            )
    block = _enclosing(branches, ctx)
    taken = ctx.claimed.get(block.name)
    if taken is not None:
        raise Kept(f"'{block.name}' already holds another merge", block.name)
    return block, form


def merge_rows(ctx: PlanContext) -> list[PlanRow]:
    """The merges of the model: one row per block merged (kind ``merge``) and one per norm it absorbs
    (kind ``merged``); a row with the reason for branches that share their input but do not merge."""
    rows: list[PlanRow] = []
    for found in reversed(find_branches(ctx)):  # in the order they run
        if isinstance(found, Kept):
            continue
        try:
            block, form = _analyse(found, ctx)
        except Exception as keep:  # Kept, NotExact, or a shape the analysis did not foresee: never merged
            if not is_sum(found.recipe):
                continue  # a sequence of convolutions that stays as it is: nothing to report
            reason = keep.reason if isinstance(keep, Kept) else _words(keep)
            names = ", ".join(f"'{m}'" for m in found.modules)
            rows.append(KeptNorm(f"{_label(found, ctx)} (branches)", "branches", f"branches {names}: {reason}"))
            continue
        if block.name in ctx.refused:
            names = ", ".join(f"'{m}'" for m in found.modules)
            reason = f"branches {names}: {ctx.refused[block.name]}"
            rows.append(KeptNorm(f"{block.name} (branches)", "branches", reason))
            continue
        modules, types = layer_names(found, ctx.model)
        channels, dims = channels_and_dims(found, ctx)
        recipe = MergeRecipe(found.recipe, channels, dims, block.post, describe(form), block.pre)
        rows.append(FoldSite(block.name, layer_type(block.module).__name__, modules, types, "merge", merge=recipe))
        for name in modules:
            module = ctx.model.get_submodule(name)
            if ctx.rules.is_norm_layer(module):
                rows.append(
                    FoldSite(
                        name, layer_type(module).__name__, (block.name,), (layer_type(block.module).__name__,), "merged"
                    )
                )
        survivors = tuple(f"{block.name}.{s}" for s in (*block.pre, *block.post))
        for name, _ in block.module.named_modules(prefix=block.name):
            if not any(name == s or name.startswith(s + ".") for s in survivors):
                ctx.claimed[name] = block.name  # gone with the block; what survives may still take folds
        ctx.claimed_calls |= found.calls
    return rows


def merge_hints(ctx: PlanContext, norms: Collection[str] | None = None) -> dict[str, str]:
    """Norm name -> the block whose branches ``reparameterize=True`` would merge it with (only branches
    holding one of ``norms``, when given, are analysed)."""
    hints: dict[str, str] = {}
    for found in find_branches(ctx):
        if isinstance(found, Kept) or (norms is not None and not any(m in norms for m in found.modules)):
            continue
        try:
            block, _ = _analyse(found, ctx)
        except Exception:  # Kept, NotExact, or anything unforeseen: a hint is a courtesy, never a failure
            continue
        for name in found.modules:
            hints[name] = block.name
    return hints


def _words(error: Exception) -> str:
    """Why a sum was not merged, for a reason: the exactness condition it fails, or what went wrong."""
    if isinstance(error, NotExact):
        return str(error)
    return f"they could not be analysed ({type(error).__name__}: {error}); please report it with the model"


def _label(branches: Branches, ctx: PlanContext) -> str:
    """Where a sum is, for a row: the module around it, else the op."""
    first, last = min(branches.calls), max(branches.calls)
    around = [s for s in ctx.graph.spans if s.start <= first and last < s.end and s.module is not ctx.model]
    if around:
        return ctx.name(min(around, key=lambda s: s.end - s.start).module)
    return ctx.graph.calls[last].target
