"""Built-in architectures by name (``torchvision:resnet50``, ``timm:efficientnet_b0``, timm's pretrained
tags as in ``timm:resnet50.a1_in1k``), with random weights and nothing downloaded. torchvision and timm are
optional: a missing one is a clear error that names the extra to install. Parsing a name imports neither
(nor torch)."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ArchitectureError", "NamedModel", "build_named_model", "parse_model_name", "libraries_with"]

_LIBRARIES = ("torchvision", "timm")

# Architectures whose stem needs a larger input than the usual 224 x 224.
_TORCHVISION_INPUT = {"inception_v3": 299}
# Video models take (N, C, T, H, W): 16 frames at the size their weights were trained for.
_VIDEO_FRAMES = 16
_VIDEO_SIZE = {"r3d_18": 112, "mc3_18": 112, "r2plus1d_18": 112}


class ArchitectureError(ValueError):
    """The architecture name cannot be built here (unknown name, or its library is missing)."""


@dataclass(frozen=True)
class NamedModel:
    """A model built from a name, with the input shape it expects by default."""

    spec: str
    model: nn.Module
    input_shape: tuple[int, ...]


def parse_model_name(spec: str) -> tuple[str, str] | None:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``; ``None`` when it is not of that form.

    >>> parse_model_name("timm:efficientnet_b0")
    ('timm', 'efficientnet_b0')
    """
    library, sep, name = spec.partition(":")
    if not sep or library not in _LIBRARIES or not name:
        return None
    return library, name


def _import(library: str) -> ModuleType:
    try:
        return importlib.import_module(library)
    except ImportError as error:
        raise ArchitectureError(
            f"{library} is not installed, so '{library}:...' architectures are unavailable; "
            f"install it with: pip install 'bnfold[{library}]'"
        ) from error


def _unknown(library: str, name: str, known: list[str]) -> ArchitectureError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(f'{library}:{c}' for c in close)}?" if close else ""
    return ArchitectureError(f"unknown {library} architecture '{name}'{hint}")


def build_named_model(spec: str, num_classes: int | None = None) -> NamedModel:
    """Build an architecture by name with random weights (no download).

    >>> build_named_model("torchvision:resnet18").input_shape
    (1, 3, 224, 224)
    """
    parsed = parse_model_name(spec)
    if parsed is None:
        raise ArchitectureError(
            f"'{spec}' is not an architecture name; use torchvision:<name> or timm:<name>, e.g. torchvision:resnet50"
        )
    library, name = parsed
    lib = _import(library)
    extra: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if library == "torchvision":
        known = list(lib.models.list_models())
        if name not in known:
            raise _unknown(library, name, known)
        if name in ("googlenet", "inception_v3"):
            extra["init_weights"] = False  # the random weights do not matter; scipy-based init is slow
        builder = lib.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            extra["weights_backbone"] = None  # detection and segmentation: no pretrained backbone download
        model = builder(weights=None, **extra)
        if builder.__module__.startswith("torchvision.models.video"):
            size = _VIDEO_SIZE.get(name, 224)
            return NamedModel(spec, model, (1, 3, _VIDEO_FRAMES, size, size))
        size = _TORCHVISION_INPUT.get(name, 224)
        return NamedModel(spec, model, (1, 3, size, size))
    base, _, tag = name.partition(".")
    known = list(lib.list_models())
    if base not in known:
        raise _unknown(library, base, known)
    if tag:
        tags = [t.partition(".")[2] for t in lib.list_pretrained(f"{base}.*")]
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=5, cutoff=0.4) or tags[:5]
            hint = f"; its tags include {', '.join(f'{base}.{t}' for t in close)}" if close else " (it has none)"
            raise ArchitectureError(f"unknown timm tag '{tag}' for {base}{hint}")
    # a tag selects a pretrained configuration (input size, classes); pretrained=False: its weights stay random
    model = lib.create_model(name, pretrained=False, **extra)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    return NamedModel(spec, model, (1, *input_size))


def libraries_with(name: str) -> list[str]:
    """The installed libraries that know the architecture ``name``, as ``library:name`` specs (for hints).

    >>> "torchvision:resnet18" in libraries_with("resnet18")
    True
    """
    found = []
    for library in _LIBRARIES:
        try:
            lib = importlib.import_module(library)
        except ImportError:
            continue
        if library == "torchvision":
            known = name in lib.models.list_models()
        else:  # timm: a name may carry a pretrained tag, resnet50.a1_in1k
            known = name.partition(".")[0] in lib.list_models()
        if known:
            found.append(f"{library}:{name}")
    return found
