"""What happened, for people (an aligned text table) and for pipelines (a JSON-ready dict)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .plan import FoldPlan

__all__ = ["FoldReport", "model_size", "plan_rows", "render_plan", "render_report"]


def model_size(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes of parameters and buffers) of a model, shared tensors counted once."""
    seen: set[int] = set()
    params = 0
    size = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter):
            params += t.numel()
    return params, size


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
    # how the fold was checked: "outputs" (the model's outputs), "layers" (each folded layer on the
    # original's inputs), or None (no example inputs)
    checked: str | None = None

    @property
    def folded(self) -> int:
        return len(self.plan.sites)

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
            "layers": plan_rows(self.plan),
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "max_abs_error": finite(self.max_abs_error),
            "max_rel_error": finite(self.max_rel_error),
            "worst_output": self.worst_output,
            "checked": self.checked,
        }

    def __str__(self) -> str:
        return render_report(self)


def plan_rows(plan: FoldPlan) -> list[dict[str, Any]]:
    """One JSON-ready dict per row of the plan: name, type, decision, partner(s), direction, reason."""
    return [
        {
            "name": row.norm,
            "type": row.norm_type,
            "decision": row.decision,
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


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_plan(plan: FoldPlan) -> str:
    """The plan as an aligned table: one row per norm layer, then the totals."""
    rows = []
    for row in plan.rows:
        reason = getattr(row, "reason", None)
        if reason is None:
            arrow = _ARROWS[getattr(row, "direction", "backward")]
            rows.append([row.norm, row.norm_type, row.decision, f"{arrow} {row.partner}", ""])
        else:
            rows.append([row.norm, row.norm_type, row.decision, row.partner or "", reason])
    head = f"{plan.model_type} (traced with {plan.traced_with}): {len(plan.sites)} norm layers folded, {len(plan.kept)} kept"
    if not rows:
        return head + "\n(no norm layers)"
    return head + "\n" + _table(["norm layer", "type", "decision", "partner", "reason"], rows)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render_report(report: FoldReport) -> str:
    """The plan table followed by size and error totals."""
    lines = [render_plan(report.plan), ""]
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
    return "\n".join(lines)
