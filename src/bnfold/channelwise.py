"""Channel-wise affine ops that are not norm modules: ``layer(x) * self.scale + self.shift``.

A Conv/ConvTranspose/Linear layer whose output is multiplied (or divided) by, or
added to (or has subtracted), a constant per-output-channel tensor folds the
same way a norm does. "Constant" means a parameter or buffer of the model, used
by this one op only (possibly through reshape/view/unsqueeze), never a value
computed from the input. The op stays in the model's code, so after folding the
constant is set to its neutral value (1 for mul/div, 0 for add/sub), which makes
the op exact identity.

Needs the shapes of an execution trace (``example_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .graph import Call, DataFlowGraph, Shape, TensorRef, ValueKey

__all__ = [
    "ConstantOperand",
    "AFFINE_OPS",
    "find_constant",
    "per_channel_axis",
    "permuted_axis",
    "affine_of_op",
    "constant_named",
    "is_neutral",
    "neutral_value",
]

# op name as recorded -> kind
AFFINE_OPS = {
    "Tensor.mul": "mul",
    "Tensor.mul_": "mul",
    "_VariableFunctionsClass.mul": "mul",
    "Tensor.div": "div",
    "Tensor.div_": "div",
    "_VariableFunctionsClass.div": "div",
    "Tensor.add": "add",
    "Tensor.add_": "add",
    "_VariableFunctionsClass.add": "add",
    "Tensor.sub": "sub",
    "Tensor.sub_": "sub",
    "_VariableFunctionsClass.sub": "sub",
}

_VIEW_OPS = {"Tensor.reshape", "Tensor.view", "Tensor.unsqueeze", "_VariableFunctionsClass.reshape"}
_PERMUTE_OPS = {"Tensor.permute", "_VariableFunctionsClass.permute"}


@dataclass(frozen=True)
class ConstantOperand:
    """A parameter or buffer reaching an op unchanged (up to reshapes)."""

    name: str
    key: ValueKey
    shape: Shape
    reason: str | None  # why it cannot be neutralized, if it cannot


def find_constant(graph: DataFlowGraph, key: ValueKey, shape: Shape | None, reader: int) -> ConstantOperand | None:
    """The parameter behind ``key`` when ``key`` is a parameter/buffer or a reshape of one, else ``None``."""
    if shape is None:
        return None
    if key in graph.constants:
        name = graph.constants[key]
        others = [i for i in graph.consumers.get(key, []) if i != reader]
        return ConstantOperand(
            name, key, shape, f"'{name}' is also used elsewhere in the forward pass" if others else None
        )
    source = graph.producer.get(key)
    if source is None:
        return None
    view = graph.calls[source]
    if view.kind != "function" or view.target not in _VIEW_OPS or len(view.inputs) != 1:
        return None
    base = view.inputs[0]
    if base not in graph.constants:
        return None
    name = graph.constants[base]
    reason = None
    if [i for i in graph.consumers.get(base, []) if i != source] or [
        i for i in graph.consumers.get(key, []) if i != reader
    ]:
        reason = f"'{name}' is also used elsewhere in the forward pass"
    return ConstantOperand(name, key, shape, reason)


def per_channel_axis(constant: Shape, activation: Shape) -> int | None | str:
    """The axis of ``activation`` along which ``constant`` varies when broadcast against it: an int, ``None``
    for a scalar-like constant, or ``"no"`` when it is not a per-axis vector (or would grow the activation)."""
    if len(constant) > len(activation):
        return "no"
    padded = (1,) * (len(activation) - len(constant)) + tuple(constant)
    varying = [i for i, size in enumerate(padded) if size != 1]
    if not varying:
        return None
    if len(varying) > 1 or padded[varying[0]] != activation[varying[0]]:
        return "no"
    return varying[0]


def permuted_axis(call: Call, axis: int) -> int | None:
    """Where ``axis`` of a permute op's input lands in its output, from the recorded arguments."""
    dims: list[int] = []
    for arg in call.args[1:]:
        if isinstance(arg, int):
            dims.append(arg)
        elif isinstance(arg, (tuple, list)) and all(isinstance(d, int) for d in arg):
            dims.extend(arg)
    if "dims" in call.kwargs and isinstance(call.kwargs["dims"], (tuple, list)):
        dims = list(call.kwargs["dims"])
    ndim = len(dims)
    if not ndim:
        return None
    normalized = [d % ndim for d in dims]
    return normalized.index(axis) if axis in normalized else None


def operands(call: Call) -> tuple[TensorRef, TensorRef] | None:
    """The two tensor operands of a binary op recorded without extra arguments (``alpha=`` etc.)."""
    if call.kwargs or len(call.args) != 2:
        return None
    a, b = call.args
    if isinstance(a, TensorRef) and isinstance(b, TensorRef):
        return a, b
    return None


def affine_of_op(kind: str, values: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """The float64 per-channel ``(scale, shift)`` that ``x <op> values`` applies."""
    v = values.detach().to(torch.float64).flatten()
    if v.numel() == 1:
        v = v.expand(channels)
    zeros, ones = torch.zeros_like(v), torch.ones_like(v)
    if kind == "mul":
        return v, zeros
    if kind == "div":
        return 1.0 / v, zeros
    if kind == "add":
        return ones, v
    if kind == "sub":
        return ones, -v
    raise ValueError(f"unknown channel-wise op {kind!r}")


def constant_named(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` (a qualified name) of ``model``."""
    module_name, _, attr = name.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr, None)
    if not isinstance(value, Tensor):
        raise AttributeError(f"no parameter or buffer '{name}'")
    return value


def is_neutral(kind: str, value: Tensor) -> bool:
    """Whether ``x <kind> value`` is already the identity (a constant folded before)."""
    return bool(torch.equal(value, neutral_value(kind, value)))


def neutral_value(kind: str, like: Tensor) -> Tensor:
    """What the constant becomes once folded: the op's identity element."""
    return torch.ones_like(like) if kind in ("mul", "div") else torch.zeros_like(like)


def is_permute_module(module: nn.Module) -> bool:
    return type(module).__name__ == "Permute" and isinstance(getattr(module, "dims", None), (list, tuple))
