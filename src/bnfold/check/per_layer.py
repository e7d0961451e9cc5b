"""Check every folded layer on the original's own inputs, independently of the rest of the model.

Comparing a model's outputs proves a fold right only when the outputs depend continuously on the values
inside the model. A detector's outputs do not: sorting, top-k, score thresholds and non-maximum
suppression turn a rounding difference of 1e-7 in a feature map into a different box. This check
compares the folded model with the original at the folds themselves:

- the original runs once and records, at each folded region, the tensors that enter it (the inputs of
  the layers a norm folds into, or of a norm that folds forward) and the tensors that leave it (the
  output of a norm folded backward, of a layer a norm folded forward into, of a channel-wise op);
- the folded model runs with the recorded inputs fed in at those entries, so each region computes from
  exactly the original's values whatever happened upstream, and what leaves it is compared with the
  original's, with the same dtype-dependent tolerances as the output check.

It checks each fold, not the model end to end: it relies on the plan's finding that nothing else reads
a folded layer's output. The output check (the default) checks that too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..discover.nested import detached_copy, iter_tensors
from ..discover.running import inference
from ..planning.channelwise import constant_named
from ..planning.fold_plan import FoldPlan, FoldSite
from ..planning.kinds import ProbeRole
from .verify import OutputDiff, compare_outputs

__all__ = ["Probes", "Recording", "ProbeRole", "probes_for", "record", "compare"]


@dataclass(frozen=True)
class Exit:
    """A tensor that must be the same in the original and the folded model: a module's output, or the
    result of the op that applies a channel-wise constant."""

    kind: str  # "module" | "constant"
    name: str
    sites: tuple[str, ...]  # the folds it checks

    @property
    def label(self) -> str:
        what = f"the output of '{self.name}'" if self.kind == "module" else f"the op that applies '{self.name}'"
        if self.sites == (self.name,):
            return what
        return f"{what} (where {', '.join(repr(s) for s in self.sites)} folded)"


@dataclass(frozen=True)
class Probes:
    """Where to feed recorded inputs (``entries``: module names) and what to compare (``exits``)."""

    entries: tuple[str, ...]
    exits: tuple[Exit, ...]


def probes_for(plan: FoldPlan) -> Probes:
    """The entries and exits of every folded region of ``plan``.

    A layer that takes folds after it (norms, channel-wise constants) leaves its output changed; the last
    fold applied to it restores the original's values. A norm folded into the layers after it leaves its
    own output changed; those layers restore them. A span (a transform over several layers) changes values
    from the input of its first partner to the outputs of the others.
    """
    after: dict[str, list[FoldSite]] = defaultdict(list)  # layer -> folds after it, in order
    before_norms: list[str] = []
    before_partners: dict[str, list[str]] = defaultdict(list)  # layer -> norms folded into its input
    regions: list[str] = []
    spans: list[FoldSite] = []
    for site in plan.sites:
        side = plan.kind(site).probe.side
        if side == "none":
            continue
        if side == "region":
            regions.append(site.norm)
            continue
        if side == "span":
            spans.append(site)
            continue
        if side == "before":
            before_norms.append(site.norm)
            for partner in site.partners:
                before_partners[partner].append(site.norm)
        else:
            for partner in site.partners:
                after[partner].append(site)
    readers = {reader for site in spans for reader in site.partners[1:]}  # fed by the span, not the original
    entries = [layer for layer in after if layer not in before_partners and layer not in readers]
    entries += before_norms + regions + [site.partners[0] for site in spans]
    exits: dict[tuple[str, str], list[str]] = defaultdict(list)
    for layer, chain in after.items():
        last = chain[-1]
        exit_key = (plan.kind(last).probe.exit, last.norm)
        exits[exit_key].extend(s.norm for s in chain)
        exits[exit_key].extend(before_partners.get(layer, []))
    for layer, norms in before_partners.items():
        if layer not in after:
            exits[("module", layer)].extend(norms)
    for block in regions:
        exits[("module", block)].append(block)
    for site in spans:
        for reader in site.partners[1:]:
            folds = after.get(reader)  # a fold after the reader restores the values at its own exit
            key = (plan.kind(folds[-1]).probe.exit, folds[-1].norm) if folds else ("module", reader)
            exits[key].append(site.norm)
    return Probes(
        tuple(dict.fromkeys(entries)),
        tuple(Exit(kind, name, tuple(dict.fromkeys(sites))) for (kind, name), sites in exits.items()),
    )


@dataclass
class Recording:
    """What one run saw at the probes: the inputs of each entry call, the value at each exit."""

    inputs: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]
    values: dict[Exit, list[Any]]


class _ConstantExits(TorchFunctionMode):
    """Records the result of the first op that applies each watched constant (or a reshaped view of it)
    to something else: ``x * gamma``, ``x.mul(gamma.reshape(1, -1, 1, 1))``."""

    def __init__(self, watched: dict[int, Exit], values: dict[Exit, list[Any]]) -> None:
        super().__init__()
        self.derived: dict[int, tuple[Exit, Tensor]] = {}  # id -> (exit, tensor kept alive so ids stay unique)
        self.watched = watched
        self.values = values

    def exit_of(self, t: Tensor) -> Exit | None:
        if id(t) in self.watched:
            return self.watched[id(t)]
        entry = self.derived.get(id(t))
        return entry[0] if entry is not None and entry[1] is t else None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = list(iter_tensors((args, kwargs)))
        found = [self.exit_of(t) for t in tensors]
        exits = {e for e in found if e is not None}
        if len(exits) == 1 and isinstance(out, Tensor):
            exit_ = exits.pop()
            if all(e is not None for e in found):
                self.derived[id(out)] = (exit_, out)  # still the constant, reshaped or cast
            else:
                self.values[exit_].append(out.detach().clone())
        return out


def record(model: nn.Module, args: tuple[Any, ...], probes: Probes, replay: Recording | None = None) -> Recording:
    """Run ``model(*args)`` (no grad, fixed seed, buffers restored) and record what the probes see.

    With ``replay``, each entry module is fed the inputs recorded there instead of its own.
    """
    inputs: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)  # calls of each entry so far
    values: dict[Exit, list[Any]] = defaultdict(list)
    modules = dict(model.named_modules())
    handles = []

    def entry_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            call = seen[name]
            seen[name] += 1
            if replay is None:
                inputs[name].append(detached_copy((args, kwargs)))
                return None
            recorded = replay.inputs.get(name, [])
            return detached_copy(recorded[call]) if call < len(recorded) else None

        return hook

    def exit_hook(exit_: Exit) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            values[exit_].append(detached_copy(output))

        return hook

    watched: dict[int, Exit] = {}
    try:
        for name in probes.entries:
            handles.append(modules[name].register_forward_pre_hook(entry_hook(name), with_kwargs=True))
        for exit_ in probes.exits:
            if exit_.kind == "module":
                handles.append(modules[exit_.name].register_forward_hook(exit_hook(exit_)))
            else:
                watched[id(constant_named(model, exit_.name))] = exit_
        with inference(model):
            if watched:
                with _ConstantExits(watched, values):
                    model(*detached_copy(args))
            else:
                model(*detached_copy(args))
    finally:
        for handle in handles:
            handle.remove()
    return Recording(dict(inputs), dict(values))


def compare(reference: Recording, actual: Recording, probes: Probes) -> list[OutputDiff]:
    """One :class:`OutputDiff` per exit (an exit seen a different number of times is an infinite error)."""
    diffs = []
    for exit_ in probes.exits:
        expected = reference.values.get(exit_, [])
        got = actual.values.get(exit_, [])
        for diff in compare_outputs(expected, got):
            diffs.append(OutputDiff(exit_.label, diff.max_abs_error, diff.scale, diff.tolerance))
    return diffs
