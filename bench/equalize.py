"""Cross-layer equalization, measured: per-tensor and per-channel 8-bit weight quantization of folded models,
before and after ``equalize=True``.

Random weights, norms randomized with gammas spread over [0.01, 10] (what folding leaves real models' ranges
like), input 4x3x64x64, float64 so that only quantization moves the outputs. Output SQNR in dB against the
float model (higher is better), with every Conv/Linear weight quantized to 8 bits symmetrically (one scale
per tensor, or one per output channel: the ceiling), activations in float. Writes docs/equalize.json and
prints a markdown table (docs/benchmarks.md holds the last one).

    python bench/equalize.py
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

import bnfold

MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "torchvision mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), False),
    "torchvision resnet18": (lambda: torchvision.models.resnet18(weights=None), False),
    "torchvision mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(weights=None), False),
    "torchvision efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), False),
    "timm repvgg_a0, re-parameterized": (lambda: timm.create_model("repvgg_a0"), True),
    "timm mobileone_s0, re-parameterized": (lambda: timm.create_model("mobileone_s0"), True),
}


def spread_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(10 ** (torch.rand(n, generator=g) * 3 - 2))
                    m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def quantized(model: nn.Module, per_channel: bool) -> nn.Module:
    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = m.weight
                top = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel else w.abs().max()
                step = torch.where(top > 0, top / 127, torch.ones_like(top))
                w.copy_((w / step).round() * step)
    return q


def sqnr(reference: torch.Tensor, noisy: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - noisy).pow(2).sum()))


def measure(name: str) -> dict[str, object]:
    build, reparameterize = MODELS[name]
    torch.manual_seed(0)
    model = spread_norms(build().eval()).double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    folded = bnfold.fold(model, x, reparameterize=reparameterize)
    start = time.perf_counter()
    result = bnfold.fold_with_report(model, x, reparameterize=reparameterize, equalize=True)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = float((result.model(x) - reference).abs().max() / reference.abs().max())
        row = {
            "model": name,
            "chains": result.report.plan.equalized,
            "layers": len(result.report.equalized_layers),
            "kept": sum(1 for k in result.report.plan.kept if k.kind == "equalize"),
            "output_change": error,
            "folded_per_tensor": sqnr(reference, quantized(folded, False)(x)),
            "equalized_per_tensor": sqnr(reference, quantized(result.model, False)(x)),
            "folded_per_channel": sqnr(reference, quantized(folded, True)(x)),
            "seconds": seconds,
        }
    return row


def main() -> None:
    torch.set_num_threads(1)
    rows = [measure(name) for name in MODELS]
    Path("docs").mkdir(exist_ok=True)
    Path("docs/equalize.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(
        "| model | chains equalized (layers) | producers kept | output change (relative) | per-tensor 8-bit, folded | per-tensor 8-bit, equalized | per-channel 8-bit, folded | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['chains']} ({r['layers']}) | {r['kept']} | {r['output_change']:.1e} | "
            f"{r['folded_per_tensor']:.1f} | {r['equalized_per_tensor']:.1f} | {r['folded_per_channel']:.1f} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
