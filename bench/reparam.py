"""Re-parameterization benchmark: parallel branches merged into one convolution, side by side.

For timm's RepVGG, MobileOne, FastViT, RepViT and RepGhost (random weights, randomized norm statistics):
bnfold with ``reparameterize=True``, timm's own per-class ``reparameterize_model``, bnfold folding norms only,
and the peers; the convolutions and norms one forward pass runs, the output error, and CPU latency, measured
interleaved in one process (median of the runs, and the spread).

    python bench/reparam.py            # writes docs/reparam.json, and docs/benchmarks.md from every JSON there
    python bench/reparam.py --quick    # fewer models and runs
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bnfold  # noqa: E402
from bnfold.testing import randomize_norms  # noqa: E402

from peers import norm_count, peers  # noqa: E402
from report import reparam_table, write_report  # noqa: E402

MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1", "repghostnet_050"]


def conv_count(model: nn.Module, x: torch.Tensor) -> int:
    """Convolutions one forward pass runs."""
    count = [0]
    handles = [
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def timm_reparameterize(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(copy.deepcopy(model))


def bnfold_reparameterize(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return bnfold.fold(model, x, reparameterize=True)


def latencies(models: dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per forward for each model, runs interleaved so that noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def bench(name: str, runs: int) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False, num_classes=1000)).eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    tools = {
        "bnfold reparameterize": bnfold_reparameterize,
        "timm reparameterize_model": timm_reparameterize,
        "bnfold (norms only)": lambda m, inp: bnfold.fold(m, inp),
        **{p.name: p.fold for p in peers() if p.name != "bnfold" and p.unavailable is None},
    }
    results: dict[str, Any] = {"model": name, "tools": {}}
    built: dict[str, nn.Module] = {"original": model}
    for tool, fold in tools.items():
        try:
            folded = fold(copy.deepcopy(model), x)
        except Exception as error:  # a peer that fails on this model: its result
            results["tools"][tool] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            continue
        with torch.no_grad():
            out = folded(x)
        error = float((out.double() - expected.double()).abs().max() / expected.double().abs().max())
        results["tools"][tool] = {"convs": conv_count(folded, x), "norms": norm_count(folded, x), "rel_error": error}
        built[tool] = folded
    results["tools"]["original"] = {"convs": conv_count(model, x), "norms": norm_count(model, x), "rel_error": 0.0}
    times = latencies(built, x, runs)
    base = statistics.median(times["original"])
    for tool, samples in times.items():
        median = statistics.median(samples)
        results["tools"][tool].update(
            latency_ms=1e3 * median,
            spread_ms=[1e3 * min(samples), 1e3 * max(samples)],
            speedup=base / median,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = MODELS[:2] if args.quick else MODELS
    runs = args.runs or (5 if args.quick else 15)
    results = [bench(name, runs) for name in names]
    (args.out / "reparam.json").write_text(json.dumps(results, indent=1) + "\n")
    main_results = args.out / "benchmarks.json"
    if main_results.exists():  # the page is made from every script's JSON
        write_report(json.loads(main_results.read_text()), args.out)
    print(reparam_table(results))


if __name__ == "__main__":
    main()
