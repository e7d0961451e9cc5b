"""How a fold is checked: which run of the folded model proves it, and how a failed comparison is judged.

With example inputs the folded model runs once and its outputs are compared (:mod:`.verify`); where the
outputs prove nothing (no floats, none known to come from floats) or the caller asks for it, each folded
region is checked on the original's own inputs instead (:mod:`.per_layer`). Without example inputs the
folded model is traced again with ``torch.fx`` (no run, no check). When the float32 outputs differ beyond
tolerance, a float64 run of the original and the per-layer check tell rounding the model amplifies from a
wrong fold.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..apply.edits import EditLog
from ..apply.surgery import apply_plan, undo_all
from ..discover.graph import DataFlowGraph
from ..discover.lineage import Lineage, LineageMode
from ..discover.nested import detached_copy, iter_tensors, map_tensors
from ..discover.running import inference
from ..discover.tracing import retrace_symbolic
from ..errors import FoldError
from ..options import FoldOptions
from ..planning.fold_plan import FoldPlan
from ..rules.table import RuleTable
from .isolate import Run
from .per_layer import Probes, Recording, compare, probes_for, record
from .verify import (
    Observed,
    OutputDiff,
    compare_observed,
    judge_float64,
    layer_mismatch_error,
    output_mismatch_error,
)

__all__ = ["Check", "Measured", "choose_check", "observe", "observe_float64", "judge_run"]


@dataclass(frozen=True)
class Check:
    """How one call checks its folds: ``how`` ("outputs", "layers", or ``None`` without example inputs), the
    reference the original gave, and ``runner``: for each plan, the run of a model folded by it."""

    how: str | None
    reference: Observed
    runner: Callable[[FoldPlan], Run]


@dataclass(frozen=True)
class Measured:
    """What the check measured: the largest absolute and relative output error, and where (``None`` without
    example inputs); ``how``: "outputs", "float64", "layers" or ``None``."""

    how: str | None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    worst_output: str | None = None


def observe(target: nn.Module, args: tuple[Any, ...], sources: bool) -> Observed:
    """Run ``target`` as the trace ran the original (no grad, fixed seed, buffers restored), and with
    ``sources`` also record the floats behind its integer outputs."""
    with inference(target):
        if not sources:
            return Observed(target(*detached_copy(args)))
        lineage = Lineage()
        with LineageMode(lineage):
            outputs = target(*detached_copy(args))
        return Observed(outputs, lineage.output_sources(outputs))


def _float64_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters, buffers and tensor attributes are float64 (made
    directly, without a float32 copy first)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        named = list(module._parameters.values()) + list(module._buffers.values()) + list(vars(module).values())
        for t in named:
            if isinstance(t, Tensor) and id(t) not in memo and t.is_floating_point():
                value = t.detach().to(torch.float64)
                memo[id(t)] = nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) else value
    return copy.deepcopy(model, memo)


def _to_float64(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.to(torch.float64) if t.is_floating_point() else t)


def observe_float64(model: nn.Module, args: tuple[Any, ...], sources: bool) -> Observed:
    """The original's outputs computed in float64: how far float32 rounding alone moves them."""
    twin = _float64_copy(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the model makes as it runs
    try:
        return observe(twin, _to_float64(detached_copy(args)), sources)
    finally:
        torch.set_default_dtype(default)


@dataclass(frozen=True)
class _LayerRun:
    """What a per-layer check recorded: the probes of one plan, on the original and on the folded model."""

    probes: Probes
    reference: Recording
    seen: Recording


def _has_float_values(outputs: Any) -> bool:
    return any(t.is_floating_point() and t.numel() > 0 for t in iter_tensors(outputs))


def _retrace_runner(rules: RuleTable) -> Callable[[FoldPlan], Run]:
    """Without example inputs: for each plan, trace the folded model with torch.fx again (no run, no check)."""
    recorded = rules.layer_types() | rules.norm_types()
    return lambda found: lambda target: retrace_symbolic(target, recorded)


def _output_runner(args: tuple[Any, ...], sources: bool) -> Callable[[FoldPlan], Run]:
    """For each plan: run the folded model and observe its outputs."""
    return lambda found: lambda target: observe(target, args, sources)


def _layer_runner(model: nn.Module, args: tuple[Any, ...]) -> Callable[[FoldPlan], Run]:
    """For each plan: record its folded regions on the original (called before the plan is applied, so also
    right when folding in place), then run the folded model with each region fed the original's inputs."""

    def for_plan(found: FoldPlan) -> Run:
        probes = probes_for(found)
        reference = record(model, args, probes)
        return lambda target: _LayerRun(probes, reference, record(target, args, probes, replay=reference))

    return for_plan


def choose_check(model: nn.Module, graph: DataFlowGraph, options: FoldOptions) -> Check:
    """How this call checks its folds (see the module docstring)."""
    reference = Observed(graph.reference_outputs, graph.output_sources, graph.output_magnitudes)
    args = options.inputs
    if args is None:
        return Check(None, reference, _retrace_runner(options.rules))
    # Outputs with no floating-point values, nor any known to come from floats, would prove nothing.
    comparable = _has_float_values(reference.outputs) or any(s.tensors for s in reference.sources.values())
    if options.equalize and not comparable:
        raise FoldError(
            f"{type(model).__name__} returns no floating-point values (nor any bnfold saw it compute from floats), "
            "so nothing could check equalize=True end to end; fold it without equalize, or pass inputs for which "
            "it returns floats"
        )
    if options.verify == "layers" or not comparable:
        return Check("layers", reference, _layer_runner(model, args))
    return Check("outputs", reference, _output_runner(args, bool(reference.sources)))


def _layer_diffs(
    model: nn.Module, target: nn.Module, found: FoldPlan, rules: RuleTable, args: tuple[Any, ...], inplace: bool
) -> list[OutputDiff] | None:
    """Check each fold on the original's own inputs (None when that check cannot run). ``model`` is the
    original as it was (folded again, briefly, when folding in place)."""
    probes = probes_for(found)
    try:
        reference = record(model, args, probes)
        if not inplace:
            return compare(reference, record(target, args, probes, replay=reference), probes)
        undo = apply_plan(model, found, rules, undoable=True)
        try:
            return compare(reference, record(model, args, probes, replay=reference), probes)
        finally:
            undo_all(undo)
    except Exception:  # the verdict below says that this check could not run
        return None


def _rounding_or_wrong(
    model: nn.Module,
    target: nn.Module,
    found: FoldPlan,
    options: FoldOptions,
    reference: Observed,
    actual: Observed,
    failed: list[OutputDiff],
) -> None:
    """The float32 outputs differ beyond tolerance: return when that is rounding the model amplifies, raise
    :class:`VerificationError` when it is (or may be) a wrong fold. ``model`` is the original as it was.

    Rounding, when both hold: a float64 run of the original is no closer to the original's float32 outputs
    than to the folded model's (within FLOAT64_FACTOR), so the fold moved the outputs no more than float32
    rounding does; and every folded region gives the original's values on the original's own inputs.
    """
    args = cast(tuple[Any, ...], options.inputs)
    try:
        float64 = observe_float64(model, args, bool(reference.sources))
    except Exception as error:  # e.g. a model that casts to float32 itself
        layers = _layer_diffs(model, target, found, options.rules, args, options.inplace)
        raise output_mismatch_error(
            failed, layers=layers, float64_failure=f"{type(error).__name__}: {error}"
        ) from error
    judgements = judge_float64(failed, reference, actual, float64)
    del float64
    layers = _layer_diffs(model, target, found, options.rules, args, options.inplace)
    if layers is None or not all(d.ok for d in layers) or not all(j.ok for j in judgements):
        raise output_mismatch_error(failed, layers=layers, judgements=judgements)


def judge_run(
    model: nn.Module, target: nn.Module, undo: EditLog, found: FoldPlan, options: FoldOptions, check: Check, first: Any
) -> tuple[Measured, EditLog]:
    """Judge what the folded model's run gave (``first``): raise :class:`VerificationError` (with every change
    to ``model`` undone) when a fold is or may be wrong; otherwise say what was measured, with the log of the
    edits that made ``target`` as it now stands (folding in place is undone and made again for the float64
    run)."""
    if check.how is None:
        return Measured(None), undo
    how = check.how
    try:
        if isinstance(first, _LayerRun):
            diffs = compare(first.reference, first.seen, first.probes)
            failed = [d for d in diffs if not d.ok]
            if failed:
                raise layer_mismatch_error(failed)
        else:
            actual = cast(Observed, first)
            diffs = compare_observed(check.reference, actual)
            failed = [d for d in diffs if not d.ok]
            if failed:
                undo_all(undo)  # the original as it was, for the float64 run and the per-layer check
                _rounding_or_wrong(model, target, found, options, check.reference, actual, failed)
                how = "float64"
                if options.inplace:  # rounding: fold the original again
                    undo = apply_plan(model, found, options.rules, undoable=True)
    except BaseException:
        undo_all(undo)
        raise
    if not diffs:
        return Measured(how, 0.0, 0.0, None), undo
    top = max(diffs, key=lambda d: d.max_abs_error)
    return Measured(how, top.max_abs_error, max(d.relative_error for d in diffs), top.path), undo
