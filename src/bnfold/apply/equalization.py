"""Cross-layer equalization, carried out: the surgery step of an equalized chain, and what it did to the
per-channel weight ranges of each layer it touched.

For each pair of a chain (:mod:`bnfold.planning.equalize_pass`), the producer's output channels are divided
by ``s`` and every reader's input channels multiplied by ``s``, with ``s`` from the layers' current weights
(:func:`~bnfold.apply.equalize_arithmetic.equalizing_scales`, the readers' ranges taken together). A chain's
pairs are swept again until no scale moves by more than :data:`TOLERANCE` (at most :data:`SWEEPS` times), as
Data-Free Quantization iterates conv -> depthwise -> conv. Every write goes through the surgery's edit log.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..planning.equalize_pass import EqualizedChain, EqualizedPair
from ..planning.fold_plan import FoldSite
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

__all__ = ["SWEEPS", "TOLERANCE", "apply_equalize", "measure_layers"]

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
