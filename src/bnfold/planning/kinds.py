"""A kind of fold as one object: what every stage needs to know about it, in one place.

A :class:`FoldKind` says how rows of its kind are found (its planning pass, and when that pass runs), how
surgery carries them out (its step), how the per-layer check probes them (its :class:`ProbeRole`), what
becomes of the folded norm or constant (its residue), and how the report names it. The plan carries the
kinds it was made with (:attr:`~bnfold.planning.fold_plan.FoldPlan.kinds`), so every later stage looks a
row's kind up there, never by comparing names. The built-in kinds are in :mod:`bnfold.kinds`; a new kind
is one more ``FoldKind``, passed per call with ``extra_kinds=[...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .context import PlanContext
    from .fold_plan import FoldSite, PlanRow

__all__ = ["ProbeRole", "Residue", "FoldKind", "PlanPass", "SurgeryStep", "keeps_itself"]

PlanPass = Callable[["PlanContext"], "list[PlanRow]"]
SurgeryStep = Callable[[Any, "FoldSite"], None]  # (the Surgery of bnfold.apply.surgery, the site) -> None

# What becomes of the folded norm (or constant, or block): "rule": what the norm's NormRule says (replaced
# by its replacement, or made neutral in place); "neutral": it stays, set to its neutral value (a constant);
# "replaced": the step puts a module of its own in its place (a merged block); "none": nothing of its own
# (a norm inside a merged block goes with the block).
Residue = Literal["rule", "neutral", "replaced", "none"]


@dataclass(frozen=True)
class ProbeRole:
    """How a kind of fold changes values, for the per-layer check.

    ``side="after"``: it folds into the layers that feed it, whose outputs are then changed until the last
    fold after them restores the original's values at its ``exit`` (the norm's output, ``"module"``, or
    the result of the op that applies a constant, ``"constant"``). ``side="before"``: it folds into the
    layers it feeds; its own output is changed, and their outputs restore the original's values.
    ``side="region"``: its own module is the entry and the exit (a merged block). ``side="span"``: a
    transform over several layers: the values change from the input of the first partner to the outputs
    of the others (a scale moved from a layer's output channels to the input channels of its readers).
    ``side="none"``: nothing to check of its own.
    """

    side: Literal["after", "before", "region", "span", "none"]
    exit: Literal["module", "constant"] = "module"


def keeps_itself(site: FoldSite) -> str:
    """What to keep so that ``site`` is not folded: by default the row's own name."""
    return site.norm


@dataclass(frozen=True)
class FoldKind:
    """Everything about one kind of fold (see the module docstring).

    Args:
        name: the kind, as rows of it say (``FoldSite.kind``).
        step: ``(surgery, site) -> None``: carry one row out on the model, through the surgery's undo log.
        probe: how the per-layer check probes a row of this kind.
        plan_pass: ``PlanContext -> rows``: the pass that finds rows of this kind (several kinds may share
            one pass: it runs once); ``None``: rows of this kind come from another kind's pass.
        order: passes run in ascending order (built-in: merges 10, norms 20, constants 30); a pass reads the
            rows decided before it in ``ctx.decided``.
        opt_in: the option that must be on for its pass to run, or ``None``: ``"reparameterize"`` (its pass
            runs with the folds, first), ``"equalize"`` (its pass runs in a second round, on the folded model:
            after every fold and merge).
        payload: the type of ``FoldSite.payload`` for rows of this kind (``None``: none).
        residue: what becomes of the folded norm (see :data:`Residue`).
        word: the decision the report shows ("folded", "merged").
        tally: which total a row counts in: folded norms, merged blocks, or equalized chains.
        keeps: ``site -> name`` to keep so that this row is not folded again (``refused``).
        label: the words for folding a row of this kind, in a reason ("folding it", "merging them").
    """

    name: str
    step: SurgeryStep
    probe: ProbeRole
    plan_pass: PlanPass | None = None
    order: int = 50
    opt_in: Literal["reparameterize", "equalize"] | None = None
    payload: type | None = None
    residue: Residue = "rule"
    word: str = "folded"
    tally: Literal["folded", "merged", "equalized"] = "folded"
    keeps: Callable[[FoldSite], str] = keeps_itself
    label: str = "folding it"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"FoldKind.name must be a non-empty string, got {self.name!r}")
        if not callable(self.step):
            raise TypeError(f"FoldKind '{self.name}': step must be callable (surgery, site) -> None")
        if not isinstance(self.probe, ProbeRole):
            raise TypeError(f"FoldKind '{self.name}': probe must be a ProbeRole, got {self.probe!r}")
        if self.opt_in not in (None, "reparameterize", "equalize"):
            raise ValueError(
                f"FoldKind '{self.name}': opt_in must be None, 'reparameterize' or 'equalize', got {self.opt_in!r}"
            )
