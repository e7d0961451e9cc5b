"""The record of a folded structure: what folding changed in a model, module by module, as JSON.

The record is found by comparing the folded model with an unfolded one of the same architecture, module by
module: which paths now hold another module (``nn.Identity``, bnfold's ``FoldedNormAct``, ...), which layers
gained a bias, which parametrizations were appended (a folded scale behind ``parametrize``), and which
non-persistent buffers were set to a neutral value (they are not in a state_dict).

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
from .surgery import ChannelAffine, ChannelScale

__all__ = [
    "FoldRecord",
    "Replacement",
    "AddedBias",
    "AddedParametrization",
    "NeutralBuffer",
    "RecordedClass",
    "describe_fold",
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
            name = recorded_name(module)
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
            and not has_tensor(old, "bias")
        ):
            biases.append(AddedBias(path, list(bias.shape)))
        for tensor in getattr(module, "parametrizations", {}):
            steps = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor])
            for index, step in enumerate(steps):
                if index < _parametrization_count(old, tensor):
                    continue
                name = recorded_name(step)
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
