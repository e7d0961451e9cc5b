"""The engine under the public functions: discover -> plan -> apply (until the folded model runs) -> check
-> report, for one checked model and one :class:`~bnfold.options.FoldOptions`.

Each stage is a module of its own (``discover/``, ``planning/``, ``apply/``, ``check/``, ``report.py``);
this one only puts them in order. Nothing here checks an argument: :mod:`bnfold.api` did.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .apply.edits import EditLog
from .check.isolate import apply_until_it_runs
from .check.strategy import Measured, choose_check, judge_run
from .discover.graph import DataFlowGraph
from .discover.tracing import trace_execution, trace_symbolic
from .options import FoldOptions
from .planning.fold_plan import FoldPlan
from .planning.planner import make_plan
from .reparam.merge_recipe import MergeRecipe
from .report import FoldReport, largest_weight, model_size
from .rules.norms import TRAINING_REASON

__all__ = ["FoldResult", "discover", "plan_model", "fold_model"]


@dataclass(frozen=True)
class FoldResult:
    """The folded model, the report of what happened, and the log of the edits that folded it (from which
    :func:`bnfold.apply.records.record_of_edits` writes the record a folded checkpoint carries)."""

    model: nn.Module
    report: FoldReport
    edits: EditLog = field(default_factory=EditLog, repr=False, compare=False)


def discover(model: nn.Module, options: FoldOptions) -> DataFlowGraph:
    """Who feeds whom: run the model once on the example inputs, or trace it with ``torch.fx``."""
    recorded = options.rules.layer_types() | options.rules.norm_types()
    if options.inputs is None:
        return trace_symbolic(model, recorded, recorded)
    return trace_execution(model, options.inputs, recorded, recorded)


def _warn_training(model: nn.Module, plan: FoldPlan, stacklevel: int) -> None:
    if model.training and any(k.reason == TRAINING_REASON for k in plan.kept):
        warnings.warn(
            f"{type(model).__name__} is in training mode, where BatchNorm uses batch statistics, so its norm "
            "layers cannot be folded; call model.eval() before bnfold.fold()",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def plan_model(model: nn.Module, options: FoldOptions, stacklevel: int) -> tuple[FoldPlan, DataFlowGraph]:
    """Discover and plan; ``stacklevel`` points a warning at the user's call (1 = the caller of this)."""
    graph = discover(model, options)
    found = make_plan(
        model, graph, options.rules, options.kinds, reparameterize=options.reparameterize, hints=options.hints
    )
    _warn_training(model, found, stacklevel + 1)
    return found, graph


def _report(
    found: FoldPlan, before: tuple[int, int], target: nn.Module, measured: Measured, weights: dict[str, float]
) -> FoldReport:
    """The report of one fold: the plan it followed, sizes before and after, what the check measured, and
    the largest weight of each merge before and after."""
    merges = {s.norm for s in found.sites if isinstance(s.payload, MergeRecipe)}
    after = model_size(target)
    merge_weights = tuple(
        (block, w, largest_weight(target, (f"{block}.merged_conv",))) for block, w in weights.items() if block in merges
    )
    return FoldReport(
        found,
        before[0],
        after[0],
        before[1],
        after[1],
        measured.max_abs_error,
        measured.max_rel_error,
        measured.worst_output,
        measured.how,
        merge_weights,
    )


def fold_model(model: nn.Module, options: FoldOptions, stacklevel: int) -> FoldResult:
    """Fold ``model`` by ``options``, check it, and report (``stacklevel`` as for :func:`plan_model`)."""
    found, graph = plan_model(model, options, stacklevel + 1)
    before = model_size(model)
    check = choose_check(model, graph, options)
    weights = {s.norm: largest_weight(model, s.partners) for s in found.sites if isinstance(s.payload, MergeRecipe)}
    target, undo, found, first = apply_until_it_runs(model, graph, found, options, check.runner)
    measured, undo = judge_run(model, target, undo, found, options, check, first)
    report = _report(found, before, target, measured, weights)
    undo.commit()  # the fold stands: the result keeps what it changed, not the old weights
    return FoldResult(target, report, undo)
