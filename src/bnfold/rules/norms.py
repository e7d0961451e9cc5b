"""What bnfold knows about each norm type: one :class:`NormRule` per type.

A norm rule holds every fact about a norm type that folding needs, whatever
layer it folds into: the per-channel affine map it applies, whether it applies
one right now, its channel axis, the input ranks it accepts, what remains of it
once folded (a module in its place, or the norm itself with its affine made the
identity), and whether a layer before it (backward) or after it (forward) may
absorb it. A new norm type is one entry in :func:`builtin_norm_rules` (or one
``extra_rules=[bnfold.NormRule(...)]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..apply.fold_arithmetic import affine_from_stats
from ..discover.memory_layout import MEMORY_FORMATS
from . import third_party as compat

__all__ = [
    "NormRule",
    "TRAINING_REASON",
    "builtin_norm_rules",
    "norm_affine",
    "elementwise_affine",
    "identity_affine",
    "layer_scale_affine",
    "running_stats_reason",
    "no_reason",
    "identity_replacement",
    "Contiguous",
    "laid_out",
    "norm_act_replacement",
    "leaves_nothing",
    "PURE_REPLACEMENTS",
    "FoldedNormAct",
    "batch_channel_axis",
    "last_channel_axis",
    "instance_channel_axis",
    "activation_reason",
    "folds_forward",
    "folds_backward",
    "tensor_attr",
    "require_tensor",
    "STATISTICS_NORMS",
    "is_neutral",
]


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


# -- affine maps -------------------------------------------------------------------------------------------


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


def elementwise_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """The float64 ``(scale, shift)`` of the elementwise affine a norm applies after normalizing, stored as
    ``weight`` and ``bias`` (either may be ``None``: scale 1, shift 0), as LayerNorm and RMSNorm do. It is
    the map a layer after the norm absorbs when the norm is made neutral (:func:`identity_affine`)."""
    weight, bias = tensor_attr(norm, "weight"), tensor_attr(norm, "bias")
    if weight is None and bias is None:
        raise AttributeError(f"{type(norm).__name__} has no elementwise affine (no weight, no bias)")
    scale = None if weight is None else weight.detach().to(torch.float64).flatten()
    shift = None if bias is None else bias.detach().to(torch.float64).flatten()
    if scale is None:
        scale = torch.ones_like(cast(Tensor, shift))
    if shift is None:
        shift = torch.zeros_like(scale)
    return scale, shift


def layer_scale_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """A layer scale multiplies each channel by ``gamma``: scale ``gamma``, no shift."""
    gamma = require_tensor(norm, "gamma").detach().to(torch.float64).flatten()
    return gamma, torch.zeros_like(gamma)


# -- whether it is a fixed map right now -------------------------------------------------------------------

TRAINING_REASON = "in training mode it normalizes with batch statistics (call model.eval() to fold it)"


def running_stats_reason(norm: nn.Module) -> str | None:
    """Why a BatchNorm-like layer does not use fixed statistics right now, or ``None`` if it does."""
    if norm.training:
        return TRAINING_REASON
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        return "track_running_stats=False: it always normalizes with batch statistics"
    return None


def no_reason(norm: nn.Module) -> str | None:
    """For norms whose map is always fixed (frozen batch norms, layer scales)."""
    return None


# -- channel axis ------------------------------------------------------------------------------------------


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


# -- what remains once folded ------------------------------------------------------------------------------


def identity_affine(norm: nn.Module) -> dict[str, Tensor]:
    """The values that make a norm's elementwise affine the identity: ``weight`` 1 and ``bias`` 0 (those it
    has). A rule with ``neutral=identity_affine`` leaves the norm in place, normalizing, with these values.

    >>> {k: v.tolist() for k, v in identity_affine(nn.LayerNorm(2)).items()}
    {'weight': [1.0, 1.0], 'bias': [0.0, 0.0]}
    """
    found: dict[str, Tensor] = {}
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        value = tensor_attr(norm, name)
        if value is not None:
            found[name] = torch.full_like(value.detach(), fill)
    return found


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


class Contiguous(nn.Module):
    """What takes a folded norm's place when the norm gave its output another memory layout than its input
    had: ``inner`` (what else the norm leaves, e.g. its activation; nothing for a plain norm), then the values
    laid out as the norm laid them out, ``x.contiguous(memory_format=...)``, so that code after it that relies
    on the layout (``.view``) still runs."""

    def __init__(self, memory_format: str, inner: nn.Module | None = None) -> None:
        super().__init__()
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}")
        self.memory_format = memory_format
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if self.inner is not None:
            x = self.inner(x)
        return x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])

    def extra_repr(self) -> str:
        return f"memory_format={self.memory_format}"


def laid_out(replacement: nn.Module, memory_format: str | None) -> nn.Module:
    """``replacement``, giving its output in ``memory_format`` (None: as it is)."""
    if memory_format is None:
        return replacement
    return Contiguous(memory_format, None if type(replacement) is nn.Identity else replacement)


def _child(norm: nn.Module, name: str) -> nn.Module:
    child = getattr(norm, name, None)
    return child if isinstance(child, nn.Module) else nn.Identity()


def norm_act_replacement(norm: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` family applies ``drop`` then ``act`` after normalizing: keep them."""
    return FoldedNormAct(_child(norm, "drop"), _child(norm, "act"))


# Replacements that build a new module from what they read of the norm and change nothing: a folded copy may
# build them from the original norm while it copies the model, instead of copying the norm first.
PURE_REPLACEMENTS: frozenset[Callable[[nn.Module], nn.Module]] = frozenset({identity_replacement, norm_act_replacement})


def leaves_nothing(replacement: Callable[[nn.Module], nn.Module], norm: nn.Module) -> bool:
    """Whether what ``replacement`` puts in a folded ``norm``'s place computes nothing (no activation or
    dropout it keeps). Custom replacements are not looked into.

    >>> leaves_nothing(identity_replacement, nn.BatchNorm2d(3))
    True
    """
    if replacement is identity_replacement:
        return True
    if replacement is norm_act_replacement:
        return all(isinstance(getattr(norm, n, None), (nn.Identity, type(None))) for n in ("drop", "act"))
    return False


# -- forward folds -----------------------------------------------------------------------------------------


def folds_forward(norm: nn.Module) -> str | None:
    """A plain norm may fold into the layers after it."""
    return None


def folds_backward(norm: nn.Module) -> str | None:
    """A plain norm may fold into the layer before it."""
    return None


def activation_reason(norm: nn.Module) -> str | None:
    """A norm that also applies an activation or dropout (not ``Identity``) folds backward only: what it
    applies sits between its affine map and any layer after it."""
    for name in ("drop", "act"):
        child = getattr(norm, name, None)
        if isinstance(child, nn.Module) and not isinstance(child, nn.Identity):
            return f"it applies {type(child).__name__} after normalizing, so a layer after it cannot absorb it"
    return None


@dataclass(frozen=True)
class NormRule:
    """Every fact about one norm type that folding needs, whatever layer it folds into.

    Args:
        norm: the norm type (a subclass that only changes construction shares its rule).
        affine: ``norm -> (scale, shift)``, the float64 per-channel map it applies (the map that folds).
        check: ``norm -> reason | None``: why it is not a fixed map right now (training mode).
        channel_axis: ``(norm, input_ndim) -> axis`` it acts on.
        input_ranks: the input ranks it accepts (``None``: any); without recorded shapes, bnfold folds only
            where these ranks fix the channel axis.
        replacement: ``norm -> module`` that takes its place once folded (``nn.Identity``).
        neutral: instead of a replacement, ``norm -> {tensor name: value}``: the norm stays where it is
            (same class, same state_dict keys) with these values, which make ``affine`` the identity
            (:func:`identity_affine`: weight 1, bias 0), and only ``affine`` moves into its partners. A norm
            whose tensors hold these values already has nothing to fold.
        backward: ``norm -> reason | None``: why the layer before it cannot absorb it.
        forward: ``norm -> reason | None``: why the layers after it cannot absorb it.

    >>> class MyBN(nn.BatchNorm2d): ...
    >>> NormRule(MyBN, input_ranks=(4,)).channel_axis(MyBN(3), 4)
    1
    """

    norm: type[nn.Module]
    affine: Callable[[nn.Module], tuple[Tensor, Tensor]] = field(default=norm_affine, compare=False)
    check: Callable[[nn.Module], str | None] = field(default=running_stats_reason, compare=False)
    channel_axis: Callable[[nn.Module, int], int] = field(default=batch_channel_axis, compare=False)
    input_ranks: tuple[int, ...] | None = None
    replacement: Callable[[nn.Module], nn.Module] = field(default=identity_replacement, compare=False)
    forward: Callable[[nn.Module], str | None] = field(default=folds_forward, compare=False)
    backward: Callable[[nn.Module], str | None] = field(default=folds_backward, compare=False)
    neutral: Callable[[nn.Module], Mapping[str, Tensor]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.norm, type) and issubclass(self.norm, nn.Module)):
            raise TypeError(f"NormRule.norm must be an nn.Module subclass, got {self.norm!r}")
        if self.neutral is not None and self.replacement is not identity_replacement:
            raise ValueError(
                f"NormRule({self.norm.__name__}): a folded norm is either replaced (replacement=) or left in "
                "place made neutral (neutral=), not both; pass one of them"
            )

    def refusal(self, norm: nn.Module, direction: str) -> str | None:
        """Why ``norm`` cannot fold in ``direction`` ("backward" or "forward") into any layer."""
        return (self.forward if direction == "forward" else self.backward)(norm)

    def is_linear(self, norm: nn.Module) -> bool:
        """Whether ``norm`` applies nothing but its affine map right now: a fixed map (``check`` finds no
        reason), and nothing left in its place once folded (:func:`leaves_nothing`; a norm made neutral
        stays, and still normalizes)."""
        return self.check(norm) is None and self.neutral is None and leaves_nothing(self.replacement, norm)

    def is_neutral(self, norm: nn.Module) -> bool:
        """Whether ``norm`` is made neutral once folded and its tensors hold the neutral values already
        (folded before): then there is nothing left to fold."""
        return self.neutral is not None and is_neutral(norm, self.neutral)


def is_neutral(norm: nn.Module, neutral: Callable[[nn.Module], Mapping[str, Tensor]]) -> bool:
    """Whether each tensor ``neutral`` names holds its neutral value already (a norm without an affine, for
    which ``neutral`` names none, has nothing to fold)."""
    for name, value in neutral(norm).items():
        current = tensor_attr(norm, name)
        if current is None or current.shape != value.shape:
            return False
        if not torch.equal(current.detach(), value.to(device=current.device, dtype=current.dtype)):
            return False
    return True


# Norms that normalize each input with its own statistics: never a fixed map.
STATISTICS_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def builtin_norm_rules() -> dict[type[nn.Module], NormRule]:
    """The norm types bnfold knows (third-party ones when their library is loaded)."""
    rules = [
        NormRule(nn.BatchNorm1d, input_ranks=(2, 3)),
        NormRule(nn.BatchNorm2d, input_ranks=(4,)),
        NormRule(nn.BatchNorm3d, input_ranks=(5,)),
        NormRule(nn.SyncBatchNorm),
        NormRule(nn.InstanceNorm1d, channel_axis=instance_channel_axis, input_ranks=(2, 3)),
        NormRule(nn.InstanceNorm2d, channel_axis=instance_channel_axis, input_ranks=(3, 4)),
        NormRule(nn.InstanceNorm3d, channel_axis=instance_channel_axis, input_ranks=(4, 5)),
    ]
    # torchvision's FrozenBatchNorm2d: fixed statistics in buffers, reshaped to (1, C, 1, 1)
    rules += [NormRule(frozen, check=no_reason, input_ranks=(4,)) for frozen in compat.frozen_batchnorm_types()]
    # timm's norm + activation layers: the activation and dropout survive the fold
    for norm_act, check, ranks in (
        *((t, running_stats_reason, (4,)) for t in compat.norm_act_types()),
        *((t, running_stats_reason, None) for t in compat.sync_norm_act_types()),
        *((t, no_reason, (4,)) for t in compat.frozen_norm_act_types()),
    ):
        rules.append(
            NormRule(
                norm_act, check=check, input_ranks=ranks, replacement=norm_act_replacement, forward=activation_reason
            )
        )
    # timm's layer scales: x * gamma, per channel
    rules += [
        NormRule(scale, affine=layer_scale_affine, check=no_reason, channel_axis=last_channel_axis)
        for scale in compat.layer_scale_types()
    ]
    rules += [
        NormRule(scale, affine=layer_scale_affine, check=no_reason, input_ranks=(4,))
        for scale in compat.layer_scale_2d_types()
    ]
    return {rule.norm: rule for rule in rules}


def is_statistics_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, InstanceNorm without running statistics...: normalized by each input's own
    statistics, never a fixed map."""
    return isinstance(module, STATISTICS_NORMS) or (
        isinstance(module, nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats
    )


def looks_like_norm(module: nn.Module) -> bool:
    """A normalization layer whether or not bnfold has a rule for it (so the plan lists it)."""
    return isinstance(module, (_NormBase, *STATISTICS_NORMS, *compat.frozen_batchnorm_types()))
