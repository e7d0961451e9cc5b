"""The op table: what each op (a function or a module type) does to the channel axis.

Every walk reads this one table: the backward walk from a norm up to the layer
that feeds it, the forward walk from a norm down to the layers that read it, and
the search for channel-wise constants (``layer(x) * gamma.view(1, -1, 1, 1)``).
An op that is not in the table ends a path: bnfold never assumes that an op it
does not know is harmless.

An entry says, for an op:

- ``kind``: ``kept`` (elementwise, the values pass unchanged), ``moved`` (permute,
  transpose, movedim, roll: elements move, by the op's arguments), ``reshaped``
  (reshape, view, flatten, squeeze...: from the recorded shapes), ``pooled``
  (average or max pooling over the axes after the channels), ``reduced`` (a mean
  over other axes) or ``identity`` (Dropout and Identity in eval mode);
- ``maps(call, axis)``: where channel ``axis`` of the op's input lands in its
  output, or ``None`` when the op mixes the channels with something else;
- ``condition(call, positive)``: why a per-channel affine map ``scale * x + shift``
  does not pass through the op unchanged, or ``None`` (``positive``: every scale is
  positive, which a maximum needs);
- ``mixes``: the words for a call that ``maps`` refuses;
- ``without_shapes``: what a walk does when there are no recorded shapes (a
  ``torch.fx`` trace): ``"pass"`` (the axis cannot move), ``"flatten"`` (a full
  ``nn.Flatten``) or ``"stop"``.

Adding an op is one entry here and one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from ..discover.graph import Call, Shape, TensorRef
from . import third_party as compat
from .classes import type_chain

__all__ = ["OpKind", "AxisMove", "OpEntry", "AVG_POOLS", "op_table", "entry_for", "axis_after", "axis_before"]

OpKind = Literal["kept", "moved", "reshaped", "pooled", "reduced", "identity"]


@dataclass(frozen=True)
class AxisMove:
    """Where the channel axis is after an op. ``flattened``: the op merged it with every axis after it into
    ``(N, C * rest)``, channel-major (``x.flatten(1)``), so a Linear reading it sees whole blocks per channel."""

    axis: int
    flattened: bool = False


def _no_condition(call: Call, positive: bool) -> str | None:
    return None


@dataclass(frozen=True)
class OpEntry:
    """What one op does to the channel axis (see the module docstring)."""

    kind: OpKind
    maps: Callable[[Call, int], AxisMove | None]
    condition: Callable[[Call, bool], str | None] = _no_condition
    without_shapes: Literal["pass", "flatten", "stop"] = "stop"
    mixes: str = "mixes the channels with another axis"  # what to say when ``maps`` gives None


# -- how the axis moves ----------------------------------------------------------------------------------


def _shapes(call: Call) -> tuple[Shape, Shape] | None:
    if not call.input_shapes or not call.output_shapes:
        return None
    before, after = call.input_shapes[0], call.output_shapes[0]
    return None if before is None or after is None else (before, after)


def _kept(call: Call, axis: int) -> AxisMove | None:
    shapes = _shapes(call)
    return AxisMove(axis) if shapes is not None and shapes[0] == shapes[1] else None


def _int_args(values: tuple[Any, ...]) -> list[int] | None:
    """The integers of ``values``, flattening one level of tuple/list (``permute(0, 2, 1)``, ``permute((0, 2, 1))``)."""
    found: list[int] = []
    for value in values:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            found.append(value)
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            found.extend(value)
        else:
            return None
    return found


def _permuted(dims: list[int] | None, axis: int) -> AxisMove | None:
    if not dims:
        return None
    normalized = [d % len(dims) for d in dims]
    return AxisMove(normalized.index(axis)) if axis in normalized else None


def _permute(call: Call, axis: int) -> AxisMove | None:
    dims = call.kwargs.get("dims")
    return _permuted(_int_args(call.args[1:]) if dims is None else _int_args((dims,)), axis)


def _permute_module(call: Call, axis: int) -> AxisMove | None:
    return _permuted(_int_args((getattr(call.module, "dims", None),)), axis)


def _transpose(call: Call, axis: int) -> AxisMove | None:
    shapes = _shapes(call)
    pair = _int_args(call.args[1:3])
    if shapes is None or pair is None or len(pair) != 2 or call.kwargs:
        return None
    d0, d1 = (d % len(shapes[0]) for d in pair)
    return AxisMove(d1 if axis == d0 else d0 if axis == d1 else axis)


def _movedim(call: Call, axis: int) -> AxisMove | None:
    shapes = _shapes(call)
    args = list(call.args[1:]) + [call.kwargs[k] for k in ("source", "destination") if k in call.kwargs]
    if shapes is None or len(args) != 2:
        return None
    ndim = len(shapes[0])
    source, destination = (_int_args((a,)) for a in args)
    if source is None or destination is None or len(source) != len(destination):
        return None
    source, destination = [s % ndim for s in source], [d % ndim for d in destination]
    placed: dict[int, int] = dict(zip(destination, source, strict=True))  # output axis -> input axis
    rest = iter(a for a in range(ndim) if a not in source)
    order = [placed[d] if d in placed else next(rest) for d in range(ndim)]
    return AxisMove(order.index(axis))


def _roll(call: Call, axis: int) -> AxisMove | None:
    """``torch.roll`` moves elements along ``dims``: the channels stay whole unless they are rolled."""
    shapes = _shapes(call)
    args = list(call.args[1:])
    dims = call.kwargs.get("dims", args[1] if len(args) > 1 else None)
    if shapes is None or dims is None:
        return None  # no dims: the flattened tensor is rolled, across the channels
    rolled = _int_args((dims,))
    if rolled is None or axis in {d % len(shapes[0]) for d in rolled}:
        return None
    return AxisMove(axis)


def _reshaped_axis(before: Shape, after: Shape, axis: int) -> int | None:
    """The axis of ``after`` that axis ``axis`` of ``before`` becomes under a row-major reshape: the one with
    the same size and the same number of elements after it (so every element keeps its index along it)."""
    inner = math.prod(before[axis + 1 :])
    for a, size in enumerate(after):
        if size == before[axis] and math.prod(after[a + 1 :]) == inner:
            return a
    return None


def _reshape(call: Call, axis: int) -> AxisMove | None:
    shapes = _shapes(call)
    if shapes is None or any(isinstance(a, torch.dtype) for a in call.args[1:]) or "dtype" in call.kwargs:
        return None  # x.view(torch.int8) reinterprets the bytes
    before, after = shapes
    same = _reshaped_axis(before, after, axis)
    if same is not None:
        return AxisMove(same)
    if axis == 1 and len(after) == 2 and after[0] == before[0]:
        return AxisMove(1, flattened=True)  # x.flatten(1), x.view(N, -1): channel-major blocks
    return None


def _index(call: Call, axis: int) -> AxisMove | None:
    """``x[:, None, ...]``: an index of full slices, ``None``, ``...`` and integers on axes of size one only
    adds or drops axes of size one."""
    shapes = _shapes(call)
    index = call.args[1] if len(call.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    full = slice(None)

    def allowed(item: Any) -> bool:
        return (
            item is None or item is Ellipsis or item == full or (isinstance(item, int) and not isinstance(item, bool))
        )

    if shapes is None or isinstance(index, TensorRef) or not all(allowed(i) for i in items):
        return None
    if sum(i is Ellipsis for i in items) > 1:
        return None
    before = shapes[0]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded.extend([full] * (len(before) - consumed) if item is Ellipsis else [item])
    expanded.extend([full] * (len(before) - sum(1 for i in expanded if i is not None)))
    position = out_axis = 0
    found = None
    for item in expanded:
        if item is None:
            out_axis += 1
            continue
        if isinstance(item, int):
            if position >= len(before) or before[position] != 1 or position == axis:
                return None  # an integer index on an axis longer than one picks elements
            position += 1
            continue
        if position == axis:
            found = out_axis
        position += 1
        out_axis += 1
    return None if found is None else AxisMove(found)


def _mean(call: Call, axis: int) -> AxisMove | None:
    """``x.mean(dim, keepdim)`` over axes other than the channels."""
    shapes = _shapes(call)
    args = list(call.args[1:])
    dim = call.kwargs.get("dim", args[0] if args else None)
    keepdim = call.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if shapes is None or "dtype" in call.kwargs or not isinstance(keepdim, bool):
        return None
    dims = _int_args((dim,)) if dim is not None else None
    if not dims:
        return None
    ndim = len(shapes[0])
    reduced = {d % ndim for d in dims}
    if axis in reduced:
        return None
    return AxisMove(axis if keepdim else axis - sum(1 for d in reduced if d < axis))


def _pool(spatial: int) -> Callable[[Call, int], AxisMove | None]:
    def maps(call: Call, axis: int) -> AxisMove | None:
        shapes = _shapes(call)
        if shapes is None or axis >= len(shapes[0]) - spatial:
            return None  # it pools over the channels
        return AxisMove(axis)

    return maps


def _flatten_module(call: Call, axis: int) -> AxisMove | None:
    return _reshape(call, axis)


def _identity(call: Call, axis: int) -> AxisMove | None:
    return AxisMove(axis)


# -- when a per-channel affine map passes through ----------------------------------------------------------


def _average_condition(call: Call, positive: bool) -> str | None:
    """An average commutes with ``scale * x + shift`` when it averages real elements only."""
    module = call.module
    padding = getattr(module, "padding", 0)
    padded = any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    if padded and getattr(module, "count_include_pad", False):
        return "averages padded zeros (count_include_pad=True)"
    if getattr(module, "divisor_override", None) is not None:
        return "divides by a fixed divisor_override"
    return None


def _max_condition(call: Call, positive: bool) -> str | None:
    """A maximum commutes with ``scale * x + shift`` when every scale is positive."""
    if getattr(call.module, "return_indices", False):
        return "also returns indices"
    return None if positive else "takes a maximum, and some of the norm's scales are not positive"


def _eval_condition(call: Call, positive: bool) -> str | None:
    module = call.module
    if isinstance(module, _DropoutNd) and module.training:
        return f"is {type(module).__name__} in training mode (a random mask, not the identity)"
    return None


# -- the table ---------------------------------------------------------------------------------------------

_KEPT = OpEntry("kept", _kept)
_PERMUTE = OpEntry("moved", _permute)
_TRANSPOSE = OpEntry("moved", _transpose)
_MOVEDIM = OpEntry("moved", _movedim)
_RESHAPE = OpEntry("reshaped", _reshape)
_INDEX = OpEntry("reshaped", _index)
_MEAN = OpEntry("reduced", _mean, mixes="takes a mean over its channels")
_IDENTITY = OpEntry("identity", _identity, _eval_condition, without_shapes="pass")

_FUNCTIONS: dict[str, OpEntry] = {
    "Tensor.contiguous": _KEPT,
    "Tensor.clone": _KEPT,
    "_VariableFunctionsClass.clone": _KEPT,
    "Tensor.permute": _PERMUTE,
    "_VariableFunctionsClass.permute": _PERMUTE,
    "Tensor.transpose": _TRANSPOSE,
    "_VariableFunctionsClass.transpose": _TRANSPOSE,
    "Tensor.swapaxes": _TRANSPOSE,
    "Tensor.swapdims": _TRANSPOSE,
    "Tensor.movedim": _MOVEDIM,
    "_VariableFunctionsClass.movedim": _MOVEDIM,
    "Tensor.roll": OpEntry("moved", _roll),
    "_VariableFunctionsClass.roll": OpEntry("moved", _roll),
    "Tensor.reshape": _RESHAPE,
    "Tensor.view": _RESHAPE,
    "Tensor.flatten": _RESHAPE,
    "Tensor.unflatten": _RESHAPE,
    "Tensor.squeeze": _RESHAPE,
    "Tensor.unsqueeze": _RESHAPE,
    "Tensor.reshape_as": _RESHAPE,
    "Tensor.view_as": _RESHAPE,
    "_VariableFunctionsClass.reshape": _RESHAPE,
    "_VariableFunctionsClass.flatten": _RESHAPE,
    "_VariableFunctionsClass.squeeze": _RESHAPE,
    "_VariableFunctionsClass.unsqueeze": _RESHAPE,
    "Tensor.__getitem__": _INDEX,
    "Tensor.mean": _MEAN,
    "_VariableFunctionsClass.mean": _MEAN,
}

# The average pools with a fixed window, by spatial rank (one is a convolution when it counts its padding).
AVG_POOLS: dict[type[nn.Module], int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_AVG_POOLS = {
    **AVG_POOLS,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_MAX_POOLS = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


_TABLES: dict[tuple[type[nn.Module], ...], dict[type[nn.Module], OpEntry]] = {}


def _modules() -> dict[type[nn.Module], OpEntry]:
    """The entries for module types, built once per set of third-party types loaded (each lookup asks)."""
    permutes = compat.permute_module_types()
    table = _TABLES.get(permutes)
    if table is None:
        table = _TABLES[permutes] = _build_modules(permutes)
    return table


def _build_modules(permutes: tuple[type[nn.Module], ...]) -> dict[type[nn.Module], OpEntry]:
    table: dict[type[nn.Module], OpEntry] = {
        nn.Identity: _IDENTITY,
        nn.Dropout: _IDENTITY,
        nn.Dropout1d: _IDENTITY,
        nn.Dropout2d: _IDENTITY,
        nn.Dropout3d: _IDENTITY,
        nn.AlphaDropout: _IDENTITY,
        nn.FeatureAlphaDropout: _IDENTITY,
        nn.Flatten: OpEntry("reshaped", _flatten_module, without_shapes="flatten"),
        nn.Unflatten: OpEntry("reshaped", _flatten_module),
    }
    for pool, spatial in _AVG_POOLS.items():
        table[pool] = OpEntry("pooled", _pool(spatial), _average_condition, "pass", "pools over its channels")
    for pool, spatial in _MAX_POOLS.items():
        table[pool] = OpEntry("pooled", _pool(spatial), _max_condition, "pass", "pools over its channels")
    for permute in permutes:
        table[permute] = OpEntry("moved", _permute_module)
    return table


def op_table() -> tuple[dict[str, OpEntry], dict[type[nn.Module], OpEntry]]:
    """The table: entries for functions (by recorded name) and for module types."""
    return _FUNCTIONS, dict(_modules())


def entry_for(call: Call, modules: dict[type[nn.Module], OpEntry] | None = None) -> OpEntry | None:
    """The table's entry for a recorded call, or ``None`` (an op bnfold does not know ends a path)."""
    if call.kind == "function":
        return _FUNCTIONS.get(call.target)
    if call.kind != "module" or call.module is None:
        return None
    table = _modules() if modules is None else modules
    if type(call.module) is nn.Flatten and not _full_flatten(call.module):
        return OpEntry("reshaped", _flatten_module)  # a partial Flatten: only with shapes
    for kind in type_chain(call.module):
        if kind in table:
            return table[kind]
    return None


def _full_flatten(module: nn.Module) -> bool:
    return getattr(module, "start_dim", None) == 1 and getattr(module, "end_dim", None) == -1


def axis_after(call: Call, axis: int, entry: OpEntry) -> AxisMove | None:
    """Where channel ``axis`` of ``call``'s input lands in its output (with shapes)."""
    return entry.maps(call, axis)


def axis_before(call: Call, axis: int, entry: OpEntry) -> int | None:
    """Which axis of ``call``'s input becomes ``axis`` of its output, unflattened; ``None``: none does."""
    ndim = call.input_ndims[0] if call.input_ndims else None
    if ndim is None:
        return axis if entry.without_shapes == "pass" else None
    for candidate in range(ndim):
        if entry.maps(call, candidate) == AxisMove(axis):
            return candidate
    return None
