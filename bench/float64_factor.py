"""Measure how far folded and unfolded float32 models are from a float64 run of the original, on models that
amplify float rounding: the evidence for ``bnfold.check.verify.FLOAT64_FACTOR``.

    python bench/float64_factor.py            # about 2 minutes on 2 cores

For each model and seed: e_u, the original's float32 distance to its float64 run, and e_f, the folded model's,
on every output that fails the float32 comparison; the ratio e_f / e_u is what FLOAT64_FACTOR bounds. A wrong
fold (a rule that scales by 1.01 instead of 1) is measured the same way, for contrast.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnfold
from bnfold import pipeline
from bnfold.apply.surgery import apply_plan, clone_model
from bnfold.check.strategy import observe, observe_float64
from bnfold.check.verify import Observed, compare_observed, judge_float64
from bnfold.options import FoldOptions
from bnfold.rules.table import build_rules, norm_affine
from bnfold.testing import randomize_norms


class Amplifier(nn.Module):
    """conv -> bn, then sin(k * x): a rounding difference of 1e-7 becomes one of k * 1e-7."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.bn(self.conv(x)) * self.k)


class Chaotic(nn.Module):
    """A deep conv -> bn -> tanh stack with gain above the edge of chaos: perturbations grow with depth."""

    def __init__(self, depth: int = 40, width: int = 16, gain: float = 2.5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh()) for _ in range(depth)
        )
        for block in self.blocks:
            nn.init.normal_(block[0].weight, std=gain / math.sqrt(width * 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))


def _ssdlite() -> nn.Module:
    import torchvision

    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Any]]] = {
    "sin(1e4 x)": (lambda: Amplifier(1e4), lambda g: torch.randn(2, 3, 10, 10, generator=g)),
    "sin(1e6 x)": (lambda: Amplifier(1e6), lambda g: torch.randn(2, 3, 10, 10, generator=g)),
    "tanh stack x40": (Chaotic, lambda g: torch.randn(2, 3, 12, 12, generator=g)),
    "ssdlite320": (_ssdlite, lambda g: ([torch.rand(3, 160, 160, generator=g)],)),
}


def _wrong_rules() -> list[bnfold.FoldRule]:
    def off(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = norm_affine(norm)
        return scale * 1.01, shift

    return [bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, affine=off)]


def ratios(name: str, seed: int, wrong: bool) -> list[tuple[float, float]]:
    """(e_u, e_f) for every output of the folded model that fails the float32 comparison."""
    build, inputs = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_norms(build().eval(), seed)
    args = inputs(torch.Generator().manual_seed(seed))
    args = args if isinstance(args, tuple) else (args,)
    rules = build_rules(_wrong_rules() if wrong else None)
    plan, graph = pipeline.plan_model(model, FoldOptions(args, rules), stacklevel=1)
    target = clone_model(model)
    apply_plan(target, plan, rules, undoable=False)
    reference = Observed(graph.reference_outputs, graph.output_sources, graph.output_magnitudes)
    actual = observe(target, args, bool(reference.sources))
    failed = [d for d in compare_observed(reference, actual) if not d.ok]
    if not failed:
        return []
    float64 = observe_float64(model, args, bool(reference.sources))
    return [(j.unfolded, j.folded) for j in judge_float64(failed, reference, actual, float64)]


def main() -> None:
    warnings.simplefilter("ignore")
    seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
    print("| model | fold | outputs failing float32 | e_f / e_u: median | max |")
    print("|---|---|---|---|---|")
    rows = []
    for name in MODELS:
        for wrong in (False, True):
            found = [r for seed in seeds for r in ratios(name, seed, wrong)]
            values = [f / u if u > 0 else (math.inf if f > 0 else 1.0) for u, f in found]
            fold = "wrong by 1%" if wrong else "exact"
            median = statistics.median(values) if values else math.nan
            top = max(values) if values else math.nan
            rows.append({"model": name, "fold": fold, "outputs": len(values), "median": median, "max": top})
            print(f"| {name} | {fold} | {len(values)} | {median:.3g} | {top:.3g} |", flush=True)
    out = Path(__file__).resolve().parent.parent / "docs" / "float64_factor.json"
    out.write_text(json.dumps({"seeds": len(seeds), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
