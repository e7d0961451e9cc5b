"""One fold that breaks the folded model must not block the others: find it, keep it, fold the rest.

A fold can be right on its own numbers and still break the model around it: code after a norm may read
an attribute of it, or rely on something bnfold did not see. When the folded model fails to run (or a
fold cannot be applied at all), the folds are applied again in plan order to copies, a growing prefix at a
time (a binary search), to find the first fold that breaks the run; it is kept with the error as its
reason, the model is planned again without it (what read through it sees it kept), and the rest is folded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import nn

from ..apply.edits import EditLog
from ..apply.surgery import apply_plan, copy_and_fold, folded_copy, undo_all
from ..discover.graph import DataFlowGraph
from ..errors import FoldError, clean_message
from ..options import FoldOptions
from ..planning.fold_plan import FoldPlan, FoldSite
from ..planning.planner import make_plan
from ..rules.table import RuleTable

__all__ = ["Run", "refusal_name", "failure_reason", "first_breaking_fold", "apply_until_it_runs"]

Run = Callable[[nn.Module], Any]  # runs a folded model once, returns what the check needs


def refusal_name(plan: FoldPlan, site: FoldSite) -> str:
    """What to keep so that ``site`` is not folded, by its kind: its norm, or for a norm merged with its
    branches, the block they merge into (a merge is kept whole)."""
    return plan.kind(site).keeps(site)


def failure_reason(plan: FoldPlan, site: FoldSite, error: BaseException, applied: bool = True) -> str:
    """The reason, in a kept row, for a fold (or merge) that broke the folded model (``applied=False``: that
    could not be applied)."""
    text = clean_message(error).splitlines()[0] if clean_message(error) else ""
    if len(text) > 160:
        text = text[:157] + "..."
    what = plan.kind(site).label
    outcome = "made the folded model fail to run" if applied else "failed"
    return f"{what} {outcome} ({type(error).__name__}: {text})"


def first_breaking_fold(
    model: nn.Module, plan: FoldPlan, rules: RuleTable, run: Run, whole: BaseException
) -> tuple[FoldSite, BaseException]:
    """The first fold of ``plan`` (in the order they apply) after which a copy of ``model`` fails ``run``,
    with the error, given that ``model`` itself runs and the whole plan fails with ``whole``. ``model`` is
    not changed."""
    if not plan.sites:
        raise FoldError("the model failed to run with nothing folded")
    lo, hi = 0, len(plan.sites)  # the first ``lo`` folds run; the first ``hi`` do not
    error = whole
    while hi - lo > 1:
        mid = (lo + hi) // 2
        failure = _failure(model, replace(plan, sites=plan.sites[:mid]), rules, run)
        if failure is None:
            lo = mid
        else:
            hi, error = mid, failure
    return plan.sites[hi - 1], error


def _failure(model: nn.Module, plan: FoldPlan, rules: RuleTable, run: Run) -> BaseException | None:
    try:
        run(folded_copy(model, plan, rules))
    except Exception as error:
        return error
    return None


def _failed_run(model: nn.Module, error: BaseException) -> FoldError:
    """The folded model's own code relied on something folding removed."""
    return FoldError(
        f"the folded {type(model).__name__} fails where the original ran "
        f"({type(error).__name__}: {error}); nothing was folded. Please report it with the model"
    )


def apply_until_it_runs(
    model: nn.Module,
    graph: DataFlowGraph,
    found: FoldPlan,
    options: FoldOptions,
    runner: Callable[[FoldPlan], Run],
    finish: Callable[[nn.Module, EditLog, FoldPlan], FoldPlan] | None = None,
) -> tuple[nn.Module, EditLog, FoldPlan, Any]:
    """Fold ``found`` into ``model`` (or a copy, by ``options.inplace``) and run the result once with
    ``runner``'s run for that plan. A fold that cannot be applied, or that makes the run fail, is kept with the
    reason, and the model is planned and folded again without it: one bad fold never blocks the others.
    ``finish``: a second round on the folded model before it runs (its edits in the same log), returning the
    whole plan. Returns the folded model, the log of its edits, the plan it follows and what the run gave."""
    refused: dict[str, str] = {}
    while True:
        run = runner(found)
        try:
            if options.inplace:
                target, undo = model, apply_plan(model, found, options.rules, undoable=True)
            else:  # a failed copy is simply dropped
                target, undo = copy_and_fold(model, found, options.rules)
        except FoldError as error:
            site = next((s for s in found.sites if s.norm == error.norm), None)
            if site is None:
                raise
            failure: BaseException = error.__cause__ or error
            applied = False
        else:
            try:
                complete = found if finish is None else finish(target, undo, found)
            except BaseException:
                undo_all(undo)
                raise
            try:
                return target, undo, complete, run(target)
            except Exception as error:
                undo_all(undo)
                try:
                    site, failure = first_breaking_fold(model, found, options.rules, run, error)
                except FoldError:
                    raise _failed_run(model, error) from error
                applied = True
        name = refusal_name(found, site)
        if name in refused:  # planned again all the same: never loop
            raise _failed_run(model, failure) from failure
        refused[name] = failure_reason(found, site, failure, applied)
        found = make_plan(
            model,
            graph,
            options.rules,
            options.kinds,
            reparameterize=options.reparameterize,
            refused=refused,
            hints=options.hints,
        )
