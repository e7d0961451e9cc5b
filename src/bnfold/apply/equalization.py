"""Cross-layer equalization, carried out: the surgery step of an equalized chain, and what it did to the
per-channel weight ranges of each layer it touched.

For each pair of a chain (:mod:`bnfold.planning.equalize_pass`), the producer's output channels are divided
by ``s`` and every reader's input channels multiplied by ``s``, with ``s`` from the layers' current weights
(:func:`~bnfold.apply.equalize_arithmetic.equalizing_scales`, the readers' ranges taken together). A chain's
pairs are swept again until no scale moves by more than :data:`TOLERANCE` (at most :data:`SWEEPS` times), as
Data-Free Quantization iterates conv -> depthwise -> conv. Every write goes through the surgery's edit log.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..discover.nested import detached_copy, iter_tensors
from ..discover.running import inference
from ..planning.equalize_pass import EqualizedChain, EqualizedPair
from ..planning.fold_plan import FoldPlan, FoldSite, KeptNorm
from ..rules.norms import tensor_attr
from ..rules.table import RuleTable
from ..rules.weight_hooks import effective_weight
from .equalize_arithmetic import (
    equalizing_scales,
    input_channel_ranges,
    output_channel_ranges,
    per_tensor_sqnr,
    range_spread,
)
from .surgery import apply_plan

__all__ = [
    "SWEEPS",
    "TOLERANCE",
    "apply_equalize",
    "measure_layers",
    "quantized_weights",
    "output_sqnr",
    "chains_worth_it",
]

SWEEPS = 20
TOLERANCE = 1e-6  # largest |log s| of a sweep that still counts as a move


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def _scales(pair: EqualizedPair, modules: dict[str, nn.Module], rules: RuleTable) -> Tensor:
    producer = modules[pair.producer]
    r1 = output_channel_ranges(effective_weight(producer), rules.layout_for(producer), _groups(producer))
    r2 = torch.zeros_like(r1)
    for name, blocks in zip(pair.readers, pair.blocks, strict=True):
        reader = modules[name]
        ranges = input_channel_ranges(effective_weight(reader), rules.layout_for(reader), _groups(reader), blocks)
        r2 = torch.maximum(r2, ranges)
    return equalizing_scales(r1, r2)


def _move(pair: EqualizedPair, s: Tensor, surgery: Any) -> None:
    """Divide the producer's output channels by ``s``, multiply the readers' input channels by ``s``."""
    modules, rules, log = surgery.modules, surgery.rules, surgery.log
    producer = modules[pair.producer]
    inverse = 1.0 / s
    log.scale_weight(producer, inverse, rules.layout_for(producer), "output")
    if tensor_attr(producer, "bias") is not None:
        log.map_bias(producer, inverse, torch.zeros_like(inverse))
    for name in pair.readers:
        reader = modules[name]
        log.scale_weight(reader, s, rules.layout_for(reader), "input")


def apply_equalize(surgery: Any, site: FoldSite) -> None:
    """Equalize every pair of the chain, sweeping until the scales settle."""
    chain = site.payload_as(EqualizedChain)
    for _ in range(SWEEPS):
        moved = 0.0
        for pair in chain.pairs:
            s = _scales(pair, surgery.modules, surgery.rules)
            step = float(s.log().abs().max()) if s.numel() else 0.0
            if step <= TOLERANCE:
                continue
            _move(pair, s, surgery)
            moved = max(moved, step)
        if moved <= TOLERANCE:
            return


def measure_layers(model: nn.Module, names: list[str], rules: RuleTable) -> dict[str, tuple[float, float]]:
    """``name -> (spread of per-output-channel ranges, per-tensor 8-bit SQNR)`` of each layer of ``names``."""
    found: dict[str, tuple[float, float]] = {}
    for name in names:
        layer = model.get_submodule(name)
        weight = effective_weight(layer)
        ranges = output_channel_ranges(weight, rules.layout_for(layer), _groups(layer))
        found[name] = (range_spread(ranges), per_tensor_sqnr(weight))
    return found


def quantized_weights(model: nn.Module, rules: RuleTable) -> nn.Module:
    """A copy of ``model`` whose layer weights (the rules' Conv/ConvTranspose/Linear) are rounded to symmetric
    8-bit with one scale per tensor: what a runtime with per-tensor weight quantization computes."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            weight = tensor_attr(module, "weight")
            if rules.layer_rule(module) is None or weight is None or not weight.is_floating_point():
                continue
            if not isinstance(module._parameters.get("weight"), Tensor):
                continue  # computed by a hook or a parametrization: left as it is
            top = float(weight.abs().max())
            if top > 0:
                step = top / 127
                weight.copy_((weight / step).round() * step)
    return twin


def output_sqnr(model: nn.Module, quantized: nn.Module, args: tuple[Any, ...]) -> float:
    """The SQNR in dB of ``quantized``'s floating-point outputs against ``model``'s on ``args`` (higher is
    better; ``inf`` when they are equal)."""
    outputs = []
    for target in (model, quantized):
        with inference(target):
            outputs.append([t.double() for t in iter_tensors(target(*detached_copy(args))) if t.is_floating_point()])
    signal = sum(float(r.pow(2).sum()) for r in outputs[0])
    noise = sum(float((r - q).pow(2).sum()) for r, q in zip(*outputs, strict=True))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def chains_worth_it(model: nn.Module, plan: FoldPlan, rules: RuleTable, args: tuple[Any, ...]) -> FoldPlan:
    """``plan`` (equalization rows on the folded ``model``) with each chain that would lower the output SQNR
    of per-tensor 8-bit weights on ``args`` kept instead, with the figures: equalizing weight ranges is not
    always what 8-bit weights need (a layer's largest channel sets everyone's step). Chains are tried in
    order on a scratch copy, each kept or taken back by what it does to the measured SQNR; ``model`` is not
    changed."""
    chains = [s for s in plan.sites if plan.kind(s).tally == "equalized"]
    if not chains:
        return plan
    scratch = copy.deepcopy(model)
    current = output_sqnr(scratch, quantized_weights(scratch, rules), args)
    refused: dict[str, KeptNorm] = {}
    for site in chains:
        log = apply_plan(
            scratch, FoldPlan(plan.model_type, plan.traced_with, (site,), (), (site.norm,), plan.kinds), rules
        )
        trial = output_sqnr(scratch, quantized_weights(scratch, rules), args)
        if trial + 1e-9 < current:
            log.undo()
            reason = (
                f"equalizing it would lower the output SQNR with per-tensor 8-bit weights on the example inputs "
                f"({current:.1f} -> {trial:.1f} dB)"
            )
            refused[site.norm] = KeptNorm(site.norm, site.norm_type, reason, site.partners[-1], kind="equalize")
        else:
            current = trial
    if not refused:
        return plan
    return FoldPlan(
        plan.model_type,
        plan.traced_with,
        tuple(s for s in plan.sites if s.norm not in refused),
        (*plan.kept, *refused.values()),
        plan.order,
        plan.kinds,
    )
