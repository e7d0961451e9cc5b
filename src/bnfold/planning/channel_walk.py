"""The channel walker: from a value up to the call that produces it, or down to every call that reads it,
through the ops of the registry (:mod:`bnfold.rules.ops`), following the channel axis.

Every pass that moves a per-channel transform across ops walks here: a backward fold (a norm's
``scale * x + shift`` into the layer before it), a forward fold (into the layers after it), a channel-wise
constant, a branch of a sum. What must pass is a parameter, a set of :data:`~bnfold.rules.ops.Transform`:
``NORM_FOLD`` (a scale, its sign and a shift) for a norm, ``POSITIVE_SCALE`` for moving a positive scale
from a layer's output channels to its readers' input channels. A walk goes through every op the registry
can follow and reports where and why it stops; :meth:`Upward.blocked` and :func:`follow_down` then say
which step stops a given set of transforms, so a pass decides in its own order what to report first.

A step is one call with one tensor in and one out whose entry says where the channels go (``maps``); with
no recorded shapes (a ``torch.fx`` trace) only entries whose ``without_shapes`` lets them through. A pass
may add steps of its own (``look``): a norm or a constant already folded into the same layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from ..discover.graph import Call, DataFlowGraph, ValueKey
from ..rules.ops import AxisMove, OpEntry, Transform, axis_before, entry_for

__all__ = [
    "END",
    "End",
    "Look",
    "Step",
    "Upward",
    "Reached",
    "Blocked",
    "Followed",
    "walk_up",
    "walk_down",
    "axis_up",
    "axis_down",
    "follow_down",
    "first_block",
    "hands_on_values",
]


class End:
    """What a ``look`` hook returns for a call the walk must not go through."""

    def __repr__(self) -> str:
        return "END"


END = End()

# A pass's own view of a call: the input to follow through it (every transform passes, the axis stays), END
# (the walk stops there), or None (the registry decides).
Look = Callable[[Call], ValueKey | End | None]

# What a step stands for when a pass walks through it on its own terms (see ``look``).
_FOLDED = OpEntry("identity")


@dataclass(frozen=True)
class Step:
    """One call a walk went through: its registry entry, and its output on the path (read by call ``reader``
    walking up; ``None`` walking down, where the walk follows every reader)."""

    call: Call
    entry: OpEntry
    value: ValueKey
    reader: int | None

    @property
    def folded(self) -> bool:
        """A step a pass walks through on its own terms (a norm already folded into the layer)."""
        return self.entry is _FOLDED

    @property
    def input(self) -> ValueKey:
        return self.call.inputs[0]


@dataclass(frozen=True)
class Upward:
    """Where a walk up ended: ``source`` produced ``value``, read by call ``reader`` on the path (``None``:
    nothing the trace saw produced it); ``steps`` lie between, nearest the start first; ``stop`` says why
    the walk did not go through ``source``."""

    source: Call | None
    value: ValueKey
    reader: int
    steps: tuple[Step, ...]
    stop: str

    def shared(self, graph: DataFlowGraph) -> Step | None:
        """The first step (from the start) whose output something off the path also reads."""
        for step in self.steps:
            if graph.consumers.get(step.value, []) != [step.reader]:
                return step
        return None

    def blocked(self, carried: frozenset[Transform]) -> tuple[Step, str] | None:
        """The first step (from the start) that does not let ``carried`` through, and why."""
        return first_block(self.steps, carried)


@dataclass(frozen=True)
class Reached:
    """A reader a walk down did not go through. ``stop`` says why the walk stopped there: ``None`` for a
    call outside the registry (a layer, say: the pass decides), else ``unread`` (nothing reads ``value``;
    ``call`` is None), ``output`` (a model output), ``tangled`` (it reads the value twice, not as its first
    input, or returns several tensors), ``shared`` (a module called more than once), ``needs_shapes`` (an
    op that can move the axis, without recorded shapes) or ``blocked`` (it does not let the carried
    transforms through; ``why``)."""

    call: Call | None
    value: ValueKey
    path: tuple[Step, ...]  # from the start down to it
    stop: Literal["unread", "output", "tangled", "shared", "needs_shapes", "blocked"] | None = None
    why: str = ""


@dataclass(frozen=True)
class Blocked:
    """The step that stops a walk's transform or loses its channels, and why (``on_axis``: it moves or
    mixes the channels, rather than letting the transform through)."""

    step: Step
    reason: str
    on_axis: bool


@dataclass(frozen=True)
class Followed:
    """The channel axis where a path ends (``None`` without shapes), and whether the path flattened it into
    channel-major blocks (``x.flatten(1)``)."""

    axis: int | None
    flattened: bool


def _entry(call: Call, graph: DataFlowGraph) -> tuple[OpEntry | None, str]:
    """The entry a walk steps through ``call`` by, or ``None`` and the reason."""
    if len(call.outputs) != 1 or len(call.inputs) != 1:
        return None, "does not map one tensor to one tensor"
    entry = entry_for(call)
    if entry is None or entry.maps is None:
        return None, "is not an op the walk goes through"
    if not graph.has_shapes and entry.without_shapes != "pass":
        return None, "can move the channels, and there are no recorded shapes"
    return entry, ""


def walk_up(
    graph: DataFlowGraph,
    value: ValueKey,
    reader: int,
    carried: frozenset[Transform] | None = None,
    look: Look | None = None,
) -> Upward:
    """Walk up from ``value`` (read by call ``reader``) through the ops of the registry to the call that
    produces what they pass on. With ``carried``, a step that does not let those transforms through ends
    the walk too. Nothing is checked about who else reads the values on the way: see :meth:`Upward.shared`.

    >>> import torch
    >>> from torch import nn
    >>> from bnfold.discover.tracing import trace_execution
    >>> from bnfold.rules.ops import POSITIVE_NORM_FOLD, POSITIVE_SCALE
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    >>> g = trace_execution(m, (torch.randn(1, 3, 4, 4),), {nn.Conv2d, nn.BatchNorm2d}, set())
    >>> norm = g.calls[-2]
    >>> walk = walk_up(g, norm.inputs[0], norm.index, POSITIVE_SCALE)
    >>> walk.source.target, [step.call.target for step in walk.steps]
    ('0', ['1'])
    >>> walk_up(g, norm.inputs[0], norm.index, POSITIVE_NORM_FOLD).stop[-16:]
    'a shift does not'
    """
    steps: list[Step] = []
    seen: set[int] = set()
    while True:
        index = graph.producer.get(value)
        if index is None:
            return Upward(None, value, reader, tuple(steps), "nothing the trace saw produces it")
        source = graph.calls[index]
        if index in seen:  # a cycle cannot happen in a trace; stop rather than loop
            return Upward(source, value, reader, tuple(steps), "is on the path twice")
        seen.add(index)
        own = look(source) if look is not None else None
        if isinstance(own, End):
            return Upward(source, value, reader, tuple(steps), "is where the pass stops")
        if own is not None:
            steps.append(Step(source, _FOLDED, value, reader))
            value, reader = own, index
            continue
        entry, why = _entry(source, graph)
        if entry is None:
            return Upward(source, value, reader, tuple(steps), why)
        step = Step(source, entry, value, reader)
        if carried is not None:
            reason = entry.blocks(source, carried)
            if reason:
                return Upward(source, value, reader, tuple(steps), reason)
        steps.append(step)
        value, reader = source.inputs[0], index


def walk_down(
    graph: DataFlowGraph,
    value: ValueKey,
    carried: frozenset[Transform] | None = None,
    through_shared: bool = False,
) -> Iterator[Reached]:
    """Walk down from ``value`` to every call that reads it, fanning out through the ops of the registry;
    yield each reader it does not go through (lazily, depth first, so a pass may stop at the first).
    ``through_shared``: go through an op module called more than once too (each call is walked on its own;
    a pass that moves a per-call transform may, one that changes the module may not).

    >>> import torch
    >>> from torch import nn
    >>> from bnfold.discover.tracing import trace_execution
    >>> from bnfold.rules.ops import POSITIVE_SCALE
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    >>> g = trace_execution(m, (torch.randn(1, 3, 4, 4),), {nn.Conv2d}, set())
    >>> [(r.call.target, len(r.path)) for r in walk_down(g, g.calls[1].outputs[0], POSITIVE_SCALE)]
    [('2', 1)]
    """
    frontier: list[tuple[ValueKey, tuple[Step, ...]]] = [(value, ())]
    seen: set[int] = set()
    while frontier:
        value, path = frontier.pop()
        readers = graph.consumers.get(value, [])
        if not readers:
            yield Reached(None, value, path, "unread")
        for index in readers:
            reader = graph.calls[index]
            if reader.kind == "output":
                yield Reached(reader, value, path, "output")
                continue
            if index in seen:
                continue
            seen.add(index)
            if reader.inputs.count(value) != 1 or reader.inputs[0] != value or len(reader.outputs) != 1:
                yield Reached(reader, value, path, "tangled")
                continue
            entry = entry_for(reader)
            if entry is None or entry.maps is None or len(reader.inputs) != 1:
                yield Reached(reader, value, path)
                continue
            if not through_shared and reader.module is not None and len(graph.calls_of(reader.module)) > 1:
                yield Reached(reader, value, path, "shared")
                continue
            if not graph.has_shapes and entry.without_shapes == "stop":
                yield Reached(reader, value, path, "needs_shapes")
                continue
            reason = entry.blocks(reader, carried) if carried is not None else None
            if reason:
                yield Reached(reader, value, path, "blocked", reason)
                continue
            frontier.append((reader.outputs[0], (*path, Step(reader, entry, reader.outputs[0], None))))


def first_block(steps: tuple[Step, ...], carried: frozenset[Transform]) -> tuple[Step, str] | None:
    """The first of ``steps`` that does not let ``carried`` through, and why."""
    for step in steps:
        if step.folded:
            continue
        reason = step.entry.blocks(step.call, carried)
        if reason:
            return step, reason
    return None


def axis_up(steps: tuple[Step, ...], axis: int) -> int | Step:
    """The axis that channel ``axis`` at the start of a walk up comes from at its source end, or the step
    that mixes it with another axis."""
    for step in steps:
        if step.folded:
            continue
        before = axis_before(step.call, axis, step.entry)
        if before is None:
            return step
        axis = before
    return axis


def axis_down(steps: tuple[Step, ...], axis: int) -> int | Step:
    """Where channel ``axis`` of the first step's input lands after the last (``steps`` in the order they
    run), unflattened; or the step that mixes or flattens it."""
    for step in steps:
        if step.folded:
            continue
        move = step.entry.maps(step.call, axis) if step.entry.maps is not None else None
        if move is None or move.flattened:
            return step
        axis = move.axis
    return axis


def follow_down(steps: tuple[Step, ...], axis: int | None, carried: frozenset[Transform]) -> Followed | Blocked:
    """Follow channel ``axis`` (``None`` without shapes) down ``steps`` (in the order they run) and check at
    each that ``carried`` passes: where the axis ends and whether it was flattened, or the first step that
    breaks either."""
    flattened = False
    for step in steps:
        entry, call = step.entry, step.call
        if axis is None:  # no shapes: only steps that cannot move the axis, and a full Flatten
            if flattened and entry.kind == "pooled":
                return Blocked(step, "pools the flattened channels", on_axis=True)
            flattened = flattened or entry.without_shapes == "flatten"
        elif flattened:
            if call.input_shapes[0] != call.output_shapes[0]:
                return Blocked(step, "reshapes the flattened channels", on_axis=True)
        else:
            move: AxisMove | None = entry.maps(call, axis) if entry.maps is not None else None
            if move is None:
                return Blocked(step, entry.mixes, on_axis=True)
            axis, flattened = move.axis, move.flattened
        reason = entry.blocks(call, carried)
        if reason:
            return Blocked(step, reason, on_axis=False)
    return Followed(axis, flattened)


def hands_on_values(call: Call) -> bool:
    """Whether ``call`` hands on its one input's values unchanged, in the same shape (nn.Identity, Dropout
    in eval mode, ``contiguous``, ``clone``): a branch of a sum may run through it."""
    entry = entry_for(call)
    if entry is None or entry.kind not in ("identity", "kept") or len(call.inputs) != 1 or len(call.outputs) != 1:
        return False
    if call.inputs == call.outputs:
        return False  # handed on as the same tensor: the trace shows no new value to walk through
    module = call.module
    if module is not None and (module._forward_hooks or module._forward_pre_hooks):
        return False  # a hook may change what it hands on
    shapes = (call.input_shapes[0], call.output_shapes[0]) if call.input_shapes and call.output_shapes else None
    if shapes is None or shapes[0] is None or shapes[0] != shapes[1]:
        return False
    return entry.blocks(call, frozenset({"scale", "sign", "shift", "permutation"})) is None
