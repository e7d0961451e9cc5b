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

from ..apply.surgery import folded_copy
from ..errors import FoldError, clean_message
from ..planning.fold_plan import FoldPlan, FoldSite
from ..rules.table import RuleTable

__all__ = ["Run", "refusal_name", "failure_reason", "first_breaking_fold"]

Run = Callable[[nn.Module], Any]  # runs a folded model once, returns what the check needs


def refusal_name(site: FoldSite) -> str:
    """What to keep so that ``site`` is not folded: its norm, or for a norm merged with its branches, the
    block they merge into (a merge is kept whole)."""
    return site.partners[0] if site.kind == "merged" else site.norm


def failure_reason(site: FoldSite, error: BaseException, applied: bool = True) -> str:
    """The reason, in a kept row, for a fold (or merge) that broke the folded model (``applied=False``: that
    could not be applied)."""
    text = clean_message(error).splitlines()[0] if clean_message(error) else ""
    if len(text) > 160:
        text = text[:157] + "..."
    what = "merging them" if site.kind in ("merge", "merged") else "folding it"
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
