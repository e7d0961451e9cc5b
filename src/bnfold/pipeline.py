"""The engine under the public functions: discover -> plan -> apply (until the folded model runs) -> check
-> report, for one checked model and one :class:`~bnfold.options.FoldOptions`.

Each stage is a module of its own (``discover/``, ``planning/``, ``apply/``, ``check/``, ``report.py``);
this one only puts them in order. Nothing here checks an argument: :mod:`bnfold.api` did.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from torch import nn

from .apply.edits import EditLog
from .apply.equalization import chains_worth_it, measure_layers
from .apply.surgery import apply_plan, folded_copy
from .check.isolate import apply_until_it_runs
from .check.strategy import Measured, choose_check, judge_run
from .discover.graph import DataFlowGraph
from .discover.tracing import trace_execution, trace_symbolic
from .options import FoldOptions
from .planning.fold_plan import FoldPlan
from .planning.planner import make_plan
from .reparam.merge_recipe import MergeRecipe
from .report import FoldReport, LayerQuantization, largest_weight, model_size
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


def plan_model(
    model: nn.Module, options: FoldOptions, stacklevel: int, second_round: bool = True
) -> tuple[FoldPlan, DataFlowGraph]:
    """Discover and plan; ``stacklevel`` points a warning at the user's call (1 = the caller of this). With
    ``options.equalize`` and ``second_round``, a folded copy is planned again for equalization, and the plan
    has the rows of both rounds."""
    graph = discover(model, options)
    found = make_plan(
        model, graph, options.rules, options.kinds, reparameterize=options.reparameterize, hints=options.hints
    )
    _warn_training(model, found, stacklevel + 1)
    if options.equalize and second_round:
        found = found.joined(_second_plan(folded_copy(model, found, options.rules), options))
    return found, graph


def _second_plan(target: nn.Module, options: FoldOptions) -> FoldPlan:
    """The plan of the second round: equalization, on the folded model (traced again); with example inputs,
    only the chains that do not lower the measured 8-bit output SQNR (:func:`chains_worth_it`)."""
    graph = discover(target, options)
    second = make_plan(target, graph, options.rules, options.kinds, stage="equalize")
    if options.inputs is None or options.equalize_all:
        return second
    return chains_worth_it(target, second, options.rules, options.inputs)


@dataclass
class _Equalization:
    """The second round of a fold: plan equalization on the folded model, carry it out in the same log, and
    measure each layer it touched before and after."""

    options: FoldOptions
    layers: tuple[LayerQuantization, ...] = ()

    def __call__(self, target: nn.Module, log: EditLog, found: FoldPlan) -> FoldPlan:
        second = _second_plan(target, self.options)
        names = list(dict.fromkeys(name for site in second.sites for name in site.partners))
        before = measure_layers(target, names, self.options.rules)
        apply_plan(target, second, self.options.rules, log=log)
        after = measure_layers(target, names, self.options.rules)
        self.layers = tuple(
            LayerQuantization(name, before[name][0], before[name][1], after[name][0], after[name][1]) for name in names
        )
        return found.joined(second)


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
    found, graph = plan_model(model, options, stacklevel + 1, second_round=False)
    before = model_size(model)
    check = choose_check(model, graph, options)
    weights = {s.norm: largest_weight(model, s.partners) for s in found.sites if isinstance(s.payload, MergeRecipe)}
    equalization = _Equalization(options) if options.equalize else None
    target, undo, found, first = apply_until_it_runs(model, graph, found, options, check.runner, equalization)
    measured, undo = judge_run(model, target, undo, found, options, check, first)
    report = _report(found, before, target, measured, weights)
    if equalization is not None:
        report = dataclasses.replace(report, equalized_layers=equalization.layers)
    undo.commit()  # the fold stands: the result keeps what it changed, not the old weights
    return FoldResult(target, report, undo)
