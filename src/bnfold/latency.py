"""How much faster the folded model runs: median latency of both models, measured side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .nested import detached_copy, iter_tensors

__all__ = ["Latency", "compare_latency"]


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward pass of the original and the folded model."""

    runs: int
    before_ms: float
    after_ms: float

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms

    def to_dict(self) -> dict[str, float]:
        return {"runs": self.runs, "before_ms": self.before_ms, "after_ms": self.after_ms, "speedup": self.speedup}

    def __str__(self) -> str:
        return (
            f"latency:    {self.before_ms:.2f} ms -> {self.after_ms:.2f} ms "
            f"(x{self.speedup:.2f}, median of {self.runs} interleaved runs)"
        )


def compare_latency(
    original: nn.Module,
    folded: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    *,
    runs: int = 30,
    warmup: int = 3,
    on_run: Callable[[int, int], None] | None = None,
) -> Latency:
    """Time ``original(*example_inputs)`` and ``folded(*example_inputs)``, without grad, alternating one
    run of each so that machine noise hits both alike; report the medians.

    Neither model's mode is changed: call ``.eval()`` first, as for folding. On CUDA every run is
    synchronized. ``on_run(i, total)`` is called after each pair of runs (for progress bars).

    >>> import torch, bnfold
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> latency = compare_latency(m, bnfold.fold(m, x), x, runs=5)
    >>> latency.runs, latency.speedup > 0
    (5, True)
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    args = detached_copy(args)
    cuda = any(t.device.type == "cuda" for t in iter_tensors(args))

    def once(model: nn.Module) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*args)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"before": [], "after": []}
    total = warmup + runs
    with torch.no_grad():
        for i in range(total):
            for key, model in (("before", original), ("after", folded)):
                elapsed = once(model)
                if i >= warmup:
                    times[key].append(elapsed)
            if on_run is not None:
                on_run(i + 1, total)
    return Latency(runs, statistics.median(times["before"]) * 1e3, statistics.median(times["after"]) * 1e3)
