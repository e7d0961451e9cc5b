"""What each call of a ``torch.fx`` trace may do to the memory of its inputs.

An execution trace sees storage and version counters, so it knows when a tensor
is written in place through any alias of its memory. A symbolic trace has no
tensors: ``h.permute(...)`` and ``h`` are different nodes that share memory, and
``h.relu_()`` changes both. So each call of a symbolic trace gets an
:class:`Effect`:

- ``aliases``: its output may share memory with an input (a view, ``detach``,
  an in-place op returning its input, ``nn.Identity``, an op bnfold does not
  know);
- ``writes``: it may write an input in place (a method or function ending in
  ``_``, ``x += y``, ``x[i] = v``, ``inplace=True``, ``out=``, an op bnfold does
  not know, a module whose class is not torch's).

The op registry (:mod:`bnfold.rules.ops`, its ``memory`` column) names what is
known to be safe (new memory and no write, or a view and no write); anything
else is taken to alias and to write. :func:`changed_after` then asks
whether any tensor sharing memory with a value may be written after a call
read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from torch import nn

from ..rules.classes import type_chain
from ..rules.ops import Memory, memory_of, registry
from .graph import DataFlowGraph, TensorKey, ValueKey

__all__ = ["Effect", "NO_EFFECT", "effect_of_function", "effect_of_module", "changed_after", "changed_later"]


class Effect(NamedTuple):
    aliases: bool
    writes: bool


NO_EFFECT = Effect(aliases=False, writes=False)
_VIEW = Effect(aliases=True, writes=False)
_UNKNOWN = Effect(aliases=True, writes=True)
_EFFECTS: dict[Memory, Effect] = {"fresh": NO_EFFECT, "view": _VIEW, "writes": _UNKNOWN}

# Python's binary operators: torch.fx records ``x += y`` as ``operator.add(x, y)``, the same as ``x + y``, so
# each may write its left operand and hand it back.
_AUGMENTABLE_OPERATORS = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift"}
)


def _last_name(name: str) -> str:
    return name.rpartition(".")[2]


def effect_of_function(name: str, kwargs: Mapping[str, Any], python_operator: bool = False) -> Effect:
    """The effect of a function or method call of a symbolic trace, by its recorded name and keywords;
    ``python_operator``: the call is one of Python's ``operator`` functions (``x + y`` or ``x += y``)."""
    last = _last_name(name)
    if last.endswith("_") and not last.endswith("__"):
        return _UNKNOWN  # an in-place op returns its input, written
    if python_operator and last in _AUGMENTABLE_OPERATORS:
        return _UNKNOWN
    if kwargs.get("inplace") is True or kwargs.get("out") is not None:
        return _UNKNOWN
    return _EFFECTS[memory_of(last)]


def effect_of_module(module: nn.Module) -> Effect:
    """The effect of a module call of a symbolic trace: a leaf of torch.nn or a layer or norm bnfold knows.
    A module built with ``inplace=True`` writes its input; a class from outside torch (a library's or the
    user's own layer) may do anything in its forward; the registry says what the others do (identities and
    reshapes hand on a view)."""
    if getattr(module, "inplace", False) is True or not type(module).__module__.startswith("torch."):
        return _UNKNOWN
    modules = registry()[1]
    entry = next((modules[kind] for kind in type_chain(module) if kind in modules), None)
    if entry is not None and entry.memory == "view":
        return _VIEW
    return NO_EFFECT


def _sharing(graph: DataFlowGraph, key: ValueKey) -> set[ValueKey]:
    """Every value that may share memory with ``key``: up and down through calls that may alias."""
    group = {key}
    todo = [key]
    while todo:
        value = todo.pop()
        linked: list[Iterable[ValueKey]] = []
        producer = graph.producer.get(value)
        if producer is not None and graph.effects.get(producer, _UNKNOWN).aliases:
            linked.append(graph.calls[producer].inputs)
        for index in graph.consumers.get(value, []):
            if graph.effects.get(index, _UNKNOWN).aliases:
                linked.append(graph.calls[index].outputs)
        for values in linked:
            for other in values:
                if other not in group:
                    group.add(other)
                    todo.append(other)
    return group


def changed_after(graph: DataFlowGraph, key: ValueKey, reader: int) -> bool:
    """Whether a call after ``reader`` (in the trace's order, which is the order of execution) may write a
    tensor that shares memory with ``key``."""
    for value in _sharing(graph, key):
        for index in graph.consumers.get(value, []):
            if index > reader and graph.effects.get(index, _UNKNOWN).writes:
                return True
    return False


def changed_later(graph: DataFlowGraph, key: ValueKey, reader: int) -> bool:
    """Whether the tensor behind ``key`` may be changed in place after ``reader`` read it (through it
    or any alias of the same storage). A symbolic trace has no storage: any other reader of the value
    counts, and so does any later call that may write a value that may share its memory."""
    if graph.traced_with != "example_inputs":
        return any(i != reader for i in graph.consumers.get(key, [])) or changed_after(graph, key, reader)
    if not isinstance(key, TensorKey) or key.storage is None:
        return True
    return (
        graph.storage_writes.get(key.storage, 0) > key.writes or graph.final_versions.get(key.serial, 0) > key.version
    )
