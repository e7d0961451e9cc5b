"""How much faster the folded model runs: latency of both models, measured side by side, with its spread.

A busy machine makes single runs swing by an order of magnitude, so the result keeps every model's
minimum, quartiles and maximum, and says when the runs vary too much for the speed-up to be trusted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..discover.nested import detached_copy, iter_tensors

__all__ = ["Latency", "Timing", "compare_latency"]

# Runs whose middle half spans more than this fraction of their median are too noisy to compare.
NOISY_SPREAD = 0.2


@dataclass(frozen=True)
class Timing:
    """The spread of one model's timed runs, in milliseconds."""

    min_ms: float
    q1_ms: float
    median_ms: float
    q3_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        """The spread of run times given in seconds.

        >>> Timing.of([0.001, 0.002, 0.003, 0.004, 0.005]).median_ms
        3.0
        """
        ms = sorted(s * 1e3 for s in seconds)
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], ms[0], ms[0])
        q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(ms[0], q1, median, q3, ms[-1])

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "min_ms": self.min_ms,
            "q1_ms": self.q1_ms,
            "median_ms": self.median_ms,
            "q3_ms": self.q3_ms,
            "max_ms": self.max_ms,
        }

    def __str__(self) -> str:
        return f"{self.min_ms:.2f} / {self.q1_ms:.2f}-{self.q3_ms:.2f} / {self.max_ms:.2f} ms"


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward pass of the original and the folded model, and the spread of each."""

    runs: int
    before_ms: float
    after_ms: float
    before: Timing | None = None
    after: Timing | None = None

    @classmethod
    def from_samples(cls, before_s: list[float], after_s: list[float]) -> Latency:
        """From the run times in seconds of each model.

        >>> Latency.from_samples([0.010, 0.011, 0.012], [0.008, 0.009, 0.010]).speedup
        1.2222222222222223
        """
        if not before_s or len(before_s) != len(after_s):
            raise ValueError("from_samples() needs the same, non-zero number of runs of each model")
        before, after = Timing.of(before_s), Timing.of(after_s)
        return cls(len(before_s), before.median_ms, after.median_ms, before, after)

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms

    @property
    def warning(self) -> str | None:
        """Why the speed-up should not be trusted (runs that vary too much), or None."""
        noisy = [(what, t) for what, t in (("original", self.before), ("folded", self.after)) if t is not None]
        noisy = [(what, t) for what, t in noisy if t.spread > NOISY_SPREAD]
        if not noisy:
            return None
        worst = max(t.spread for _, t in noisy)
        which = "original and folded models'" if len(noisy) == 2 else f"{noisy[0][0]} model's"
        return (
            f"the {which} run times vary by {worst:.0%} of the median between the quartiles (more than "
            f"{NOISY_SPREAD:.0%}): the machine is busy or throttling, so the speed-up is not reliable; measure on an "
            "idle machine, with more runs (--bench-runs)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "before_ms": self.before_ms,
            "after_ms": self.after_ms,
            "speedup": self.speedup,
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "warning": self.warning,
        }

    def __str__(self) -> str:
        lines = [
            f"latency:    {self.before_ms:.2f} ms -> {self.after_ms:.2f} ms "
            f"(x{self.speedup:.2f}, median of {self.runs} interleaved runs)"
        ]
        if self.before is not None and self.after is not None:
            lines.append(f"spread:     before {self.before}, after {self.after} (min / middle half / max)")
        if self.warning:
            lines.append(f"warning:    {self.warning}")
        return "\n".join(lines)


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
    run of each so that machine noise hits both alike; report the medians and the spread of each
    (``latency.warning`` says when the runs vary too much to trust the speed-up).

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
    return Latency.from_samples(times["before"], times["after"])
