"""Check that a folded model computes what the original did.

Every tensor in the outputs (nested tuples, lists, dicts) is compared. The
tolerance depends on the dtype and is relative to the output's own scale:
folding changes rounding, never values, so a real difference is a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import VerificationError
from .nested import leaves

__all__ = ["OutputDiff", "relative_tolerance", "compare_outputs", "mismatch_error"]

_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}


def relative_tolerance(dtype: torch.dtype) -> float:
    """The largest difference allowed between outputs of this dtype, relative to their scale.

    >>> relative_tolerance(torch.float32)
    0.0001
    """
    return _RTOL.get(dtype, 1e-4 if dtype.is_floating_point else 0.0)


@dataclass(frozen=True)
class OutputDiff:
    """How one output tensor of the folded model differs from the original's."""

    path: str
    max_abs_error: float
    scale: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.scale if self.scale > 0 else (0.0 if self.max_abs_error == 0 else math.inf)

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def _diff(path: str, expected: Tensor, actual: Tensor) -> OutputDiff:
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputDiff(path, math.inf, 0.0, 0.0)
    if not expected.is_floating_point() and not expected.is_complex():
        equal = torch.equal(expected, actual)
        return OutputDiff(path, 0.0 if equal else math.inf, 1.0, 0.0)
    e = expected.detach().to(torch.float64)
    a = actual.detach().to(torch.float64)
    both_nan = torch.isnan(e) & torch.isnan(a)
    diff = torch.where(both_nan, torch.zeros_like(e), (e - a).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    finite = e[torch.isfinite(e)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    rtol = relative_tolerance(expected.dtype)
    error = float(diff.max()) if diff.numel() else 0.0
    return OutputDiff(path, error, scale, rtol * scale + rtol * 1e-3)


def compare_outputs(expected: Any, actual: Any) -> list[OutputDiff]:
    """One :class:`OutputDiff` per tensor in the outputs; a structural mismatch is an infinite error."""
    left = leaves(expected)
    right = leaves(actual)
    if [p for p, _ in left] != [p for p, _ in right]:
        return [OutputDiff("output structure", math.inf, 0.0, 0.0)]
    diffs = []
    for (path, e), (_, a) in zip(left, right, strict=False):
        if isinstance(e, Tensor) and isinstance(a, Tensor):
            diffs.append(_diff(path, e, a))
        elif isinstance(e, Tensor) or isinstance(a, Tensor):
            diffs.append(OutputDiff(path, math.inf, 0.0, 0.0))
    return diffs


def mismatch_error(
    failed: list[OutputDiff], *, layers: list[OutputDiff] | None = None, what: str = "output"
) -> VerificationError:
    """The error for diffs beyond their tolerance, naming the worst one.

    ``what="output"``: the model's outputs differ; ``layers`` (when the per-layer check could run) tells a
    wrong fold from a model that amplifies rounding. ``what="folded layer"``: the per-layer check failed.
    """
    # outputs: the worst one; folded layers: the first one in the model (later ones may only inherit it)
    worst = failed[0] if what != "output" else max(failed, key=lambda d: d.max_abs_error / max(d.tolerance, 1e-300))
    amount = f"by {worst.max_abs_error:.3g} (tolerance {worst.tolerance:.3g}, scale {worst.scale:.3g})"
    bug = "This is a bug in bnfold or in a custom FoldRule: please report it with the model"
    layers_match = None
    if what != "output":
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        message = (
            f"{worst.path} differs from the original's {amount} on the same inputs{more}; nothing was folded. {bug}"
        )
    else:
        message = f"the folded model's {worst.path} differs from the original's {amount}; nothing was folded. "
        wrong = [d for d in layers or [] if not d.ok]
        if layers is None:
            message += (
                f"{bug}. If the model's outputs jump with tiny rounding differences (sorting, top-k, thresholds, "
                "non-maximum suppression), pass verify='layers' to check each folded layer instead"
            )
        elif wrong:
            layers_match = False
            message += f"The first folded layer that differs on the original's own inputs: {wrong[0].path}. {bug}"
        else:
            layers_match = True
            rel = max((d.relative_error for d in layers), default=0.0)
            message += (
                f"Yet every folded layer matches the original on the same inputs (worst relative error {rel:.2g}): "
                "the model amplifies float rounding after them: sorting, top-k, thresholds, argmax or non-maximum "
                "suppression (detection models), or a deep stack whose activations grow without bound (common "
                "with random weights; the unfolded model then differs as much from its own float64 version). To "
                "accept the check of each folded layer instead of the outputs, pass verify='layers' "
                "(command line: --verify layers)"
            )
    return VerificationError(
        message, output=worst.path, error=worst.max_abs_error, tolerance=worst.tolerance, layers_match=layers_match
    )
