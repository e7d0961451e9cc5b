"""What bnfold knows about each layer type a norm can fold into: one :class:`LayerRule` per type.

A layer rule says how the layer stores its weight (the layout of a Conv, a
ConvTranspose or a Linear), and whether a norm before it can be absorbed
exactly (the padding rule of a forward fold). A new layer type is one entry
in :func:`builtin_layer_rules` (or one ``extra_rules=[bnfold.LayerRule(...)]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..apply.fold_arithmetic import Layout
from . import third_party as compat
from .norms import require_tensor

__all__ = [
    "CONVS",
    "LayerRule",
    "builtin_layer_rules",
    "layout_of_type",
    "resolve_layout",
    "padding_reason",
    "runtime_padding_reason",
    "out_channels",
    "in_channels",
    "channel_axis",
    "output_ranks",
]

# The torch convolutions, by spatial rank.
CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

_LAYOUTS: tuple[tuple[type[nn.Module], Layout], ...] = (
    (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"),
    (nn.ConvTranspose3d, "conv_transpose"),
    *((conv, "conv") for conv in CONVS.values()),
    (nn.Linear, "linear"),
)


def layout_of_type(layer: type[nn.Module]) -> Layout | None:
    """The weight layout of a subclass of a torch Conv, ConvTranspose or Linear layer, else ``None``."""
    for base, layout in _LAYOUTS:
        if issubclass(layer, base):
            return layout
    return None


def resolve_layout(owner: str, layer: object, layout: object) -> Layout:
    """The weight layout a rule gives (or infers) for ``layer``; a clear error for a bad rule."""
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise TypeError(f"{owner}.layer must be an nn.Module subclass, got {layer!r}")
    if layout not in (None, "conv", "conv_transpose", "linear"):
        raise ValueError(f"{owner}.layout must be 'conv', 'conv_transpose' or 'linear', got {layout!r}")
    found = layout or layout_of_type(layer)
    if found is None:
        raise ValueError(
            f"{owner} cannot infer how {layer.__name__} stores its weight; pass layout='conv', "
            "'conv_transpose' or 'linear'"
        )
    return found


def padding_reason(layer: nn.Module, layout: Layout) -> str | None:
    """Why a norm before ``layer`` does not fold into it exactly: its padded zeros live in the norm's output
    space (the folded layer would see them as a different value), or a ConvTranspose whose outputs see
    different numbers of inputs (the norm's shift would not become a per-channel bias)."""
    padding = getattr(layer, "_reversed_padding_repeated_twice", None)
    padded = padding is not None and any(int(p) != 0 for p in padding)
    mode = getattr(layer, "padding_mode", "zeros")
    if layout == "conv" and padded and mode == "zeros":
        return (
            f"pads its input with zeros (padding={getattr(layer, 'padding', None)}): the padded zeros "
            "would not pass through the folded norm, so folding it there is not exact"
        )
    if layout == "conv_transpose":
        kernel = tuple(getattr(layer, "kernel_size", ()))
        stride = tuple(getattr(layer, "stride", ()))
        pad = tuple(getattr(layer, "padding", ()))
        dilation = tuple(getattr(layer, "dilation", ()))
        out_pad = tuple(getattr(layer, "output_padding", ()))
        full = (
            all(s == 1 for s in stride)
            and all(p == d * (k - 1) for p, d, k in zip(pad, dilation, kernel, strict=True))
            and all(o == 0 for o in out_pad)
        )
        if not full:
            return (
                "is a ConvTranspose whose outputs see different numbers of inputs (stride or border), "
                "so the norm's shift would not become a per-channel bias"
            )
    return None


def runtime_padding_reason(layer: nn.Module, layout: Layout) -> str | None:
    """timm's ``Conv2dSame`` pads 'same' with zeros at run time, whatever its ``padding`` says."""
    return "pads its input with zeros at run time ('same' padding), so a norm before it does not fold exactly"


@dataclass(frozen=True)
class LayerRule:
    """How one layer type stores its weight, and whether a norm before it folds into it.

    Args:
        layer: the layer type (a subclass that only changes construction shares its rule).
        layout: ``"conv"``, ``"conv_transpose"`` or ``"linear"``: how ``weight`` (and ``bias``, possibly
            ``None``) are laid out; inferred for subclasses of the torch layers.
        forward: ``(layer, layout) -> reason | None``: why a norm before it cannot fold into it.

    >>> LayerRule(nn.Conv2d).weight_layout
    'conv'
    """

    layer: type[nn.Module]
    layout: Layout | None = None
    forward: Callable[[nn.Module, Layout], str | None] = field(default=padding_reason, compare=False)

    def __post_init__(self) -> None:
        resolve_layout("LayerRule", self.layer, self.layout)

    @property
    def weight_layout(self) -> Layout:
        return resolve_layout("LayerRule", self.layer, self.layout)


def builtin_layer_rules() -> dict[type[nn.Module], LayerRule]:
    """The layer types bnfold folds into (third-party ones when their library is loaded)."""
    rules = [LayerRule(layer) for layer, _ in _LAYOUTS]
    rules += [LayerRule(conv, forward=runtime_padding_reason) for conv in compat.same_padding_conv_types()]
    rules += [LayerRule(linear) for linear in compat.plain_linear_types()]
    return {rule.layer: rule for rule in rules}


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


def channel_axis(layer: nn.Module, layout: Layout, ndim: int) -> int:
    """The channel axis of a layer's input or output of rank ``ndim`` (convs accept unbatched input)."""
    if layout == "linear":
        return ndim - 1
    return 1 if ndim == require_tensor(layer, "weight").dim() else 0


def output_ranks(layer: nn.Module, layout: Layout) -> tuple[int, ...] | None:
    """The ranks of the tensors the layer reads and makes (``None``: any, as a Linear)."""
    if layout == "linear":
        return None
    rank = require_tensor(layer, "weight").dim()
    return (rank - 1, rank)
