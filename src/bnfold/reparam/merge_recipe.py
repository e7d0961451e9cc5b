"""What a merge carries in the plan: the branches as a recipe, and the branches that keep running beside the
merged convolution (a partial merge). Data only, read by surgery and the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KeptBranch", "MergeRecipe"]


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
