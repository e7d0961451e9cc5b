"""Folded checkpoints: the folded weights, and the record of what folding changed in the model's structure
(:mod:`bnfold.records`), so that a freshly built model of the same architecture takes them in one call,
without example inputs. The record lives in the safetensors metadata, or for a ``.pt`` file in a small JSON
file next to it (``folded.pt.bnfold.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..apply.edits import EditLog, place_at
from ..apply.records import FoldRecord, describe_fold, has_tensor, recorded, recorded_class, recorded_name
from ..errors import CheckpointError
from ..rules.classes import layer_type
from .output_files import OutputSet
from .state_dict import (
    TORCH_SUFFIXES,
    PickledObjectError,
    StateDictError,
    compare_state,
    read_state_dict,
    strip_wrapper_prefixes,
)

__all__ = [
    "FoldRecord",
    "describe_fold",
    "save_folded",
    "load_folded",
    "read_record",
    "record_path",
    "write_folded",
    "recorded",
]

METADATA_KEY = "bnfold"  # the safetensors metadata entry that holds the record
SIDE_SUFFIX = ".bnfold.json"
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")


# -- writing -------------------------------------------------------------------------------------------
def record_path(path: Path) -> Path:
    """Where the record of a ``.pt`` checkpoint lives: ``folded.pt`` -> ``folded.pt.bnfold.json``."""
    return path.with_name(path.name + SIDE_SUFFIX)


def _state_for_saving(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def write_folded(folded: nn.Module, record: FoldRecord, path: Path, outputs: OutputSet) -> None:
    """Stage the folded state_dict and its record in ``outputs`` (written when it commits)."""
    state = _state_for_saving(folded)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared storage (tied weights): store private copies
        tensors = {k: v.clone() for k, v in state.items()}
        save_file(tensors, str(outputs.stage(path)), metadata={"format": "pt", METADATA_KEY: record.to_json()})
        return
    torch.save(state, outputs.stage(path))
    outputs.stage(record_path(path)).write_text(record.to_json() + "\n")


def _check_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{what} must be a str or a pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"{what} '{path}' has an unsupported suffix '{path.suffix}'; use .safetensors or .pt/.pth "
            "(the record then goes to a .bnfold.json file next to it)"
        )
    return path


def save_folded(folded: nn.Module, path: str | Path, *, original: nn.Module) -> None:
    """Write the folded model's state_dict with a record of what folding changed, for :func:`load_folded`.

    ``original`` is the model it was folded from, or any unfolded model of the same architecture (only its
    structure is compared). ``.safetensors`` files hold the record in their metadata; ``.pt``/``.pth`` files
    get a small ``<name>.bnfold.json`` next to them. Both files are written, or neither.

    >>> import tempfile, torch, bnfold
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> path = Path(tempfile.mkdtemp()) / "folded.pt"
    >>> bnfold.save_folded(bnfold.fold(m, torch.randn(1, 3, 8, 8)), path, original=m)
    >>> sorted(p.name for p in path.parent.iterdir())
    ['folded.pt', 'folded.pt.bnfold.json']
    """
    if not isinstance(folded, nn.Module) or not isinstance(original, nn.Module):
        raise TypeError(
            f"save_folded() expects torch.nn.Modules, got {type(folded).__name__} and {type(original).__name__}"
        )
    if original is folded:
        raise ValueError(
            "save_folded() needs the unfolded architecture as original=, but got the folded model itself (folded "
            "with inplace=True?); pass a freshly built model of the same architecture"
        )
    path = _check_path(path, "path")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    record = describe_fold(original, folded)
    with OutputSet() as outputs:
        write_folded(folded, record, path, outputs)
        outputs.commit()


# -- reading -------------------------------------------------------------------------------------------
def read_record(path: Path, metadata: dict[str, str] | None = None) -> FoldRecord | None:
    """The record of the checkpoint at ``path`` (from ``metadata`` for safetensors), or None if it has none."""
    if path.suffix == ".safetensors":
        text = (metadata or {}).get(METADATA_KEY)
        return None if text is None else FoldRecord.from_json(text, f"'{path}'")
    side = record_path(path)
    if not side.is_file():
        return None
    return FoldRecord.from_json(side.read_text(), f"'{side}'")


def _rebuild(model: nn.Module, record: FoldRecord, source: str, log: EditLog) -> None:
    """Give the fresh ``model`` the folded structure (new modules hold placeholder values until loaded)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    built: dict[int, nn.Module] = {}  # a module registered under several paths is replaced once
    for r in record.replaced:
        old = modules.get(r.path)
        if old is None:
            raise CheckpointError(f"{source} replaces '{r.path}', which this {type(model).__name__} does not have")
        if layer_type(old).__name__ != r.was:
            hint = " (is the model already folded? pass a freshly built one)" if recorded_name(old) else ""
            raise CheckpointError(
                f"{source} was folded from a {r.was} at '{r.path}', but this model has a {type(old).__name__}{hint}"
            )
        new = built.get(id(old))
        if new is None:
            new = recorded_class(r.module, source).from_record(r.spec, old)
            built[id(old)] = new
        # where the model holds it now: a replacement may carry modules over (a MergedConv keeps some of the
        # block's), and a later entry replaces them there
        log.replace(old, new, [place_at(model, r.path)])
    modules = dict(model.named_modules(remove_duplicate=False))
    for b in record.biases:
        layer = modules.get(b.path)
        weight = getattr(layer, "weight", None)
        if layer is None or not isinstance(weight, Tensor):
            raise CheckpointError(f"{source} gives a bias to '{b.path}', which this model has no such layer at")
        if has_tensor(layer, "bias"):
            raise CheckpointError(
                f"{source} gives a bias to '{b.path}', which already has one (is the model already folded?)"
            )
        zeros = torch.zeros(b.shape, dtype=torch.float64)
        log.map_bias(layer, torch.ones_like(zeros), zeros)
    for p in record.parametrizations:
        owner = modules.get(p.path)
        if owner is None or not parametrize.is_parametrized(owner, p.tensor):
            raise CheckpointError(
                f"{source} extends the parametrization of '{p.path}.{p.tensor}', which this model does not have "
                "(build it the same way as the model that was folded, parametrizations included)"
            )
        step = recorded_class(p.module, source).from_record(p.spec, owner)
        device = next((t.device for t in owner.parameters()), torch.device("cpu"))
        log.append_parametrization(owner, p.tensor, step.to(device))
    for buf in record.buffers:
        module_path, _, name = buf.path.rpartition(".")
        module = modules.get(module_path)
        value = None if module is None else module._buffers.get(name)
        if module is None or not isinstance(value, Tensor):
            raise CheckpointError(f"{source} sets the buffer '{buf.path}', which this model does not have")
        log.set_tensors(module, {name: 1.0 if buf.value == "ones" else 0.0})


def load_folded(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a folded checkpoint (written by ``bnfold ... -o`` or :func:`save_folded`) into ``model``, a freshly
    built, unfolded model of the same architecture: give it the folded structure the checkpoint records, then
    load the weights. No example inputs, no tracing.

    ``model`` is changed in place and returned. If the file does not fit it, :class:`~bnfold.CheckpointError`
    says what differs, and ``model`` is left as it was.

    >>> import tempfile, torch, bnfold
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> path = Path(tempfile.mkdtemp()) / "folded.safetensors"
    >>> bnfold.save_folded(bnfold.fold(m, torch.randn(1, 3, 8, 8)), path, original=m)
    >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> type(bnfold.load_folded(fresh, path)[1]).__name__
    'Identity'
    """
    if not isinstance(model, nn.Module):
        hint = " (build the architecture first, then load into it)" if isinstance(model, (str, Path)) else ""
        raise TypeError(
            f"load_folded() expects a torch.nn.Module as its first argument, got {type(model).__name__}{hint}"
        )
    path = _check_path(path, "path")
    source = f"'{path}'"
    try:
        state, metadata = read_state_dict(path)
    except PickledObjectError as error:
        raise CheckpointError(
            f"{error} A whole folded module needs no load_folded: torch.load(path, weights_only=False) it, if you "
            "trust the file"
        ) from error
    except StateDictError as error:
        raise CheckpointError(str(error)) from error
    record = read_record(path, metadata)
    expected = model.state_dict()
    state, _ = strip_wrapper_prefixes(state, set(expected))
    if record is None:
        side = "" if path.suffix == ".safetensors" else f" (nor a record file '{record_path(path)}' next to it)"
        plain = (
            " It fits this model as it is: load it with model.load_state_dict()."
            if compare_state(expected, state).ok
            else ""
        )
        raise CheckpointError(
            f"{source} holds no bnfold fold record{side}, so bnfold cannot tell what was folded. Write folded "
            f"checkpoints with bnfold ... -o or bnfold.save_folded(folded, path, original=model).{plain}"
        )
    if record.model != type(model).__name__:
        raise CheckpointError(f"{source} holds a folded {record.model}; this model is a {type(model).__name__}")
    log = EditLog()
    try:
        _rebuild(model, record, source, log)
        fit = compare_state(model.state_dict(), state)
        if not fit.ok:
            classes = fit.classifier_outputs()
            hint = f"; only the classifier differs: build the model with num_classes={classes}" if classes else ""
            raise CheckpointError(
                f"{source} does not fit this {type(model).__name__} once folded: {fit.describe()}{hint}"
            )
        model.load_state_dict(state)
    except BaseException:
        log.undo()
        raise
    return model
