"""Reversible edits on a model, and the log that takes them back and says what they changed.

Every change bnfold makes to a model goes through an :class:`EditLog`: replace a module wherever it is
registered, scale a weight's channels, map a bias, append a parametrization, set tensors to given values.
The log keeps two things per edit: a way back (undoing the log, newest first, leaves the model bit-identical)
and a description of what changed (:data:`Change`), from which :func:`bnfold.apply.records.record_of_edits`
writes the record a folded checkpoint carries.

Weights can live in a plain parameter, behind ``torch.nn.utils.parametrize`` (weight_norm, spectral_norm, any
user parametrization), behind a pruning mask (``torch.nn.utils.prune``: ``weight_orig * weight_mask``
recomputed by a forward pre-hook) or behind the older hook-based ``weight_norm``; the weight and bias edits
write where the layer really reads them.

A log made with ``undoable=False`` (for a copy that is thrown away if anything fails) keeps no way back and no
old values, and scales a plain weight where it is, without a temporary; it still describes what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from ..rules.norms import require_tensor, tensor_attr
from ..rules.weight_hooks import weight_hook
from .fold_arithmetic import Layout, fold_bias, scale_input_channels, scale_output_channels

__all__ = [
    "EditLog",
    "Change",
    "Replaced",
    "WeightScaled",
    "BiasMapped",
    "BiasAdded",
    "ParametrizationAppended",
    "TensorsSet",
    "ChannelScale",
    "ChannelAffine",
    "Place",
    "places",
    "place_at",
]

Axis = Literal["output", "input"]
# where a module is registered: (parent, attribute name in the parent's _modules)
Place = tuple[nn.Module, str]


# -- parametrizations the edits append --------------------------------------------------------------------
class ChannelScale(nn.Module):
    """A parametrization that multiplies a weight along its output (``axis="output"``) or input channels."""

    def __init__(self, scale: Tensor, layout: Layout, groups: int, axis: str = "output") -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.layout: Layout = layout
        self.groups = groups
        self.axis = axis

    def forward(self, weight: Tensor) -> Tensor:
        scale = require_tensor(self, "scale")
        if self.axis == "output":
            return scale_output_channels(weight, scale, self.layout, self.groups)
        return scale_input_channels(weight, scale, self.layout, self.groups)


class ChannelAffine(nn.Module):
    """A parametrization that maps a bias ``b`` to ``b * scale + shift``."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, bias: Tensor) -> Tensor:
        return fold_bias(bias, require_tensor(self, "scale"), require_tensor(self, "shift"), bias)


# -- what changed -------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Replaced:
    """``new`` took the place of ``old`` at ``where`` (``old`` may itself be an earlier replacement)."""

    old: nn.Module
    new: nn.Module
    where: tuple[Place, ...]


@dataclass(frozen=True, eq=False)
class WeightScaled:
    """The weight of ``layer`` was multiplied along its ``axis`` channels (where the layer reads it)."""

    layer: nn.Module
    axis: Axis


@dataclass(frozen=True, eq=False)
class BiasMapped:
    """The bias of ``layer`` (zero when it had none) was mapped to ``b * scale + shift``."""

    layer: nn.Module


@dataclass(frozen=True, eq=False)
class BiasAdded:
    """``layer`` had no bias and was given a bias parameter."""

    layer: nn.Module


@dataclass(frozen=True, eq=False)
class ParametrizationAppended:
    """``step`` was appended to the parametrizations of ``module.<tensor>``."""

    module: nn.Module
    tensor: str
    step: nn.Module


@dataclass(frozen=True, eq=False)
class TensorsSet:
    """Tensors of ``module`` were given new values in place. ``neutral``: those of them that are buffers kept
    out of the state_dict and now hold ones or zeros where they held something else (a checkpoint records
    these, since its state_dict does not carry them)."""

    module: nn.Module
    names: tuple[str, ...]
    neutral: tuple[tuple[str, Literal["ones", "zeros"]], ...] = ()


Change = Replaced | WeightScaled | BiasMapped | BiasAdded | ParametrizationAppended | TensorsSet


# -- where modules are registered ---------------------------------------------------------------------------
def places(modules: Iterable[nn.Module]) -> dict[int, list[Place]]:
    """Every place under which each of ``modules`` (a model's ``modules()``) registers a child, by the child's
    id (a module may have aliases: several places).

    >>> conv = nn.Conv2d(1, 1, 1)
    >>> m = nn.Sequential(conv, conv)
    >>> [attr for _, attr in places(m.modules())[id(conv)]]
    ['0', '1']
    """
    found: dict[int, list[Place]] = {}
    for parent in modules:
        for attr, child in parent._modules.items():
            if child is not None:
                found.setdefault(id(child), []).append((parent, attr))
    return found


def place_at(model: nn.Module, path: str) -> Place:
    """The place of the module at the qualified ``path`` in ``model`` as it is now (following ``_modules``).

    >>> m = nn.Sequential(nn.Sequential(nn.ReLU()))
    >>> owner, attr = place_at(m, "0.0")
    >>> owner is m[0], attr
    (True, '0')
    """
    owner_path, _, attr = path.rpartition(".")
    owner = model
    for name in owner_path.split(".") if owner_path else ():
        child = owner._modules.get(name)
        if child is None:
            raise KeyError(f"no module at '{owner_path}' in {type(model).__name__}")
        owner = child
    return owner, attr


# -- the log ------------------------------------------------------------------------------------------------
class EditLog:
    """The edits made to a model, each with its way back and a description of what it changed.

    >>> m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    >>> log = EditLog()
    >>> log.map_bias(m[0], torch.ones(2), torch.full((2,), 0.5))
    >>> log.replace(m[1], nn.Identity(), places(m.modules())[id(m[1])])
    >>> [type(c).__name__ for c in log.changes]
    ['BiasMapped', 'BiasAdded', 'Replaced']
    >>> log.undo()
    >>> m[0].bias is None, type(m[1]).__name__
    (True, 'BatchNorm1d')
    """

    def __init__(self, undoable: bool = True) -> None:
        self.undoable = undoable
        self.changes: list[Change] = []
        self._back: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self.changes)

    def _way_back(self, step: Callable[[], None]) -> None:
        if self.undoable:
            self._back.append(step)

    def undo(self) -> None:
        """Take every edit back, newest first, and forget them. A log without a way back takes nothing back: its
        edits stand, and so does its description of them."""
        if not self.undoable:
            return
        for step in reversed(self._back):
            step()
        self._back.clear()
        self.changes.clear()

    def commit(self) -> None:
        """Keep the edits: drop their way back and the old values it holds (the description stays)."""
        self.undoable = False
        self._back.clear()

    def note(self, change: Change) -> None:
        """Describe a change made outside the log (a copy made with a replacement in place): no way back."""
        self.changes.append(change)

    # -- modules -----------------------------------------------------------------------------------------
    def replace(self, old: nn.Module, new: nn.Module, where: Iterable[Place]) -> None:
        """Register ``new`` at each of ``where`` (every place of ``old``: see :func:`places`), in ``old``'s
        mode (training or eval)."""
        new.train(old.training)
        taken = tuple(where)
        for parent, attr in taken:
            parent._modules[attr] = new
            self._way_back(_put_back(parent, attr, old))
        self.changes.append(Replaced(old, new, taken))

    def append_parametrization(self, module: nn.Module, tensor: str, step: nn.Module) -> None:
        """Append ``step`` to the parametrizations of ``module.<tensor>``."""
        self._append_parametrization(module, tensor, step)
        self.changes.append(ParametrizationAppended(module, tensor, step))

    def _append_parametrization(self, module: nn.Module, tensor: str, step: nn.Module) -> None:
        if parametrize.is_parametrized(module, tensor):
            parametrize.register_parametrization(module, tensor, step)
            steps = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor])
            self._way_back(lambda: steps.__delitem__(len(steps) - 1))
            return
        order = list(module._parameters), list(module._buffers)
        parametrize.register_parametrization(module, tensor, step)

        def unregister() -> None:
            # the tensor is registered again, as itself, last: put it back where it was
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
            _reorder(module._parameters, order[0])
            _reorder(module._buffers, order[1])

        self._way_back(unregister)

    # -- tensors -----------------------------------------------------------------------------------------
    def set_tensors(self, module: nn.Module, values: Mapping[str, Tensor | float]) -> None:
        """Write each of ``values`` into the tensor of that name of ``module`` (a parameter or buffer), in
        place: a tensor is copied in, a number fills it. Makes a norm neutral (``{"weight": 1.0, "bias":
        0.0}``), or a folded constant its op's neutral value."""
        neutral: list[tuple[str, Literal["ones", "zeros"]]] = []
        for name, value in values.items():
            target = require_tensor(module, name)
            if name in module._non_persistent_buffers_set and name in module._buffers:
                neutral.extend((name, kind) for kind in _neutral_kinds(target, value))
            self._copy_into(target, value)
        self.changes.append(TensorsSet(module, tuple(values), tuple(neutral)))

    def _copy_into(self, target: Tensor, value: Tensor | float) -> None:
        old = target.detach().clone() if self.undoable else target
        with torch.no_grad():
            if isinstance(value, Tensor):
                target.copy_(value)
            else:
                target.fill_(value)

        def restore() -> None:
            with torch.no_grad():
                target.copy_(old)

        self._way_back(restore)

    def _set_attribute(self, module: nn.Module, name: str, value: Tensor) -> None:
        old = require_tensor(module, name)
        setattr(module, name, value)
        self._way_back(lambda: setattr(module, name, old))

    def scale_weight(self, layer: nn.Module, scale: Tensor, layout: Layout, axis: Axis) -> None:
        """Multiply the layer's weight by ``scale`` along ``axis`` ("output" or "input" channels), where the
        layer reads it."""
        groups = int(getattr(layer, "groups", 1))
        scaled = scale_output_channels if axis == "output" else scale_input_channels
        self.changes.append(WeightScaled(layer, axis))
        if parametrize.is_parametrized(layer, "weight"):
            self.append_parametrization(layer, "weight", ChannelScale(scale, layout, groups, axis))
            return
        pruning = cast(prune.BasePruningMethod | None, weight_hook(layer, "prune"))
        if pruning is not None:
            # A per-channel scale keeps zeros zero: fold into weight_orig and keep the mask.
            orig = require_tensor(layer, "weight_orig")
            self._copy_into(orig, scaled(orig, scale, layout, groups))
            self._set_attribute(layer, "weight", pruning.apply_mask(layer))
            return
        weight_norm = cast(Any, weight_hook(layer, "weight_norm"))
        if weight_norm is not None:
            # weight = g * v / |v|: with v = target and g = |target|, weight = target, whatever the norm's dim
            target = scaled(weight_norm.compute_weight(layer), scale, layout, groups)
            self._copy_into(require_tensor(layer, "weight_v"), target)
            self._copy_into(require_tensor(layer, "weight_g"), torch.norm_except_dim(target, 2, weight_norm.dim))
            self._set_attribute(layer, "weight", weight_norm.compute_weight(layer))
            return
        weight = require_tensor(layer, "weight")
        if self.undoable:
            self._copy_into(weight, scaled(weight, scale, layout, groups))
        else:  # a copy, dropped if anything fails: scale the weight where it is
            with torch.no_grad():
                scaled(weight, scale, layout, groups, out=weight)

    def map_bias(self, layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
        """Map the layer's bias ``b`` to ``b * scale + shift``; a layer without a bias gains one (a missing bias
        counts as zero), and a parametrized bias gains a parametrization."""
        self.changes.append(BiasMapped(layer))
        if parametrize.is_parametrized(layer, "bias"):
            self.append_parametrization(layer, "bias", ChannelAffine(scale, shift))
            return
        bias = tensor_attr(layer, "bias")
        if bias is None:
            weight = require_tensor(layer, "weight")
            new = nn.Parameter(fold_bias(None, scale, shift, weight), requires_grad=weight.requires_grad)
            layer.register_parameter("bias", new)
            self._way_back(lambda: layer.register_parameter("bias", None))
            self.changes.append(BiasAdded(layer))
        else:
            self._copy_into(bias, fold_bias(bias, scale, shift, bias))

    def map_output(self, layer: nn.Module, scale: Tensor, shift: Tensor, layout: Layout) -> None:
        """Map the layer's output channels ``y`` to ``scale * y + shift`` (its weight and its bias)."""
        self.scale_weight(layer, scale, layout, "output")
        self.map_bias(layer, scale, shift)


def _reorder(table: dict[str, Any], names: list[str]) -> None:
    held = dict(table)
    table.clear()
    table.update((name, held[name]) for name in names if name in held)
    table.update((name, value) for name, value in held.items() if name not in table)


def _put_back(parent: nn.Module, attr: str, module: nn.Module) -> Callable[[], None]:
    def put_back() -> None:
        parent._modules[attr] = module

    return put_back


def _neutral_kinds(target: Tensor, value: Tensor | float) -> list[Literal["ones", "zeros"]]:
    """Which neutral values (ones, zeros) ``target`` holds once ``value`` is written into it, if that changes
    it. For buffers kept out of the state_dict only: small, and read once."""
    new = torch.as_tensor(value, dtype=target.dtype, device=target.device).expand_as(target)
    if torch.equal(new, target.detach()):
        return []
    kinds: list[Literal["ones", "zeros"]] = []
    for kind, neutral in (("ones", torch.ones_like(target)), ("zeros", torch.zeros_like(target))):
        if torch.equal(new, neutral):
            kinds.append(cast(Literal["ones", "zeros"], kind))
    return kinds
