"""The public entry points: check the arguments, then discover -> plan -> apply -> verify -> report."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from .apply.edits import EditLog
from .apply.surgery import apply_plan, clone_model, copy_and_fold, undo_all
from .check.isolate import Run, failure_reason, first_breaking_fold, refusal_name
from .check.per_layer import Probes, Recording, compare, probes_for, record
from .check.verify import (
    Observed,
    OutputDiff,
    compare_observed,
    judge_float64,
    layer_mismatch_error,
    output_mismatch_error,
)
from .discover.graph import DataFlowGraph
from .discover.lineage import Lineage, LineageMode
from .discover.nested import detached_copy, iter_tensors
from .discover.running import inference
from .discover.tracing import retrace_symbolic, trace_execution, trace_symbolic
from .errors import FoldError
from .planning.fold_plan import FoldPlan
from .planning.planner import make_plan
from .report import FoldReport, largest_weight, model_size
from .rules import third_party as compat
from .rules.norms import TRAINING_REASON
from .rules.table import AnyRule, RuleTable, build_rules

VerifyMode = Literal["outputs", "layers"]
VERIFY_MODES = ("outputs", "layers")

__all__ = ["fold", "plan", "fold_with_report", "FoldResult", "BN_Folder"]


def _check_model(model: Any, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? build the model and load_state_dict it first)" if isinstance(model, dict) else ""
        raise TypeError(f"bnfold.{caller}() expects a torch.nn.Module, got {type(model).__name__}{hint}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"bnfold.{caller}() got a TorchScript module ({type(model).__name__}); fold the Python model "
            "before torch.jit.script / torch.jit.trace"
        )
    compiled = compat.compiled_module_types()
    for name, module in model.named_modules():
        if isinstance(module, compiled):
            what = "a torch.compile'd module" if not name else f"'{name}', a torch.compile'd module,"
            raise TypeError(
                f"bnfold.{caller}() got {what} (OptimizedModule); fold the module before compiling it: "
                f"bnfold.{caller}(compiled._orig_mod, ...), then torch.compile the result"
            )
        for tname, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None and nn.parameter.is_lazy(t):
                where = f"'{name}'" if name else "the model"
                raise ValueError(
                    f"{where} ({type(module).__name__}) is not initialised yet ({tname} is an uninitialised lazy "
                    "parameter); run one forward pass, model(example_input), before folding"
                )
    return model


def _check_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    hint = "; pass tuple(...) for several positional inputs" if isinstance(example_inputs, list) else ""
    raise TypeError(
        "example_inputs must be a Tensor or a tuple of positional arguments for model(*example_inputs), "
        f"got {type(example_inputs).__name__}{hint}"
    )


def _discover(model: nn.Module, args: tuple[Any, ...] | None, rules: RuleTable) -> DataFlowGraph:
    recorded = rules.layer_types() | rules.norm_types()
    if args is None:
        return trace_symbolic(model, recorded, recorded)
    return trace_execution(model, args, recorded, recorded)


def _warn_training(model: nn.Module, plan: FoldPlan, stacklevel: int) -> None:
    if model.training and any(k.reason == TRAINING_REASON for k in plan.kept):
        warnings.warn(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics, so its norm "
            "layers cannot be folded; call model.eval() before bnfold.fold()",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _plan(
    model: nn.Module,
    args: tuple[Any, ...] | None,
    rules: RuleTable,
    stacklevel: int,
    reparameterize: bool = False,
    hints: bool = True,
) -> tuple[FoldPlan, DataFlowGraph]:
    """Discover and plan; ``stacklevel`` points a warning at the user's call (1 = the caller of _plan);
    ``hints``: see :func:`~bnfold.planner.make_plan`."""
    if not isinstance(reparameterize, bool):
        raise TypeError(f"reparameterize must be True or False, got {reparameterize!r}")
    if reparameterize and args is None:
        raise ValueError(
            "reparameterize=True needs example_inputs (merging branches follows the recorded shapes), e.g. "
            "bnfold.fold(model, torch.randn(1, 3, 224, 224), reparameterize=True)"
        )
    graph = _discover(model, args, rules)
    found = make_plan(model, graph, rules, reparameterize=reparameterize, hints=hints)
    _warn_training(model, found, stacklevel + 1)
    return found, graph


def plan(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    extra_rules: Iterable[AnyRule] | None = None,
    reparameterize: bool = False,
) -> FoldPlan:
    """Every norm layer of ``model`` with its decision (fold into which layer, or keep and why).

    Changes nothing: with ``example_inputs`` the model runs once, without grad, with a fixed seed,
    and its buffers are restored afterwards.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> p = plan(m, torch.randn(1, 3, 16, 16))
    >>> len(p.sites), len(p.kept)
    (1, 0)
    """
    model = _check_model(model, "plan")
    args = _check_inputs(example_inputs)
    found, _ = _plan(model, args, build_rules(extra_rules), stacklevel=2, reparameterize=reparameterize)
    return found


@dataclass(frozen=True)
class FoldResult:
    """The folded model, the report of what happened, and the log of the edits that folded it (from which
    :func:`bnfold.apply.records.record_of_edits` writes the record a folded checkpoint carries)."""

    model: nn.Module
    report: FoldReport
    edits: EditLog = field(default_factory=EditLog, repr=False, compare=False)


def fold_with_report(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
) -> FoldResult:
    """Like :func:`fold`, and also return a :class:`FoldReport` (decisions, sizes, measured error).

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> result = fold_with_report(m, torch.randn(1, 3, 16, 16))
    >>> result.report.folded, result.report.kept
    (1, 0)
    """
    return _fold(model, example_inputs, inplace, extra_rules, verify, reparameterize)


def _has_float_values(outputs: Any) -> bool:
    return any(t.is_floating_point() and t.numel() > 0 for t in iter_tensors(outputs))


def _failed_run(model: nn.Module, error: BaseException) -> FoldError:
    """The folded model's own code relied on something folding removed."""
    return FoldError(
        f"the folded {type(model).__name__} fails where the original ran "
        f"({type(error).__name__}: {error}); nothing was folded. Please report it with the model"
    )


def _observe(target: nn.Module, args: tuple[Any, ...], sources: bool) -> Observed:
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
    if isinstance(obj, Tensor):
        return obj.to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_float64(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float64(v) for k, v in obj.items()}
    return obj


def _observe_float64(model: nn.Module, args: tuple[Any, ...], sources: bool) -> Observed:
    """The original's outputs computed in float64: how far float32 rounding alone moves them."""
    twin = _float64_copy(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the model makes as it runs
    try:
        return _observe(twin, _to_float64(detached_copy(args)), sources)
    finally:
        torch.set_default_dtype(default)


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


@dataclass(frozen=True)
class _LayerRun:
    """What ``verify="layers"`` recorded: the probes of one plan, on the original and on the folded model."""

    probes: Probes
    reference: Recording
    seen: Recording


def _output_runner(args: tuple[Any, ...], sources: bool) -> Callable[[FoldPlan], Run]:
    """For each plan: run the folded model and observe its outputs."""
    return lambda found: lambda target: _observe(target, args, sources)


def _retrace_runner(rules: RuleTable) -> Callable[[FoldPlan], Run]:
    """Without example inputs: for each plan, trace the folded model with torch.fx again (no run, no check)."""
    recorded = rules.layer_types() | rules.norm_types()
    return lambda found: lambda target: retrace_symbolic(target, recorded)


def _layer_runner(model: nn.Module, args: tuple[Any, ...]) -> Callable[[FoldPlan], Run]:
    """For each plan: record its folded regions on the original (called before the plan is applied, so also
    right when folding in place), then run the folded model with each region fed the original's inputs."""

    def for_plan(found: FoldPlan) -> Run:
        probes = probes_for(found)
        reference = record(model, args, probes)
        return lambda target: _LayerRun(probes, reference, record(target, args, probes, replay=reference))

    return for_plan


def _apply_and_run(
    model: nn.Module,
    graph: DataFlowGraph,
    found: FoldPlan,
    rules: RuleTable,
    inplace: bool,
    reparameterize: bool,
    runner: Callable[[FoldPlan], Run],
    hints: bool = True,
) -> tuple[nn.Module, EditLog, FoldPlan, Any]:
    """Fold ``found`` into ``model`` (or a copy) and run the result once (without example inputs: trace it
    again). A fold that cannot be applied, or that makes the run fail, is kept with the reason (see
    :mod:`bnfold.isolate`), and the model is planned and folded again without it: one bad fold never blocks
    the others. Returns the folded model, the undo log, the plan it follows and what the run gave."""
    refused: dict[str, str] = {}
    while True:
        run = runner(found)
        try:
            if inplace:
                target, undo = model, apply_plan(model, found, rules, undoable=True)
            else:  # a failed copy is simply dropped
                target, undo = copy_and_fold(model, found, rules)
        except FoldError as error:
            site = next((s for s in found.sites if s.norm == error.norm), None)
            if site is None:
                raise
            failure: BaseException = error.__cause__ or error
            applied = False
        else:
            try:
                return target, undo, found, run(target)
            except Exception as error:
                undo_all(undo)
                try:
                    site, failure = first_breaking_fold(model, found, rules, run, error)
                except FoldError:
                    raise _failed_run(model, error) from error
                applied = True
        name = refusal_name(site)
        if name in refused:  # planned again all the same: never loop
            raise _failed_run(model, failure) from failure
        refused[name] = failure_reason(site, failure, applied)
        found = make_plan(model, graph, rules, reparameterize=reparameterize, refused=refused, hints=hints)


def _rounding_or_wrong(
    model: nn.Module,
    target: nn.Module,
    found: FoldPlan,
    rules: RuleTable,
    args: tuple[Any, ...],
    inplace: bool,
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
    try:
        float64 = _observe_float64(model, args, bool(reference.sources))
    except Exception as error:  # e.g. a model that casts to float32 itself
        layers = _layer_diffs(model, target, found, rules, args, inplace)
        raise output_mismatch_error(
            failed, layers=layers, float64_failure=f"{type(error).__name__}: {error}"
        ) from error
    judgements = judge_float64(failed, reference, actual, float64)
    del float64
    layers = _layer_diffs(model, target, found, rules, args, inplace)
    if layers is None or not all(d.ok for d in layers) or not all(j.ok for j in judgements):
        raise output_mismatch_error(failed, layers=layers, judgements=judgements)


def _fold(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None,
    inplace: bool,
    extra_rules: Iterable[AnyRule] | None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
    hints: bool = True,
) -> FoldResult:
    """The body of fold() and fold_with_report(), called directly by both (warnings point at the user).
    ``hints=False``: nobody reads the plan's kept rows (fold() returns only the model), so they go without
    the reparameterization hints, whose analysis costs as much as a merge."""
    model = _check_model(model, "fold")
    args = _check_inputs(example_inputs)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be 'outputs' or 'layers', got {verify!r}")
    rules = build_rules(extra_rules)
    found, graph = _plan(model, args, rules, stacklevel=3, reparameterize=reparameterize, hints=hints)
    params_before, bytes_before = model_size(model)
    checked = None
    reference = Observed(graph.reference_outputs, graph.output_sources, graph.output_magnitudes)
    runner = _retrace_runner(rules)
    if args is not None:
        # Outputs with no floating-point values, nor any known to come from floats, would prove nothing.
        comparable = _has_float_values(reference.outputs) or any(s.tensors for s in reference.sources.values())
        checked = "layers" if verify == "layers" or not comparable else "outputs"
        runner = _layer_runner(model, args) if checked == "layers" else _output_runner(args, bool(reference.sources))
    weights_before = {s.norm: largest_weight(model, s.partners) for s in found.sites if s.kind == "merge"}
    target, undo, found, first = _apply_and_run(model, graph, found, rules, inplace, reparameterize, runner, hints)
    merges = {s.norm for s in found.sites if s.kind == "merge"}
    weights_before = {block: weight for block, weight in weights_before.items() if block in merges}
    abs_error = rel_error = None
    worst = None
    if args is not None:
        try:
            if isinstance(first, _LayerRun):
                diffs = compare(first.reference, first.seen, first.probes)
                failed = [d for d in diffs if not d.ok]
                if failed:
                    raise layer_mismatch_error(failed)
            else:
                actual = cast(Observed, first)
                diffs = compare_observed(reference, actual)
                failed = [d for d in diffs if not d.ok]
                if failed:
                    undo_all(undo)  # the original as it was, for the float64 run and the per-layer check
                    _rounding_or_wrong(model, target, found, rules, args, inplace, reference, actual, failed)
                    checked = "float64"
                    if inplace:
                        undo = apply_plan(model, found, rules, undoable=True)
        except BaseException:
            undo_all(undo)
            raise
        if diffs:
            top = max(diffs, key=lambda d: d.max_abs_error)
            abs_error, worst = top.max_abs_error, top.path
            rel_error = max(d.relative_error for d in diffs)
        else:
            abs_error, rel_error = 0.0, 0.0
    params_after, bytes_after = model_size(target)
    merge_weights = tuple(
        (block, before, largest_weight(target, (f"{block}.merged_conv",))) for block, before in weights_before.items()
    )
    report = FoldReport(
        found,
        params_before,
        params_after,
        bytes_before,
        bytes_after,
        abs_error,
        rel_error,
        worst,
        checked,
        merge_weights,
    )
    undo.commit()  # the fold stands: the result keeps what it changed, not the old weights
    return FoldResult(target, report, undo)


def fold(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    extra_rules: Iterable[AnyRule] | None = None,
    verify: VerifyMode = "outputs",
    reparameterize: bool = False,
) -> nn.Module:
    """Fold every norm layer of ``model`` that can be folded exactly into its neighbouring layer.

    With ``example_inputs`` (a Tensor, or a tuple of positional arguments) bnfold runs the model once to
    see what really feeds what, and checks that the folded model gives the same outputs
    (``VerificationError`` otherwise, with the original untouched). Without them it uses ``torch.fx``.

    ``inplace=False`` (default) returns a folded copy and leaves ``model`` bit-identical;
    ``inplace=True`` folds ``model`` itself and returns it.

    ``verify="outputs"`` (default) compares the model's outputs (integer outputs through the floats they were
    computed from). When they differ beyond float32 rounding, the original runs once more in float64 (a float64
    copy of it, briefly): the fold passes when the folded model is no further from that run than the original's
    own float32 outputs are, and every folded layer gives the original's values on the original's own inputs.
    So models whose outputs jump with tiny rounding differences (detection models) fold under this check too.
    ``verify="layers"`` checks only each folded layer on the original's own inputs, not the model end to end.

    ``reparameterize=True`` also merges parallel branches that read the same tensor and are summed
    (RepVGG, MobileOne, ACNet, DBB blocks, and a user's own) into one convolution: the module around them
    is replaced by a :class:`bnfold.MergedConv`. It needs ``example_inputs``.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold(m, torch.randn(1, 3, 16, 16))
    >>> type(folded[1]).__name__
    'Identity'
    """
    return _fold(model, example_inputs, inplace, extra_rules, verify, reparameterize, hints=False).model


class BN_Folder:  # noqa: N801 - the name fasterai code already uses
    """Drop-in replacement for fasterai's ``BN_Folder``: ``BN_Folder().fold(model)`` returns a folded copy.

    Unlike the original it pairs layers by data flow (not registration order), folds every supported
    norm type, and never folds a norm when that would change the outputs. Pass ``example_inputs`` to fold
    models that ``torch.fx`` cannot trace; without them such a model is returned unfolded, with a warning.

    >>> import torch
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    >>> type(BN_Folder().fold(m)[1]).__name__
    'Identity'
    """

    def __init__(self) -> None:
        super().__init__()

    def fold(self, model: nn.Module, example_inputs: Tensor | tuple[Any, ...] | None = None) -> nn.Module:
        from .errors import TraceError

        try:
            return fold(model, example_inputs)
        except TraceError as error:
            if example_inputs is not None:
                raise
            warnings.warn(
                f"BN_Folder could not trace {type(model).__name__}, so nothing was folded: {error}",
                UserWarning,
                stacklevel=2,
            )
            return clone_model(model)
