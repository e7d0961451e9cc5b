"""The plan: what folds into what, and what stays and why. Data only.

Every later stage (surgery, the per-layer check, the report) reads these types;
this module imports none of them. Each fold says its kind explicitly and
carries what surgery needs, so nothing is ever parsed back from a label:

==========  ===================================================================
kind        meaning
==========  ===================================================================
backward    a norm after one layer, ``norm(layer(x))``: the layer's output channels
concat      a norm after a channel-wise ``torch.cat`` of layers: each layer takes
            the slice ``slices[i]`` of the norm's channels
forward     a norm before layers, ``layer(norm(x))``: their input channels
constant    a per-channel parameter applied by an op, ``layer(x) <op> constant``:
            folded into the layer, the constant set to the op's neutral value
merge       parallel branches of one tensor and their sum, merged into one
            convolution: the block around them (``norm``) becomes a MergedConv
            (in a partial merge, beside the branches that keep running)
merged      a norm that is part of a merge (``partners``: the block)
==========  ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..report import render_plan  # the plan's text is the report's (which reads this module for types only)

__all__ = [
    "FoldKind",
    "Direction",
    "ConstantOp",
    "KeptBranch",
    "MergeRecipe",
    "FoldSite",
    "KeptNorm",
    "FoldPlan",
    "PlanRow",
]

FoldKind = Literal["backward", "concat", "forward", "constant", "merge", "merged"]
Direction = Literal["backward", "forward"]
ConstantOp = Literal["mul", "div", "add", "sub"]


@dataclass(frozen=True)
class KeptBranch:
    """A branch of a partial merge that keeps running beside the merged convolution, and why: ``sign *
    recipe(x)`` (a recipe of :mod:`bnfold.branches` whose modules run as they are), the modules it runs."""

    sign: float
    recipe: Any
    modules: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class MergeRecipe:
    """What surgery needs to rebuild a merge: the branches as a recipe (:mod:`bnfold.branches`), the
    channels and spatial rank of the tensor they read, the modules that follow the sum inside the block
    (names relative to it), what the merge became, in words, and the modules before the branches.
    ``kept``: in a partial merge, the branches that keep running, added to the merged convolution."""

    recipe: Any
    channels: int
    dims: int
    post: tuple[str, ...]
    result: str
    pre: tuple[str, ...] = ()  # the modules before the branches inside the block
    kept: tuple[KeptBranch, ...] = ()


@dataclass(frozen=True)
class FoldSite:
    """A norm layer (or a channel-wise constant) that folds into its partner layer(s).

    ``norm``: the qualified name of the norm module (for ``kind="constant"``, of the parameter or buffer).
    ``partners``: the layers it folds into; ``slices``: for ``kind="concat"``, the ``(start, stop)`` range
    of the norm's channels each partner takes; ``op``: for ``kind="constant"``, the op that applies it;
    ``via``: for a backward fold, norms already folded into the same layer that this one reads through
    (``conv -> bn -> layer scale``), in the order they apply; ``memory_format``: for a norm that gave its
    output another memory layout than its input had, the format its replacement must give (code after it
    may rely on it, e.g. ``.view``).
    """

    norm: str
    norm_type: str
    partners: tuple[str, ...]
    partner_types: tuple[str, ...]
    kind: FoldKind = "backward"
    via: tuple[str, ...] = ()
    slices: tuple[tuple[int, int], ...] = ()
    op: ConstantOp | None = None
    merge: MergeRecipe | None = None
    memory_format: str | None = None

    @property
    def direction(self) -> Direction:
        """Which side of the norm its partners are on: ``forward`` (after it) or ``backward`` (before it)."""
        return "forward" if self.kind == "forward" else "backward"

    @property
    def decision(self) -> str:
        return "merged" if self.kind in ("merge", "merged") else "folded"

    @property
    def partner(self) -> str:
        return ", ".join(self.partners)


@dataclass(frozen=True)
class KeptNorm:
    """A norm layer (or channel-wise constant) that stays in the model, and why."""

    norm: str
    norm_type: str
    reason: str
    partner: str | None = None

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
    """

    model_type: str
    traced_with: str
    sites: tuple[FoldSite, ...]
    kept: tuple[KeptNorm, ...]
    order: tuple[str, ...]  # row names in model order

    @property
    def rows(self) -> list[PlanRow]:
        """One entry per norm layer, in the model's module order."""
        by_name: dict[str, PlanRow] = {s.norm: s for s in self.sites}
        by_name.update({k.norm: k for k in self.kept})
        return [by_name[name] for name in self.order]

    def __str__(self) -> str:
        return render_plan(self)
