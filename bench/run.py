"""Benchmark bnfold side by side with every peer, in one run, and write the results.

    python bench/run.py            # full: about 16 minutes on 2 CPU cores
    python bench/run.py --quick    # 3 models, fewer runs: under 3 minutes

Writes docs/benchmarks.md (tables), docs/bench_*.png (plots) and docs/benchmarks.json (raw numbers).
Every tool folds the same model object built the same way (its own deep copy), on the same input, in
one process; latency runs are interleaved across tools and reported as medians and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bnfold  # noqa: E402
from bnfold.discover.nested import iter_tensors  # noqa: E402

from peers import LIMIT, Peer, norm_count, peers  # noqa: E402
from zoo import QUICK, SCALING, ZOO, BenchModel, build, input_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def rel_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    e, a = expected.detach().double(), actual.detach().double()
    if e.shape != a.shape:
        return float("inf")
    return float((e - a).abs().max() / e.abs().max().clamp_min(1e-12))


def output_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's first output tensor (the logits of a tuple, a dict or a transformers ModelOutput)."""
    with torch.no_grad():
        out = model(x)
    return next(iter_tensors(out))


def run_tool(peer: Peer, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module | None, float, str | None]:
    if peer.unavailable:
        return None, 0.0, "not installed"
    subject = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = peer.fold(subject, x)
    except Exception as error:  # a peer failing on a model is a result
        text = str(error).splitlines()[0][:120] if str(error) else ""
        return None, time.perf_counter() - start, f"{type(error).__name__}: {text}"
    return folded.eval(), time.perf_counter() - start, None


def latency(models: dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per forward for each model, runs interleaved so that noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    cuda = x.device.type == "cuda"
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, model in models.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed)
    return {k: statistics.median(v) for k, v in times.items()}


def probe(model: str, tool: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "probe.py"), model, tool],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError):
        return {"fold_s": None, "peak_extra_mb": None, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}


def bench_zoo(entries: list[BenchModel], tools: list[Peer], runs: int) -> list[dict[str, Any]]:
    results = []
    for entry in entries:
        log(f"[zoo] {entry.name}")
        model = build(entry)
        x = input_for(entry)
        reference = output_of(model, x)
        row: dict[str, Any] = {"model": entry.name, "norms": norm_count(model, x), "input": list(x.shape), "tools": {}}
        variants: dict[str, nn.Module] = {"original": model}
        for peer in [*tools, LIMIT]:
            folded, seconds, error = run_tool(peer, model, x)
            if folded is not None:  # the fold time: the median of 3 calls, each on its own copy of the model
                seconds = statistics.median([seconds, *(run_tool(peer, model, x)[1] for _ in range(2))])
            info: dict[str, Any] = {"fold_s": seconds, "error": error}
            if folded is not None:
                info["norms_left"] = norm_count(folded, x)
                info["rel_error"] = rel_error(reference, output_of(folded, x))
                variants[peer.name] = folded
            if peer.name == "bnfold" and folded is not None:
                info["sites"] = len(bnfold.plan(model, x).sites)
            row["tools"][peer.name] = info
        medians = latency(variants, x, runs)
        row["latency_ms"] = {k: v * 1e3 for k, v in medians.items()}
        if torch.cuda.is_available():  # the same variants on the GPU, labelled as such in the report
            on_gpu = {k: copy.deepcopy(v).cuda() for k, v in variants.items()}
            row["latency_cuda_ms"] = {k: v * 1e3 for k, v in latency(on_gpu, x.cuda(), runs).items()}
            del on_gpu
            torch.cuda.empty_cache()
        results.append(row)
    return results


def bench_memory(entries: list[BenchModel], tools: list[Peer], workers: int) -> dict[str, dict[str, Any]]:
    jobs = [(e.name, p.name) for e in entries for p in tools if not p.unavailable]
    log(f"[memory] {len(jobs)} fresh-process probes")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda job: probe(*job), jobs))
    out: dict[str, dict[str, Any]] = {}
    for (model, tool), result in zip(jobs, found, strict=True):
        out.setdefault(model, {})[tool] = result
    return out


def bench_precision(entries: list[BenchModel], tools: list[Peer]) -> list[dict[str, Any]]:
    """Error of each tool's folded float16/bfloat16 model against the float64 original."""
    rows = []
    for entry in entries:
        log(f"[precision] {entry.name}")
        model = build(entry)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        reference = output_of(copy.deepcopy(model).double(), x.double())
        for dtype in (torch.float16, torch.bfloat16):
            low = copy.deepcopy(model).to(dtype)
            xl = x.to(dtype)
            row: dict[str, Any] = {"model": entry.name, "dtype": str(dtype).replace("torch.", "")}
            row["unfolded"] = rel_error(reference, output_of(low, xl))
            for peer in tools:
                folded, _, error = run_tool(peer, low, xl)
                row[peer.name] = error if folded is None else rel_error(reference, output_of(folded, xl))
            rows.append(row)
    return rows


def bench_scaling(entries: list[BenchModel], tools: list[Peer], workers: int) -> list[dict[str, Any]]:
    """Fold time in this process (median of 3, warm) and peak extra memory in fresh processes."""
    rows = []
    memory = bench_memory(entries, tools, workers)
    for entry in entries:
        log(f"[scaling] {entry.name}")
        model = build(entry)
        x = input_for(entry)
        params = sum(p.numel() for p in model.parameters())
        row: dict[str, Any] = {"model": entry.name, "parameters": params, "modules": len(list(model.modules()))}
        for peer in tools:
            probe_result = memory.get(entry.name, {}).get(peer.name, {})
            times = [run_tool(peer, model, x) for _ in range(3)]
            errors = [error for _, _, error in times if error]
            row[peer.name] = {
                "fold_s": None if errors else statistics.median(seconds for _, seconds, _ in times),
                "peak_extra_mb": probe_result.get("peak_extra_mb"),
                "error": errors[0] if errors else probe_result.get("error"),
            }
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 models and fewer runs (under 3 minutes)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where to write benchmarks.md, .json and plots")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables and plots from benchmarks.json")
    args = parser.parse_args()
    if args.report_only:
        from report import write_report

        write_report(json.loads((args.out / "benchmarks.json").read_text()), args.out)
        return
    started = time.perf_counter()
    torch.manual_seed(0)
    tools = peers()
    zoo = [e for e in ZOO if e.name in QUICK] if args.quick else ZOO
    runs = 5 if args.quick else 21
    results: dict[str, Any] = {
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        "peers": {p.name: {"version": p.version, "unavailable": p.unavailable} for p in tools},
    }
    results["zoo"] = bench_zoo(zoo, tools, runs)
    results["memory"] = bench_memory(zoo, tools, workers=2)
    precision_models = [e for e in ZOO if e.name in ("tv/resnet18", "tv/mobilenet_v3_large", "timm/efficientnet_b0")]
    results["precision"] = bench_precision(precision_models[:1] if args.quick else precision_models, tools)
    scaling_entries = SCALING[:2] + SCALING[5:7] if args.quick else SCALING
    scaling_names = ("bnfold", "fasterai") if args.quick else ("bnfold", "fasterai", "torch.fx fuse", "AIMET")
    scaling_tools = [p for p in tools if p.name in scaling_names]
    results["scaling"] = bench_scaling(scaling_entries, scaling_tools, workers=2)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str))
    from report import write_report

    write_report(results, args.out)
    log(f"done in {results['seconds']:.0f} s: {args.out / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
