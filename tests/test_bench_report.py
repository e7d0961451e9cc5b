"""The benchmark's report writer renders the published results (docs/benchmarks.json) consistently."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import summary, write_report  # noqa: E402


def test_published_results_render_and_agree_with_the_raw_numbers(tmp_path):
    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    write_report(results, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "## Summary" in text and "## Scaling" in text
    rows = {row["tool"]: row for row in summary(results)}
    total = sum(row["norms"] for row in results["zoo"])
    assert rows["bnfold"]["total"] == total
    # the summary counts exactly the per-model folds whose outputs stayed correct
    folded = sum(
        row["norms"] - row["tools"]["bnfold"]["norms_left"]
        for row in results["zoo"]
        if row["tools"]["bnfold"].get("rel_error", 1.0) <= 1e-3
    )
    assert rows["bnfold"]["folded"] == folded
    assert f"| bnfold | {folded} / {total} |" in text


def test_cuda_latency_table_appears_only_with_cuda_figures(tmp_path):
    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    write_report(results, tmp_path)
    cpu_only = (tmp_path / "benchmarks.md").read_text()
    assert "CUDA latency" not in cpu_only
    results["machine"]["cuda"] = "Example GPU"
    for row in results["zoo"]:
        row["latency_cuda_ms"] = {k: v / 10 for k, v in row["latency_ms"].items()}
    write_report(results, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "CUDA latency (Example GPU)" in text
    assert text.count("| tv/resnet18 |") == cpu_only.count("| tv/resnet18 |") + 1  # one more table row
