"""Structural re-parameterization: parallel branches merged into one convolution, on any model.

The pass (:func:`merge_rows`) finds sums of branches of one tensor (:mod:`bnfold.branches`), checks that
one convolution computes them exactly (:mod:`bnfold.kernels`), and finds the smallest enclosing module
whose whole forward is those branches and what follows the sum inside it (an activation, a dropout). A sum
cannot become one conv by swapping modules (the Python ``forward`` still adds), so surgery replaces that
module by a :class:`MergedConv`: the merged convolution, then the modules that followed the sum.
Everything else keeps its class and attribute path.

When only some branches of a sum merge exactly (another has an activation, a different stride, shared
weights...), those merge and the others keep running (a partial merge): the :class:`MergedConv` also holds
the modules and constants of the kept branches, under their paths in the block, runs each kept branch as the
chain of modules and coefficients it was, and adds it to the merged convolution's output before the modules
that followed the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..discover.graph import Span
from ..planning.context import Kept, PlanContext
from ..planning.fold_plan import FoldSite, KeptNorm, PlanRow
from ..rules.classes import layer_type
from .branches import Branches, Term, channels_and_dims, find_branches, region_reason
from .merge_arithmetic import ConvForm, NotExact, add_forms, affine_after
from .merge_recipe import KeptBranch, MergeRecipe
from .merged_conv import Step, held_kind, held_thing
from .recipes import (
    Coefficient,
    Layer,
    Recipe,
    Source,
    Sum,
    describe,
    evaluate,
    has_conv,
    is_sum,
    sequence_cost,
    structure,
    unknown_reason,
)

__all__ = ["merge_rows", "merge_hints", "kept_program"]


@dataclass(frozen=True)
class _Block:
    name: str
    module: nn.Module
    pre: tuple[str, ...]
    post: tuple[str, ...]


def _enclosing(branches: Branches, ctx: PlanContext) -> _Block:
    """The smallest module around the branches whose forward is a chain: modules before the branches
    (``pre``), the branches and their sum, modules after it (``post``); or Kept with the reason."""
    graph = ctx.graph
    region = branches.calls
    first, last = min(region), max(region)
    around = [s for s in graph.spans if s.start <= first and last < s.end and s.module is not ctx.model]
    if not around:
        raise Kept("no module around them but the model itself (merging replaces the module around the branches)")
    span = min(around, key=lambda s: s.end - s.start)
    name = ctx.name(span.module)
    if sum(1 for s in graph.spans if s.module is span.module) != 1:
        raise Kept(f"'{name}', the module around them, is called more than once", name)
    if span.module._forward_hooks or span.module._forward_pre_hooks:
        raise Kept(f"'{name}', the module around them, has forward hooks", name)
    if len(span.inputs) != 1:
        raise Kept(f"'{name}', the module around them, takes {len(span.inputs)} tensors", name)
    pre, post = _chains(branches, span, name, ctx)
    return _Block(name, span.module, pre, post)


def _chains(branches: Branches, block: Span, name: str, ctx: PlanContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The modules before and after the branches inside ``block``: one chain from the block's input to the
    tensor the branches read, and one from their sum to the block's output."""
    graph = ctx.graph
    inner = [s for s in graph.spans if block.start <= s.start and s.end <= block.end and s is not block]
    first, last = min(branches.calls), max(branches.calls)
    current = block.inputs[0]
    chains: tuple[list[str], list[str]] = ([], [])
    index = block.start
    while index < block.end:
        call = graph.calls[index]
        if first <= index <= last:
            if index not in branches.calls and not (call.inputs and call.inputs == call.outputs):
                raise Kept(f"'{name}' computes '{call.target}' between its branches", name)
            if index == first:
                if current != branches.source:
                    raise Kept(
                        f"'{name}' reads its branches' input through something that is not a chain of modules", name
                    )
                current = branches.output
            index += 1
            continue
        if call.inputs and call.inputs == call.outputs:
            index += 1  # the identity in eval mode (Identity, Dropout, DropPath)
            continue
        step = max(
            (s for s in inner if s.start == index and not (set(range(s.start, s.end)) & branches.calls)),
            key=lambda s: s.end - s.start,
            default=None,
        )
        if step is None:
            raise Kept(f"'{name}' also computes '{call.target}', which is not part of the branches", name)
        child = ctx.name(step.module)
        if not child.startswith(name + ".") or step.inputs != [current] or len(step.outputs) != 1:
            raise Kept(f"'{name}' applies '{child}' to something other than the chain through its branches", name)
        if "." in child[len(name) + 1 :]:
            raise Kept(f"'{name}' calls '{child}', which is not one of its own children, around its branches", name)
        chains[index > last].append(child[len(name) + 1 :])
        current = step.outputs[0]
        index = step.end
    if block.outputs != [current]:
        raise Kept(f"'{name}' returns something other than the sum and what follows it", name)
    return tuple(chains[0]), tuple(chains[1])


@dataclass(frozen=True)
class _Merge:
    """What a merge takes: the block, the merged convolution and its recipe, the modules and calls it
    merges, and (in a partial merge) the branches that keep running."""

    block: _Block
    branches: Branches
    form: ConvForm
    recipe: Recipe
    modules: tuple[str, ...]
    calls: frozenset[int]
    kept: tuple[KeptBranch, ...] = ()


Evaluator = Callable[[Recipe, PlanContext, int, int], ConvForm]


def _exact(recipe: Recipe, ctx: PlanContext, channels: int, dims: int) -> ConvForm:
    return evaluate(recipe, ctx.model, ctx.rules, channels, dims)


def _by_structure() -> Evaluator:
    """An evaluator for hints, which need only whether branches merge: that depends on the recipe's
    structure (:func:`~bnfold.recipes.structure`), not on the weights' values, so blocks built alike
    (a RepVGG stage) are evaluated once. Its forms hold the first such block's values: never for a merge."""
    memo: dict[Hashable, ConvForm | Exception] = {}

    def evaluator(recipe: Recipe, ctx: PlanContext, channels: int, dims: int) -> ConvForm:
        key = (structure(recipe, ctx.model), channels, dims)
        if key not in memo:
            try:
                memo[key] = _exact(recipe, ctx, channels, dims)
            except Exception as error:  # the same outcome for every block built alike
                memo[key] = error
        found = memo[key]
        if isinstance(found, Exception):
            raise found
        return found

    return evaluator


def _analyse(branches: Branches, ctx: PlanContext, evaluator: Evaluator = _exact) -> _Merge:
    """The merge of all the branches; failing that, of those that merge (a partial merge); else Kept or
    NotExact with the reason the whole sum stays."""
    try:
        return _whole(branches, ctx, evaluator)
    except (Kept, NotExact) as whole:
        if branches.inner is not None and has_conv(branches.inner.recipe):
            # the sum alone, without the norm or convolution after it; if it stays, its reason is about the sum
            return _analyse(branches.inner, ctx, evaluator)
        if not branches.terms:
            raise
        try:
            return _partial(branches, ctx, evaluator)
        except _NoSplit:
            raise whole from None


def _whole(branches: Branches, ctx: PlanContext, evaluator: Evaluator) -> _Merge:
    reason = region_reason(branches, ctx)
    if reason:
        raise Kept(reason)
    channels, dims = channels_and_dims(branches, ctx)
    form = evaluator(branches.recipe, ctx, channels, dims)
    if not is_sum(branches.recipe):
        before, after = sequence_cost(branches.recipe, ctx.model), float(form.kernel.numel())
        if after > before:
            raise NotExact(
                f"one convolution would cost more multiply-adds than the sequence ({after:.0f} > {before:.0f})"
            )
    block = _enclosing(branches, ctx)
    _unclaimed(block, ctx)
    return _Merge(block, branches, form, branches.recipe, branches.modules, branches.calls)


def _unclaimed(block: _Block, ctx: PlanContext) -> None:
    if ctx.claimed.get(block.name) is not None:
        raise Kept(f"'{block.name}' already holds another merge", block.name)


class _NoSplit(Exception):  # noqa: N818 - control flow: no part of the branches is worth merging alone
    pass


# How many branches of one sum a partial merge tries as the first of its group (each try is linear in them).
_MAX_SEEDS = 8


def _partial(branches: Branches, ctx: PlanContext, evaluator: Evaluator) -> _Merge:
    """The largest group of branches that one convolution computes exactly, the others kept running.

    Raises :class:`_NoSplit` when no group saves a module (see :func:`_saves`), and Kept when one would but a
    kept branch cannot run alone."""
    terms = branches.terms
    channels, dims = channels_and_dims(branches, ctx)
    forms: dict[int, ConvForm] = {}
    reasons: dict[int, str] = {}
    for i, term in enumerate(terms):
        try:
            form = evaluator(term.recipe, ctx, channels, dims)
        except Exception as error:  # NotExact, or a shape the analysis did not foresee: this branch stays
            reasons[i] = _words(error)
            continue
        reason = region_reason(term, ctx)
        if reason is None:
            forms[i] = form
        else:
            reasons[i] = reason
    group, merged_form = _largest_group(terms, forms)
    if merged_form is None or len(group) < 2 or len(group) == len(terms) or not _saves([terms[i] for i in group]):
        raise _NoSplit
    for i in range(len(terms)):
        if i not in group and i not in reasons:
            try:
                _combine(terms, forms, sorted((*group, i)))
                reasons[i] = "it does not merge with the others"
            except NotExact as error:
                reasons[i] = str(error)
    merged = [terms[i] for i in group]
    kept = tuple(KeptBranch(t.sign, t.recipe, t.modules, reasons[i]) for i, t in enumerate(terms) if i not in group)
    for branch in kept:
        unknown = unknown_reason(branch.recipe)
        if unknown is not None:
            raise Kept(unknown)
    block = _enclosing(branches, ctx)
    held = kept_program(kept, block.name, block.module)[1]
    _check_held(block, [p for p, _, _ in held], [m for t in merged for m in t.modules])
    _unclaimed(block, ctx)
    recipe = Sum(tuple((t.sign, t.recipe) for t in merged))
    modules = tuple(m for t in merged for m in t.modules)
    calls = branches.calls - frozenset().union(*(t.calls for i, t in enumerate(terms) if i not in group))
    return _Merge(block, branches, merged_form, recipe, modules, calls, kept)


def _combine(terms: tuple[Term, ...], forms: dict[int, ConvForm], group: Sequence[int]) -> ConvForm:
    """The convolution of the branches ``group`` (in order), as :func:`~bnfold.recipes.evaluate` adds them."""
    first, *rest = group
    form = forms[first]
    if terms[first].sign != 1.0:
        sign = torch.tensor(terms[first].sign, dtype=torch.float64)
        form = affine_after(form, sign, torch.tensor(0.0, dtype=torch.float64))
    for i in rest:
        form = add_forms(form, forms[i], terms[i].sign)
    return form


def _largest_group(terms: tuple[Term, ...], forms: dict[int, ConvForm]) -> tuple[list[int], ConvForm | None]:
    """The most branches that merge into one convolution: from each convolution branch in turn, every
    other branch that still merges with those taken, in order."""
    best: list[int] = []
    best_form = None
    seeds = [i for i in forms if has_conv(terms[i].recipe)][:_MAX_SEEDS]
    for seed in seeds:
        group = [seed]
        for i in forms:
            if i == seed:
                continue
            trial = sorted((*group, i))
            try:
                _combine(terms, forms, trial)
            except NotExact:
                continue
            group = trial
        if len(group) > len(best):
            best, best_form = group, _combine(terms, forms, group)
    return best, best_form


def _saves(terms: list[Term]) -> bool:
    """Whether merging ``terms`` runs fewer modules: a convolution among them, and at least two of them run
    a module (a convolution, a norm or a pool; merging ``x`` alone into a convolution saves none)."""
    return sum(1 for t in terms if t.modules) >= 2 and any(has_conv(t.recipe) for t in terms)


def _steps(recipe: Recipe, block: str) -> tuple[Step, ...]:
    """A kept branch as steps relative to the block (Kept when it is not one chain inside the block)."""
    if isinstance(recipe, Source):
        return ()
    if isinstance(recipe, Layer):
        return (*_steps(recipe.inner, block), ("module", _relative(recipe.name, block), None))
    if isinstance(recipe, Coefficient):
        target: str | float = _relative(recipe.name, block) if recipe.name else float(recipe.value or 0.0)
        return (*_steps(recipe.inner, block), (recipe.op, target, recipe.shape if recipe.name else None))
    raise Kept(
        f"a branch that does not merge is not one chain from the branches' input, so it cannot run alone in '{block}'",
        block,
    )


def _relative(name: str, block: str) -> str:
    if not name.startswith(block + "."):
        raise Kept(f"'{name}', on a branch that does not merge, is not inside '{block}'", block)
    return name[len(block) + 1 :]


def kept_program(
    kept: Sequence[KeptBranch], block_name: str, block: nn.Module
) -> tuple[list[tuple[float, tuple[Step, ...]]], list[tuple[str, nn.Module | Tensor, str]]]:
    """The kept branches of a partial merge as :class:`MergedConv` runs them (signs and steps, relative to
    the block), and what they read there (path, the module or tensor, its kind), outermost paths only."""
    program = [(branch.sign, _steps(branch.recipe, block_name)) for branch in kept]
    paths: list[str] = []
    for _, steps in program:
        for _op, target, _ in steps:
            if isinstance(target, str) and target not in paths:
                paths.append(target)
    paths = _whole_containers(block, paths)
    outermost = [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]
    held = [(p, held_thing(block, p, kind), kind) for p in outermost for kind in (held_kind(block, p),)]
    return program, held


def _whole_containers(block: nn.Module, paths: list[str]) -> list[str]:
    """``paths`` with a container in place of its children when it holds nothing else (so that it keeps its
    class: a Sequential stays one)."""
    paths = list(paths)
    changed = True
    while changed:
        changed = False
        for path in list(paths):
            parent = path.rpartition(".")[0]
            if not parent or parent in paths:
                continue
            children = [f"{parent}.{name}" for name, child in block.get_submodule(parent)._modules.items() if child]
            if children and all(c in paths for c in children):
                paths = [p for p in paths if not p.startswith(parent + ".")]
                paths.append(parent)
                changed = True
                break
    return paths


def _check_held(block: _Block, held: list[str], merged: list[str]) -> None:
    """A kept branch's modules must be apart from the merged ones and from those around the branches."""
    prefix = block.name + "."
    around = (*block.pre, *block.post)
    for path in held:
        for other in (*around, *(m[len(prefix) :] for m in merged if m.startswith(prefix))):
            if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                raise Kept(
                    f"'{prefix}{path}', on a branch that does not merge, shares '{prefix}{other}' with the merge",
                    block.name,
                )


def merge_rows(ctx: PlanContext) -> list[PlanRow]:
    """The merges of the model: one row per block merged (kind ``merge``) and one per norm it absorbs
    (kind ``merged``); in a partial merge, one per branch that keeps running, with the reason; a row with
    the reason for branches that share their input but do not merge."""
    rows: list[PlanRow] = []
    everything = [found for found in reversed(find_branches(ctx)) if not isinstance(found, Kept)]  # in run order
    # sums kept whole because no module computes one of their branches; the sums inside them may merge alone
    whole = [found.calls - found.opaque for found in everything if unknown_reason(found.recipe) is not None]
    for found in everything:
        own = found.calls - found.opaque
        if unknown_reason(found.recipe) is not None and own & ctx.claimed_calls:
            continue  # a sum inside it merged on its own
        try:
            merge = _analyse(found, ctx)
        except Exception as keep:  # Kept, NotExact, or a shape the analysis did not foresee: never merged
            if not is_sum(found.recipe):
                continue  # a sequence of convolutions that stays as it is: nothing to report
            if any(own < calls for calls in whole):
                continue  # reported with the sum it is part of
            reason = keep.reason if isinstance(keep, Kept) else _words(keep)
            names = ", ".join(f"'{m}'" for m in found.modules)
            rows.append(KeptNorm(f"{_label(found, ctx)} (branches)", "branches", f"branches {names}: {reason}"))
            continue
        block = merge.block
        if block.name in ctx.refused:
            names = ", ".join(f"'{m}'" for m in found.modules)
            reason = f"branches {names}: {ctx.refused[block.name]}"
            rows.append(KeptNorm(f"{block.name} (branches)", "branches", reason))
            continue
        modules = merge.modules
        types = tuple(layer_type(ctx.model.get_submodule(n)).__name__ for n in modules)
        channels, dims = channels_and_dims(merge.branches, ctx)
        result = describe(merge.form)
        if merge.kept:
            count = len(merge.kept)
            result += f" + {count} kept branch{'es' if count > 1 else ''}"
        recipe = MergeRecipe(merge.recipe, channels, dims, block.post, result, block.pre, merge.kept)
        rows.append(FoldSite(block.name, layer_type(block.module).__name__, modules, types, "merge", recipe))
        for name in modules:
            module = ctx.model.get_submodule(name)
            if ctx.rules.is_norm_layer(module):
                rows.append(
                    FoldSite(
                        name, layer_type(module).__name__, (block.name,), (layer_type(block.module).__name__,), "merged"
                    )
                )
        for branch in merge.kept:
            what = branch.modules[-1] if branch.modules else block.name
            rows.append(
                KeptNorm(
                    f"{what} (branch)",
                    "branch",
                    f"runs beside the merged convolution of '{block.name}': {branch.reason}",
                    block.name,
                )
            )
        held = [p for p, _, kind in kept_program(merge.kept, block.name, block.module)[1] if kind == "module"]
        survivors = tuple(f"{block.name}.{s}" for s in (*block.pre, *block.post, *held))
        for name, _ in block.module.named_modules(prefix=block.name):
            if not any(name == s or name.startswith(s + ".") for s in survivors):
                ctx.claimed[name] = block.name  # gone with the block; what survives may still take folds
        ctx.claimed_calls |= merge.calls
    return rows


def merge_hints(ctx: PlanContext, norms: Collection[str] | None = None) -> dict[str, str]:
    """Norm name -> the block whose branches ``reparameterize=True`` would merge it with (only branches
    holding one of ``norms``, when given, are analysed)."""
    hints: dict[str, str] = {}
    evaluator = _by_structure()
    for found in find_branches(ctx):
        if isinstance(found, Kept) or (norms is not None and not any(m in norms for m in found.modules)):
            continue
        try:
            merge = _analyse(found, ctx, evaluator)
        except Exception:  # Kept, NotExact, or anything unforeseen: a hint is a courtesy, never a failure
            continue
        for name in merge.modules:
            hints[name] = merge.block.name
    return hints


def _words(error: Exception) -> str:
    """Why a sum was not merged, for a reason: the exactness condition it fails, or what went wrong."""
    if isinstance(error, NotExact):
        return str(error)
    return f"they could not be analysed ({type(error).__name__}: {error}); please report it with the model"


def _label(branches: Branches, ctx: PlanContext) -> str:
    """Where a sum is, for a row: the module around it, else the op."""
    first, last = min(branches.calls), max(branches.calls)
    around = [s for s in ctx.graph.spans if s.start <= first and last < s.end and s.module is not ctx.model]
    if around:
        return ctx.name(min(around, key=lambda s: s.end - s.start).module)
    return ctx.graph.calls[last].target
