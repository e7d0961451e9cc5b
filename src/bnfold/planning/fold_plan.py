"""The plan: what folds into what, and what stays and why. Data only.

Every later stage (surgery, the per-layer check, the report) reads these types. Each row says its kind
explicitly (``FoldSite.kind``, a :class:`~bnfold.planning.kinds.FoldKind` of the plan's ``kinds``) and
carries that kind's typed payload, so nothing is ever parsed back from a label: :class:`ReadThrough` for a
backward fold that reads through norms folded before it, :class:`ConcatSlices` for a norm after a
``torch.cat``, :class:`AppliedBy` for a channel-wise constant, and for a merge its
:class:`~bnfold.reparam.merge_recipe.MergeRecipe`. The kinds
themselves are listed in :mod:`bnfold.kinds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ..report import render_plan  # the plan's text is the report's (which reads this module for types only)

if TYPE_CHECKING:
    from .kinds import FoldKind

__all__ = [
    "Direction",
    "ReadThrough",
    "ConcatSlices",
    "AppliedBy",
    "ConstantOp",
    "FoldSite",
    "KeptNorm",
    "FoldPlan",
    "PlanRow",
]

Direction = Literal["backward", "forward"]
ConstantOp = Literal["mul", "div", "add", "sub"]
Payload = TypeVar("Payload")


@dataclass(frozen=True)
class ReadThrough:
    """A backward fold's payload: the norms already folded into the same layer that this one reads through
    (``conv -> bn -> layer scale``), in the order they apply."""

    via: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConcatSlices:
    """A fold into a channel-wise ``torch.cat`` of layers: the ``(start, stop)`` range of the norm's channels
    each partner takes, in the partners' order."""

    slices: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class AppliedBy:
    """A channel-wise constant's payload: the op that applies it to the layer's output."""

    op: ConstantOp


@dataclass(frozen=True)
class FoldSite:
    """A norm layer (or a channel-wise constant, or a block of branches) that folds into its partner layer(s).

    ``norm``: the qualified name of the norm module (for a constant, of the parameter or buffer; for a
    merge, of the block). ``partners``: the layers it folds into. ``kind``: its kind of fold, by name (the
    plan's ``kinds`` says everything about it); ``payload``: that kind's data (see the module docstring).
    ``direction``: which side of the norm its partners are on. ``memory_format``: for a norm that gave its
    output another memory layout than its input had, the format its replacement must give (code after it
    may rely on it, e.g. ``.view``).
    """

    norm: str
    norm_type: str
    partners: tuple[str, ...]
    partner_types: tuple[str, ...]
    kind: str = "backward"
    payload: Any = None
    direction: Direction = "backward"
    memory_format: str | None = None

    @property
    def partner(self) -> str:
        return ", ".join(self.partners)

    def payload_as(self, kind: type[Payload]) -> Payload:
        """The payload, which must be a ``kind`` (surgery's steps read their own kind's payload)."""
        if not isinstance(self.payload, kind):
            raise ValueError(f"the plan gives no {kind.__name__} for '{self.norm}' ({self.kind})")
        return self.payload


@dataclass(frozen=True)
class KeptNorm:
    """A norm layer (or channel-wise constant) that stays in the model, and why."""

    norm: str
    norm_type: str
    reason: str
    partner: str | None = None
    kind: str | None = None  # the kind of transform it was kept out of, when not a norm's fold ("equalize")

    @property
    def decision(self) -> str:
        return "kept"


PlanRow = FoldSite | KeptNorm


@dataclass(frozen=True)
class FoldPlan:
    """Every norm layer of a model with its decision: folded into which layer, or kept and why.

    >>> import torch, bnfold
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> p = bnfold.plan(m, torch.randn(1, 3, 8, 8))
    >>> [(s.norm, s.partners, s.kind) for s in p.sites]
    [('1', ('0',), 'backward')]
    >>> p.decision(p.sites[0])
    'folded'
    """

    model_type: str
    traced_with: str
    sites: tuple[FoldSite, ...]
    kept: tuple[KeptNorm, ...]
    order: tuple[str, ...]  # row names in model order
    # the kinds of fold it was made with, by name (bnfold.kinds): every later stage looks a row's kind up here
    kinds: Mapping[str, FoldKind] = field(default_factory=dict, compare=False, repr=False)

    def kind(self, site: FoldSite) -> FoldKind:
        """Everything about ``site``'s kind of fold."""
        found = self.kinds.get(site.kind)
        if found is None:
            raise KeyError(f"'{site.norm}' is a fold of kind '{site.kind}', which this plan was not made with")
        return found

    @property
    def folded(self) -> int:
        """Norm layers (and constants) folded or merged away (rows whose kind tallies as ``"folded"``)."""
        return sum(1 for s in self.sites if self.kind(s).tally == "folded")

    @property
    def merged(self) -> int:
        """Blocks of parallel branches merged into one convolution (rows whose kind tallies as ``"merged"``)."""
        return sum(1 for s in self.sites if self.kind(s).tally == "merged")

    @property
    def equalized(self) -> int:
        """Chains of layers whose weight ranges were equalized (rows whose kind tallies as ``"equalized"``)."""
        return sum(1 for s in self.sites if self.kind(s).tally == "equalized")

    def joined(self, other: FoldPlan) -> FoldPlan:
        """This plan followed by ``other`` (a second round on the folded model), with the kinds of both."""
        kinds = {**self.kinds, **other.kinds}
        return FoldPlan(
            self.model_type,
            self.traced_with,
            (*self.sites, *other.sites),
            (*self.kept, *other.kept),
            (*self.order, *other.order),
            kinds,
        )

    def decision(self, row: PlanRow) -> str:
        """What happened to ``row``, in one word: its kind's word ("folded", "merged"), or "kept"."""
        return self.kind(row).word if isinstance(row, FoldSite) else "kept"

    @property
    def rows(self) -> list[PlanRow]:
        """One entry per norm layer, in the model's module order."""
        by_name: dict[str, PlanRow] = {s.norm: s for s in self.sites}
        by_name.update({k.norm: k for k in self.kept})
        return [by_name[name] for name in self.order]

    def __str__(self) -> str:
        return render_plan(self)
