"""Make the plan: the passes of the plan's kinds of fold, in their declared order, over the data-flow graph.

Each pass reads the model, its graph and the rules (a :class:`~bnfold.planning.context.PlanContext`, whose
``decided`` holds the rows decided before it) and returns rows of its kinds. The kinds (built-in ones in
:mod:`bnfold.kinds`, a call's own with ``extra_kinds``) say which pass finds them and in what order; a pass
shared by several kinds runs once. Building the plan changes nothing.

Without ``reparameterize``, a norm kept in branches that a merge would take says so in its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import nn

from ..discover.graph import DataFlowGraph
from ..reparam.merge_pass import merge_hints
from ..rules.table import RuleTable
from .context import PlanContext
from .fold_plan import FoldPlan, FoldSite, KeptNorm, PlanRow
from .kinds import FoldKind, PlanPass

__all__ = ["Stage", "passes_of", "make_plan"]


Stage = Literal["fold", "equalize"]


def passes_of(kinds: Mapping[str, FoldKind], reparameterize: bool, stage: Stage = "fold") -> list[PlanPass]:
    """The passes of ``kinds`` for ``stage`` in their declared order, each once: for ``"fold"``, every kind's
    but the equalization round's (those that need ``reparameterize`` only with it); for ``"equalize"``, the
    kinds that run on the folded model."""
    found: dict[int, tuple[int, PlanPass]] = {}
    for kind in kinds.values():
        if kind.plan_pass is None or (kind.opt_in == "equalize") != (stage == "equalize"):
            continue
        if kind.opt_in == "reparameterize" and not reparameterize:
            continue
        order, _ = found.get(id(kind.plan_pass), (kind.order, kind.plan_pass))
        found[id(kind.plan_pass)] = (min(order, kind.order), kind.plan_pass)
    return [run for _, run in sorted(found.values(), key=lambda entry: entry[0])]


def make_plan(
    model: nn.Module,
    graph: DataFlowGraph,
    rules: RuleTable,
    kinds: Mapping[str, FoldKind],
    *,
    reparameterize: bool = False,
    refused: Mapping[str, str] | None = None,
    hints: bool = True,
    stage: Stage = "fold",
) -> FoldPlan:
    """Decide, for every norm layer (and channel-wise constant) of ``model``, whether and where it folds,
    with the passes of ``kinds`` (:func:`passes_of`). ``refused``: norms, constants and merged blocks to keep (name -> the reason).
    ``hints``: a kept norm that ``reparameterize=True`` would merge says so in its reason."""
    ctx = PlanContext(model, graph, rules, refused=dict(refused or {}))
    rows: dict[str, PlanRow] = ctx.decided  # by name, in the order found
    for run in passes_of(kinds, reparameterize, stage):
        for row in run(ctx):
            if isinstance(row, FoldSite) and row.kind not in kinds:
                raise ValueError(f"a planning pass made a row of kind '{row.kind}', which no FoldKind names")
            # a constant used by several ops is reported once (kept: used elsewhere)
            rows.setdefault(row.norm, row)
    kept_names = {name for name, row in rows.items() if not isinstance(row, FoldSite)}
    # Only a kept row shows a hint, so the branches (whose analysis costs as much as a merge) are looked at
    # only when there is one; no pass above claims anything without reparameterize.
    hinted = hints and stage == "fold" and kept_names and not reparameterize and graph.has_shapes
    merges = merge_hints(ctx, kept_names) if hinted else {}
    sites: list[FoldSite] = []  # in the order surgery applies them: the order each pass gives
    kept: list[KeptNorm] = []
    for row in rows.values():
        if isinstance(row, FoldSite):
            sites.append(row)
        elif row.norm in merges:
            reason = (
                f"{row.reason}; reparameterize=True would merge it with its parallel branches into '{merges[row.norm]}'"
            )
            kept.append(KeptNorm(row.norm, row.norm_type, reason, row.partner))
        else:
            kept.append(row)
    # rows are listed in the model's module order, then the rest (constants) in the order they were found
    modules = {name: i for i, (name, _) in enumerate(ctx.modules)}
    found = {name: i for i, name in enumerate(rows)}
    order = sorted(found, key=lambda name: (0, modules[name]) if name in modules else (1, found[name]))
    return FoldPlan(type(model).__name__, graph.traced_with, tuple(sites), tuple(kept), tuple(order), kinds)
