"""The record of a folded structure: what folding changed in a model, module by module, as JSON.

The record says which paths now hold another module (``nn.Identity``, bnfold's ``FoldedNormAct``, ...), which
layers gained a bias, which parametrizations were appended (a folded scale behind ``parametrize``), and which
non-persistent buffers were set to a neutral value (they are not in a state_dict). It is written from the
:class:`~bnfold.apply.edits.EditLog` of the fold (:func:`record_of_edits`) or, given only the two models, found
by comparing the folded one with an unfolded one of the same architecture (:func:`describe_fold`); both walk
the folded model the same way, so they give the same record.

Each module class bnfold puts into a model describes itself: an entry of ``_RECORDED`` names the class and
says how to turn an instance into a JSON-ready spec (``to_record``) and back (``from_record``, given the
module it replaces in the fresh model). A new kind of replacement is one more entry (``recorded(...)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import CheckpointError
from ..reparam.merged_conv import MergedConv
from ..rules.classes import layer_type
from ..rules.norms import Contiguous, FoldedNormAct, norm_act_replacement
from .edits import BiasAdded, ChannelAffine, ChannelScale, EditLog, ParametrizationAppended, Replaced, TensorsSet

__all__ = [
    "FoldRecord",
    "Replacement",
    "AddedBias",
    "AddedParametrization",
    "NeutralBuffer",
    "RecordedClass",
    "describe_fold",
    "record_of_edits",
    "recorded",
    "recorded_name",
    "recorded_class",
    "has_tensor",
]

RECORD_FORMAT = "bnfold.fold-record"
RECORD_VERSION = 1

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


def recorded_name(module: nn.Module) -> str | None:
    for name, entry in _RECORDED.items():
        if type(module) is entry.cls:
            return name
    return None


def _record_of(module: nn.Module) -> Spec:
    """A recorded module inside another's record: its class and its own record."""
    name = recorded_name(module)
    if name is None:
        raise CheckpointError(
            f"bnfold cannot record a {type(module).__name__}; save the whole module, torch.save(folded)"
        )
    return {"class": name, "spec": _RECORDED[name].to_record(module)}


def _rebuilt(record: Spec, replaced: nn.Module) -> nn.Module:
    return recorded_class(str(record["class"]), "the record").from_record(record["spec"], replaced)


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
    Contiguous,
    to_record=lambda m: {
        "memory_format": cast(Contiguous, m).memory_format,
        "inner": None if cast(Contiguous, m).inner is None else _record_of(cast(nn.Module, cast(Contiguous, m).inner)),
    },
    from_record=lambda spec, replaced: Contiguous(
        str(spec["memory_format"]), None if spec.get("inner") is None else _rebuilt(spec["inner"], replaced)
    ),
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


def recorded_class(name: str, where: str) -> RecordedClass:
    entry = _RECORDED.get(name)
    if entry is None:
        raise CheckpointError(f"{where} names a module class bnfold does not know, {name!r}: is bnfold up to date?")
    return entry


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
        from .. import __version__

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


def has_tensor(module: nn.Module, name: str) -> bool:
    """Whether ``module`` holds a tensor ``name`` (a parameter, a buffer, or a parametrized one)."""
    if parametrize.is_parametrized(module, name):
        return True
    return isinstance(module._parameters.get(name), Tensor) or isinstance(module._buffers.get(name), Tensor)


@dataclass(frozen=True)
class _Changed:
    """What changed at one module of the folded model: it replaced a module of class ``was``; or it gained a
    bias, the parametrization steps ``steps`` ((tensor, step)), neutral ``buffers`` ((name, "ones"/"zeros"))."""

    was: type[nn.Module] | None = None
    bias: bool = False
    steps: tuple[tuple[str, nn.Module], ...] = ()
    buffers: tuple[tuple[str, str], ...] = ()


_UNCHANGED = _Changed()


class _Walk:
    """The modules of a folded model, path by path in ``named_modules`` order (every alias), without what lies
    inside a replacement (but with the modules it carries over under their own names, its ``survivors``) and
    without parametrization steps (described with their owner)."""

    def __init__(self) -> None:
        # replaced paths -> the children the replacement carries over under their own names (``survivors``, as
        # a MergedConv keeps the modules around its branches): what else is under them belongs to the replacement
        self.inside: dict[str, tuple[str, ...]] = {}

    def covered(self, path: str) -> bool:
        if "parametrizations" in path.split("."):
            return True
        for prefix, survivors in self.inside.items():
            if path.startswith(prefix + "."):
                rest = path[len(prefix) + 1 :]
                if not any(rest == s or rest.startswith(s + ".") for s in survivors):
                    return True
        return False

    def record(self, folded: nn.Module, changed: Callable[[str, nn.Module], _Changed]) -> FoldRecord:
        """The record of ``folded``, given what ``changed`` at each path."""
        replaced: list[Replacement] = []
        biases: list[AddedBias] = []
        added: list[AddedParametrization] = []
        buffers: list[NeutralBuffer] = []
        for path, module in folded.named_modules(remove_duplicate=False):
            if self.covered(path):
                continue
            change = changed(path, module)
            where = f"'{path}'" if path else "the model"
            if change.was is not None:
                name = recorded_name(module)
                if name is None:
                    raise CheckpointError(
                        f"{where} was {change.was.__name__} and is now {type(module).__name__}, which bnfold cannot "
                        "record (a replacement from a custom rule?); save the whole module instead, "
                        "torch.save(folded) (--save-module on the command line)"
                    )
                replaced.append(Replacement(path, change.was.__name__, name, _RECORDED[name].to_record(module)))
                self.inside[path] = tuple(getattr(module, "survivors", ()))
                continue
            bias = module._parameters.get("bias")
            if change.bias and isinstance(bias, Tensor):
                biases.append(AddedBias(path, list(bias.shape)))
            for tensor, step in change.steps:
                name = recorded_name(step)
                if name is None:
                    raise CheckpointError(
                        f"{where}: a {type(step).__name__} parametrization of {tensor} was added, which bnfold "
                        "cannot record; save the whole module instead, torch.save(folded)"
                    )
                added.append(AddedParametrization(path, tensor, name, _RECORDED[name].to_record(step)))
            buffers.extend(NeutralBuffer(f"{path}.{b}" if path else b, value) for b, value in change.buffers)
        return FoldRecord(type(folded).__name__, tuple(replaced), tuple(biases), tuple(added), tuple(buffers))


def _steps(module: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(tensor, index, step) for each parametrization step of ``module``, in order."""
    found: list[tuple[str, int, nn.Module]] = []
    for tensor in getattr(module, "parametrizations", {}):
        steps = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor])
        found.extend((tensor, index, step) for index, step in enumerate(steps))
    return found


def record_of_edits(log: EditLog, folded: nn.Module) -> FoldRecord:
    """What folding changed in the structure of ``folded``, from the log of the edits that folded it (see
    :func:`bnfold.apply.surgery.copy_and_fold`): the same record as :func:`describe_fold` gives, without an
    unfolded model to compare with.

    >>> from bnfold.apply.edits import places
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    >>> log = EditLog(undoable=False)
    >>> log.map_bias(m[0], torch.ones(8), torch.zeros(8))
    >>> log.replace(m[1], nn.Identity(), places(m.modules())[id(m[1])])
    >>> record = record_of_edits(log, m)
    >>> [(r.path, r.was, r.module) for r in record.replaced], [b.path for b in record.biases]
    ([('1', 'BatchNorm2d', 'Identity')], ['0'])
    """
    was: dict[int, nn.Module] = {}  # replacement -> the module it finally stands for
    biases: set[int] = set()
    steps: set[int] = set()
    neutral: dict[int, dict[str, str]] = {}
    for change in log.changes:
        if isinstance(change, Replaced):
            was[id(change.new)] = was.get(id(change.old), change.old)
        elif isinstance(change, BiasAdded):
            biases.add(id(change.layer))
        elif isinstance(change, ParametrizationAppended):
            steps.add(id(change.step))
        elif isinstance(change, TensorsSet):
            neutral.setdefault(id(change.module), {}).update(change.neutral)

    def changed(path: str, module: nn.Module) -> _Changed:
        key = id(module)
        old = was.get(key)
        if old is not None and layer_type(old) is not layer_type(module):
            return _Changed(was=layer_type(old))
        if key not in biases and key not in neutral and not steps:
            return _UNCHANGED
        return _Changed(
            bias=key in biases,
            steps=tuple((tensor, step) for tensor, _, step in _steps(module) if id(step) in steps),
            buffers=tuple(sorted(neutral.get(key, {}).items())),
        )

    return _Walk().record(folded, changed)


def describe_fold(original: nn.Module, folded: nn.Module) -> FoldRecord:
    """What folding changed in the structure of ``folded``, found by comparing it with ``original`` (the model
    it was folded from, or any unfolded model of the same architecture). When bnfold folds, the log of its
    edits gives the same record without the comparison (:func:`record_of_edits`).

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

    def changed(path: str, module: nn.Module) -> _Changed:
        old = before.get(path)
        if old is None:
            where = f"'{path}'" if path else "the model"
            raise CheckpointError(
                f"{where} ({type(module).__name__}) is not in the unfolded {type(original).__name__}: is it the "
                "same architecture?"
            )
        if layer_type(old) is not layer_type(module):
            return _Changed(was=layer_type(old))
        return _Changed(
            bias="bias" in module._parameters and _has_weight(module) and not has_tensor(old, "bias"),
            steps=tuple((t, step) for t, index, step in _steps(module) if index >= _parametrization_count(old, t)),
            buffers=tuple(_neutral_buffers(old, module)),
        )

    walk = _Walk()
    record = walk.record(folded, changed)
    after = {path for path, _ in folded.named_modules(remove_duplicate=False)}
    missing = [p for p in before if p not in after and not walk.covered(p) and p not in walk.inside]
    if missing:
        raise CheckpointError(
            f"'{missing[0]}' of the unfolded {type(original).__name__} is not in the folded one: is it the same "
            "architecture?"
        )
    return record


def _has_weight(module: nn.Module) -> bool:
    """Whether ``module`` has a weight: a parameter, a parametrized one, or one a pre-hook recomputes (pruning,
    the older weight_norm), without computing it."""
    return has_tensor(module, "weight") or isinstance(vars(module).get("weight"), Tensor)


def _neutral_buffers(old: nn.Module, module: nn.Module) -> list[tuple[str, str]]:
    """The buffers of ``module`` kept out of the state_dict that hold ones or zeros, where ``old`` held
    something else."""
    found: list[tuple[str, str]] = []
    for name in sorted(module._non_persistent_buffers_set):
        new, previous = module._buffers.get(name), old._buffers.get(name)
        if not isinstance(new, Tensor) or not isinstance(previous, Tensor) or new.shape != previous.shape:
            continue
        if torch.equal(new.cpu(), previous.cpu()):
            continue
        for value, neutral in (("ones", torch.ones_like(new)), ("zeros", torch.zeros_like(new))):
            if torch.equal(new, neutral):
                found.append((name, value))
    return found
