"""Optional third-party layer types (torchvision, timm).

bnfold depends on torch alone; these functions return the extra layer classes it
knows how to fold when their library is loaded, and nothing otherwise. They never
import a library themselves: a model can only hold a timm or torchvision layer once
that library has been imported, and importing one costs a second or more.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = [
    "frozen_batchnorm_types",
    "norm_act_types",
    "frozen_norm_act_types",
    "sync_norm_act_types",
    "layer_scale_types",
    "layer_scale_2d_types",
    "same_padding_conv_types",
    "plain_linear_types",
    "permute_module_types",
    "compiled_module_types",
]


def _optional(module: str, name: str) -> type[nn.Module] | None:
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _present(*candidates: type[nn.Module] | None) -> tuple[type[nn.Module], ...]:
    return tuple(c for c in candidates if c is not None)


def frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Norms with fixed statistics stored as buffers: torchvision's ``FrozenBatchNorm2d``."""
    return _present(_optional("torchvision.ops.misc", "FrozenBatchNorm2d"))


def norm_act_types() -> tuple[type[nn.Module], ...]:
    """BatchNorm2d subclasses that also apply dropout and an activation: timm's ``BatchNormAct2d``."""
    return _present(_optional("timm.layers.norm_act", "BatchNormAct2d"))


def sync_norm_act_types() -> tuple[type[nn.Module], ...]:
    """SyncBatchNorm subclasses that also apply dropout and an activation: timm's ``SyncBatchNormAct``."""
    return _present(_optional("timm.layers.norm_act", "SyncBatchNormAct"))


def frozen_norm_act_types() -> tuple[type[nn.Module], ...]:
    """Frozen batch norms that also apply dropout and an activation: timm's ``FrozenBatchNormAct2d``."""
    return _present(_optional("timm.layers.norm_act", "FrozenBatchNormAct2d"))


def layer_scale_types() -> tuple[type[nn.Module], ...]:
    """Per-channel scales on channels-last tensors: timm's ``LayerScale`` (``x * gamma``)."""
    return _present(_optional("timm.layers", "LayerScale"))


def layer_scale_2d_types() -> tuple[type[nn.Module], ...]:
    """Per-channel scales on NCHW tensors (``x * gamma``, ``gamma`` of shape ``(C, 1, 1)`` or ``(C,)``):
    timm's ``LayerScale2d``, and FastViT's own."""
    return _present(_optional("timm.layers", "LayerScale2d"), _optional("timm.models.fastvit", "LayerScale2d"))


def same_padding_conv_types() -> tuple[type[nn.Module], ...]:
    """Conv2d subclasses that pad 'same' at run time with zeros: timm's ``Conv2dSame`` (backward only)."""
    return _present(_optional("timm.layers.conv2d_same", "Conv2dSame"))


def plain_linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear subclasses whose forward is ``F.linear(x, weight, bias)``: timm's ``Linear`` (it only casts
    the weight to the input's dtype under TorchScript)."""
    return _present(_optional("timm.layers.linear", "Linear"))


def permute_module_types() -> tuple[type[nn.Module], ...]:
    """Modules that permute their input's axes by a ``dims`` attribute: torchvision's ``Permute``
    (ConvNeXt, Swin)."""
    return _present(_optional("torchvision.ops.misc", "Permute"))


def compiled_module_types() -> tuple[type[nn.Module], ...]:
    """The wrapper ``torch.compile`` returns for a module: ``OptimizedModule`` (loaded once anything was
    compiled)."""
    return _present(_optional("torch._dynamo.eval_frame", "OptimizedModule"))
