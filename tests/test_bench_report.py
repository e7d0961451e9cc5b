"""The benchmark's report writer renders the published results (docs/benchmarks.json) consistently."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
from report import summary, write_report  # noqa: E402


@pytest.fixture
def plots_not_drawn(monkeypatch):
    """The report names its plots without drawing them: these tests read its tables (the first test draws
    the plots)."""
    monkeypatch.setattr(report, "_plots", lambda results, out, tools: ["bench_speedup.png", "bench_scaling.png"])


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


def test_cuda_latency_table_appears_only_with_cuda_figures(tmp_path, plots_not_drawn):
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


def test_the_checks_own_measurements_get_their_sections(tmp_path, plots_not_drawn):
    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    write_report(results, tmp_path)
    assert "## Differential fuzzing" not in (tmp_path / "benchmarks.md").read_text()
    row = {"model": "tv/resnet18", "forward_ms": 40.0, "fold_in_forwards": 3.3, "traced_in_forwards": 1.2}
    row |= {"copy_in_forwards": 0.5, "fold_over_bound_budget": 1.19}
    (tmp_path / "cost.json").write_text(json.dumps({"date": "today", "cpu_time": True, "rows": [row]}))
    factor = {"model": "sin(1e6 x)", "fold": "exact", "outputs": 8, "median": 0.9, "max": 1.4}
    (tmp_path / "float64_factor.json").write_text(json.dumps({"seeds": 8, "rows": [factor]}))
    fuzz = {"programs": 10, "counts": {"folded": 9, "refused": 1}, "refusals": {"VerificationError": 1}}
    fuzz |= {"sites_folded": 12, "seconds": 60.0, "bad": []}
    (tmp_path / "fuzz.json").write_text(json.dumps(fuzz))
    merged = {"convs": 17, "norms": 0, "rel_error": 1e-7, "latency_ms": 50.0, "speedup": 1.8}
    timm_own = {"convs": 17, "norms": 0, "rel_error": 1e-7, "latency_ms": 49.0, "speedup": 1.84}
    original = {"convs": 39, "norms": 61, "rel_error": 0.0, "latency_ms": 90.0, "speedup": 1.0}
    reparam = {"model": "repvgg_a0", "tools": {"original": original, "bnfold reparameterize": merged}}
    reparam["tools"]["timm reparameterize_model"] = timm_own
    (tmp_path / "reparam.json").write_text(json.dumps([reparam]))
    write_report(results, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "| tv/resnet18 | 40.0 | 3.30 | 1.20 | 0.50 | 1.19 |" in text
    assert "| sin(1e6 x) | exact | 8 | 0.9 | 1.4 |" in text
    assert "| 10 | 9 | 1 | 0 | 0 | 0 | 0 |" in text
    assert "Refusals by error: 1 VerificationError." in text
    assert "## Re-parameterization: parallel branches into one convolution" in text
    assert "| repvgg_a0 | 39 / 61, x1.00 | - | 17 / 0, x1.84 | 17 / 0, x1.80 |" in text
    assert "re-parameterization: 1.02 (1.00 = the same)" in text
