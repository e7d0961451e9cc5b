"""What a merged block becomes: :class:`MergedConv`, one convolution between the modules that were around
the branches (and, in a partial merge, the branches that keep running), and how it is built."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..rules.layers import CONVS
from .merge_arithmetic import ConvForm

__all__ = ["MergedConv", "build_conv", "Step", "held_kind", "held_thing"]


# One step of a kept branch, relative to the block: ("module", path, None) runs the module at ``path``;
# (op, constant, shape) applies ``value <op> constant``, the constant a number or the path of a parameter or
# buffer, read with ``shape`` (the op may have read it reshaped).
Step = tuple[str, str | float, tuple[int, ...] | None]
_OPS: dict[str, Callable[[Any, Any], Tensor]] = {
    "mul": operator.mul,
    "div": operator.truediv,
    "add": operator.add,
    "sub": operator.sub,
}


def _plant(root: nn.Module, path: str, thing: nn.Module | Tensor, kind: str) -> None:
    """Register ``thing`` at ``path`` under ``root``, with plain containers for the names on the way (so
    that its state_dict keys are those it had in the block)."""
    *parents, last = path.split(".")
    owner = root
    for name in parents:
        child = owner._modules.get(name)
        if child is None:
            child = nn.Module()
            owner.add_module(name, child)
        owner = child
    if kind == "module":
        owner.add_module(last, cast(nn.Module, thing))
    elif kind == "parameter":
        owner.register_parameter(last, cast(nn.Parameter, thing))
    else:
        owner.register_buffer(last, cast(Tensor, thing), persistent=kind == "buffer")


def held_kind(block: nn.Module, path: str) -> str:
    """Whether ``path`` in ``block`` is a module, a parameter, a buffer or a buffer kept out of the state_dict."""
    owner_path, _, last = path.rpartition(".")
    owner = block.get_submodule(owner_path) if owner_path else block
    if last in owner._modules:
        return "module"
    if last in owner._parameters:
        return "parameter"
    return "non-persistent buffer" if last in owner._non_persistent_buffers_set else "buffer"


def held_thing(block: nn.Module, path: str, kind: str) -> nn.Module | Tensor:
    if kind == "module":
        return block.get_submodule(path)
    return block.get_parameter(path) if kind == "parameter" else block.get_buffer(path)


class MergedConv(nn.Module):
    """What a block of parallel branches became: the modules before the branches inside the block, one
    convolution (``merged_conv``), then the modules after their sum. The modules around the branches keep
    the attribute names they had in the block (so their paths, and their state_dict keys, do not move).

    In a partial merge it also runs the branches that did not merge (``kept_branches``: a sign and the
    steps of each, see :data:`Step`) on the same input and adds them to the merged convolution's output;
    the modules and constants they read (``held``) keep their paths in the block too."""

    def __init__(
        self,
        conv: nn.Module,
        post: list[tuple[str, nn.Module]],
        merged_from: tuple[str, ...] = (),
        pre: list[tuple[str, nn.Module]] | None = None,
        kept: Sequence[tuple[float, tuple[Step, ...]]] = (),
        held: Sequence[tuple[str, nn.Module | Tensor, str]] = (),
    ) -> None:
        super().__init__()
        for name, module in pre or []:
            self.add_module(name, module)
        self.merged_conv = conv  # registered between them, so that repr and state_dict read in order
        for path, thing, kind in held:
            _plant(self, path, thing, kind)
        for name, module in post:
            self.add_module(name, module)
        self.merged_from = merged_from
        self.pre_names = tuple(name for name, _ in pre or [])
        self.post_names = tuple(name for name, _ in post)
        self.kept_branches = tuple((float(sign), tuple(steps)) for sign, steps in kept)
        self.held = tuple((path, kind) for path, _, kind in held)

    @property
    def survivors(self) -> tuple[str, ...]:
        """The modules of the block it replaced that it keeps, under the same names."""
        return (*self.pre_names, *self.post_names, *(path for path, kind in self.held if kind == "module"))

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready description, from which :meth:`from_record` rebuilds this structure."""
        conv = cast(nn.modules.conv._ConvNd, self.merged_conv)
        record = {
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
        if self.kept_branches:
            record["kept"] = [
                [sign, [[op, target, None if shape is None else list(shape)] for op, target, shape in steps]]
                for sign, steps in self.kept_branches
            ]
            record["held"] = [[path, kind] for path, kind in self.held]
        return record

    @classmethod
    def from_record(cls, spec: dict[str, Any], replaced: nn.Module) -> MergedConv:
        """The structure :meth:`to_record` described, on ``replaced`` (the block of a freshly built model):
        its modules before and after the branches (and those of kept branches) are kept, the convolution is
        new (its weights load next)."""
        dims = int(spec["dims"])
        dtype = getattr(torch, str(spec["dtype"]))
        conv = cast(Any, CONVS[dims])(
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
        kept = [
            (
                float(sign),
                tuple(
                    (
                        str(op),
                        target if isinstance(target, str) else float(target),
                        None if shape is None else tuple(shape),
                    )
                    for op, target, shape in steps
                ),
            )
            for sign, steps in spec.get("kept", [])
        ]
        held = [(str(path), held_thing(replaced, path, kind), str(kind)) for path, kind in spec.get("held", [])]
        return cls(conv, post, tuple(spec["merged_from"]), pre, kept, held)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.pre_names:
            x = self._modules[name](x)  # type: ignore[misc]  # registered in __init__, never None
        y = self.merged_conv(x)
        for sign, steps in self.kept_branches:
            value = x
            for op, target, shape in steps:
                if op == "module":
                    value = self.get_submodule(cast(str, target))(value)  # looked up now: a fold may replace it
                elif isinstance(target, str):
                    owner, _, name = target.rpartition(".")
                    constant = cast(Tensor, getattr(self.get_submodule(owner) if owner else self, name))
                    value = _OPS[op](value, constant if shape is None else constant.reshape(shape))
                else:
                    value = _OPS[op](value, target)
            y = y + value if sign > 0 else y - value
        for name in self.post_names:
            y = self._modules[name](y)  # type: ignore[misc]  # registered in __init__, never None
        return y

    def extra_repr(self) -> str:
        parts = [f"merged from: {', '.join(self.merged_from)}"] if self.merged_from else []
        if self.kept_branches:
            parts.append(f"kept branches: {len(self.kept_branches)}")
        return "; ".join(parts)


def build_conv(form: ConvForm, like: Tensor) -> nn.Module:
    """A torch convolution holding ``form``, its weights cast once to ``like``'s dtype and device."""
    conv_type = cast(Any, CONVS[form.dims])  # Conv1d/2d/3d take tuples for every size argument
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
