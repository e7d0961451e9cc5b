"""Folded checkpoints: the folded weights, and a record of what folding changed in the model's structure, so
that a freshly built model of the same architecture takes them in one call, without example inputs.

The record is found by comparing the folded model with an unfolded one of the same architecture, module by
module: which paths now hold another module (``nn.Identity``, bnfold's ``FoldedNormAct``, ...), which layers
gained a bias, which parametrizations were appended (a folded scale behind ``parametrize``), and which
non-persistent buffers were set to a neutral value (they are not in a state_dict). It lives in the
safetensors metadata, or for a ``.pt`` file in a small JSON file next to it (``folded.pt.bnfold.json``).

Each module class bnfold puts into a model describes itself: an entry of ``_RECORDED`` names the class and
says how to turn an instance into a JSON-ready spec (``to_record``) and back (``from_record``, given the
module it replaces in the fresh model). A new kind of replacement is one more entry (``recorded(...)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .classes import layer_type
from .errors import CheckpointError
from .files import OutputSet
from .norms import FoldedNormAct, norm_act_replacement
from .reparam import MergedConv
from .statedict import (
    TORCH_SUFFIXES,
    PickledObjectError,
    StateDictError,
    compare_state,
    read_state_dict,
    strip_wrapper_prefixes,
)
from .surgery import ChannelAffine, ChannelScale

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

RECORD_FORMAT = "bnfold.fold-record"
RECORD_VERSION = 1
METADATA_KEY = "bnfold"  # the safetensors metadata entry that holds the record
SIDE_SUFFIX = ".bnfold.json"
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")

Spec = dict[str, Any]


# -- the module classes a record can name -----------------------------------------------------------------
@dataclass(frozen=True)
class RecordedClass:
    """How instances of one module class bnfold puts into models are written to a record and rebuilt."""

    cls: type[nn.Module]
    to_record: Callable[[nn.Module], Spec]
    # (spec, the module in the fresh model that it replaces or parametrizes) -> the module
    from_record: Callable[[Spec, nn.Module], nn.Module]


_RECORDED: dict[str, RecordedClass] = {}


def recorded(
    cls: type[nn.Module],
    *,
    name: str | None = None,
    to_record: Callable[[nn.Module], Spec] | None = None,
    from_record: Callable[[Spec, nn.Module], nn.Module] | None = None,
) -> type[nn.Module]:
    """Let records name ``cls``. A class of bnfold's own defines ``to_record(self) -> dict`` and a classmethod
    ``from_record(cls, spec, replaced) -> module``, and is registered with ``@recorded``; a class bnfold does not
    own (``nn.Identity``) is registered with the two functions. Returns ``cls``, so it works as a decorator.

    >>> @recorded
    ... class Gate(nn.Module):
    ...     def __init__(self, channels: int) -> None:
    ...         super().__init__()
    ...         self.channels = channels
    ...     def to_record(self) -> dict:
    ...         return {"channels": self.channels}
    ...     @classmethod
    ...     def from_record(cls, spec: dict, replaced: nn.Module) -> "Gate":
    ...         return cls(spec["channels"])
    >>> _RECORDED["Gate"].from_record({"channels": 4}, nn.Identity()).channels
    4
    >>> del _RECORDED["Gate"]
    """
    to_record = to_record or getattr(cls, "to_record", None)
    from_record = from_record or getattr(cls, "from_record", None)
    if to_record is None or from_record is None:
        raise TypeError(f"{cls.__name__} needs to_record and from_record to be recorded")
    _RECORDED[name or cls.__name__] = RecordedClass(cls, to_record, from_record)
    return cls


def _recorded_name(module: nn.Module) -> str | None:
    for name, entry in _RECORDED.items():
        if type(module) is entry.cls:
            return name
    return None


def _folded_norm_act(spec: Spec, replaced: nn.Module) -> nn.Module:
    rebuilt = norm_act_replacement(replaced)
    children = {name: type(child).__name__ for name, child in rebuilt.named_children()}
    if children != spec:
        raise CheckpointError(
            f"the checkpoint's {type(replaced).__name__} kept {spec}, but this model's keeps {children}"
        )
    return rebuilt


def _dtype(spec: Spec) -> torch.dtype:
    dtype = getattr(torch, str(spec.get("dtype", "float64")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {spec.get('dtype')!r} in the record")
    return dtype


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


recorded(MergedConv)
recorded(nn.Identity, name="Identity", to_record=lambda m: {}, from_record=lambda spec, replaced: nn.Identity())
recorded(
    FoldedNormAct,
    to_record=lambda m: {name: type(child).__name__ for name, child in m.named_children()},
    from_record=_folded_norm_act,
)
recorded(
    ChannelScale,
    to_record=lambda m: {
        "layout": cast(ChannelScale, m).layout,
        "groups": cast(ChannelScale, m).groups,
        "axis": cast(ChannelScale, m).axis,
        "channels": cast(Tensor, m.scale).numel(),
        "dtype": _dtype_name(cast(Tensor, m.scale)),
    },
    from_record=lambda spec, owner: ChannelScale(
        torch.ones(int(spec["channels"]), dtype=_dtype(spec)), spec["layout"], int(spec["groups"]), spec["axis"]
    ),
)
recorded(
    ChannelAffine,
    to_record=lambda m: {"channels": cast(Tensor, m.scale).numel(), "dtype": _dtype_name(cast(Tensor, m.scale))},
    from_record=lambda spec, owner: ChannelAffine(
        torch.ones(int(spec["channels"]), dtype=_dtype(spec)), torch.zeros(int(spec["channels"]), dtype=_dtype(spec))
    ),
)


# -- the record ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replacement:
    """The module at ``path`` (of class ``was``) is replaced by a recorded class, built from ``spec``."""

    path: str
    was: str
    module: str
    spec: Spec


@dataclass(frozen=True)
class AddedBias:
    """The layer at ``path`` had no bias; folding gave it one of ``shape``."""

    path: str
    shape: list[int]


@dataclass(frozen=True)
class AddedParametrization:
    """A parametrization appended to ``tensor`` of the module at ``path``."""

    path: str
    tensor: str
    module: str
    spec: Spec


@dataclass(frozen=True)
class NeutralBuffer:
    """A non-persistent buffer (not in the state_dict) set to its neutral value: ``"ones"`` or ``"zeros"``."""

    path: str
    value: str


@dataclass(frozen=True)
class FoldRecord:
    """What folding changed in the structure of a model of class ``model``."""

    model: str
    replaced: tuple[Replacement, ...] = ()
    biases: tuple[AddedBias, ...] = ()
    parametrizations: tuple[AddedParametrization, ...] = ()
    buffers: tuple[NeutralBuffer, ...] = ()

    def to_json(self) -> str:
        from . import __version__

        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "version": RECORD_VERSION,
                "bnfold": __version__,
                "model": self.model,
                "replaced": [asdict(r) for r in self.replaced],
                "biases": [asdict(b) for b in self.biases],
                "parametrizations": [asdict(p) for p in self.parametrizations],
                "buffers": [asdict(b) for b in self.buffers],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> FoldRecord:
        try:
            data = json.loads(text)
            if data.get("format") != RECORD_FORMAT:
                raise ValueError("not a bnfold fold record")
            if data.get("version") != RECORD_VERSION:
                raise ValueError(
                    f"record version {data.get('version')} (written by bnfold {data.get('bnfold')}); this bnfold "
                    f"reads version {RECORD_VERSION}"
                )
            return cls(
                str(data["model"]),
                tuple(Replacement(**r) for r in data.get("replaced", [])),
                tuple(AddedBias(**b) for b in data.get("biases", [])),
                tuple(AddedParametrization(**p) for p in data.get("parametrizations", [])),
                tuple(NeutralBuffer(**b) for b in data.get("buffers", [])),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CheckpointError(f"cannot read the fold record in {where}: {error}") from error


def _parametrization_count(module: nn.Module, tensor: str) -> int:
    if not parametrize.is_parametrized(module, tensor):
        return 0
    return len(cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor]))


def _has_tensor(module: nn.Module, name: str) -> bool:
    if parametrize.is_parametrized(module, name):
        return True
    return isinstance(module._parameters.get(name), Tensor) or isinstance(module._buffers.get(name), Tensor)


def describe_fold(original: nn.Module, folded: nn.Module) -> FoldRecord:
    """What folding changed in the structure of ``folded``, found by comparing it with ``original`` (the model
    it was folded from, or any unfolded model of the same architecture).

    >>> import torch, bnfold
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)).eval()
    >>> record = describe_fold(m, bnfold.fold(m, torch.randn(1, 3, 8, 8)))
    >>> [(r.path, r.was, r.module) for r in record.replaced], [b.path for b in record.biases]
    ([('1', 'BatchNorm2d', 'Identity')], ['0'])
    """
    if type(original) is not type(folded):
        raise CheckpointError(
            f"cannot compare a {type(folded).__name__} with a {type(original).__name__}: pass the model it was "
            "folded from, or a freshly built one of the same architecture"
        )
    before = dict(original.named_modules(remove_duplicate=False))
    after = dict(folded.named_modules(remove_duplicate=False))
    replaced: list[Replacement] = []
    biases: list[AddedBias] = []
    added: list[AddedParametrization] = []
    buffers: list[NeutralBuffer] = []
    # replaced paths -> the children the replacement carries over under their own names (``survivors``, as a
    # MergedConv keeps the modules around its branches): what else is under them belongs to the replacement
    inside: dict[str, tuple[str, ...]] = {}

    def under_replaced(path: str) -> bool:
        if "parametrizations" in path.split("."):
            return True  # parametrization steps are compared with their owner, below
        for prefix, survivors in inside.items():
            if path.startswith(prefix + "."):
                rest = path[len(prefix) + 1 :]
                if not any(rest == s or rest.startswith(s + ".") for s in survivors):
                    return True
        return False

    for path, module in after.items():
        if under_replaced(path):
            continue
        old = before.get(path)
        where = f"'{path}'" if path else "the model"
        if old is None:
            raise CheckpointError(
                f"{where} ({type(module).__name__}) is not in the unfolded {type(original).__name__}: is it the "
                "same architecture?"
            )
        if layer_type(old) is not layer_type(module):
            name = _recorded_name(module)
            if name is None:
                raise CheckpointError(
                    f"{where} was {layer_type(old).__name__} and is now {type(module).__name__}, which bnfold cannot "
                    "record (a replacement from a custom rule?); save the whole module instead, torch.save(folded) "
                    "(--save-module on the command line)"
                )
            replaced.append(Replacement(path, layer_type(old).__name__, name, _RECORDED[name].to_record(module)))
            inside[path] = tuple(getattr(module, "survivors", ()))
            continue
        weight = module._parameters.get("weight")
        bias = module._parameters.get("bias")
        if (
            "bias" in module._parameters
            and isinstance(bias, Tensor)
            and isinstance(weight, Tensor)
            and not _has_tensor(old, "bias")
        ):
            biases.append(AddedBias(path, list(bias.shape)))
        for tensor in getattr(module, "parametrizations", {}):
            steps = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor])
            for index, step in enumerate(steps):
                if index < _parametrization_count(old, tensor):
                    continue
                name = _recorded_name(step)
                if name is None:
                    raise CheckpointError(
                        f"{where}: a {type(step).__name__} parametrization of {tensor} was added, which bnfold "
                        "cannot record; save the whole module instead, torch.save(folded)"
                    )
                added.append(AddedParametrization(path, tensor, name, _RECORDED[name].to_record(step)))
        for buffer_name in sorted(module._non_persistent_buffers_set):
            new, previous = module._buffers.get(buffer_name), old._buffers.get(buffer_name)
            if not isinstance(new, Tensor) or not isinstance(previous, Tensor) or new.shape != previous.shape:
                continue
            if torch.equal(new.cpu(), previous.cpu()):
                continue
            for value, neutral in (("ones", torch.ones_like(new)), ("zeros", torch.zeros_like(new))):
                if torch.equal(new, neutral):
                    buffers.append(NeutralBuffer(f"{path}.{buffer_name}" if path else buffer_name, value))
    missing = [p for p in before if p not in after and not under_replaced(p) and p not in inside]
    if missing:
        raise CheckpointError(
            f"'{missing[0]}' of the unfolded {type(original).__name__} is not in the folded one: is it the same "
            "architecture?"
        )
    return FoldRecord(type(folded).__name__, tuple(replaced), tuple(biases), tuple(added), tuple(buffers))


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


class _Undo:
    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


def _parents(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    found: dict[str, tuple[nn.Module, str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, child in module._modules.items():
            if child is not None:
                found[f"{path}.{attr}" if path else attr] = (module, attr)
    return found


def _entry(name: str, where: str) -> RecordedClass:
    entry = _RECORDED.get(name)
    if entry is None:
        raise CheckpointError(f"{where} names a module class bnfold does not know, {name!r}: is bnfold up to date?")
    return entry


def _drop_last(steps: nn.ModuleList) -> None:
    del steps[len(steps) - 1]


def _restore(value: Tensor, saved: Tensor) -> None:
    with torch.no_grad():
        value.copy_(saved)


def _rebuild(model: nn.Module, record: FoldRecord, source: str, undo: _Undo) -> None:
    """Give the fresh ``model`` the folded structure (new modules hold placeholder values until loaded)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    parents = _parents(model)
    built: dict[int, nn.Module] = {}  # a module registered under several paths is replaced once
    for r in record.replaced:
        old = modules.get(r.path)
        if old is None:
            raise CheckpointError(f"{source} replaces '{r.path}', which this {type(model).__name__} does not have")
        if layer_type(old).__name__ != r.was:
            hint = " (is the model already folded? pass a freshly built one)" if _recorded_name(old) else ""
            raise CheckpointError(
                f"{source} was folded from a {r.was} at '{r.path}', but this model has a {type(old).__name__}{hint}"
            )
        new = built.get(id(old))
        if new is None:
            new = _entry(r.module, source).from_record(r.spec, old)
            new.train(old.training)
            built[id(old)] = new
        parent, attr = parents[r.path]
        parent._modules[attr] = new
        undo.steps.append(partial(parent._modules.__setitem__, attr, old))
        # a replacement may carry modules over (a MergedConv keeps some of the block's): replaced below, they
        # are replaced where it holds them now
        parents.update({f"{r.path}.{path}": where for path, where in _parents(new).items()})
    modules = dict(model.named_modules(remove_duplicate=False))
    for b in record.biases:
        layer = modules.get(b.path)
        weight = getattr(layer, "weight", None)
        if layer is None or not isinstance(weight, Tensor):
            raise CheckpointError(f"{source} gives a bias to '{b.path}', which this model has no such layer at")
        if _has_tensor(layer, "bias"):
            raise CheckpointError(
                f"{source} gives a bias to '{b.path}', which already has one (is the model already folded?)"
            )
        bias = nn.Parameter(
            torch.zeros(b.shape, dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
        )
        layer.register_parameter("bias", bias)
        undo.steps.append(partial(layer.register_parameter, "bias", None))
    for p in record.parametrizations:
        owner = modules.get(p.path)
        if owner is None or not parametrize.is_parametrized(owner, p.tensor):
            raise CheckpointError(
                f"{source} extends the parametrization of '{p.path}.{p.tensor}', which this model does not have "
                "(build it the same way as the model that was folded, parametrizations included)"
            )
        step = _entry(p.module, source).from_record(p.spec, owner)
        device = next((t.device for t in owner.parameters()), torch.device("cpu"))
        parametrize.register_parametrization(owner, p.tensor, step.to(device))
        steps = cast(nn.ModuleList, cast(nn.ModuleDict, owner.parametrizations)[p.tensor])
        undo.steps.append(partial(_drop_last, steps))
    for buf in record.buffers:
        module_path, _, name = buf.path.rpartition(".")
        module = modules.get(module_path)
        value = None if module is None else module._buffers.get(name)
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source} sets the buffer '{buf.path}', which this model does not have")
        saved = value.detach().clone()
        with torch.no_grad():
            value.fill_(1 if buf.value == "ones" else 0)
        undo.steps.append(partial(_restore, value, saved))


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
    undo = _Undo()
    try:
        _rebuild(model, record, source, undo)
        fit = compare_state(model.state_dict(), state)
        if not fit.ok:
            classes = fit.classifier_outputs()
            hint = f"; only the classifier differs: build the model with num_classes={classes}" if classes else ""
            raise CheckpointError(
                f"{source} does not fit this {type(model).__name__} once folded: {fit.describe()}{hint}"
            )
        model.load_state_dict(state)
    except BaseException:
        undo.run()
        raise
    return model
