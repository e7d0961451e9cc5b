"""What happened, for people (an aligned text table) and for pipelines (a JSON-ready dict)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .reparam.merge_recipe import MergeRecipe

if TYPE_CHECKING:
    from .planning.fold_plan import FoldPlan

__all__ = [
    "FoldReport",
    "LayerQuantization",
    "model_size",
    "largest_weight",
    "plan_rows",
    "render_plan",
    "render_report",
    "wrap_field",
]


def model_size(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes of parameters and buffers) of a model, shared tensors counted once."""
    seen: set[int] = set()
    params = 0
    size = 0
    modules = list(model.modules())  # the module dicts directly: parameters() and buffers() walk it twice
    tensors = [t for m in modules for t in m._parameters.values()] + [t for m in modules for t in m._buffers.values()]
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        size += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter):
            params += t.numel()
    return params, size


def largest_weight(model: nn.Module, names: tuple[str, ...]) -> float:
    """The largest ``|weight|`` of the convolutions among the modules ``names`` of ``model``."""
    largest = 0.0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvNd):
            largest = max(largest, float(module.weight.detach().abs().max()))
    return largest


@dataclass(frozen=True)
class LayerQuantization:
    """What equalization did to one layer's weight: how far apart its per-output-channel ranges are (largest
    over smallest) and its per-tensor symmetric 8-bit SQNR in dB, before and after."""

    layer: str
    spread_before: float
    sqnr_before: float
    spread_after: float
    sqnr_after: float


@dataclass(frozen=True)
class FoldReport:
    """The plan, plus what the fold changed: size before and after, and the measured output error."""

    plan: FoldPlan
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    max_abs_error: float | None  # None when there were no example inputs to check with
    max_rel_error: float | None
    worst_output: str | None
    # how the fold was checked: "outputs" (the model's outputs), "float64" (the outputs differ by rounding the
    # model amplifies: no more than the original's own from a float64 run, and every folded layer matched),
    # "layers" (each folded layer on the original's inputs), or None (no example inputs)
    checked: str | None = None
    # for each merge: (block, largest |weight| of its branches' convolutions, of the merged convolution);
    # merged kernels can be harder to quantize when the second grows
    merge_weights: tuple[tuple[str, float, float], ...] = ()
    # with equalize=True: each layer equalization touched, measured before and after
    equalized_layers: tuple[LayerQuantization, ...] = ()

    @property
    def folded(self) -> int:
        """Norm layers (and constants) folded or merged."""
        return self.plan.folded

    @property
    def merged(self) -> int:
        """Blocks of parallel branches merged into one convolution."""
        return self.plan.merged

    @property
    def kept(self) -> int:
        return len(self.plan.kept)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (stable keys; see the docs)."""

        def finite(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        return {
            "model": self.plan.model_type,
            "traced_with": self.plan.traced_with,
            "folded": self.folded,
            "kept": self.kept,
            "merged": self.merged,
            "merges": self._merges(),
            "layers": plan_rows(self.plan),
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "max_abs_error": finite(self.max_abs_error),
            "max_rel_error": finite(self.max_rel_error),
            "worst_output": self.worst_output,
            "checked": self.checked,
            "equalized": self.plan.equalized,
            "equalized_layers": [
                {
                    "layer": q.layer,
                    "spread_before": finite(q.spread_before),
                    "spread_after": finite(q.spread_after),
                    "sqnr_before": finite(q.sqnr_before),
                    "sqnr_after": finite(q.sqnr_after),
                }
                for q in self.equalized_layers
            ],
        }

    def _merges(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per merge, in model order."""
        weights = {block: (before, after) for block, before, after in self.merge_weights}
        found = []
        for row in self.plan.rows:
            merge = _merge_of(row)
            if merge is None:
                continue
            before, after = weights.get(row.norm, (None, None))
            found.append(
                {
                    "block": row.norm,
                    "type": row.norm_type,
                    "branches": list(getattr(row, "partners", ())),
                    "result": merge.result,
                    "kept_branches": [{"modules": list(k.modules), "reason": k.reason} for k in merge.kept],
                    "largest_weight_before": before,
                    "largest_weight_after": after,
                }
            )
        return found

    def __str__(self) -> str:
        return render_report(self)


def _merge_of(row: Any) -> MergeRecipe | None:
    """The recipe of a merged block's row, or ``None``."""
    payload = getattr(row, "payload", None)
    return payload if isinstance(payload, MergeRecipe) else None


def plan_rows(plan: FoldPlan) -> list[dict[str, Any]]:
    """One JSON-ready dict per row of the plan: name, type, decision, partner(s), direction, reason."""
    return [
        {
            "name": row.norm,
            "type": row.norm_type,
            "decision": plan.decision(row),
            "partner": row.partner,
            "partners": list(getattr(row, "partners", ())) or ([row.partner] if row.partner else []),
            "kind": getattr(row, "kind", None),
            "direction": getattr(row, "direction", None),
            "reason": getattr(row, "reason", None),
        }
        for row in plan.rows
    ]


# which side of the norm its partners are on: "<-" the layer before it, "->" the layers after it
_ARROWS = {"backward": "<-", "forward": "->"}
_MERGE_ARROW = "=>"  # a block whose branches became one convolution, or a norm merged with it


def _table(header: list[str], rows: list[list[str]], width: int | None = None) -> str:
    """An aligned table; with ``width``, the last column wraps so that lines fit (when the others leave room)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if width is not None:
        room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
        widths[-1] = max(min(widths[-1], room), min(widths[-1], _MIN_WRAP))
    lines = []
    for row in [header, *rows]:
        last = textwrap.wrap(row[-1], widths[-1], break_long_words=False, break_on_hyphens=False) or [""]
        cells = row[:-1]
        for i, piece in enumerate(last):
            shown = cells if i == 0 else [""] * len(cells)
            lines.append("  ".join(c.ljust(w) for c, w in zip([*shown, piece], widths, strict=True)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# the narrowest the reason column wraps to, however long the names before it
_MIN_WRAP = 20


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def render_plan(plan: FoldPlan, *, width: int | None = None, planned: bool = False) -> str:
    """The plan as an aligned table: one row per norm layer, then the totals. ``width`` wraps the reasons to
    that many columns; ``planned`` words the decisions as what would happen (a dry run)."""
    fold, keep = ("fold", "keep") if planned else ("folded", "kept")
    rows = []
    paths = [row for row in plan.rows if _is_path(plan, row)]
    for row in plan.rows:
        if _is_path(plan, row):
            continue
        reason = getattr(row, "reason", None)
        word = plan.decision(row)
        decision = {"folded": fold, "kept": keep}.get(word, word)
        merge = _merge_of(row)
        if reason is None and merge is not None:
            rows.append(
                [row.norm, row.norm_type, decision, f"{_MERGE_ARROW} {merge.result}", f"branches: {row.partner}"]
            )
        elif reason is None and word == "merged":
            rows.append([row.norm, row.norm_type, decision, f"{_MERGE_ARROW} {row.partner}", ""])
        elif reason is None:
            arrow = _ARROWS[getattr(row, "direction", "backward")]
            rows.append([row.norm, row.norm_type, decision, f"{arrow} {row.partner}", ""])
        else:
            rows.append([row.norm, row.norm_type, decision, row.partner or "", reason])
    merges = plan.merged
    norms = _count(plan.folded, "norm layer")
    blocks = f", {_count(merges, 'block')} of parallel branches merged into one convolution each" if merges else ""
    if planned:
        totals = f"dry run, nothing changed: {norms} would be folded, {len(plan.kept)} kept{blocks.replace(' merged', ' would be merged')}"
    else:
        totals = f"{norms} folded, {len(plan.kept) - _kept_paths(paths)} kept{blocks}"
    head = f"{plan.model_type} (traced with {plan.traced_with}): {totals}"
    table = (
        "(no norm layers)" if not rows else _table(["norm layer", "type", "decision", "partner", "reason"], rows, width)
    )
    text = head + "\n" + table
    if paths:
        text += "\n\n" + _render_paths(plan, paths, width, planned)
    return text


def _is_path(plan: FoldPlan, row: Any) -> bool:
    """Whether ``row`` is an equalization row (a chain of layers, or a producer kept out of one)."""
    if getattr(row, "reason", None) is not None:
        return getattr(row, "kind", None) == "equalize"
    return plan.kind(row).tally == "equalized"


def _kept_paths(paths: list[Any]) -> int:
    return sum(1 for row in paths if getattr(row, "reason", None) is not None)


def _render_paths(plan: FoldPlan, paths: list[Any], width: int | None, planned: bool) -> str:
    """The equalization table: each chain, pair by pair (producer -> readers, through which ops), and each
    producer kept out of one, with the reason."""
    rows: list[list[str]] = []
    for row in paths:
        reason = getattr(row, "reason", None)
        if reason is not None:
            rows.append([row.norm, "kept", row.partner or "", reason])
            continue
        for pair in getattr(row.payload, "pairs", ()):
            through = f"through {', '.join(pair.through)}" if pair.through else "directly"
            word = "equalize" if planned else "equalized"
            rows.append([pair.producer, word, "-> " + ", ".join(pair.readers), through])
    chains = plan.equalized
    totals = f"{_count(chains, 'chain')} of layers {'to equalize' if planned else 'equalized'}"
    head = f"cross-layer equalization: {totals}, {_count(_kept_paths(paths), 'producer')} kept"
    return head + "\n" + _table(["producer", "decision", "readers", "through / reason"], rows, width)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def wrap_field(line: str, width: int | None, indent: int = 12) -> str:
    """A ``label:      text`` line (the label padded to ``indent``) wrapped to ``width``, under its text.

    >>> print(wrap_field("note:       one two three", 20))
    note:       one two
                three
    """
    if width is None or len(line) <= width:
        return line
    return textwrap.fill(line, width, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False)


def _equalization_line(layers: tuple[LayerQuantization, ...]) -> str:
    """One line: the per-tensor 8-bit weight SQNR of the equalized layers, and their largest channel-range
    spread, before and after."""
    finite = [q for q in layers if math.isfinite(q.sqnr_before) and math.isfinite(q.sqnr_after)]
    mean_before = sum(q.sqnr_before for q in finite) / len(finite) if finite else math.nan
    mean_after = sum(q.sqnr_after for q in finite) / len(finite) if finite else math.nan
    spread_before = max(q.spread_before for q in layers)
    spread_after = max(q.spread_after for q in layers)
    return (
        f"equalized:  {_count(len(layers), 'layer')}; per-tensor 8-bit weight SQNR {mean_before:.1f} -> "
        f"{mean_after:.1f} dB (mean); largest spread of channel ranges {spread_before:.3g} -> {spread_after:.3g}"
    )


def render_report(report: FoldReport, *, width: int | None = None) -> str:
    """The plan table (reasons wrapped to ``width`` columns) followed by size and error totals."""
    lines = [render_plan(report.plan, width=width), ""]
    lines.append(f"parameters: {report.parameters_before:,} -> {report.parameters_after:,}")
    lines.append(f"size:       {_size(report.bytes_before)} -> {_size(report.bytes_after)}")
    if report.max_abs_error is None:
        lines.append("max error:  not checked (no example inputs)")
    else:
        lines.append(
            f"max error:  {report.max_abs_error:.3g} absolute, {report.max_rel_error:.3g} relative ({report.worst_output})"
        )
        if report.checked == "layers":
            lines.append("checked:    each folded layer on the original's own inputs (not the model's outputs)")
        elif report.checked == "float64":
            lines.append(
                "checked:    outputs against a float64 run of the original (the model amplifies float32 rounding: "
                "the folded outputs are no further from it than the original's), and each folded layer"
            )
    if report.equalized_layers:
        lines.append(_equalization_line(report.equalized_layers))
    if report.merge_weights:
        before = max(b for _, b, _ in report.merge_weights)
        after = max(a for _, _, a in report.merge_weights)
        lines.append(
            f"merged:     {_count(len(report.merge_weights), 'block')}; largest |weight| {before:.3g} in the "
            f"branches -> {after:.3g} merged (for quantization: see the guide)"
        )
    return "\n".join([lines[0], *(wrap_field(line, width) for line in lines[1:])])
