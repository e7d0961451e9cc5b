"""The op registry: one entry per op (a function or a module type) saying everything bnfold knows about it.

Every walk over channels reads it through :mod:`bnfold.planning.channel_walk`: the
backward walk from a norm up to the layer that feeds it, the forward walk from a
norm down to the layers that read it, the search for channel-wise constants
(``layer(x) * gamma.view(1, -1, 1, 1)``) and the search for parallel branches.
The aliasing analysis of a ``torch.fx`` trace and the execution tracer read their
columns from it too. An op that is not in the registry ends a path: bnfold never
assumes that an op it does not know is harmless.

An entry says, for an op:

- ``kind``: ``kept`` (elementwise, the values pass unchanged), ``moved`` (permute,
  transpose, movedim, roll: elements move, by the op's arguments), ``reshaped``
  (reshape, view, flatten, squeeze...: from the recorded shapes), ``pooled``
  (average or max pooling over the axes after the channels), ``reduced`` (a mean
  over other axes), ``identity`` (Dropout and Identity in eval mode),
  ``activation`` (elementwise and not linear: ReLU and its kin), ``arithmetic``
  (``+ - * /`` of two operands), ``joined`` (a concatenation), ``metadata`` (reads
  a tensor's shape or type, never its values) or ``other`` (only its memory is
  known);
- ``maps(call, axis)``: where channel ``axis`` of the op's input lands in its
  output, or ``None`` when the op mixes the channels with something else; an entry
  without ``maps`` is not walked through;
- ``passes``: the per-channel transforms of its input that come out of it as the
  same transforms of its output (:data:`Transform`: a positive ``scale``, a
  ``sign`` (a negative scale), a ``shift``, a ``permutation`` of the channels).
  A norm fold moves ``scale * x + shift`` across the op, so it needs the scale
  and the shift to pass (and the sign when a scale is negative); a positive
  per-channel scale alone passes a ReLU, a shift does not;
- ``condition(call, carried)``: why this call does not let the ``carried``
  transforms through although its kind does (padded zeros averaged with a shift,
  Dropout in training mode), or ``None``;
- ``stops``: what to say for each transform it does not pass;
- ``mixes``: the words for a call that ``maps`` refuses;
- ``without_shapes``: what a walk does when there are no recorded shapes (a
  ``torch.fx`` trace): ``"pass"`` (the axis cannot move), ``"flatten"`` (a full
  ``nn.Flatten``) or ``"stop"``;
- ``memory``: what a call does to the memory of its inputs (for the aliasing
  analysis of a ``torch.fx`` trace): ``fresh`` (new memory, nothing written),
  ``view`` (may return a view of an input, or the input itself) or ``writes``
  (may write an input in place, or an op bnfold knows nothing more of);
- ``applies``: the arithmetic of a binary op (``add``, ``sub``, ``mul``, ``div``)
  and ``augmented``: it is Python's in-place form (``x += y``), which the search
  for channel-wise constants leaves alone.

Functions are keyed by the name an execution trace records (``Tensor.permute``,
``_VariableFunctionsClass.cat``, ``relu`` for ``F.relu``); a ``torch.fx`` trace
names a call by its last part (``permute``, ``add``), which
:func:`memory_of` reads. Adding an op is one entry here and one test.
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

__all__ = [
    "OpKind",
    "Transform",
    "Memory",
    "BinaryOp",
    "ALL_TRANSFORMS",
    "NORM_FOLD",
    "POSITIVE_NORM_FOLD",
    "POSITIVE_SCALE",
    "AxisMove",
    "OpEntry",
    "AVG_POOLS",
    "op_table",
    "registry",
    "entry_for",
    "function_entry",
    "memory_of",
    "axis_after",
    "axis_before",
]

OpKind = Literal[
    "kept",
    "moved",
    "reshaped",
    "pooled",
    "reduced",
    "identity",
    "activation",
    "arithmetic",
    "joined",
    "metadata",
    "other",
]
Transform = Literal["scale", "sign", "shift", "permutation"]
Memory = Literal["fresh", "view", "writes"]
BinaryOp = Literal["add", "sub", "mul", "div"]

ALL_TRANSFORMS: frozenset[Transform] = frozenset({"scale", "sign", "shift", "permutation"})
# What a norm fold (or a channel-wise constant, folded with the same arithmetic) carries across an op: its
# scale and its shift, and the sign when some scale is negative.
NORM_FOLD: frozenset[Transform] = frozenset({"scale", "sign", "shift"})
POSITIVE_NORM_FOLD: frozenset[Transform] = frozenset({"scale", "shift"})
# What cross-layer equalization carries: a positive per-channel scale.
POSITIVE_SCALE: frozenset[Transform] = frozenset({"scale"})

_ORDER: tuple[Transform, ...] = ("scale", "sign", "shift", "permutation")
_STOPS: dict[Transform, str] = {
    "scale": "does not let a per-channel scale through",
    "sign": "does not let a negative scale through, and some of the scales are not positive",
    "shift": "does not let a shift through",
    "permutation": "does not let a permutation of the channels through",
}


@dataclass(frozen=True)
class AxisMove:
    """Where the channel axis is after an op. ``flattened``: the op merged it with every axis after it into
    ``(N, C * rest)``, channel-major (``x.flatten(1)``), so a Linear reading it sees whole blocks per channel."""

    axis: int
    flattened: bool = False


def _no_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    return None


@dataclass(frozen=True)
class OpEntry:
    """Everything bnfold knows about one op (see the module docstring)."""

    kind: OpKind
    maps: Callable[[Call, int], AxisMove | None] | None = None
    condition: Callable[[Call, frozenset[Transform]], str | None] = _no_condition
    without_shapes: Literal["pass", "flatten", "stop"] = "stop"
    mixes: str = "mixes the channels with another axis"  # what to say when ``maps`` gives None
    passes: frozenset[Transform] = ALL_TRANSFORMS
    stops: tuple[tuple[Transform, str], ...] = ()  # what to say when a transform does not pass
    memory: Memory = "writes"
    applies: BinaryOp | None = None
    augmented: bool = False

    def blocks(self, call: Call, carried: frozenset[Transform]) -> str | None:
        """Why ``carried`` does not come out of ``call`` unchanged, or ``None`` when it does.

        >>> from bnfold.discover.graph import Call
        >>> relu = function_entry("Tensor.relu")
        >>> call = Call(0, "function", "Tensor.relu", None)
        >>> relu.blocks(call, POSITIVE_SCALE) is None, relu.blocks(call, POSITIVE_NORM_FOLD)[-16:]
        (True, 'a shift does not')
        """
        reason = self.condition(call, carried)
        if reason:
            return reason
        for transform in _ORDER:
            if transform in carried and transform not in self.passes:
                return dict(self.stops).get(transform, _STOPS[transform])
        return None


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


# -- when a transform passes through ---------------------------------------------------------------------


def _average_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    """An average commutes with a scale always, and with a shift when it averages real elements only."""
    if "shift" not in carried:
        return None
    module = call.module
    padding = getattr(module, "padding", 0)
    padded = any(int(p) != 0 for p in (padding if isinstance(padding, tuple) else (padding,)))
    if padded and getattr(module, "count_include_pad", False):
        return "averages padded zeros (count_include_pad=True)"
    if getattr(module, "divisor_override", None) is not None:
        return "divides by a fixed divisor_override"
    return None


def _max_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    if getattr(call.module, "return_indices", False):
        return "also returns indices"
    return None


def _eval_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    module = call.module
    if isinstance(module, _DropoutNd) and module.training:
        return f"is {type(module).__name__} in training mode (a random mask, not the identity)"
    return None


def _in_place_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    """An activation that writes its input: an execution trace keys the tensor by its version, so it sees
    every reader before and after; a ``torch.fx`` trace (no shapes) cannot tell what else shares the memory."""
    in_place = (
        getattr(call.module, "inplace", False) is True
        or call.kwargs.get("inplace") is True
        or (call.kind == "function" and call.target.endswith("_") and not call.target.endswith("__"))
    )
    if in_place and (not call.input_shapes or call.input_shapes[0] is None):
        return "works in place, and without example_inputs bnfold cannot tell what else reads that memory"
    return None


def _prelu_condition(call: Call, carried: frozenset[Transform]) -> str | None:
    reason = _in_place_condition(call, carried)
    if reason is None and "permutation" in carried and getattr(call.module, "num_parameters", 1) != 1:
        return "has a slope per channel, which a permutation of the channels would mismatch"
    return reason


def _elementwise(call: Call, axis: int) -> AxisMove | None:
    """An elementwise op of one tensor: the axis stays (its shape, when recorded, must too)."""
    shapes = _shapes(call)
    if shapes is not None and shapes[0] != shapes[1]:
        return None
    return AxisMove(axis)


# -- the registry ------------------------------------------------------------------------------------------

_KEPT = OpEntry("kept", _kept, memory="view")
_CLONE = OpEntry("kept", _kept, memory="fresh")
_PERMUTE = OpEntry("moved", _permute, memory="view")
_TRANSPOSE = OpEntry("moved", _transpose, memory="view")
_MOVEDIM = OpEntry("moved", _movedim, memory="view")
_ROLL = OpEntry("moved", _roll, memory="fresh")
_RESHAPE = OpEntry("reshaped", _reshape, memory="view")
_INDEX = OpEntry("reshaped", _index, memory="view")
_MEAN = OpEntry("reduced", _mean, mixes="takes a mean over its channels", memory="fresh")
_IDENTITY = OpEntry("identity", _identity, _eval_condition, without_shapes="pass", memory="view")

# ReLU and its kin: max(x, 0) and a slope below zero commute with a positive per-channel scale (and with a
# permutation of the channels), never with a shift or a sign.
_NOT_LINEAR = "is a ReLU-like activation, not linear: a positive per-channel scale passes through it"
_RECTIFIER_STOPS: tuple[tuple[Transform, str], ...] = (
    ("shift", f"{_NOT_LINEAR}, a shift does not"),
    ("sign", f"{_NOT_LINEAR}, a negative one does not"),
)
_RECTIFIER = OpEntry(
    "activation",
    _elementwise,
    _in_place_condition,
    without_shapes="pass",
    passes=frozenset({"scale", "permutation"}),
    stops=_RECTIFIER_STOPS,
    memory="fresh",
)
_RECTIFIER_IN_PLACE = OpEntry(
    "activation",
    _elementwise,
    _in_place_condition,
    without_shapes="stop",
    passes=frozenset({"scale", "permutation"}),
    stops=_RECTIFIER_STOPS,
    memory="writes",
)


def _binary(op: BinaryOp, augmented: bool = False) -> OpEntry:
    return OpEntry("arithmetic", applies=op, augmented=augmented, memory="writes" if augmented else "fresh")


def _names(memory: Memory, kind: OpKind, names: str) -> dict[str, OpEntry]:
    entry = OpEntry(kind, memory=memory)
    return {name: entry for name in names.split()}


_FUNCTIONS: dict[str, OpEntry] = {
    # ops a walk goes through
    "Tensor.contiguous": _KEPT,
    "Tensor.clone": _CLONE,
    "_VariableFunctionsClass.clone": _CLONE,
    "Tensor.permute": _PERMUTE,
    "_VariableFunctionsClass.permute": _PERMUTE,
    "Tensor.transpose": _TRANSPOSE,
    "_VariableFunctionsClass.transpose": _TRANSPOSE,
    "Tensor.swapaxes": _TRANSPOSE,
    "Tensor.swapdims": _TRANSPOSE,
    "Tensor.movedim": _MOVEDIM,
    "_VariableFunctionsClass.movedim": _MOVEDIM,
    "Tensor.roll": _ROLL,
    "_VariableFunctionsClass.roll": _ROLL,
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
    "relu": _RECTIFIER,  # F.relu (inplace=True: the condition)
    "Tensor.relu": _RECTIFIER,
    "_VariableFunctionsClass.relu": _RECTIFIER,
    "leaky_relu": _RECTIFIER,  # F.leaky_relu
    "Tensor.relu_": _RECTIFIER_IN_PLACE,
    "_VariableFunctionsClass.relu_": _RECTIFIER_IN_PLACE,
    "leaky_relu_": _RECTIFIER_IN_PLACE,  # F.leaky_relu_
    # arithmetic: channel-wise constants and sums of branches
    "Tensor.mul": _binary("mul"),
    "Tensor.mul_": OpEntry("arithmetic", applies="mul", memory="writes"),
    "Tensor.__mul__": _binary("mul"),
    "Tensor.__rmul__": _binary("mul"),
    "_VariableFunctionsClass.mul": _binary("mul"),
    "Tensor.div": _binary("div"),
    "Tensor.div_": OpEntry("arithmetic", applies="div", memory="writes"),
    "Tensor.__truediv__": _binary("div"),
    "_VariableFunctionsClass.div": _binary("div"),
    "Tensor.add": _binary("add"),
    "Tensor.add_": OpEntry("arithmetic", applies="add", memory="writes"),
    "Tensor.__add__": _binary("add"),
    "Tensor.__radd__": _binary("add"),
    "Tensor.__iadd__": _binary("add", augmented=True),
    "_VariableFunctionsClass.add": _binary("add"),
    "Tensor.sub": _binary("sub"),
    "Tensor.sub_": OpEntry("arithmetic", applies="sub", memory="writes"),
    "Tensor.__sub__": _binary("sub"),
    "Tensor.__isub__": _binary("sub", augmented=True),
    "_VariableFunctionsClass.sub": _binary("sub"),
    # joins
    "_VariableFunctionsClass.cat": OpEntry("joined", memory="fresh"),
    "_VariableFunctionsClass.concat": OpEntry("joined", memory="fresh"),
    "_VariableFunctionsClass.concatenate": OpEntry("joined", memory="fresh"),
    # reads of metadata only: a shape or a dtype does not change when a norm folds, so these are not consumers
    **_names(
        "fresh",
        "metadata",
        "Tensor.shape Tensor.size Tensor.dim Tensor.ndim Tensor.ndimension Tensor.dtype Tensor.device "
        "Tensor.layout Tensor.numel Tensor.nelement Tensor.__len__ Tensor.is_contiguous Tensor.is_floating_point "
        "Tensor.is_complex Tensor.requires_grad Tensor.is_cuda Tensor.is_cpu Tensor.is_leaf Tensor.grad_fn "
        "Tensor.stride Tensor.element_size Tensor.get_device Tensor._version Tensor.data_ptr Tensor.is_sparse "
        "Tensor.is_quantized Tensor.is_meta Tensor.names Tensor.__hash__ Tensor.storage_offset Tensor.is_mps "
        "Tensor.is_xpu Tensor.is_nested Tensor.is_inference Tensor.__format__ numel is_floating_point is_complex",
    ),
    **_names("view", "metadata", "Tensor._base Tensor.untyped_storage"),  # they hand on the memory itself
    # ops known only by what they do to memory (by the last part of the name a torch.fx trace gives them)
    **_names(
        "fresh",
        "other",
        # arithmetic and comparison (operator.add, torch.add, Tensor.add all end in "add")
        "add sub mul truediv floordiv div mod pow matmul neg abs rsub __rsub__ __rtruediv__ __matmul__ __neg__ "
        "__pow__ __rpow__ __floordiv__ __mod__ eq ne lt le gt ge and_ or_ xor invert not_ truth "
        "exp log sqrt rsqrt reciprocal sin cos tanh sigmoid sign square "
        "clamp clip maximum minimum where lerp addcmul addcdiv erf "
        # activations (their in-place forms end in "_" or take inplace=True, which the kwargs show)
        "relu6 gelu silu mish hardswish hardsigmoid elu selu "
        "softplus softmax log_softmax hardtanh celu glu logsigmoid prelu "
        # layers, pooling, reductions and joins
        "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear "
        "batch_norm layer_norm group_norm instance_norm normalize embedding "
        "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d "
        "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
        "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
        "interpolate pad pixel_shuffle pixel_unshuffle channel_shuffle "
        "sum prod amax amin max min argmax argmin std var norm "
        "cumsum stack flip repeat tile scaled_dot_product_attention einsum bmm mm baddbmm addmm "
        # metadata, as torch.fx names it
        "size dim len isinstance",
    ),
    **_names(
        "view",
        "other",
        "moveaxis t T mT H mH expand expand_as narrow select getitem chunk split tensor_split unbind "
        "detach as_strided diagonal real imag unfold to type type_as "
        "cpu cuda float half double bfloat16 int long bool getattr data "
        "dropout",  # F.dropout(x, training=False) returns x itself
    ),
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
        nn.Flatten: OpEntry("reshaped", _flatten_module, without_shapes="flatten", memory="view"),
        nn.Unflatten: OpEntry("reshaped", _flatten_module, memory="view"),
        nn.ReLU: _RECTIFIER,
        nn.LeakyReLU: _RECTIFIER,
        nn.PReLU: OpEntry(
            "activation",
            _elementwise,
            _prelu_condition,
            without_shapes="pass",
            passes=frozenset({"scale", "permutation"}),
            stops=_RECTIFIER_STOPS,
            memory="fresh",
        ),
    }
    # a maximum commutes with a scale only when it keeps the order: a positive one
    max_stops: tuple[tuple[Transform, str], ...] = (
        ("sign", "takes a maximum, and some of the norm's scales are not positive"),
    )
    for pool, spatial in _AVG_POOLS.items():
        table[pool] = OpEntry(
            "pooled", _pool(spatial), _average_condition, "pass", "pools over its channels", memory="fresh"
        )
    for pool, spatial in _MAX_POOLS.items():
        table[pool] = OpEntry(
            "pooled",
            _pool(spatial),
            _max_condition,
            "pass",
            "pools over its channels",
            passes=frozenset({"scale", "shift", "permutation"}),
            stops=max_stops,
            memory="fresh",
        )
    for permute in permutes:
        table[permute] = OpEntry("moved", _permute_module, memory="view")
    return table


def registry() -> tuple[dict[str, OpEntry], dict[type[nn.Module], OpEntry]]:
    """Every entry: for functions (by recorded name) and for module types."""
    return _FUNCTIONS, dict(_modules())


def op_table() -> tuple[dict[str, OpEntry], dict[type[nn.Module], OpEntry]]:
    """The entries a walk over channels goes through (those that say where the channel axis goes): for
    functions (by recorded name) and for module types."""
    return {name: e for name, e in _FUNCTIONS.items() if e.maps is not None}, dict(_modules())


def function_entry(name: str) -> OpEntry | None:
    """The entry for a function or method by the name an execution trace records, or ``None``.

    >>> function_entry("_VariableFunctionsClass.cat").kind, function_entry("Tensor.__iadd__").applies
    ('joined', 'add')
    """
    return _FUNCTIONS.get(name)


def _last_name(name: str) -> str:
    return name.rpartition(".")[2]


def _memory_by_last_name() -> dict[str, Memory]:
    """Every entry's memory by the last part of its name (entries that share it agree: a test checks)."""
    return {_last_name(name): entry.memory for name, entry in _FUNCTIONS.items()}


_MEMORY = _memory_by_last_name()


def memory_of(name: str) -> Memory:
    """What a call named ``name`` (by its last part: ``torch.fx`` names ``x.add(y)``, ``torch.add`` and
    ``x + y`` alike) does to the memory of its inputs; ``writes`` for a name the registry does not know.

    >>> memory_of("permute"), memory_of("operator.add"), memory_of("my_kernel")
    ('view', 'fresh', 'writes')
    """
    return _MEMORY.get(_last_name(name), "writes")


def entry_for(call: Call, modules: dict[type[nn.Module], OpEntry] | None = None) -> OpEntry | None:
    """The registry's entry for a recorded call, or ``None`` (an op bnfold does not know ends a path)."""
    if call.kind == "function":
        return _FUNCTIONS.get(call.target)
    if call.kind != "module" or call.module is None:
        return None
    table = _modules() if modules is None else modules
    if type(call.module) is nn.Flatten and not _full_flatten(call.module):
        return OpEntry("reshaped", _flatten_module, memory="view")  # a partial Flatten: only with shapes
    for kind in type_chain(call.module):
        if kind in table:
            return table[kind]
    return None


def _full_flatten(module: nn.Module) -> bool:
    return getattr(module, "start_dim", None) == 1 and getattr(module, "end_dim", None) == -1


def axis_after(call: Call, axis: int, entry: OpEntry) -> AxisMove | None:
    """Where channel ``axis`` of ``call``'s input lands in its output (with shapes)."""
    return entry.maps(call, axis) if entry.maps is not None else None


def axis_before(call: Call, axis: int, entry: OpEntry) -> int | None:
    """Which axis of ``call``'s input becomes ``axis`` of its output, unflattened; ``None``: none does."""
    if entry.maps is None:
        return None
    ndim = call.input_ndims[0] if call.input_ndims else None
    if ndim is None:
        return axis if entry.without_shapes == "pass" else None
    for candidate in range(ndim):
        if entry.maps(call, candidate) == AxisMove(axis):
            return candidate
    return None
