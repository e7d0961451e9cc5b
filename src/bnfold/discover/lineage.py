"""What each output of one forward pass was computed from, for the output check.

- An integer or boolean output (class indices, labels, masks) hides how close its decision was, and a wrong
  fold may leave it unchanged on the example inputs: the check compares the floating-point tensors it was
  computed from. Every op that makes a non-float tensor records the floats among its inputs and the sources of
  its non-float inputs, so each integer output carries the floats behind it (at most ``MAX_SOURCES``).
- A float output's rounding error comes from the values that entered the op that made it: ``relu(x)`` of large
  ``x`` may be small and still carry the rounding of ``x``. The inputs of each op are held until its result is
  read by another op (or freed), so at the end each output still has the inputs of its last op, and the check
  can scale its tolerance with their magnitude.

The floats behind integers are followed through every op the function mode sees, inside modules too, so that
a run of the original (traced) and one of the folded model (a plain :class:`LineageMode`) see the same ops
wherever folding did not change them. Magnitudes come from the ops and module calls the tracer records.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .nested import leaves

__all__ = ["Sources", "Lineage", "LineageMode", "MAX_SOURCES"]


@dataclass(frozen=True)
class Sources:
    """Copies of the floating-point tensors an integer output was computed from, in the order they were made.
    ``complete``: they are all of them (none was dropped, none changed in place before the end of the run)."""

    tensors: tuple[Tensor, ...]
    complete: bool


MAX_SOURCES = 8  # the floats kept behind one integer tensor (the first ones, in the order they were made)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be written)
        return -1


class Lineage:
    """Bookkeeping for one run: call :meth:`observe` for every op, then ask about the outputs.

    ``magnitudes``: also hold each op's inputs until its result is read (for the tolerance of float outputs);
    ``constants``: ids of the model's parameters and buffers, which are not values flowing through it.
    """

    def __init__(self, magnitudes: bool = False, constants: Iterable[int] = ()) -> None:
        self.magnitudes = magnitudes
        self.constants = set(constants)
        # id(non-float tensor) -> (ref, (its float sources as (tensor, version at the time), whether that is all))
        self.sources: dict[int, tuple[weakref.ReferenceType[Tensor], tuple[tuple[tuple[Tensor, int], ...], bool]]] = {}
        # id(float tensor) -> (ref, the inputs of the op that made it)
        self.inputs: dict[int, tuple[weakref.ReferenceType[Tensor], tuple[Tensor, ...]]] = {}

    def _entry(self, table: dict[int, Any], t: Tensor) -> Any:
        entry = table.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def _remember(self, table: dict[int, Any], t: Tensor, value: Any) -> None:
        key = id(t)

        def forget(ref: weakref.ReferenceType[Tensor], table: dict[int, Any] = table, key: int = key) -> None:
            entry = table.get(key)
            if entry is not None and entry[0] is ref:
                del table[key]

        table[key] = (weakref.ref(t, forget), value)

    def observe(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ins: list[Tensor] | None = None,
        hold: bool = False,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` and record what its results come from (``ins``: the tensors among its
        arguments, when the caller has them). With ``hold`` (and ``magnitudes``), the op counts as the last one
        that made its float results; inside a module only integer results are followed (the module's call
        itself is the op that makes its output, see :meth:`made`)."""
        out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            if _is_float(out) and not (hold and self.magnitudes):
                return out
            outs = [out]
        elif isinstance(out, (tuple, list)):
            outs = _tensors(out)
        else:
            return out  # a shape, a number, a bool: nothing flows on
        if ins is None:
            ins = _tensors(args) + (_tensors(kwargs) if kwargs else [])
        for o in outs:
            if not _is_float(o):
                self._derive(o, ins)
        if hold and self.magnitudes:
            self.made(outs, ins)
        return out

    def made(self, outs: list[Tensor], ins: list[Tensor]) -> None:
        """``outs`` were made from ``ins`` by one op (or one module call): for the magnitudes of float outputs."""
        if not self.magnitudes:
            return
        for o in outs:
            if _is_float(o):
                self._hold(o, ins)
        for t in ins:  # read by this op: the op that made it is no longer the last one
            if not any(t is o for o in outs) and self._entry(self.inputs, t) is not None:
                del self.inputs[id(t)]

    def _hold(self, o: Tensor, ins: list[Tensor]) -> None:
        held = [t for t in ins if t is not o and _is_float(t) and id(t) not in self.constants]
        if any(t is o for t in ins):  # in place: what entered the op that made it still flows in
            entry = self._entry(self.inputs, o)
            if entry is not None:
                held = [*entry[1], *held]
        self._remember(self.inputs, o, tuple(held))

    def _derive(self, o: Tensor, ins: list[Tensor]) -> None:
        found: dict[int, tuple[Tensor, int]] = {}
        complete = True
        for t in ins:
            if _is_float(t):
                found.setdefault(id(t), (t, _version(t)))
            else:
                entry = self._entry(self.sources, t)
                if entry is not None:
                    complete = complete and entry[1][1]
                    for source in entry[1][0]:
                        found.setdefault(id(source[0]), source)
        if found:
            kept = tuple(list(found.values())[:MAX_SOURCES])
            self._remember(self.sources, o, (kept, complete and len(kept) == len(found)))

    # -- what the outputs came from -----------------------------------------------------------------
    def output_sources(self, outputs: Any) -> dict[str, Sources]:
        """For each non-float output tensor (by path) computed from floats: copies of those floats."""
        found: dict[str, Sources] = {}
        for path, leaf in leaves(outputs):
            if not isinstance(leaf, Tensor) or _is_float(leaf):
                continue
            entry = self._entry(self.sources, leaf)
            if entry is None:
                continue
            sources, complete = entry[1]
            if any(_version(t) != version for t, version in sources):
                found[path] = Sources((), False)  # changed in place since: the values it came from are gone
            else:
                found[path] = Sources(tuple(t.detach().clone() for t, _ in sources), complete)
        return found

    def output_magnitudes(self, outputs: Any) -> dict[str, float]:
        """For each float output tensor (by path): the largest magnitude among the inputs of the op that made
        it, when that op is known."""
        found: dict[str, float] = {}
        for path, leaf in leaves(outputs):
            if not isinstance(leaf, Tensor) or not _is_float(leaf):
                continue
            entry = self._entry(self.inputs, leaf)
            if entry is None:
                continue
            magnitude = 0.0
            for t in entry[1]:
                if t.numel():
                    values = t.detach().abs()
                    finite = values[torch.isfinite(values)]
                    if finite.numel():
                        magnitude = max(magnitude, float(finite.max()))
            found[path] = magnitude
        return found


class LineageMode(TorchFunctionMode):
    """A function mode that feeds every op to a :class:`Lineage` (for runs that are not traced)."""

    def __init__(self, lineage: Lineage) -> None:
        super().__init__()
        self.lineage = lineage

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        return self.lineage.observe(func, args, kwargs or {})
