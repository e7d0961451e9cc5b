"""Reading state_dict files and explaining, key by key, why one does not fit a model.

A file is a ``.pt``/``.pth`` state_dict (read with ``weights_only=True``) or a ``.safetensors`` file (its
metadata comes along). ``module.`` prefixes (DataParallel, DistributedDataParallel) and ``_orig_mod.``
prefixes (``torch.compile``) are stripped when the model's own keys have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import clean_message

__all__ = [
    "StateDictError",
    "PickledObjectError",
    "TORCH_SUFFIXES",
    "Fit",
    "read_state_dict",
    "strip_wrapper_prefixes",
    "compare_state",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# prefix -> what adds it
_WRAPPER_PREFIXES = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile"}


class StateDictError(ValueError):
    """A file cannot be read as a state_dict (the message says why and what to do)."""


class PickledObjectError(StateDictError):
    """The file holds a pickled object (a whole model?), which ``weights_only=True`` refuses to load."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in clean_message(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state_dict, metadata) from a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file, on the CPU.
    The metadata is a safetensors file's (empty for torch files). Common checkpoint layouts
    (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped."""
    if not path.exists():
        raise StateDictError(f"'{path}' does not exist")
    if path.is_dir():
        raise StateDictError(f"'{path}' is a directory, not a weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise StateDictError(
                f"reading '{path}' needs the safetensors package: pip install safetensors (or 'bnfold[export]')"
            ) from None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as error:
            raise StateDictError(f"cannot read '{path}' as safetensors: {_first_line(error)}") from error
    if path.suffix not in TORCH_SUFFIXES:
        raise StateDictError(
            f"cannot read '{path}': unsupported format '{path.suffix}'; weights must be a state_dict in a "
            ".pt/.pth file or a .safetensors file"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "GLOBAL" in str(error) and "allowed global" in str(error):
            raise PickledObjectError(
                f"'{path}' holds a pickled object, not a state_dict (a dict of tensors): a whole model saved with "
                "torch.save(model)?"
            ) from error
        raise StateDictError(f"cannot read '{path}' as a state_dict: {_first_line(error)}") from error
    for key in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise StateDictError(f"'{path}' does not hold a state_dict (a dict of tensors)")
    return dict(loaded), {}


def strip_wrapper_prefixes(state: dict[str, Tensor], model_keys: set[str]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` without the prefixes wrappers add to every key, and what added them (for a note)."""
    stripped: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix, source in _WRAPPER_PREFIXES.items():
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped.append(f"'{prefix}' ({source})")
                changed = True
    return state, stripped


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


@dataclass(frozen=True)
class Fit:
    """How the keys and shapes of a file's state_dict compare with a model's."""

    matching: int
    expected: int
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    shapes: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, model's, file's

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def classifier_outputs(self) -> int | None:
        """When the only difference is the number of outputs of the last layers (a classifier trained for
        another number of classes), that number."""
        if self.missing or self.unexpected or not self.shapes:
            return None
        sizes = set()
        for _, mine, theirs in self.shapes:
            if len(mine) != len(theirs) or not mine or mine[1:] != theirs[1:]:
                return None
            sizes.add(theirs[0])
        return sizes.pop() if len(sizes) == 1 else None

    def looks_folded(self, model: nn.Module) -> bool:
        """Whether the file looks like this model folded: the norms' keys are missing and the layers that
        fed them have gained biases."""
        if not self.missing or not self.unexpected or self.shapes:
            return False
        modules = dict(model.named_modules())

        def owner(key: str) -> nn.Module | None:
            return modules.get(key.rpartition(".")[0])

        def is_norm(module: nn.Module | None) -> bool:
            return module is not None and (hasattr(module, "running_mean") or "norm" in type(module).__name__.lower())

        gained_bias = all(
            k.endswith(".bias") and owner(k) is not None and getattr(owner(k), "bias", 0) is None
            for k in self.unexpected
        )
        return gained_bias and all(is_norm(owner(k)) for k in self.missing)

    def describe(self) -> str:
        """What differs, with the first keys and the counts."""
        parts = [f"{self.matching} of {self.expected} keys fit"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the file ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_first(self.unexpected)})")
        if self.shapes:
            shown = "; ".join(f"{k}: {mine} here, {theirs} in the file" for k, mine, theirs in self.shapes[:3])
            more = f"; ... ({len(self.shapes) - 3} more)" if len(self.shapes) > 3 else ""
            parts.append(f"{len(self.shapes)} of another shape ({shown}{more})")
        return ", ".join(parts)


def compare_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> Fit:
    """Compare a model's ``state_dict()`` (``expected``) with a file's ``state``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, _shape(expected[k]), _shape(state[k]))
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    matching = sum(1 for k in expected if k in state) - len(shapes)
    return Fit(matching, len(expected), missing, unexpected, shapes)
