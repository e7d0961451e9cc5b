"""The data-flow graph of one forward pass: who feeds whom.

Registration order (``_modules``) says nothing about data flow; only running or tracing the model does
(:mod:`bnfold.tracing`). A value is a tensor object *and* the state of the memory behind it: an in-place op
changes a tensor without making a new one, and it may do so through any alias of the same storage, so a
value's key holds the count of writes its storage had seen.

The graph answers: which call produced each value, which calls consume it, how many times each module ran,
and whether a layer's parameters are used anywhere but in its own call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from .lineage import Sources

if TYPE_CHECKING:
    from .aliasing import Effect

__all__ = ["ValueKey", "Shape", "TensorKey", "Call", "TensorRef", "Span", "DataFlowGraph", "readable_op_names"]

ValueKey = Hashable
Shape = tuple[int, ...]


class TensorKey(NamedTuple):
    """A value seen by the execution tracer: one tensor object in one state of its memory."""

    serial: int  # the tensor object
    version: int  # its version counter
    storage: int | None  # the storage behind it (None: a tensor without one, e.g. sparse)
    writes: int  # how many writes that storage had seen, through any alias


@dataclass
class Call:
    """One step of the forward pass: a module call, a tensor op, the model's inputs, or its outputs."""

    index: int
    kind: str  # "input" | "module" | "function" | "output"
    target: str  # qualified module name, or the op's name
    module: nn.Module | None
    inputs: list[ValueKey] = field(default_factory=list)
    outputs: list[ValueKey] = field(default_factory=list)
    input_shapes: list[Shape | None] = field(default_factory=list)
    output_shapes: list[Shape | None] = field(default_factory=list)
    # a function call's arguments, tensors replaced by TensorRef(key) (execution tracing only)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    # a recorded module call's inputs and outputs laid out in memory (see memory_format); execution tracing only
    input_formats: list[str] = field(default_factory=list)
    output_formats: list[str] = field(default_factory=list)

    @property
    def input_ndims(self) -> list[int | None]:
        return [None if s is None else len(s) for s in self.input_shapes]

    @property
    def output_ndims(self) -> list[int | None]:
        return [None if s is None else len(s) for s in self.output_shapes]


@dataclass(frozen=True)
class TensorRef:
    """Stands for a tensor argument in a recorded call."""

    key: ValueKey


@dataclass(frozen=True)
class Span:
    """One module call of the forward pass, outside any module recorded as a whole: the calls it made
    (``calls[start:end]``, its own included when it is recorded) and the values it read and returned."""

    module: nn.Module
    start: int
    end: int
    inputs: list[ValueKey]
    outputs: list[ValueKey]


@dataclass
class DataFlowGraph:
    """The calls of one forward pass and the values that flow between them."""

    calls: list[Call] = field(default_factory=list)
    producer: dict[ValueKey, int] = field(default_factory=dict)
    consumers: dict[ValueKey, list[int]] = field(default_factory=lambda: defaultdict(list))
    module_calls: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    foreign_uses: dict[int, str] = field(default_factory=dict)
    traced_with: str = "example_inputs"
    # execution tracing: a copy of what the model returned, and for the output check, the floats behind each
    # integer output and the magnitude of the values entering the op that made each float output (by path)
    reference_outputs: Any = None
    output_sources: dict[str, Sources] = field(default_factory=dict)
    output_magnitudes: dict[str, float] = field(default_factory=dict)
    # values that are a parameter or buffer of the model, with its qualified name
    constants: dict[ValueKey, str] = field(default_factory=dict)
    # execution tracing: the writes each storage had seen when the run ended, and the last version of
    # each tensor object
    storage_writes: dict[int, int] = field(default_factory=dict)
    final_versions: dict[int, int] = field(default_factory=dict)
    # execution tracing: every module call that is not inside a module recorded as a whole
    spans: list[Span] = field(default_factory=list)
    # symbolic tracing: what each call may do to the memory of its inputs (by call index)
    effects: dict[int, Effect] = field(default_factory=dict)

    @property
    def has_shapes(self) -> bool:
        return self.traced_with == "example_inputs"

    def add(
        self,
        kind: str,
        target: str,
        module: nn.Module | None,
        inputs: list[ValueKey],
        outputs: list[ValueKey],
        input_shapes: list[Shape | None] | None = None,
        output_shapes: list[Shape | None] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Call:
        call = Call(
            len(self.calls),
            kind,
            target,
            module,
            inputs,
            outputs,
            input_shapes or [None] * len(inputs),
            output_shapes or [None] * len(outputs),
            args,
            kwargs or {},
        )
        self.calls.append(call)
        # A call that hands back one of its inputs unchanged (same tensor, same version: nn.Identity,
        # dropout in eval mode, x.contiguous() on a contiguous x) is the identity on that value: it is
        # neither a consumer nor a new producer of it, so later readers attach to the original value.
        passthrough = set(inputs) & set(outputs)
        for key in inputs:
            if key not in passthrough:
                self.consumers[key].append(call.index)
        for key in outputs:
            if key not in passthrough:
                self.producer[key] = call.index
        if module is not None and kind == "module":
            self.module_calls[id(module)].append(call.index)
        return call

    def count_call(self, module: nn.Module) -> None:
        """A module that ran without being recorded (inside another recorded module) still counts."""
        self.module_calls[id(module)].append(-1)

    def calls_of(self, module: nn.Module) -> list[int]:
        return self.module_calls.get(id(module), [])


# How PyTorch's internal namespaces are written in its documentation, for messages
_PUBLIC_NAMES = (
    ("_VariableFunctionsClass.", "torch."),
    ("_C._nn.", "torch.nn.functional."),
    ("_C._special.", "torch.special."),
)


def readable_op_names(text: str) -> str:
    """``text`` with the op names bnfold records spelled as users write them.

    >>> readable_op_names("its input comes from '_VariableFunctionsClass.relu'")
    "its input comes from 'torch.relu'"
    """
    for internal, public in _PUBLIC_NAMES:
        text = text.replace(internal, public)
    return text
