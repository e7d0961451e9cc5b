"""Turn benchmark results into docs/benchmarks.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

WRONG = 1e-3  # relative output error above which a float32 fold counts as wrong


def _fmt_err(value: Any) -> str:
    if isinstance(value, str):
        return "fails"
    if value is None or not math.isfinite(value):
        return "wrong shape"
    return f"{value:.1e}"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tool: norms folded correctly, models with wrong outputs / failures, mean speed-up."""
    tools = list(results["peers"]) + ["norms deleted (limit)"]
    rows = []
    for tool in tools:
        folded = total = wrong = failed = 0
        speedups = []
        for row in results["zoo"]:
            info = row["tools"].get(tool, {})
            total += row["norms"]
            if info.get("error"):
                failed += 1
                continue
            err = info.get("rel_error", math.inf)
            if tool != "norms deleted (limit)" and (err is None or err > WRONG):
                wrong += 1
            elif tool != "norms deleted (limit)":
                folded += row["norms"] - info.get("norms_left", row["norms"])
            latency = row["latency_ms"]
            if tool in latency:
                speedups.append(latency["original"] / latency[tool])
        rows.append(
            {
                "tool": tool,
                "folded": folded,
                "total": total,
                "wrong": wrong,
                "failed": failed,
                "speedup": _geomean(speedups),
            }
        )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    rows = []
    n = len(results["zoo"])
    for s in summary(results):
        if s["tool"] == "norms deleted (limit)":
            rows.append([s["tool"], "-", "all (outputs wrong)", "-", f"x{s['speedup']:.2f}" if s["speedup"] else "-"])
            continue
        unavailable = results["peers"].get(s["tool"], {}).get("unavailable")
        if unavailable:
            rows.append([s["tool"], "not installed", "-", "-", "-"])
            continue
        rows.append(
            [
                s["tool"],
                f"{s['folded']} / {s['total']}",
                f"{s['wrong']} of {n}",
                f"{s['failed']} of {n}",
                f"x{s['speedup']:.2f}" if s["speedup"] else "-",
            ]
        )
    return _table(
        [
            "tool",
            "norms folded, outputs correct",
            "models with changed outputs",
            "models it fails on",
            "CPU speed-up (geomean)",
        ],
        rows,
    )


def _coverage(results: dict[str, Any], tools: list[str]) -> str:
    rows = []
    for row in results["zoo"]:
        cells = [row["model"], str(row["norms"])]
        for tool in tools:
            info = row["tools"].get(tool, {})
            if info.get("error"):
                cells.append("fails" if info["error"] != "not installed" else "n/a")
                continue
            done = row["norms"] - info.get("norms_left", row["norms"])
            err = info.get("rel_error")
            mark = "" if err is not None and err <= WRONG else " **wrong**"
            extra = ""
            if tool == "bnfold" and info.get("sites", done) > done:
                extra = f" (+{info['sites'] - done} other)"
            cells.append(f"{done}{extra}, {_fmt_err(err)}{mark}")
        rows.append(cells)
    return _table(["model", "BN run", *tools], rows)


def _latency(results: dict[str, Any], tools: list[str], key: str = "latency_ms") -> str:
    rows = []
    for row in results["zoo"]:
        if key not in row:
            continue
        lat = row[key]
        cells = [row["model"], f"{lat['original']:.1f}"]
        for tool in [*tools, "norms deleted (limit)"]:
            cells.append(f"x{lat['original'] / lat[tool]:.2f}" if tool in lat else "-")
        rows.append(cells)
    return _table(["model", "original (ms)", *tools, "norms deleted (limit)"], rows)


def _cost(results: dict[str, Any], tools: list[str]) -> str:
    rows = []
    for row in results["zoo"]:
        cells = [row["model"]]
        probes = results["memory"].get(row["model"], {})
        for tool in tools:
            info = row["tools"].get(tool, {})
            if info.get("error"):
                cells.append("fails" if info["error"] != "not installed" else "n/a")
                continue
            mb = (probes.get(tool) or {}).get("peak_extra_mb")
            forwards = info["fold_s"] / (row["latency_ms"]["original"] / 1e3) if row.get("latency_ms") else None
            cells.append(
                f"{info['fold_s']:.2f} s"
                + (f" ({forwards:.1f} fwd)" if forwards is not None else "")
                + ", "
                + (f"{mb:.0f} MB" if mb is not None else "?")
            )
        rows.append(cells)
    return _table(["model", *tools], rows)


def _precision(results: dict[str, Any], tools: list[str]) -> str:
    rows = []
    for row in results["precision"]:
        rows.append([row["model"], row["dtype"], _fmt_err(row["unfolded"]), *[_fmt_err(row.get(t)) for t in tools]])
    return _table(["model", "dtype", "unfolded", *tools], rows)


def _scaling(results: dict[str, Any], tools: list[str]) -> str:
    rows = []
    for row in results["scaling"]:
        cells = [row["model"], f"{row['parameters'] / 1e6:.2f} M", str(row["modules"])]
        for tool in tools:
            p = row.get(tool) or {}
            if p.get("error"):
                cells.append("fails")
            elif p.get("fold_s") is None:
                cells.append("n/a")
            else:
                mem = f"{p['peak_extra_mb']:.0f} MB" if p.get("peak_extra_mb") is not None else "?"
                cells.append(f"{p['fold_s']:.2f} s, {mem}")
        rows.append(cells)
    return _table(["model", "parameters", "modules", *tools], rows)


def _plots(results: dict[str, Any], out: Path, tools: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    names = [r["model"] for r in results["zoo"]]
    series = [*tools, "norms deleted (limit)"]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.5))
    width = 0.8 / len(series)
    for i, tool in enumerate(series):
        values = []
        for row in results["zoo"]:
            lat = row["latency_ms"]
            err = row["tools"].get(tool, {}).get("rel_error")
            ok = tool in lat and (tool == "norms deleted (limit)" or (err is not None and err <= WRONG))
            values.append(lat["original"] / lat[tool] if ok else 0.0)
        ax.bar([j + i * width for j in range(len(names))], values, width, label=tool)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("CPU speed-up vs original")
    ax.set_title("CPU speed-up of each tool's folded model (no bar: the tool failed)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "bench_speedup.png", dpi=110)
    plt.close(fig)
    written.append("bench_speedup.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, prefix, xkey, xlabel in (
        (axes[0], "tv/", "parameters", "parameters (resnet18 -> resnet152)"),
        (axes[1], "nested/", "depth", "nesting depth of conv-bn blocks"),
    ):
        rows = [r for r in results["scaling"] if r["model"].startswith(prefix)]
        for tool in [t for t in tools if any((r.get(t) or {}).get("fold_s") for r in rows)]:
            points = [
                (r["parameters"] if xkey == "parameters" else int(r["model"].split("/")[1]), r[tool]["fold_s"])
                for r in rows
                if (r.get(tool) or {}).get("fold_s") and not r[tool].get("error")
            ]
            if points:
                ax.loglog(*zip(*points, strict=True), marker="o", label=tool)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fold time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench_scaling.png", dpi=110)
    plt.close(fig)
    written.append("bench_scaling.png")
    return written


def write_report(results: dict[str, Any], out: Path) -> None:
    tools = list(results["peers"])
    m = results["machine"]
    peers = "\n".join(
        f"- **{name}** {info['version']}"
        + (f": could not be used here ({info['unavailable']})" if info["unavailable"] else "")
        for name, info in results["peers"].items()
    )
    plots = _plots(results, out, tools)
    parts = [
        "# Benchmarks",
        "",
        f"Measured on {m['date']} ({results['mode']} run, {results['seconds']:.0f} s): {m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), Python {m['python']}, torch {m['torch']}. "
        + ("GPU: " + m["cuda"] if m["cuda"] else "No GPU: CPU figures only.")
        + (f" {m['note']}" if m.get("note") else ""),
        "",
        "Regenerate with `python bench/run.py` (full) or `python bench/run.py --quick`. Raw numbers: "
        "[benchmarks.json](benchmarks.json). Every model has random weights and randomized BatchNorm statistics "
        "(running mean ~ N(0, 0.1), variance ~ U(0.5, 2), affine weight ~ U(0.5, 1.5), bias ~ N(0, 0.1)), so a "
        "wrong fold shows in the outputs. Each tool folds its own deep copy of the same model, on the same input.",
        "",
        "Tools:",
        "",
        peers,
        "- **norms deleted (limit)**: every BatchNorm layer replaced by nothing (outputs wrong): the speed a "
        "folded model can reach at best.",
        "",
        "torch.ao `fuse_modules` needs the (layer, norm) name pairs written by hand; it is given the backward pairs "
        "that bnfold found and that torch.ao supports, its best case.",
        "",
        "## Summary",
        "",
        summary_table(results),
        "",
        f'"Changed outputs": maximum output error above {WRONG:g} of the output\'s scale (float32). '
        "Speed-up: geometric mean over the models of original latency / folded latency, counting only models "
        "the tool folded without changing outputs.",
        "",
        "## Coverage and correctness",
        "",
        "BatchNorm-family layers folded, and the maximum relative output error against the original "
        '(float32; around 1e-7 is rounding). "other": bnfold\'s further folds (layer scales, channel-wise '
        "constants).",
        "",
        _coverage(results, tools),
        "",
        "## CPU latency",
        "",
        "Batch 1, median of interleaved runs in one process; speed-up = original latency / folded latency.",
        "",
        _latency(results, tools),
        "",
        *(
            [
                f"CUDA latency ({m['cuda']}), batch 1, same models and protocol:",
                "",
                _latency(results, tools, "latency_cuda_ms"),
                "",
            ]
            if any("latency_cuda_ms" in row for row in results["zoo"])
            else []
        ),
        *([f"![speed-up]({plots[0]})", ""] if plots else []),
        "## Cost of folding",
        "",
        "Fold time of the call as its users make it (median of 3 calls in the benchmark process, each on its own "
        "copy of the model; "
        "bnfold's time includes copying the model, running it to trace and running the copy to check the outputs), "
        "the same in units of the model's own forward time (fwd: the original's batch-1 latency above), "
        "and peak extra resident memory of the call (measured in a fresh process per tool and model). "
        "What a verified fold costs step by step: `python bench/cost.py` (below).",
        "",
        _cost(results, tools),
        "",
        "## Low precision",
        "",
        "Maximum output error, relative to the output's scale, of the model folded in float16/bfloat16 against "
        'the float64 original (2 x 3 x 64 x 64 input). "unfolded": the low-precision model\'s own error.',
        "",
        _precision(results, tools),
        "",
        "## Scaling",
        "",
        "Fold time (median of 3 in the benchmark process) and peak extra memory (fresh process) as models grow "
        "(resnet18 to resnet152 at 64 x 64 input) and as modules nest more deeply (a chain of conv-bn blocks, each "
        "nested in the previous one).",
        "",
        _scaling(results, [t for t in tools if results["scaling"] and t in results["scaling"][0]]),
        "",
        *([f"![scaling]({plots[1]})", ""] if len(plots) > 1 else []),
        *_check_sections(out),
    ]
    (out / "benchmarks.md").write_text("\n".join(parts))


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _within_bound(rows: list[dict[str, Any]], bound: float = 1.25) -> str:
    """How many models a verified fold costs at most ``bound`` x the budget for, and which exceed it."""
    over = [r for r in rows if r["fold_over_bound_budget"] > bound]
    text = f"{len(rows) - len(over)} of {len(rows)} models are within {bound}"
    if not over:
        return text + "."
    names = ", ".join(f"{r['model']} ({r['fold_over_bound_budget']:.2f})" for r in over)
    return f"{text}; over it: {names}."


def reparam_table(results: list[dict[str, Any]]) -> str:
    """The re-parameterization table (bench/reparam.py): per model, what each tool leaves running and how fast."""
    tools = ["original", "bnfold (norms only)", "timm reparameterize_model", "bnfold reparameterize"]
    others = sorted({t for r in results for t in r["tools"]} - set(tools))
    header = ["model", *tools, *others]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        cells = [r["model"]]
        for tool in [*tools, *others]:
            t = r["tools"].get(tool)
            if t is None:
                cells.append("-")
            elif "error" in t:
                cells.append("fails")
            else:
                wrong = " **wrong outputs**" if t["rel_error"] > 1e-3 else ""
                cells.append(f"{t['convs']} / {t['norms']}, x{t.get('speedup', 0):.2f}{wrong}")
        lines.append("| " + " | ".join(cells) + " |")
    ratio = [
        r["tools"]["bnfold reparameterize"]["latency_ms"] / r["tools"]["timm reparameterize_model"]["latency_ms"]
        for r in results
        if "latency_ms" in r["tools"].get("bnfold reparameterize", {})
        and "latency_ms" in r["tools"].get("timm reparameterize_model", {})
    ]
    note = (
        "\nEach cell: convolutions / norms one forward pass runs, and the CPU speed-up over the original "
        "(batch 8, 224x224, median of interleaved runs). bnfold's latency relative to timm's own "
        f"re-parameterization: {', '.join(f'{v:.2f}' for v in ratio)} (1.00 = the same).\n"
    )
    return "\n".join(lines) + "\n" + note


def _check_sections(out: Path) -> list[str]:
    """The sections measured by their own scripts, from the JSON files they write next to benchmarks.json:
    re-parameterization (bench/reparam.py), the cost of a verified fold (bench/cost.py), the float64 check
    (bench/float64_factor.py) and the differential fuzzer (bench/fuzz.py)."""
    parts: list[str] = []
    reparam = _load(out / "reparam.json")
    if reparam:
        parts += ["## Re-parameterization: parallel branches into one convolution", "", reparam_table(reparam)]
    cost = _load(out / "cost.json")
    if cost:
        rows = [
            [
                r["model"],
                f"{r['forward_ms']:.1f}",
                f"{r['fold_in_forwards']:.2f}",
                f"{r['traced_in_forwards']:.2f}",
                f"{r['copy_in_forwards']:.2f}",
                f"{r['fold_over_bound_budget']:.2f}",
            ]
            for r in cost["rows"]
        ]
        parts += [
            "## What a verified fold costs",
            "",
            f"`python bench/cost.py{' --cpu-time' if cost.get('cpu_time') else ''}` ({cost.get('date', '?')}): "
            "median times, in units of the model's own forward pass (batch 1): `bnfold.fold(model, x)` whole "
            "(trace, plan, copy, fold, check), the traced forward it runs, and one copy of the model. The last "
            "column is the fold against the budget traced forward + folded forward + copy; the aim is at most "
            "1.25. "
            + (
                "Single-threaded CPU time, which other work on the machine disturbs less than wall time. "
                if cost.get("cpu_time")
                else ""
            )
            + "The float64 run of the check happens only when the float32 comparison fails, so it is not in these "
            f"figures. {_within_bound(cost['rows'])}",
            "",
            _table(["model", "forward (ms)", "fold (forwards)", "traced forward", "copy", "fold / budget"], rows),
            "",
        ]
    factor = _load(out / "float64_factor.json")
    if factor:
        rows = [
            [r["model"], r["fold"], str(r["outputs"]), f"{r['median']:.3g}", f"{r['max']:.3g}"] for r in factor["rows"]
        ]
        parts += [
            "## Rounding or a wrong fold: the float64 check",
            "",
            "When the folded model's float32 outputs differ from the original's beyond tolerance, bnfold runs the "
            "original once in float64 and accepts the fold only if the folded model is no further from that run "
            "than the original's own float32 outputs are, within a factor (`bnfold.check.verify.FLOAT64_FACTOR`), and "
            "every folded layer matches on the original's own inputs. The ratio of the two distances, on models "
            f"that amplify rounding ({factor['seeds']} seeds each; `python bench/float64_factor.py`), for exact folds "
            "and for folds made wrong by 1%:",
            "",
            _table(["model", "fold", "outputs failing float32", "folded / unfolded: median", "max"], rows),
            "",
        ]
    fuzz = _load(out / "fuzz.json")
    if fuzz:
        counts = fuzz["counts"]
        kinds = ["folded", "refused", "crash", "wrong", "changed", "invalid"]
        refusals = ", ".join(f"{n} {k}" for k, n in sorted(fuzz.get("refusals", {}).items())) or "none"
        parts += [
            "## Differential fuzzing",
            "",
            f"`python bench/fuzz.py --programs {fuzz['programs']} --json docs/fuzz.json` "
            f"({fuzz['seconds'] / 60:.0f} minutes): random programs mixing every layer, norm, constant and "
            "look-through op bnfold knows, in-place ops (through aliases too), shared modules, tied weights, weights "
            "and constants read elsewhere, cat/chunk/split, reshapes that keep or interleave channels, pooling, "
            "several and integer outputs, blocks of parallel branches (some merging only in part), small modules of the user's own "
            "that apply a constant, code that reads a norm after it ran, `inplace=True`, `reparameterize=True`, "
            "and folds without example inputs (torch.fx). Each is folded and judged by an oracle of the fuzzer's "
            "own (float64 copies of the original and of the folded model, output by output). `folded`: outputs "
            "equal; `refused`: a `BnfoldError` with its reason, original untouched; `crash`: any other exception; "
            "`wrong`: a returned model whose outputs differ; `changed`: the original was modified; `invalid`: the "
            "random program itself could not run (not bnfold's doing). "
            f"{fuzz.get('sites_folded', 0)} norm layers and constants were folded in all.",
            "",
            _table(["programs", *kinds], [[str(fuzz["programs"]), *(str(counts.get(k, 0)) for k in kinds)]]),
            "",
            f"Refusals by error: {refusals}. A failing seed replays with `python bench/fuzz.py --replay SEED` and "
            "shrinks with `--shrink`; CI runs 600 programs (tests/test_fuzz.py).",
            "",
        ]
        seeds = [
            f"{error}: seeds {', '.join(map(str, found))}" for error, found in fuzz.get("refused_seeds", {}).items()
        ]
        bad = [f"seed {b['seed']} ({b['kind']}): {b['detail'][:160]}" for b in fuzz.get("bad", [])]
        if seeds or bad:
            parts += ["First refused seeds: " + "; ".join(seeds) + "." if seeds else "", ""]
            parts += [*(f"- {line}" for line in bad), ""] if bad else []
        for note in fuzz.get("notes", []):
            parts += [note, ""]
    return parts
