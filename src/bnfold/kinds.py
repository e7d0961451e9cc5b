"""The kinds of fold bnfold knows: one :class:`~bnfold.planning.kinds.FoldKind` each, with its pass, its
surgery step, its probe role and its residue. A new kind is one more ``FoldKind`` passed per call
(``bnfold.fold(model, x, extra_kinds=[...])``); nothing here is patched.

==========  ========================================================================  ==============
kind        meaning                                                                   pass (order)
==========  ========================================================================  ==============
merge       parallel branches of one tensor and their sum, merged into one            merges (10,
            convolution: the block around them becomes a MergedConv                   reparameterize)
merged      a norm that is part of a merge (its partner: the block)                   merges
backward    a norm after one layer, ``norm(layer(x))``: the layer's output channels   norms (20)
concat      a norm after a channel-wise ``torch.cat`` of layers: each takes a slice   norms
forward     a norm before layers, ``layer(norm(x))``: their input channels            norms
constant    a per-channel parameter applied by an op, ``layer(x) <op> constant``      constants (30)
equalize    a chain of layers whose per-channel weight ranges are equalized by a      equalization
            positive scale moved across what lies between them                        (equalize)
==========  ========================================================================  ==============

Merges come first: the modules they take are no longer there for the other passes. Equalization runs in a
second round, on the folded model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .apply.equalization import apply_equalize
from .apply.surgery import apply_backward, apply_concat, apply_constant, apply_forward, apply_merge, apply_merged
from .planning.channelwise import constant_rows
from .planning.equalize_pass import EqualizedChain, equalize_rows
from .planning.fold_plan import AppliedBy, ConcatSlices, FoldSite, ReadThrough
from .planning.kinds import FoldKind, ProbeRole
from .planning.norm_pass import norm_rows
from .reparam.merge_pass import merge_rows
from .reparam.merge_recipe import MergeRecipe

__all__ = ["builtin_kinds", "build_kinds"]


def _the_block(site: FoldSite) -> str:
    """A norm merged with its branches is kept by keeping the block they merge into (a merge is whole)."""
    return site.partners[0]


def builtin_kinds() -> dict[str, FoldKind]:
    """The kinds of fold bnfold knows, by name."""
    kinds = [
        FoldKind(
            "merge",
            apply_merge,
            ProbeRole("region"),
            merge_rows,
            order=10,
            opt_in="reparameterize",
            payload=MergeRecipe,
            residue="replaced",
            word="merged",
            tally="merged",
            label="merging them",
        ),
        FoldKind(
            "merged",
            apply_merged,
            ProbeRole("none"),
            residue="none",
            word="merged",
            keeps=_the_block,
            label="merging them",
        ),
        FoldKind("backward", apply_backward, ProbeRole("after"), norm_rows, order=20, payload=ReadThrough),
        FoldKind("concat", apply_concat, ProbeRole("after"), payload=ConcatSlices),
        FoldKind("forward", apply_forward, ProbeRole("before")),
        FoldKind(
            "constant",
            apply_constant,
            ProbeRole("after", exit="constant"),
            constant_rows,
            order=30,
            payload=AppliedBy,
            residue="neutral",
        ),
    ]
    kinds.append(
        FoldKind(
            "equalize",
            apply_equalize,
            ProbeRole("none"),  # planned on the folded model: the output check proves it
            equalize_rows,
            order=10,
            opt_in="equalize",
            payload=EqualizedChain,
            residue="none",
            word="equalized",
            tally="equalized",
            label="equalizing them",
        )
    )
    return {kind.name: kind for kind in kinds}


_BUILTIN: Mapping[str, FoldKind] = MappingProxyType(builtin_kinds())


def build_kinds(extra: Iterable[FoldKind] | None = None) -> Mapping[str, FoldKind]:
    """The built-in kinds with a call's ``extra_kinds``; an extra kind may not reuse a built-in name.

    >>> sorted(build_kinds())
    ['backward', 'concat', 'constant', 'equalize', 'forward', 'merge', 'merged']
    """
    if extra is None:
        return _BUILTIN
    if isinstance(extra, FoldKind):
        raise TypeError("extra_kinds must be a list of FoldKind, got one FoldKind; pass extra_kinds=[kind]")
    kinds = dict(_BUILTIN)
    for kind in extra:
        if not isinstance(kind, FoldKind):
            raise TypeError(f"extra_kinds must hold bnfold.FoldKind objects, got {type(kind).__name__}")
        if kind.name in kinds:
            raise ValueError(f"extra_kinds: a kind named '{kind.name}' exists already; give yours another name")
        kinds[kind.name] = kind
    return MappingProxyType(kinds)
