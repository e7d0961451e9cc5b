"""The rule table: which (layer, norm) pairs fold, in which direction, and how.

A plain dict keyed by exact types, ``(layer type, norm type, direction) -> FoldRule``,
in the manner of PyTorch's fuser method mappings. A subclass that changes how its
class computes never matches implicitly: timm's ``BatchNormAct2d`` is a
``BatchNorm2d`` that also applies an activation, so it has rules of its own. A
subclass that only changes construction (torchvision's ``Conv3DSimple`` is a
``Conv3d`` with its own ``__init__``) computes exactly like its base, and matches
the base's rules when it has none of its own. Users teach bnfold new pairs by passing
``extra_rules=[FoldRule(...)]`` to a call; nothing global is mutated.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from . import compat
from .arithmetic import Layout, affine_from_stats

__all__ = [
    "FoldRule",
    "TRAINING_REASON",
    "layer_type",
    "type_chain",
    "has_type",
    "find_rule",
    "tensor_attr",
    "require_tensor",
    "FoldedNormAct",
    "RuleTable",
    "RuleKey",
    "layout_for",
    "out_channels",
    "in_channels",
    "Direction",
    "builtin_rules",
    "build_rules",
    "norm_affine",
    "running_stats_reason",
    "no_reason",
    "identity_replacement",
    "norm_act_replacement",
    "is_norm_layer",
    "unfoldable_reason",
]


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The module's class as its author declared it: for a module behind ``torch.nn.utils.parametrize``
    (whose class becomes a generated ``Parametrized<Name>`` subclass), the class it had before."""
    kind = type(module)
    if parametrize.is_parametrized(module) and kind.__name__ == "Parametrized" + kind.__bases__[0].__name__:
        return kind.__bases__[0]
    return kind


# Methods a subclass may override without changing what a forward pass computes.
_CONSTRUCTION_ONLY = frozenset(
    {
        "__init__",
        "__init_subclass__",
        "__repr__",
        "extra_repr",
        "reset_parameters",
        "__setstate__",
        "__getstate__",
        "_load_from_state_dict",
        "__dict__",
        "__weakref__",
    }
)


def _changes_computation(cls: type, base: type) -> bool:
    """Whether ``cls`` overrides a method or descriptor of ``base`` other than construction ones."""
    for name, value in vars(cls).items():
        if name in _CONSTRUCTION_ONLY or not hasattr(base, name):
            continue  # a name the base does not have cannot change the base's own code
        if callable(value) or hasattr(value, "__get__"):
            return True
    return False


_CHAINS: weakref.WeakKeyDictionary[type, tuple[type[nn.Module], ...]] = weakref.WeakKeyDictionary()


def _chain(kind: type[nn.Module]) -> tuple[type[nn.Module], ...]:
    cached = _CHAINS.get(kind)
    if cached is not None:
        return cached
    chain = [kind]
    cls: type = kind
    while len(cls.__bases__) == 1:
        base = cls.__bases__[0]
        if base is nn.Module or not issubclass(base, nn.Module) or _changes_computation(cls, base):
            break
        chain.append(base)
        cls = base
    _CHAINS[kind] = tuple(chain)
    return _CHAINS[kind]


def type_chain(module: nn.Module) -> tuple[type[nn.Module], ...]:
    """The module's declared class, then each ancestor that computes exactly like it (single inheritance,
    nothing overridden but construction): the classes whose rules apply, most specific first.

    >>> class MyConv(nn.Conv2d):
    ...     def __init__(self, c):
    ...         super().__init__(c, c, 3, bias=False)
    >>> [k.__name__ for k in type_chain(MyConv(4))]
    ['MyConv', 'Conv2d']
    """
    return _chain(layer_type(module))


def has_type(module: nn.Module, types: Iterable[type[nn.Module]]) -> bool:
    """Whether a rule for one of ``types`` may apply to ``module`` (see :func:`type_chain`)."""
    wanted = set(types)
    return any(kind in wanted for kind in type_chain(module))


def find_rule(rules: RuleTable, layer: nn.Module, norm: nn.Module, direction: str) -> FoldRule | None:
    """The most specific rule for this pair: exact declared classes first, then their plain ancestors."""
    for layer_kind in type_chain(layer):
        for norm_kind in type_chain(norm):
            rule = rules.get((layer_kind, norm_kind, direction))
            if rule is not None:
                return rule
    return None


def tensor_attr(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` when it is a tensor (parameter, buffer or derived attribute), else ``None``."""
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def require_tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>``, which must be a tensor."""
    value = tensor_attr(module, name)
    if value is None:
        raise AttributeError(f"{type(module).__name__} has no tensor attribute {name!r}")
    return value


def norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """The float64 ``(scale, shift)`` of a norm that stores ``running_mean``, ``running_var``,
    ``weight``, ``bias`` (``None`` when not affine) and ``eps``, as BatchNorm and its relatives do."""
    return affine_from_stats(
        require_tensor(norm, "running_mean"),
        require_tensor(norm, "running_var"),
        tensor_attr(norm, "weight"),
        tensor_attr(norm, "bias"),
        float(vars(norm)["eps"]),
    )


def layer_scale_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """A layer scale multiplies each channel by ``gamma``: scale ``gamma``, no shift."""
    gamma = require_tensor(norm, "gamma").detach().to(torch.float64).flatten()
    return gamma, torch.zeros_like(gamma)


TRAINING_REASON = "in training mode it normalizes with batch statistics (call model.eval() to fold it)"


def running_stats_reason(norm: nn.Module) -> str | None:
    """Why a BatchNorm-like layer does not use fixed statistics right now, or ``None`` if it does."""
    if norm.training:
        return TRAINING_REASON
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        return "track_running_stats=False: it always normalizes with batch statistics"
    return None


def no_reason(norm: nn.Module) -> str | None:
    """For norms whose statistics are always fixed (frozen batch norms)."""
    return None


def identity_replacement(norm: nn.Module) -> nn.Module:
    """A folded plain norm leaves nothing behind."""
    return nn.Identity()


class FoldedNormAct(nn.Module):
    """What remains of a norm+activation layer once its affine part is folded: its dropout, then its
    activation. The children keep their names (``drop``, ``act``), so their state_dict keys do not move.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def norm_act_replacement(norm: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` family applies ``drop`` then ``act`` after normalizing: keep them."""
    drop = getattr(norm, "drop", None)
    act = getattr(norm, "act", None)
    return FoldedNormAct(
        drop if isinstance(drop, nn.Module) else nn.Identity(),
        act if isinstance(act, nn.Module) else nn.Identity(),
    )


def batch_channel_axis(norm: nn.Module, input_ndim: int) -> int:
    """BatchNorm normalizes axis 1 of its (N, C, ...) input."""
    return 1


def last_channel_axis(norm: nn.Module, input_ndim: int) -> int:
    """Channels-last layers (timm's LayerScale) act on the last axis."""
    return input_ndim - 1


def instance_channel_axis(norm: nn.Module, input_ndim: int) -> int:
    """InstanceNorm also accepts unbatched (C, ...) input, where the channels are axis 0."""
    expected = getattr(norm, "_get_no_batch_dim", lambda: input_ndim - 1)() + 1
    return 1 if input_ndim == expected else 0


_LAYOUTS: tuple[tuple[type[nn.Module], Layout], ...] = (
    (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"),
    (nn.ConvTranspose3d, "conv_transpose"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.Linear, "linear"),
)


def _layout_of(layer: type[nn.Module]) -> Layout | None:
    for base, layout in _LAYOUTS:
        if issubclass(layer, base):
            return layout
    return None


Direction = Literal["backward", "forward"]


@dataclass(frozen=True)
class FoldRule:
    """How a norm of type ``norm`` folds into a layer of type ``layer``.

    ``direction="backward"``: the layer feeds the norm (``norm(layer(x))``), the usual case; the layer's
    output channels are scaled. ``direction="forward"``: the norm feeds the layer (``layer(norm(x))``); the
    layer's input channels are scaled and its bias absorbs the shift.

    Types match exactly (a subclass needs its own rule). The layer must store ``weight`` (and ``bias``,
    possibly ``None``) in the layout of a Conv, ConvTranspose or Linear layer; when it subclasses one of
    those, ``layout`` is inferred.

    Args:
        layer: the Conv/ConvTranspose/Linear-like layer type.
        norm: the norm type.
        direction: ``"backward"`` (layer -> norm) or ``"forward"`` (norm -> layer).
        affine: ``norm -> (scale, shift)``, the per-channel affine map the norm applies (float64).
        check: ``norm -> reason | None``; a reason in words when this norm cannot fold right now.
        replacement: ``norm -> module`` that takes the norm's place once folded (``nn.Identity``).
        channel_axis: ``(norm, input_ndim) -> axis`` the norm normalizes over.
        layout: ``"conv"``, ``"conv_transpose"`` or ``"linear"``; inferred from the layer's base class.

    >>> class MyBN(nn.BatchNorm2d): ...
    >>> rule = FoldRule(nn.Conv2d, MyBN)
    >>> rule.weight_layout, rule.direction
    ('conv', 'backward')
    """

    layer: type[nn.Module]
    norm: type[nn.Module]
    direction: Direction = "backward"
    affine: Callable[[nn.Module], tuple[Tensor, Tensor]] = field(default=norm_affine, compare=False)
    check: Callable[[nn.Module], str | None] = field(default=running_stats_reason, compare=False)
    replacement: Callable[[nn.Module], nn.Module] = field(default=identity_replacement, compare=False)
    channel_axis: Callable[[nn.Module, int], int] = field(default=batch_channel_axis, compare=False)
    layout: Layout | None = None

    def __post_init__(self) -> None:
        for label, value in (("layer", self.layer), ("norm", self.norm)):
            if not (isinstance(value, type) and issubclass(value, nn.Module)):
                raise TypeError(f"FoldRule.{label} must be an nn.Module subclass, got {value!r}")
        if self.direction not in ("backward", "forward"):
            raise ValueError(f"FoldRule.direction must be 'backward' or 'forward', got {self.direction!r}")
        if self.layout not in (None, "conv", "conv_transpose", "linear"):
            raise ValueError(f"FoldRule.layout must be 'conv', 'conv_transpose' or 'linear', got {self.layout!r}")
        if self.layout is None and _layout_of(self.layer) is None:
            raise ValueError(
                f"FoldRule cannot infer how {self.layer.__name__} stores its weight; "
                "pass layout='conv', 'conv_transpose' or 'linear'"
            )

    @property
    def weight_layout(self) -> Layout:
        layout = self.layout or _layout_of(self.layer)
        if layout is None:  # unreachable: __post_init__ rejects it
            raise ValueError(f"no weight layout for {self.layer.__name__}")
        return layout

    @property
    def key(self) -> RuleKey:
        return (self.layer, self.norm, self.direction)


RuleKey = tuple[type[nn.Module], type[nn.Module], str]
RuleTable = Mapping[RuleKey, FoldRule]


def layout_for(layer: nn.Module, rules: RuleTable) -> Layout:
    """How ``layer`` stores its weight, as the rules for its type say."""
    for kind in type_chain(layer):
        for (rule_layer, _, _), rule in rules.items():
            if rule_layer is kind:
                return rule.weight_layout
    raise KeyError(f"no fold rule mentions {layer_type(layer).__name__}")


def out_channels(layer: nn.Module, layout: Layout) -> int:
    """The number of output channels of a Conv/ConvTranspose/Linear-like layer."""
    weight = require_tensor(layer, "weight")
    if layout == "conv_transpose":
        return int(weight.shape[1]) * int(getattr(layer, "groups", 1))
    return int(weight.shape[0])


def in_channels(layer: nn.Module, layout: Layout) -> int:
    """The number of input channels (features, for a Linear) of a Conv/ConvTranspose/Linear-like layer."""
    weight = require_tensor(layer, "weight")
    if layout == "conv":
        return int(weight.shape[1]) * int(getattr(layer, "groups", 1))
    if layout == "conv_transpose":
        return int(weight.shape[0])
    return int(weight.shape[1])


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def builtin_rules() -> dict[RuleKey, FoldRule]:
    """The rules bnfold knows: a BatchNorm relative whose statistics are fixed in inference mode, after
    (backward) or before (forward) a Conv/ConvTranspose (1d/2d/3d) or Linear layer."""
    rules: list[FoldRule] = []
    frozen = compat.frozen_batchnorm_types()
    for dims in (1, 2, 3):
        for layer in (_CONV[dims], _CONV_T[dims]):
            directions: tuple[Direction, ...] = ("backward", "forward")
            for d in directions:
                rules.append(FoldRule(layer, _BATCH[dims], d))
                rules.append(FoldRule(layer, _INSTANCE[dims], d, channel_axis=instance_channel_axis))
                rules.append(FoldRule(layer, nn.SyncBatchNorm, d))
                if dims == 2:
                    rules.extend(FoldRule(layer, f, d, check=no_reason) for f in frozen)
            if dims == 2:
                # Norms that also apply an activation fold backward only: the activation sits between
                # the norm and any layer after it.
                for norm_act in compat.norm_act_types() + compat.sync_norm_act_types():
                    rules.append(FoldRule(layer, norm_act, replacement=norm_act_replacement))
                for frozen_act in compat.frozen_norm_act_types():
                    rules.append(FoldRule(layer, frozen_act, check=no_reason, replacement=norm_act_replacement))
    # timm's Conv2dSame computes its padding at run time (zeros), so it only takes norms after it.
    for conv in compat.same_padding_conv_types():
        for norm in (nn.BatchNorm2d, nn.SyncBatchNorm, *compat.norm_act_types(), *compat.sync_norm_act_types()):
            replacement = (
                norm_act_replacement
                if norm in compat.norm_act_types() + compat.sync_norm_act_types()
                else identity_replacement
            )
            rules.append(FoldRule(conv, norm, replacement=replacement))
    # Layer scales (x * gamma, per channel) fold like a norm with scale gamma and no shift.
    for scale in compat.layer_scale_types():
        rules.append(
            FoldRule(nn.Linear, scale, affine=layer_scale_affine, check=no_reason, channel_axis=last_channel_axis)
        )
    for scale in compat.layer_scale_2d_types():
        for layer in (nn.Conv2d, nn.ConvTranspose2d):
            rules.append(FoldRule(layer, scale, affine=layer_scale_affine, check=no_reason))
    # A norm of another rank reads the layer's output through a reshape or permute (a Conv2d flattened to
    # (N, C, H*W) before a BatchNorm1d; a Linear on (N, H, W, C) permuted before a BatchNorm2d); the planner
    # follows the channel axis through them and keeps the norm unless it lands on the layer's channels.
    for dims in (1, 2, 3):
        for layer in (_CONV[dims], _CONV_T[dims]):
            rules.extend(FoldRule(layer, _BATCH[other]) for other in (1, 2, 3) if other != dims)
    rules.extend(FoldRule(nn.Linear, norm) for norm in (*_BATCH.values(), nn.SyncBatchNorm))
    # Forward into a Linear: directly (BatchNorm1d on (N, C)), or through a Flatten of a (N, C, ...) map.
    for norm in (*_BATCH.values(), nn.SyncBatchNorm, *frozen):
        rules.append(FoldRule(nn.Linear, norm, "forward", check=no_reason if norm in frozen else running_stats_reason))
    # Linear subclasses that compute exactly F.linear take every nn.Linear rule.
    for linear in compat.plain_linear_types():
        rules.extend(dataclasses.replace(rule, layer=linear) for rule in list(rules) if rule.layer is nn.Linear)
    return {rule.key: rule for rule in rules}


def build_rules(extra_rules: Iterable[FoldRule] | None = None) -> dict[RuleKey, FoldRule]:
    """The built-in table plus ``extra_rules`` (which win over built-in rules for the same pair)."""
    table = builtin_rules()
    if extra_rules is None:
        return table
    if isinstance(extra_rules, FoldRule):
        extra_rules = [extra_rules]
    for rule in extra_rules:
        if not isinstance(rule, FoldRule):
            raise TypeError(f"extra_rules must hold bnfold.FoldRule objects, got {type(rule).__name__}")
        table[rule.key] = rule
    return table


_STATISTICS_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def is_norm_layer(module: nn.Module, rules: RuleTable) -> bool:
    """Whether ``module`` is a normalization layer that the plan should list."""
    if has_type(module, (norm for _, norm, _ in rules)):
        return True
    return isinstance(module, (_NormBase, *_STATISTICS_NORMS, *compat.frozen_batchnorm_types()))


def unfoldable_reason(module: nn.Module, rules: RuleTable) -> str | None:
    """Why a norm layer can never fold whatever feeds it, or ``None`` if some rule may apply."""
    kind = layer_type(module)
    if isinstance(module, _STATISTICS_NORMS) or (
        isinstance(module, nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats
    ):
        return f"{kind.__name__} normalizes each input with its own statistics: not a fixed affine map"
    if has_type(module, (norm for _, norm, _ in rules)):
        return None
    return (
        f"no fold rule for {kind.__name__} (a subclass that overrides how a norm computes is never matched "
        "implicitly); "
        "teach bnfold with extra_rules=[bnfold.FoldRule(layer_type, norm_type)]"
    )
