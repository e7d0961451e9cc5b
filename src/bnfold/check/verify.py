"""Check that a folded model computes what the original did.

Every tensor in the outputs (nested tuples, lists, dicts) is compared. The tolerance depends on the dtype and
is relative to the magnitudes involved: the output's own scale, or the magnitude of the values that entered the
op that made it when that is larger (a small output left after a ReLU of large values carries their rounding),
up to MAGNITUDE_CAP times the output's scale.
An integer or boolean output (class indices, labels, masks) is compared through the floating-point tensors it
was computed from: those show a wrong fold even where the integers happen to agree, and integers that differ
because two floats were within rounding of a tie are not a wrong fold.

Folding changes rounding, never values. Some models amplify rounding (sorting, thresholds, non-maximum
suppression, very deep stacks), so when the float32 comparison fails, :func:`judge_float64` tells rounding from
a wrong fold: with a float64 run of the original as the reference, the folded model must be no further from it
than the original's own float32 outputs are, within :data:`FLOAT64_FACTOR`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..discover.lineage import Sources
from ..discover.nested import leaves
from ..errors import VerificationError

__all__ = [
    "FLOAT64_FACTOR",
    "Float64Judgement",
    "Observed",
    "OutputDiff",
    "Sources",
    "compare_observed",
    "compare_outputs",
    "judge_float64",
    "layer_mismatch_error",
    "output_mismatch_error",
    "relative_tolerance",
]

_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}

# How much further from a float64 run of the original the folded float32 model may be than the original's own
# float32 outputs are. Folding changes which roundings happen, not how many: on models that amplify rounding the
# two distances are draws from the same distribution. Measured with bench/float64_factor.py (docs/benchmarks.md):
# over sin(1e4 x) and sin(1e6 x) amplifiers and a chaotic 40-layer tanh stack, 48 seeds each, the ratio had a
# median of 1 and a maximum of 2.2 for exact folds; ssdlite320_mobilenet_v3_large stays at 1.1. A fold that is
# wrong by 1% lands at 6 (sin(1e6 x), whose outputs are noise either way) to 700 and more. Twice the largest
# ratio seen leaves room for unlucky seeds; the per-layer check catches what jumpy outputs hide.
FLOAT64_FACTOR = 4.0


# The magnitude entering an output's last op counts up to this many times the output's own scale. An output far
# smaller than what entered it (``sin(1e6 * x)``, a ReLU of large negative values) keeps too little of it to be
# judged at that magnitude's tolerance: a wrong fold could hide below it. Such outputs go to the float64 run.
MAGNITUDE_CAP = 10.0


def relative_tolerance(dtype: torch.dtype) -> float:
    """The largest difference allowed between outputs of this dtype, relative to their scale.

    >>> relative_tolerance(torch.float32)
    0.0001
    """
    return _RTOL.get(dtype, 1e-4 if dtype.is_floating_point else 0.0)


@dataclass
class Observed:
    """What one run returned, and what the check needs to judge it (both keyed by output path): the floats
    behind each integer output, and the magnitude entering the op that made each float output."""

    outputs: Any
    sources: dict[str, Sources] = field(default_factory=dict)
    magnitudes: dict[str, float] = field(default_factory=dict)


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


def _distance(expected: Tensor, actual: Tensor) -> float:
    """The largest absolute difference (NaN where both are NaN counts as equal; other mismatches as inf)."""
    if expected.shape != actual.shape:
        return math.inf
    if not expected.is_floating_point() and not expected.is_complex():
        return 0.0 if torch.equal(expected, actual.to(expected.dtype)) else math.inf
    e = expected.detach().to(torch.float64)
    a = actual.detach().to(device=e.device, dtype=torch.float64)
    both_nan = torch.isnan(e) & torch.isnan(a)
    diff = torch.where(both_nan, torch.zeros_like(e), (e - a).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def _scale(t: Tensor) -> float:
    if not t.is_floating_point() or not t.numel():
        return 0.0
    finite = t.detach()[torch.isfinite(t.detach())]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _diff(path: str, expected: Tensor, actual: Tensor, magnitude: float = 0.0) -> OutputDiff:
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputDiff(path, math.inf, 0.0, 0.0)
    if not expected.is_floating_point() and not expected.is_complex():
        equal = torch.equal(expected, actual)
        return OutputDiff(path, 0.0 if equal else math.inf, 1.0, 0.0)
    scale = _scale(expected)
    rtol = relative_tolerance(expected.dtype)
    reach = min(max(scale, magnitude), MAGNITUDE_CAP * scale)
    return OutputDiff(path, _distance(expected, actual), scale, rtol * reach + rtol * 1e-3)


def compare_outputs(expected: Any, actual: Any, magnitudes: dict[str, float] | None = None) -> list[OutputDiff]:
    """One :class:`OutputDiff` per tensor in the outputs; a structural mismatch is an infinite error."""
    return compare_observed(Observed(expected, {}, magnitudes or {}), Observed(actual))


@dataclass(frozen=True)
class _Item:
    """One tensor to compare: an output leaf, or one of the floats an integer output was computed from."""

    leaf: str  # the output's path
    path: str
    expected: Tensor | None
    actual: Tensor | None


def _items(expected: Observed, actual: Observed) -> Iterator[_Item]:
    left, right = leaves(expected.outputs), leaves(actual.outputs)
    if [p for p, _ in left] != [p for p, _ in right]:
        yield _Item("output structure", "output structure", None, None)
        return
    for (path, e), (_, a) in zip(left, right, strict=True):
        if not isinstance(e, Tensor) and not isinstance(a, Tensor):
            continue
        if not isinstance(e, Tensor) or not isinstance(a, Tensor):
            yield _Item(path, path, None, None)
            continue
        mine, theirs = expected.sources.get(path), actual.sources.get(path)
        if (
            e.is_floating_point()
            or e.is_complex()
            or mine is None
            or theirs is None
            or not mine.tensors
            or len(mine.tensors) != len(theirs.tensors)
        ):
            yield _Item(path, path, e, a)
            continue
        for i, (se, sa) in enumerate(zip(mine.tensors, theirs.tensors, strict=True)):
            yield _Item(path, f"{path} (float input #{i} of the ops that computed it)", se, sa)
        # integers that differ are a tie broken by rounding, if nothing else went into them
        if not (mine.complete and theirs.complete) or e.shape != a.shape or e.dtype != a.dtype:
            yield _Item(path, path, e, a)


def compare_observed(expected: Observed, actual: Observed) -> list[OutputDiff]:
    """One :class:`OutputDiff` per compared tensor: each float output, and for an integer output the floats it
    was computed from (or the integers themselves when those are not known)."""
    diffs = []
    for item in _items(expected, actual):
        if item.expected is None or item.actual is None:
            diffs.append(OutputDiff(item.path, math.inf, 0.0, 0.0))
        else:
            diffs.append(_diff(item.path, item.expected, item.actual, expected.magnitudes.get(item.path, 0.0)))
    return diffs


@dataclass(frozen=True)
class Float64Judgement:
    """For one output that failed the float32 comparison: how far the original's and the folded model's float32
    outputs are from a float64 run of the original."""

    output: str
    unfolded: float  # the original's own float32 error
    folded: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.folded <= FLOAT64_FACTOR * self.unfolded + self.tolerance


def _distances(run: Observed, float64: Observed) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in _items(run, float64):
        d = math.inf if item.expected is None or item.actual is None else _distance(item.expected, item.actual)
        found[item.leaf] = max(found.get(item.leaf, 0.0), d)
    return found


def _leaf_of(path: str) -> str:
    return path.split(" (", 1)[0]


def judge_float64(
    failed: list[OutputDiff], reference: Observed, actual: Observed, float64: Observed
) -> list[Float64Judgement]:
    """One judgement per output with a failed diff: is the folded model no further from ``float64`` (the original
    run in float64) than the original's float32 ``reference``, within FLOAT64_FACTOR?"""
    unfolded, folded = _distances(reference, float64), _distances(actual, float64)
    tolerances: dict[str, float] = {}
    for d in failed:
        tolerances[_leaf_of(d.path)] = max(tolerances.get(_leaf_of(d.path), 0.0), d.tolerance)
    return [
        Float64Judgement(leaf, unfolded.get(leaf, math.inf), folded.get(leaf, math.inf), tolerance)
        for leaf, tolerance in tolerances.items()
    ]


# -- errors ---------------------------------------------------------------------------------------------------
_BUG = "This is a bug in bnfold or in a custom FoldRule: please report it with the model"


def _amount(d: OutputDiff) -> str:
    return f"by {d.max_abs_error:.3g} (tolerance {d.tolerance:.3g}, scale {d.scale:.3g})"


def worst_diff(failed: list[OutputDiff]) -> OutputDiff:
    return max(failed, key=lambda d: d.max_abs_error / max(d.tolerance, 1e-300))


def layer_mismatch_error(failed: list[OutputDiff]) -> VerificationError:
    """The per-layer check (``verify="layers"``) failed: name the first folded region that differs."""
    first = failed[0]  # the first in the model; later ones may only inherit it
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return VerificationError(
        f"{first.path} differs from the original's {_amount(first)} on the same inputs{more}; nothing was folded. {_BUG}",
        output=first.path,
        error=first.max_abs_error,
        tolerance=first.tolerance,
        layers_match=False,
    )


def output_mismatch_error(
    failed: list[OutputDiff],
    *,
    layers: list[OutputDiff] | None,
    judgements: list[Float64Judgement] | None = None,
    float64_failure: str | None = None,
) -> VerificationError:
    """The outputs differ and the differences are not rounding (or bnfold could not tell): say which output,
    by how much, and what the checks behind the verdict found. Never advises ``verify="layers"``: a plan that
    misread how layers are connected passes a per-layer check."""
    worst = worst_diff(failed)
    message = f"the folded model's {worst.path} differs from the original's {_amount(worst)}; nothing was folded. "
    wrong_layers = [d for d in layers or [] if not d.ok]
    layers_match = None if layers is None else not wrong_layers
    far = [j for j in judgements or [] if not j.ok]
    if wrong_layers:
        message += f"The first folded region that differs on the original's own inputs: {wrong_layers[0].path}. {_BUG}"
    elif far:
        j = far[0]
        message += (
            f"It is not float rounding: the folded {j.output} is {j.folded:.3g} away from a float64 run of the "
            f"original, the original's own float32 {j.output} only {j.unfolded:.3g}. "
            + (
                "Every folded layer gives the original's values on the original's own inputs, so what changed is "
                "how they are connected (the data flow between the folds). "
                if layers_match
                else ""
            )
            + f"{_BUG}"
        )
    elif float64_failure is not None:
        message += (
            "bnfold could not tell float rounding from a wrong fold: a float64 copy of the original, which would "
            f"show how far rounding alone moves the outputs, failed to run ({float64_failure}). Make the model run "
            "in float64 (no hard-coded float32 tensors or casts), or report it with the model"
        )
    else:
        message += (
            "The outputs are within rounding of a float64 run, but bnfold could not check the folded layers one by "
            f"one on the original's own inputs. {_BUG}"
        )
    return VerificationError(
        message, output=worst.path, error=worst.max_abs_error, tolerance=worst.tolerance, layers_match=layers_match
    )
