"""Make the plan: a short sequence of passes over the data-flow graph.

Each pass reads the model, its graph and the rules (a :class:`~bnfold.checks.PlanContext`) and returns
plan rows of its own kinds; surgery (``bnfold.surgery.STEPS``) and the per-layer check
(``bnfold.layercheck.PROBE_ROLES``) each hold one entry per kind. A new kind of fold is one pass here, one
surgery step and one probe entry. Building the plan changes nothing.

=========== ========================================================== =====================
pass        what it folds                                               kinds
=========== ========================================================== =====================
merge_rows  (``reparameterize=True``) parallel branches of one tensor    merge, merged
            and their sum, into one convolution
norm_rows   each norm layer, backward (into the layer before it), else  backward, concat,
            forward (into every layer after it)                         forward
constants   ``layer(x) * gamma + beta`` with per-channel model constants constant
=========== ========================================================== =====================

Merges come first: the modules they take are no longer there for the other passes. Without
``reparameterize``, a norm kept in branches that a merge would take says so in its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from ..discover.graph import DataFlowGraph
from ..reparam.merge_pass import merge_hints, merge_rows
from ..rules.table import RuleTable
from .channelwise import constant_rows
from .context import PlanContext
from .fold_plan import FoldPlan, FoldSite, KeptNorm, PlanRow
from .norm_pass import norm_rows

__all__ = ["PlanPass", "PASSES", "REPARAMETERIZE_PASSES", "make_plan"]

PlanPass = Callable[[PlanContext], list[PlanRow]]

PASSES: tuple[PlanPass, ...] = (norm_rows, constant_rows)
REPARAMETERIZE_PASSES: tuple[PlanPass, ...] = (merge_rows,)  # run before PASSES with reparameterize=True


def make_plan(
    model: nn.Module,
    graph: DataFlowGraph,
    rules: RuleTable,
    passes: Sequence[PlanPass] | None = None,
    *,
    reparameterize: bool = False,
    refused: Mapping[str, str] | None = None,
    hints: bool = True,
) -> FoldPlan:
    """Decide, for every norm layer (and channel-wise constant) of ``model``, whether and where it folds,
    with ``passes`` (default: :data:`PASSES`, read at each call, after :data:`REPARAMETERIZE_PASSES` when
    ``reparameterize``). ``refused``: norms, constants and merged blocks to keep (name -> the reason).
    ``hints``: a kept norm that ``reparameterize=True`` would merge says so in its reason."""
    ctx = PlanContext(model, graph, rules, refused=dict(refused or {}))
    if passes is None:
        passes = (*REPARAMETERIZE_PASSES, *PASSES) if reparameterize else PASSES
    rows: dict[str, PlanRow] = {}  # by name, in the order found
    for run in passes:
        for row in run(ctx):
            # a constant used by several ops is reported once (kept: used elsewhere)
            rows.setdefault(row.norm, row)
    kept_names = {name for name, row in rows.items() if not isinstance(row, FoldSite)}
    # Only a kept row shows a hint, so the branches (whose analysis costs as much as a merge) are looked at
    # only when there is one; no pass above claims anything without reparameterize.
    merges = merge_hints(ctx, kept_names) if hints and kept_names and not reparameterize and graph.has_shapes else {}
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
    return FoldPlan(type(model).__name__, graph.traced_with, tuple(sites), tuple(kept), tuple(order))
