"""The rule table: what bnfold knows about norms, about layers, and about the rare pair that differs.

Knowledge is split by what it describes:

- a :class:`~bnfold.norms.NormRule` per norm type (its affine map, its check, its channel axis, the input
  ranks it accepts, what remains of it once folded, whether it folds backward and forward);
- a :class:`~bnfold.layers.LayerRule` per layer type (its weight layout, its padding rule for forward folds);
- a :class:`FoldRule` per ``(layer type, norm type, direction)`` only where a pair differs from what the two
  types say on their own, or for a type bnfold does not know otherwise. A pair rule speaks for its own
  pair only.

A fold of a norm into a layer uses the pair rule when there is one, else the norm's rule and the layer's
rule together. Types match exactly, or through ancestors that compute the same (see
:func:`~bnfold.classes.type_chain`). Users add rules per call with ``extra_rules=[...]``; nothing global
is mutated. A user's rule for a norm type is consulted before any built-in judgment of that type (a rule
for ``nn.LayerNorm`` replaces "it normalizes with its own statistics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

from torch import Tensor, nn

from ..apply.fold_arithmetic import Layout
from ..planning.fold_plan import Direction
from .classes import has_type, layer_type, type_chain
from .layers import LayerRule, builtin_layer_rules, padding_reason, resolve_layout
from .norms import (
    NormRule,
    batch_channel_axis,
    builtin_norm_rules,
    identity_replacement,
    is_statistics_norm,
    leaves_nothing,
    looks_like_norm,
    norm_affine,
    running_stats_reason,
)

__all__ = ["FoldRule", "RuleKey", "RuleTable", "build_rules", "AnyRule"]


@dataclass(frozen=True)
class FoldRule:
    """How a norm of type ``norm`` folds into a layer of type ``layer``, for this pair only.

    ``direction="backward"``: the layer feeds the norm (``norm(layer(x))``), the usual case; the layer's
    output channels are scaled. ``direction="forward"``: the norm feeds the layer (``layer(norm(x))``); the
    layer's input channels are scaled and its bias absorbs the shift.

    The layer must store ``weight`` (and ``bias``, possibly ``None``) in the layout of a Conv,
    ConvTranspose or Linear layer; when it subclasses one of those, ``layout`` is inferred. To teach bnfold
    a norm type for every layer at once, pass a :class:`~bnfold.norms.NormRule` instead.

    Args:
        layer: the Conv/ConvTranspose/Linear-like layer type.
        norm: the norm type.
        direction: ``"backward"`` (layer -> norm) or ``"forward"`` (norm -> layer).
        affine: ``norm -> (scale, shift)``, the per-channel affine map the norm applies (float64).
        check: ``norm -> reason | None``; a reason in words when this norm cannot fold right now.
        replacement: ``norm -> module`` that takes the norm's place once folded (``nn.Identity``).
        neutral: instead of a replacement, ``norm -> {tensor name: value}`` that leave the norm in place with
            the identity affine (see :class:`~bnfold.norms.NormRule`).
        channel_axis: ``(norm, input_ndim) -> axis`` the norm normalizes over.
        layout: ``"conv"``, ``"conv_transpose"`` or ``"linear"``; inferred from the layer's base class.

    >>> class MyBN(nn.BatchNorm2d): ...
    >>> rule = FoldRule(nn.Conv2d, MyBN)
    >>> rule.weight_layout, rule.direction
    ('conv', 'backward')
    """

    layer: type[nn.Module]
    norm: type[nn.Module]
    direction: Direction = "backward"
    affine: Callable[[nn.Module], tuple[Tensor, Tensor]] = field(default=norm_affine, compare=False)
    check: Callable[[nn.Module], str | None] = field(default=running_stats_reason, compare=False)
    replacement: Callable[[nn.Module], nn.Module] = field(default=identity_replacement, compare=False)
    channel_axis: Callable[[nn.Module, int], int] = field(default=batch_channel_axis, compare=False)
    layout: Layout | None = None
    neutral: Callable[[nn.Module], Mapping[str, Tensor]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.norm, type) and issubclass(self.norm, nn.Module)):
            raise TypeError(f"FoldRule.norm must be an nn.Module subclass, got {self.norm!r}")
        if self.neutral is not None and self.replacement is not identity_replacement:
            raise ValueError(
                f"FoldRule({self.layer.__name__}, {self.norm.__name__}): a folded norm is either replaced "
                "(replacement=) or left in place made neutral (neutral=), not both; pass one of them"
            )
        if self.direction not in ("backward", "forward"):
            raise ValueError(f"FoldRule.direction must be 'backward' or 'forward', got {self.direction!r}")
        resolve_layout("FoldRule", self.layer, self.layout)

    @property
    def weight_layout(self) -> Layout:
        return resolve_layout("FoldRule", self.layer, self.layout)

    @property
    def key(self) -> RuleKey:
        return (self.layer, self.norm, self.direction)

    def leaves_nothing(self, norm: nn.Module) -> bool:
        """Whether nothing that computes is left where ``norm`` was once folded (a norm made neutral stays,
        and still normalizes)."""
        return self.neutral is None and leaves_nothing(self.replacement, norm)


RuleKey = tuple[type[nn.Module], type[nn.Module], str]
AnyRule = FoldRule | NormRule | LayerRule
T = TypeVar("T")


def _first(table: Mapping[type[nn.Module], T], module: nn.Module) -> T | None:
    for kind in type_chain(module):
        if kind in table:
            return table[kind]
    return None


@dataclass(frozen=True)
class RuleTable:
    """The norm rules, the layer rules and the pair rules of one call; ``given``: the norm types the caller's
    own rules name (consulted before any built-in judgment of those types)."""

    norms: dict[type[nn.Module], NormRule]
    layers: dict[type[nn.Module], LayerRule]
    pairs: dict[RuleKey, FoldRule]
    given: frozenset[type[nn.Module]] = frozenset()

    # -- lookups --------------------------------------------------------------------------------------------
    def norm_rule(self, norm: nn.Module) -> NormRule | None:
        """The rule for ``norm``'s type (or a plain ancestor's)."""
        return _first(self.norms, norm)

    def layer_rule(self, layer: nn.Module) -> LayerRule | None:
        """The rule for ``layer``'s type (or a plain ancestor's)."""
        return _first(self.layers, layer)

    def pair_rule(self, layer: nn.Module, norm: nn.Module, direction: str) -> FoldRule | None:
        """The most specific pair rule: exact declared classes first, then their plain ancestors."""
        for layer_kind in type_chain(layer):
            for norm_kind in type_chain(norm):
                rule = self.pairs.get((layer_kind, norm_kind, direction))
                if rule is not None:
                    return rule
        return None

    def rule_for(self, layer: nn.Module, norm: nn.Module, direction: Direction) -> FoldRule | None:
        """How ``norm`` folds into ``layer`` in ``direction``: the pair's own rule, else what the norm's
        rule and the layer's rule say together (unless the norm's rule refuses this norm that way: its
        ``backward`` or ``forward``); ``None`` when neither applies."""
        # the rule depends on the two classes alone: asked for every norm by the plan and again by surgery, it
        # is built once per pair of classes; only the norm rule's refusal looks at the norm itself
        key = (layer_type(layer), layer_type(norm), direction)
        found = self._rules_by_class.get(key)
        if found is None:
            found = self._rules_by_class[key] = self._rule_for(layer, norm, direction)
        rule, norm_rule = found
        if norm_rule is not None and norm_rule.refusal(norm, direction) is not None:
            return None
        return rule

    @cached_property
    def _rules_by_class(
        self,
    ) -> dict[tuple[type[nn.Module], type[nn.Module], str], tuple[FoldRule | None, NormRule | None]]:
        return {}

    def _rule_for(
        self, layer: nn.Module, norm: nn.Module, direction: Direction
    ) -> tuple[FoldRule | None, NormRule | None]:
        """The rule for the two classes, and the norm rule it was made from (``None`` for a pair rule, which
        speaks for its own pair)."""
        pair = self.pair_rule(layer, norm, direction)
        if pair is not None:
            return pair, None
        norm_rule, layer_rule = self.norm_rule(norm), self.layer_rule(layer)
        if norm_rule is None or layer_rule is None:
            return None, None
        rule = FoldRule(
            layer_type(layer),
            layer_type(norm),
            direction,
            affine=norm_rule.affine,
            check=norm_rule.check,
            replacement=norm_rule.replacement,
            channel_axis=norm_rule.channel_axis,
            layout=layer_rule.weight_layout,
            neutral=norm_rule.neutral,
        )
        return rule, norm_rule

    def forward_reason(self, layer: nn.Module, layout: Layout) -> str | None:
        """Why a norm before ``layer`` cannot fold into it (its padding)."""
        layer_rule = self.layer_rule(layer)
        return (layer_rule.forward if layer_rule is not None else padding_reason)(layer, layout)

    def directions(self, norm: nn.Module) -> dict[Direction, str | None]:
        """For each direction, why ``norm`` as such cannot fold that way (``None``: some layer may take it):
        its own rule's refusal (``backward``, ``forward``), unless a pair rule speaks for that direction.
        Without a norm rule a backward fold is still tried: the walk names the layer it finds, which says
        more."""
        norm_rule = self.norm_rule(norm)
        found: dict[Direction, str | None] = {}
        for direction in ("backward", "forward"):
            paired = any(d == direction and has_type(norm, (n,)) for _, n, d in self.pairs)
            if paired:
                found[direction] = None
            elif norm_rule is None:
                found[direction] = None if direction == "backward" else f"there is no {direction} fold rule for it"
            else:
                found[direction] = norm_rule.refusal(norm, direction)
        return found

    def nothing_to_fold(self, norm: nn.Module) -> str | None:
        """Why ``norm`` has nothing left to fold: its rule makes it neutral, and it is neutral already (folded
        before)."""
        norm_rule = self.norm_rule(norm)
        if norm_rule is not None and norm_rule.is_neutral(norm):
            return "its affine is already the identity: nothing to fold"
        return None

    def own_check(self, norm: nn.Module) -> str | None:
        """Why ``norm`` is not a fixed map right now, by its own rule (pair rules check their own pair)."""
        norm_rule = self.norm_rule(norm)
        return None if norm_rule is None else norm_rule.check(norm)

    def input_ranks(self, norm: nn.Module) -> tuple[int, ...] | None:
        """The input ranks ``norm`` accepts: from its rule, else from its nearest ancestor's (a subclass of
        BatchNorm2d still checks for 4-d input); ``None``: any, or unknown."""
        for kind in type(norm).__mro__:
            rule = self.norms.get(kind)
            if rule is not None:
                return rule.input_ranks
        return None

    def layout_for(self, layer: nn.Module) -> Layout:
        """How ``layer`` stores its weight, as its rule (or a pair rule for its type) says."""
        layer_rule = self.layer_rule(layer)
        if layer_rule is not None:
            return layer_rule.weight_layout
        for kind in type_chain(layer):
            for (rule_layer, _, _), rule in self.pairs.items():
                if rule_layer is kind:
                    return rule.weight_layout
        raise KeyError(f"no fold rule mentions {layer_type(layer).__name__}")

    # -- what the tracer and the plan list -----------------------------------------------------------------
    def layer_types(self) -> set[type[nn.Module]]:
        return set(self._layer_types)

    def norm_types(self) -> set[type[nn.Module]]:
        return set(self._norm_types)

    # Built once per table (every lookup of the plan asks); the methods above hand out copies.
    @cached_property
    def _layer_types(self) -> frozenset[type[nn.Module]]:
        return frozenset(self.layers) | {layer for layer, _, _ in self.pairs}

    @cached_property
    def _norm_types(self) -> frozenset[type[nn.Module]]:
        return frozenset(self.norms) | {norm for _, norm, _ in self.pairs}

    def is_norm_layer(self, module: nn.Module) -> bool:
        """Whether ``module`` is a normalization layer that the plan should list."""
        return has_type(module, self._norm_types) or looks_like_norm(module)

    def unfoldable_reason(self, module: nn.Module) -> str | None:
        """Why a norm layer can never fold whatever it is next to, or ``None`` if some rule may apply."""
        kind = layer_type(module)
        if has_type(module, self.given):
            return None  # the caller's own rule judges it
        if is_statistics_norm(module):
            return f"{kind.__name__} normalizes each input with its own statistics: not a fixed affine map"
        if has_type(module, self._norm_types):
            return None
        return (
            f"no fold rule for {kind.__name__} (a subclass that overrides how a norm computes is never matched "
            "implicitly); teach bnfold with extra_rules=[bnfold.NormRule(norm_type, ...)] or "
            "[bnfold.FoldRule(layer_type, norm_type)]"
        )


def build_rules(extra_rules: Iterable[AnyRule] | AnyRule | None = None) -> RuleTable:
    """The built-in rules plus ``extra_rules`` (which win over built-in rules for the same type or pair)."""
    norms, layers, pairs = builtin_norm_rules(), builtin_layer_rules(), {}
    given: set[type[nn.Module]] = set()
    if extra_rules is None:
        extra_rules = []
    if isinstance(extra_rules, (FoldRule, NormRule, LayerRule)):
        extra_rules = [extra_rules]
    for rule in extra_rules:
        if isinstance(rule, FoldRule):
            pairs[rule.key] = rule
            given.add(rule.norm)
        elif isinstance(rule, NormRule):
            norms[rule.norm] = rule
            given.add(rule.norm)
        elif isinstance(rule, LayerRule):
            layers[rule.layer] = rule
        else:
            raise TypeError(
                "extra_rules must hold bnfold.FoldRule, bnfold.NormRule or bnfold.LayerRule objects, "
                f"got {type(rule).__name__}"
            )
    return RuleTable(norms, layers, pairs, frozenset(given))
