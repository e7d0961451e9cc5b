"""Discover who feeds whom: build the :class:`~bnfold.graph.DataFlowGraph` of one forward pass.

Registration order (``_modules``) says nothing about data flow; only running or
tracing the model does. Two tracers build the same :class:`DataFlowGraph`:

- :func:`trace_execution` runs the model once on example inputs, with hooks on
  the modules and a ``TorchFunctionMode`` that sees every tensor op outside the
  recorded modules (functional calls, ``x + y``, indexing, in-place ops). A value
  is a tensor object *and* the state of the memory behind it: an in-place op
  changes a tensor without making a new one, and it may do so through any alias
  of the same storage (a view, ``.detach()``, ``.data``, ``as_strided``, ``set_``,
  a Tensor subclass), most of which have no ``_base`` and some not even the same
  version counter. So every op the mode sees (inside modules too) and every module
  call has the version counters of its tensor arguments compared before and after:
  a write counts against the storage behind the tensor written, and a value's key
  holds the count of its storage. It follows Python control flow as taken.
- :func:`trace_symbolic` uses ``torch.fx`` when there are no example inputs.

The graph answers: which call produced each value, which calls consume it, how
many times each module ran, and whether a layer's parameters are used anywhere
but in its own call.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import TraceError
from ..rules.classes import has_type
from ..rules.ops import function_entry
from .aliasing import NO_EFFECT, effect_of_function, effect_of_module
from .graph import Call, DataFlowGraph, Shape, Span, TensorKey, TensorRef, ValueKey
from .lineage import Lineage
from .memory_layout import memory_format
from .nested import detached_copy, iter_tensors
from .running import inference

__all__ = ["trace_execution", "trace_symbolic", "retrace_symbolic"]


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (a list: the tracer looks at them twice)."""
    if isinstance(obj, Tensor):
        return [obj]
    found: list[Tensor] = []
    for item in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ():
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list, dict)):
            found.extend(_tensors(item))
    return found


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be written)
        return -1


def _own_tensors(module: nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``module`` and its children (layers and norms rarely have children:
    walking their dicts directly is many times cheaper than ``parameters()`` and ``buffers()``)."""
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            found.extend(_own_tensors(child))
    return found


def _applies_own_state(module: nn.Module) -> bool:
    """A module without children that is recorded as a whole would hide what its forward does with its own
    parameters and buffers. A torch class, or a subclass of one (a Conv2d with its own _conv_forward),
    computes like that class, whose entries and reasons name it; a module class of the user's own (a layer
    scale: ``x * self.gamma.view(-1, 1, 1)``) is Python code like a container's forward, so its ops are
    recorded one by one, and a constant it applies may then fold."""
    for kind in type(module).__mro__:
        if kind is nn.Module:
            break
        if kind.__module__.split(".", 1)[0] == "torch":
            return False
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


def _versions(tensors: list[Tensor]) -> list[int]:
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [_version(t) for t in tensors]


def _reads_metadata(name: str) -> bool:
    """Whether an op reads only a tensor's metadata, never its values (the registry's ``metadata`` kind): a
    shape or a dtype does not change when a norm folds, so such a call is not a consumer."""
    entry = function_entry(name)
    return entry is not None and entry.kind == "metadata"


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if name.endswith("__get__"):
        # a property read (x.dtype, x.shape): the descriptor is bound to the func
        descriptor = getattr(func, "__self__", None)
        attr = getattr(descriptor, "__name__", None)
        name = f"Tensor.{attr}" if attr else name[: -len(".__get__")]
    return name.replace("TensorBase.", "Tensor.")


# Ops that read only the shape, dtype or device of some tensor arguments: those arguments are not consumers.
# ``x.reshape_as(other)``: ``other`` is a template; ``torch.zeros_like(x)`` and ``x.new_zeros(...)`` read no
# tensor values at all.
_TEMPLATE_OPS = {"Tensor.reshape_as", "Tensor.view_as", "Tensor.expand_as", "Tensor.type_as"}
_VALUE_FREE_OPS = {
    "_VariableFunctionsClass.zeros_like",
    "_VariableFunctionsClass.ones_like",
    "_VariableFunctionsClass.empty_like",
    "_VariableFunctionsClass.full_like",
    "_VariableFunctionsClass.rand_like",
    "_VariableFunctionsClass.randn_like",
    "_VariableFunctionsClass.randint_like",
    "Tensor.new_zeros",
    "Tensor.new_ones",
    "Tensor.new_empty",
    "Tensor.new_full",
}


def _value_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The arguments of op ``name`` whose values its result depends on."""
    if name in _VALUE_FREE_OPS:
        return ()
    if name in _TEMPLATE_OPS:
        return (args[:1], {k: v for k, v in kwargs.items() if k != "other"})
    return (args, kwargs)


class _ExecutionTracer(TorchFunctionMode):
    """Records module calls (through hooks) and tensor ops (through the function mode) into a graph."""

    def __init__(
        self, model: nn.Module, recorded_types: set[type[nn.Module]], watched_types: set[type[nn.Module]]
    ) -> None:
        super().__init__()
        self.graph = DataFlowGraph(traced_with="example_inputs")
        self.names: dict[int, str] = {}
        for name, module in model.named_modules():
            self.names.setdefault(id(module), name or "<root>")
        self.recorded_types = recorded_types
        self.depth = 0  # > 0 while inside a recorded module: its internals are its own business
        self.recording: nn.Module | None = None  # that recorded module
        self.quiet = 0  # > 0 while bnfold's own bookkeeping runs
        self.stack: list[tuple[nn.Module, bool, list[ValueKey], list[Shape | None], int]] = []
        self.serials: dict[int, tuple[weakref.ReferenceType[Tensor], int]] = {}
        self.storages: dict[int, tuple[weakref.ReferenceType[Any], int]] = {}
        self.writes: dict[int, int] = {}  # storage serial -> writes seen so far
        # (storage, writes) -> the values seen in that state of that storage
        self.values_of_state: dict[tuple[int, int], dict[ValueKey, None]] = {}
        # the writes made during each call being recorded (innermost last)
        self.write_context: list[list[tuple[int, int]]] = []
        self.counter = itertools.count(1)
        self.completed = 0
        self.last_completed = ""
        # tensor id -> qualified name, for every parameter and buffer of the model
        self.constant_names: dict[int, str] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)
        ):
            self.constant_names.setdefault(id(t), name)
        self.lineage = Lineage(magnitudes=True, constants=self.constant_names)
        # tensor id -> module whose parameter or buffer it is, for layers that may be folded into
        self.owned: dict[int, nn.Module] = {}
        self.owned_storages: dict[int, nn.Module] = {}  # the same, by storage: a write may use any alias
        for module in model.modules():
            if has_type(module, watched_types):
                for t in _own_tensors(module):
                    self.owned[id(t)] = module
                    storage = self.storage_serial(t)
                    if storage is not None:
                        self.owned_storages[storage] = module

    # -- value keys -------------------------------------------------------------------------------
    def serial(self, t: Tensor) -> int:
        entry = self.serials.get(id(t))
        if entry is None or entry[0]() is not t:
            entry = (weakref.ref(t), next(self.counter))
            self.serials[id(t)] = entry
        return entry[1]

    def storage_serial(self, t: Tensor) -> int | None:
        """The storage behind ``t``, the same for every alias of it (None when it has none)."""
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or wrapper tensors
            return None
        entry = self.storages.get(id(storage))
        if entry is None or entry[0]() is not storage:
            entry = (weakref.ref(storage), next(self.counter))
            self.storages[id(storage)] = entry
        return entry[1]

    def key(self, t: Tensor) -> ValueKey:
        version = _version(t)
        serial = self.serial(t)
        storage = self.storage_serial(t)
        key = TensorKey(serial, version, storage, 0 if storage is None else self.writes.get(storage, 0))
        if storage is not None:
            self.values_of_state.setdefault((storage, key.writes), {})[key] = None
        constant = self.constant_names.get(id(t))
        if constant is not None:
            self.graph.constants[key] = constant
        if self.graph.final_versions.get(serial, -1) < version:
            self.graph.final_versions[serial] = version
        return key

    def wrote(self, t: Tensor, op: str) -> None:
        """An op wrote into ``t`` (called by :class:`_StorageWrites` for every aliasing write)."""
        storage = self.storage_serial(t)
        if storage is None:
            return
        state = (storage, self.writes.get(storage, 0))
        self.writes[storage] = state[1] + 1
        if self.write_context:
            self.write_context[-1].append(state)
        else:  # a write outside any op the tracer saw: it still reads (and changes) what was there
            self.graph.add("function", op, None, list(self.values_of_state.get(state, ())), [])
        owner = self.owned_storages.get(storage)
        # a module updating its own buffers in its own call (a norm in training mode) is its own business
        if owner is not None and owner is not self.recording:
            self.graph.foreign_uses.setdefault(id(owner), f"{op}, which changes its parameters in place")

    def attach_writes(self, call: Call, writes: list[tuple[int, int]]) -> None:
        """A call that wrote into a storage, through whichever alias, changes every value that lived there:
        it counts as one of their readers (after folding, a layer's output may become the norm's)."""
        for state in writes:
            for key in self.values_of_state.get(state, ()):
                if key not in call.inputs and call.index not in self.graph.consumers[key]:
                    self.graph.consumers[key].append(call.index)

    def settle_versions(self) -> None:
        """Record the writes of every storage and the last version of every tensor still alive."""
        self.graph.storage_writes = dict(self.writes)
        for ref, serial in list(self.serials.values()):
            t = ref()
            if t is not None and serial in self.graph.final_versions:
                self.graph.final_versions[serial] = max(self.graph.final_versions[serial], _version(t))

    def keys(self, obj: Any) -> tuple[list[ValueKey], list[Shape | None]]:
        tensors = list(iter_tensors(obj))
        return [self.key(t) for t in tensors], [tuple(t.shape) for t in tensors]

    def spec(self, obj: Any) -> Any:
        """``obj`` with every tensor replaced by its TensorRef (call before the op runs)."""
        if isinstance(obj, Tensor):
            return TensorRef(self.key(obj))
        if isinstance(obj, (tuple, list)):
            return tuple(self.spec(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.spec(v) for k, v in obj.items()}
        return obj

    # -- module hooks -----------------------------------------------------------------------------
    def is_recorded(self, module: nn.Module) -> bool:
        if has_type(module, self.recorded_types):
            return True
        return next(iter(module.children()), None) is None and not _applies_own_state(module)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.quiet += 1
        try:
            top = self.depth == 0
            record = top and self.is_recorded(module)
            keys, shapes = self.keys((args, kwargs)) if top else ([], [])
            self.stack.append((module, record, keys, shapes, len(self.graph.calls) if top else -1))
            if record:
                self.depth += 1
                self.recording = module
                self.write_context.append([])
            elif self.depth > 0:
                self.graph.count_call(module)
        finally:
            self.quiet -= 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self.quiet += 1
        try:
            _, record, keys, shapes, start = self.stack.pop()
            writes: list[tuple[int, int]] = []
            if record:
                inputs = _tensors((args, kwargs))
                # a write to an input that no op inside showed (TorchScript, C++ code): its version moved
                for t, key in zip(inputs, keys, strict=False):
                    if isinstance(key, TensorKey) and _version(t) != key.version:
                        if key.storage is None or self.writes.get(key.storage, 0) == key.writes:
                            self.wrote(t, self.names.get(id(module), "?"))
                self.depth -= 1
                self.recording = None
                writes = self.write_context.pop()
            if start >= 0:
                out_keys, out_shapes = self.keys(output)
                if record:
                    call = self.graph.add(
                        "module", self.names.get(id(module), "?"), module, keys, out_keys, shapes, out_shapes
                    )
                    call.input_formats = [memory_format(t) for t in iter_tensors((args, kwargs))]
                    call.output_formats = [memory_format(t) for t in iter_tensors(output)]
                    self.attach_writes(call, writes)
                    self.lineage.made(_tensors(output), inputs)
                self.graph.spans.append(Span(module, start, len(self.graph.calls), keys, out_keys))
            self.completed += 1
            self.last_completed = self.names.get(id(module), "?")
        finally:
            self.quiet -= 1

    # -- tensor ops ---------------------------------------------------------------------------------
    def check_writes(self, tensors: list[Tensor], versions: list[int], func: Any) -> None:
        """An argument whose version moved was written, through it or an alias of its memory."""
        for t, version in zip(tensors, versions, strict=True):
            if _version(t) != version:
                self.wrote(t, _op_name(func))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.quiet > 0:
            return func(*args, **kwargs)
        tensors = _tensors(args) + _tensors(kwargs) if kwargs else _tensors(args)
        versions = _versions(tensors)
        if self.depth > 0:  # inside a recorded module: only writes and integer results matter
            out = self.lineage.observe(func, args, kwargs, tensors)
            if versions != _versions(tensors):
                self.check_writes(tensors, versions, func)
            return out
        name = _op_name(func)
        if _reads_metadata(name):
            return func(*args, **kwargs)
        keys, shapes = self.keys(_value_arguments(name, args, kwargs))
        arg_spec, kwarg_spec = self.spec(args), self.spec(kwargs)
        for t in tensors:
            owner = self.owned.get(id(t))
            if owner is not None:
                self.graph.foreign_uses.setdefault(id(owner), name)
        self.write_context.append([])
        try:
            out = self.lineage.observe(func, args, kwargs, tensors, hold=True)
            self.check_writes(tensors, versions, func)
        finally:
            writes = self.write_context.pop()
        out_keys, out_shapes = self.keys(out)
        call = self.graph.add("function", name, None, keys, out_keys, shapes, out_shapes, arg_spec, kwarg_spec)
        self.attach_writes(call, writes)
        return out

    def where(self) -> str:
        if self.stack:
            module = self.stack[-1][0]
            return f"inside '{self.names.get(id(module), '?')}' ({type(module).__name__})"
        return "in the model's own forward code"


def trace_execution(
    model: nn.Module,
    args: tuple[Any, ...],
    recorded_types: set[type[nn.Module]],
    watched_types: set[type[nn.Module]],
) -> DataFlowGraph:
    """Run ``model(*args)`` once (no grad, fixed seed, buffers restored) and record its data flow.

    ``recorded_types`` are recorded as single calls (their internals are not looked at);
    ``watched_types`` are layers and norms whose parameters must not be used outside their own call.
    """
    tracer = _ExecutionTracer(model, recorded_types, watched_types)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(tracer.pre_hook, prepend=True, with_kwargs=True))
        handles.append(module.register_forward_hook(tracer.post_hook, with_kwargs=True))
    try:
        with inference(model):
            args = detached_copy(args)
            in_keys, in_shapes = tracer.keys(args)
            tracer.graph.add("input", "<inputs>", None, [], in_keys, None, in_shapes)
            try:
                with tracer:
                    output = model(*args)
            except Exception as error:  # the user's model failed: say where, keep the cause
                raise TraceError(
                    f"running {type(model).__name__} on example_inputs failed {tracer.where()} after "
                    f"{tracer.completed} completed module calls (last completed: '{tracer.last_completed or '-'}'): "
                    f"{type(error).__name__}: {str(error) or '(no message; often an input of a size the model does not accept)'}"
                ) from error
            out_keys, out_shapes = tracer.keys(output)
            tracer.graph.add("output", "<outputs>", None, out_keys, [], out_shapes, None)
            tracer.settle_versions()
            tracer.graph.reference_outputs = detached_copy(output)
            tracer.graph.output_sources = tracer.lineage.output_sources(output)
            tracer.graph.output_magnitudes = tracer.lineage.output_magnitudes(output)
    finally:
        for handle in handles:
            handle.remove()
    return tracer.graph


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_types: set[type[nn.Module]]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_type(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)


def trace_symbolic(
    model: nn.Module, leaf_types: set[type[nn.Module]], watched_types: set[type[nn.Module]]
) -> DataFlowGraph:
    """Build the graph with ``torch.fx`` symbolic tracing (no inputs needed, no shapes known)."""
    try:
        fx_graph = _LeafTracer(leaf_types).trace(model)
    except Exception as error:  # fx cannot follow this model: explain how to proceed
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(
            f"could not trace {type(model).__name__} without example inputs "
            f"(torch.fx: {type(error).__name__}: {reason}); pass example_inputs, e.g. "
            f"bnfold.fold(model, torch.randn(1, 3, 224, 224)), so bnfold can run the model once instead"
        ) from error
    graph = DataFlowGraph(traced_with="torch.fx")
    watched = {id(m): m for m in model.modules() if has_type(m, watched_types)}
    for node in fx_graph.nodes:
        inputs = [n.name for n in node.all_input_nodes]
        if node.op == "placeholder":
            graph.effects[graph.add("input", node.name, None, [], [node.name]).index] = NO_EFFECT
        elif node.op == "call_module":
            module = model.get_submodule(str(node.target))
            call = graph.add("module", str(node.target), module, inputs, [node.name])
            graph.effects[call.index] = effect_of_module(module)
        elif node.op == "output":
            graph.effects[graph.add("output", "<outputs>", None, inputs, []).index] = NO_EFFECT
        else:
            if node.op == "get_attr":
                owner_name, _, _ = str(node.target).rpartition(".")
                with contextlib.suppress(AttributeError):
                    owner = model.get_submodule(owner_name)
                    if id(owner) in watched:
                        graph.foreign_uses.setdefault(id(owner), f"get_attr {node.target}")
            name = _op_name(node.target) if callable(node.target) else str(node.target)
            call = graph.add("function", name, None, inputs, [node.name])
            python_operator = getattr(node.target, "__module__", None) in ("operator", "_operator")
            graph.effects[call.index] = effect_of_function(name, node.kwargs, python_operator)
    return graph


def retrace_symbolic(model: nn.Module, leaf_types: set[type[nn.Module]]) -> None:
    """Trace a folded model with ``torch.fx`` once more, raising what its code raises. Without example inputs
    this stands in for the run that shows a fold breaking the model's own code (``self.bn.num_features``
    read in a forward after the norm was replaced)."""
    _LeafTracer(leaf_types).trace(model)
