"""Parallel branches as one convolution: find them in the data-flow graph.

A sum of branches that all read the same tensor ``x`` (``a + b``, ``a + b + c``, ``+=``, ``a - b``, with
scalar or per-channel coefficients), each a linear chain from ``x`` (a convolution and the norms and affine
maps after it, a norm alone, nothing at all, an average pool, a 1x1 convolution before or after a kxk one;
through ops that hand on their input unchanged, by the op registry: ``nn.Identity``, Dropout in eval mode,
``clone``; a reshape or a permute still ends a branch),
and optionally a norm or affine map after the sum, is one convolution at inference. A sum that also adds
branches that are not linear (an activation on a branch) is found too, each such branch as the chain of
modules that computes it from ``x``: the linear branches may merge while those keep running
(:mod:`bnfold.reparam` decides).

The result of the analysis is a :data:`~bnfold.recipes.Recipe`: a small tree that names the modules and
constants of the branches (:mod:`bnfold.recipes`, which also turns it into one convolution).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from torch import nn

from ..discover.graph import Call, Span, TensorRef, ValueKey
from ..planning.channel_walk import hands_on_values
from ..planning.channelwise import constant_op, find_constant, readers_inside
from ..planning.context import Kept, PlanContext, layer_reason
from ..rules.classes import type_chain
from ..rules.layers import CONVS
from ..rules.ops import entry_for
from ..rules.table import RuleTable
from .merge_arithmetic import NotExact
from .recipes import (
    Coefficient,
    Layer,
    Recipe,
    Source,
    Sum,
    Unknown,
    conv_names,
    exact_pool,
    has_conv,
    is_sum,
    rebase,
    unknown_reason,
)

__all__ = ["Term", "Branches", "find_branches", "region_reason", "channels_and_dims"]


def _sum_sign(call: Call) -> float | None:
    """``+1`` for a call that adds its two operands, ``-1`` for one that subtracts the second (the registry's
    ``applies``, Python's ``+=`` and ``-=`` included), else ``None``."""
    entry = entry_for(call) if call.kind == "function" else None
    applies = entry.applies if entry is not None else None
    return 1.0 if applies == "add" else -1.0 if applies == "sub" else None


@dataclass(frozen=True)
class Term:
    """One branch of a sum: ``sign * recipe(x)``, with the calls, modules and constants it spans."""

    sign: float
    recipe: Recipe
    calls: frozenset[int]
    modules: tuple[str, ...]  # in the order they run
    constants: tuple[str, ...]


@dataclass(frozen=True)
class Branches:
    """A merge the analysis found: the recipe, the tensor it reads, the calls and modules it spans, and
    the value it computes. ``terms``: the branches of a sum one by one (empty when the recipe is not a
    sum); ``inner``: for a sum followed by a norm or affine map, the sum alone."""

    recipe: Recipe
    source: ValueKey
    calls: frozenset[int]
    modules: tuple[str, ...]  # in the order they run
    constants: tuple[str, ...]
    output: ValueKey
    terms: tuple[Term, ...] = ()
    inner: Branches | None = None
    opaque: frozenset[int] = frozenset()  # calls inside the modules a branch that does not merge runs as they are


# -- finding branches in the graph -------------------------------------------------------------------------


class _Stop(Exception):  # noqa: N818 - control flow: this value is where the branches start
    pass


@dataclass
class _Found:
    recipe: Recipe
    sources: set[ValueKey]
    calls: set[int]
    modules: list[str]
    constants: list[str]
    terms: tuple[tuple[float, _Found], ...] = ()  # a sum: its branches, flattened, with their signs
    under: _Found | None = None  # a layer or coefficient: what it applies to
    made_by: int | None = None  # the call that computes it
    opaque: frozenset[int] = frozenset()  # calls inside modules a kept branch runs as they are


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _is_plain_conv(module: nn.Module) -> bool:
    return any(kind in CONVS.values() for kind in type_chain(module))


def _is_linear_norm(module: nn.Module, rules: RuleTable) -> bool:
    """A norm bnfold has a rule for, that applies nothing but its affine map."""
    norm_rule = rules.norm_rule(module)
    return norm_rule is not None and norm_rule.is_linear(module)


def _on_channels(norm: nn.Module, call: Call, rules: RuleTable) -> bool:
    """Whether a norm acts on axis 1 of its input (the channels a convolution mixes), with one value per
    channel there (a channels-last layer scale does not)."""
    norm_rule = rules.norm_rule(norm)
    shape = call.input_shapes[0] if call.input_shapes else None
    if norm_rule is None or shape is None or len(shape) < 3 or norm_rule.channel_axis(norm, len(shape)) != 1:
        return False
    return int(norm_rule.affine(norm)[0].numel()) == int(shape[1])


# How many values the analysis looks back over to tell whether a value added to branches is computed from
# their input (a branch that is not linear) or not (a residual connection).
_MAX_LOOK_BACK = 10_000

# How many linear steps one branch may chain before the analysis stops looking (a deep purely linear stack
# is not a block of branches, and the walk must neither recurse without bound nor cost more than linear time).
_MAX_DEPTH = 200


class _Analysis:
    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self.graph = ctx.graph
        self.inside = readers_inside(ctx)
        self.steps: dict[int, _Found | None] = {}  # call index -> its recipe (None: not a linear step)
        self.depth = 0
        self.spans: dict[ValueKey, list[Span]] | None = None  # one-input, one-output module calls by output

    def value(self, key: ValueKey, reader: int | None) -> _Found:
        """The recipe of ``key`` as read by call ``reader``: through linear steps back to where branches
        start (a value read by several calls, or made by a step that is not linear)."""
        graph = self.graph
        index = graph.producer.get(key)
        if index is None or (reader is not None and graph.consumers.get(key, []) != [reader]):
            return _Found(Source(), {key}, set(), [], [])
        found = self.step(graph.calls[index])
        return _Found(Source(), {key}, set(), [], []) if found is None else found

    def step(self, call: Call) -> _Found | None:
        """The recipe of ``call``'s output, or ``None`` when ``call`` is not a linear step (remembered)."""
        if call.index in self.steps:
            return self.steps[call.index]
        if self.depth >= _MAX_DEPTH:
            return None
        self.depth += 1
        try:
            found: _Found | None = self._step(call)
        except _Stop:
            found = None
        finally:
            self.depth -= 1
        self.steps[call.index] = found
        return found

    def _step(self, call: Call) -> _Found:
        if len(call.outputs) != 1:
            raise _Stop
        if hands_on_values(call):  # nn.Identity, Dropout in eval mode, clone: the branch goes on through it
            inner = self.value(call.inputs[0], call.index)
            return replace(inner, calls=inner.calls | {call.index})
        if call.kind == "module" and call.module is not None and len(call.inputs) == 1:
            module, name = call.module, self.ctx.name(call.module)
            kind = (
                "conv"
                if _is_plain_conv(module)
                else "norm"
                if _is_linear_norm(module, self.ctx.rules) and _on_channels(module, call, self.ctx.rules)
                else "pool"
                if exact_pool(module)
                else None
            )
            if kind is None:
                raise _Stop
            inner = self.value(call.inputs[0], call.index)
            return _Found(
                Layer(kind, name, inner.recipe),
                inner.sources,
                inner.calls | {call.index},
                [*inner.modules, name],
                inner.constants,
                under=inner,
                made_by=call.index,
            )
        if call.kind != "function":
            raise _Stop
        sign = _sum_sign(call)
        if sign is not None and len(call.args) == 2 and not call.kwargs:
            a, b = call.args
            if isinstance(a, TensorRef) and isinstance(b, TensorRef):
                left, right = self.value(a.key, call.index), self.value(b.key, call.index)
                parts = (*_parts(left, 1.0), *_parts(right, sign))
                return _Found(
                    Sum(tuple((s, part.recipe) for s, part in parts)),
                    left.sources | right.sources,
                    left.calls | right.calls | {call.index},
                    [*left.modules, *right.modules],
                    [*left.constants, *right.constants],
                    terms=parts,
                    made_by=call.index,
                )
        op = constant_op(call)
        if op is not None and len(call.args) == 2 and not call.kwargs:
            return self._coefficient(call, op)
        raise _Stop

    def _coefficient(self, call: Call, op: str) -> _Found:
        """``branch <op> c``: a number, or a per-channel (or scalar) parameter nothing else reads."""
        graph = self.graph
        a, b = call.args
        for position, (this, other) in enumerate(((a, b), (b, a))):
            if not isinstance(this, TensorRef):
                continue
            number = _number(other)
            name = None
            if number is None:
                if not isinstance(other, TensorRef):
                    continue
                shapes = dict(zip(call.inputs, call.input_shapes, strict=False))
                constant = find_constant(graph, other.key, shapes.get(other.key), call.index, self.inside)
                if constant is None or constant.reason:
                    continue
                if not _per_channel(constant.shape, shapes.get(this.key)):
                    continue
                name = constant.name
            if position == 1 and op in ("sub", "div"):
                raise _Stop  # c - x, c / x: not affine in x's channels the same way
            inner = self.value(this.key, call.index)
            constants = [*inner.constants, name] if name else inner.constants
            shape = tuple(int(n) for n in constant.shape) if name and constant is not None else None
            recipe = Coefficient(op, inner.recipe, name=name, value=number, shape=shape)
            return _Found(
                recipe,
                inner.sources,
                inner.calls | {call.index},
                inner.modules,
                constants,
                under=inner,
                made_by=call.index,
            )
        raise _Stop

    # -- a sum whose branches read different values: the linear ones from x, the others from x through modules

    def split(self, found: _Found) -> _Found | None:
        """``found`` (a sum of branches that read different values) as branches of one tensor ``x``: those
        that read ``x`` as they are, each other one through the chain of modules that computes what it reads
        from ``x`` (or :class:`Unknown`); ``None`` when no value is read by two branches, one a convolution."""
        sources: dict[ValueKey, list[_Found]] = {}
        for _, part in found.terms:
            if len(part.sources) == 1:
                sources.setdefault(next(iter(part.sources)), []).append(part)
        fallback = None
        for x, parts in sorted(sources.items(), key=lambda item: -len(item[1])):
            if len(parts) < 2 or not any(has_conv(p.recipe) for p in parts):
                continue
            others = {v for _, part in found.terms if part.sources != {x} for v in part.sources}
            if not all(self._computed_from(v, x) for v in others):
                continue  # a value from before x is added (a residual connection): not branches of x
            terms = tuple(
                (sign, part if part.sources == {x} else self._through_modules(part, x)) for sign, part in found.terms
            )
            split = _Found(
                Sum(tuple((sign, part.recipe) for sign, part in terms)),
                {x},
                found.calls.union(*(part.calls for _, part in terms)),
                [m for _, part in terms for m in part.modules],
                [c for _, part in terms for c in part.constants],
                terms=terms,
                made_by=found.made_by,
                opaque=frozenset().union(*(part.opaque for _, part in terms)),
            )
            if unknown_reason(split.recipe) is None:
                return split
            fallback = fallback or split  # reported with the reason, unless another tensor reads them all
        return fallback

    def _through_modules(self, part: _Found, x: ValueKey) -> _Found:
        """``part``, which reads one value ``v``, with ``v`` computed from ``x`` by the chain of modules
        (each run as it is) that makes it; :class:`Unknown` with the reason when no such chain does."""
        if len(part.sources) != 1:
            return _Found(
                Unknown("a branch reads values that are not one chain from the branches' input"),
                set(),
                part.calls,
                [],
                [],
            )
        value = next(iter(part.sources))
        if len(self.graph.consumers.get(value, [])) != 1:
            return _Found(Unknown("a branch's value is also read elsewhere"), set(), part.calls, [], [])
        chain: list[Span] = []
        while value != x:
            span = self._module_making(value)
            if span is None or len(chain) >= _MAX_DEPTH:
                index = self.graph.producer.get(value)
                what = f"'{self.graph.calls[index].target}'" if index is not None else "a value it does not compute"
                return _Found(
                    Unknown(f"a branch computes {what} in code, not in a module that can run on its own"),
                    set(),
                    part.calls,
                    [],
                    [],
                )
            chain.append(span)
            value = span.inputs[0]
            if value != x and any(not span.start <= i < span.end for i in self.graph.consumers.get(value, [])):
                return _Found(Unknown("a value inside a branch is also read elsewhere"), set(), part.calls, [], [])
        base: Recipe = Source()
        names = [self.ctx.name(span.module) for span in reversed(chain)]
        for name in names:
            base = Layer("module", name, base)
        calls = {i for span in chain for i in range(span.start, span.end)}
        return _Found(
            rebase(part.recipe, base),
            {x},
            part.calls | calls,
            [*names, *part.modules],
            part.constants,
            opaque=frozenset(calls),
        )

    def _computed_from(self, value: ValueKey, x: ValueKey) -> bool:
        """Whether ``value`` is computed from ``x`` (looking back only over the calls made after ``x``)."""
        graph = self.graph
        start = graph.producer.get(x, -1)
        seen: set[ValueKey] = set()
        todo = [value]
        while todo:
            key = todo.pop()
            if key == x:
                return True
            index = graph.producer.get(key)
            if key in seen or index is None or index <= start:
                continue
            seen.add(key)
            if len(seen) > _MAX_LOOK_BACK:
                return False  # too far to tell: taken for a value from elsewhere (nothing merges)
            todo.extend(graph.calls[index].inputs)
        return False

    def _module_making(self, value: ValueKey) -> Span | None:
        """The largest module call (not the model's) that computes ``value`` from one tensor and reads
        nothing else made outside it."""
        if self.spans is None:
            self.spans = {}
            for span in self.graph.spans:
                if len(span.outputs) == 1 and len(span.inputs) == 1 and span.inputs != span.outputs:
                    self.spans.setdefault(span.outputs[0], []).append(span)
        best = None
        for span in self.spans.get(value, []):
            if span.module is self.ctx.model or not self._self_contained(span):
                continue
            if best is None or span.end - span.start > best.end - best.start:
                best = span
        return best

    def _self_contained(self, span: Span) -> bool:
        """Whether every call of ``span`` reads only its input, constants, and values made inside it."""
        graph = self.graph
        for call in graph.calls[span.start : span.end]:
            for key in call.inputs:
                made = graph.producer.get(key)
                if key in span.inputs or key in graph.constants or (made is not None and span.start <= made < span.end):
                    continue
                return False
        return True


def _per_channel(constant: tuple[int, ...], activation: tuple[int, ...] | None) -> bool:
    """Whether ``constant`` broadcasts as a scalar or along axis 1 of ``activation``."""
    if activation is None or len(constant) > len(activation):
        return False
    padded = (1,) * (len(activation) - len(constant)) + tuple(constant)
    varying = [i for i, size in enumerate(padded) if size != 1]
    return not varying or (varying == [1] and padded[1] == activation[1])


def _parts(found: _Found, sign: float) -> tuple[tuple[float, _Found], ...]:
    if found.terms:
        return tuple((sign * s, part) for s, part in found.terms)
    return ((sign, found),)


def find_branches(ctx: PlanContext) -> list[Branches | Kept]:
    """Every sum of parallel branches of one tensor (with the branches that are not linear, each through the
    modules that compute it from that tensor), and every sequence of two or more convolutions with only
    affine maps between them, latest first (not yet checked for exactness)."""
    analysis = _Analysis(ctx)
    graph = ctx.graph
    covered: set[int] = set()
    found: list[Branches | Kept] = []
    for call in reversed(graph.calls):
        if call.index in covered or len(call.outputs) != 1 or call.kind not in ("module", "function"):
            continue
        result = analysis.step(call)
        if result is None or not has_conv(result.recipe):
            continue
        if not is_sum(result.recipe) and len(conv_names(result.recipe)) < 2:
            continue
        if len(result.sources) != 1:
            split = analysis.split(result)
            if split is None:
                continue  # a residual sum of values from different places: not parallel branches
            result = split
        # a sum with a branch no module computes stays whole, and sums inside it may still merge on their own
        if unknown_reason(result.recipe) is None:
            covered |= result.calls - result.opaque  # a kept branch's modules may hold branches of their own
        found.append(_branches(result, call.outputs[0], analysis))
    return found


def _branches(found: _Found, output: ValueKey, analysis: _Analysis) -> Branches:
    inner = found.under
    while inner is not None and not inner.terms:
        inner = inner.under
    alone = None
    if inner is not None and inner is not found and inner.made_by is not None and len(inner.sources) == 1:
        alone = _branches(inner, analysis.graph.calls[inner.made_by].outputs[0], analysis)
    return Branches(
        found.recipe,
        next(iter(found.sources)),
        frozenset(found.calls),
        tuple(found.modules),
        tuple(found.constants),
        output,
        tuple(
            Term(sign, part.recipe, frozenset(part.calls), tuple(part.modules), tuple(part.constants))
            for sign, part in found.terms
        ),
        alone,
        found.opaque,
    )


def region_reason(branches: Branches | Term, ctx: PlanContext) -> str | None:
    """Why the modules and constants of a merge (or of one of its branches) cannot be merged as they are
    (shared, hooked...)."""
    for name in branches.modules:
        module = ctx.model.get_submodule(name)
        calls = ctx.graph.calls_of(module)
        if len(calls) != 1:
            return f"'{name}' is called {len(calls)} times in one forward pass (shared)"
        if module._forward_hooks or (module._forward_pre_hooks and not _is_plain_conv(module)):
            return f"'{name}' has forward hooks"
        if _is_plain_conv(module):
            reason = layer_reason(module, ctx)
            if reason:
                return reason
        elif id(module) in ctx.graph.foreign_uses:
            return f"the parameters of '{name}' are also used outside it (by {ctx.graph.foreign_uses[id(module)]})"
    return None


def channels_and_dims(branches: Branches, ctx: PlanContext) -> tuple[int, int]:
    """The channels and spatial rank of the tensor the branches read."""
    for call in ctx.graph.calls:
        for key, shape in zip(call.outputs, call.output_shapes, strict=False):
            if key == branches.source and shape is not None:
                return int(shape[1]), len(shape) - 2
    for call in ctx.graph.calls:
        for key, shape in zip(call.inputs, call.input_shapes, strict=False):
            if key == branches.source and shape is not None:
                return int(shape[1]), len(shape) - 2
    raise NotExact("the shape of the tensor the branches read is unknown")
