"""What a verified fold costs, in units of the model's own forward pass, and against its bound.

    python bench/cost.py                     # the benchmark models; about 5 minutes on 2 cores
    python bench/cost.py tv/resnet50 ...     # some of them
    python bench/cost.py --cpu-time ...      # single-threaded CPU time instead of wall time (a busy machine)

For each model (batch 1, as in bench/run.py): the median wall time of a forward pass, of the traced forward
bnfold runs to see the data flow, of one copy of the model (its weights), of a forward pass of the folded copy,
and of ``bnfold.fold(model, x)`` (trace, plan, copy, fold, check). The bound: a verified fold costs at most
1.25 x (traced forward + folded forward + copy). Runs are interleaved so that noise from other processes hits
every measurement alike.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bnfold  # noqa: E402
from bnfold import pipeline  # noqa: E402
from bnfold.apply.surgery import apply_plan, clone_model  # noqa: E402
from bnfold.options import FoldOptions  # noqa: E402
from bnfold.rules.table import build_rules  # noqa: E402

from zoo import ZOO, build, by_name, input_for  # noqa: E402

BOUND = 1.25


def measure(name: str, runs: int = 7, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    entry = by_name(name)
    model = build(entry)
    x = input_for(entry)
    rules = build_rules(None)
    options = FoldOptions((x,), rules)
    plan, _ = pipeline.plan_model(model, options, stacklevel=1)
    folded = clone_model(model)
    apply_plan(folded, plan, rules, undoable=False)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def folded_forward() -> None:
        with torch.no_grad():
            folded(x)

    steps: dict[str, Callable[[], Any]] = {
        "forward": forward,
        "traced": lambda: pipeline.discover(model, options),
        "copy": lambda: clone_model(model),
        "folded_forward": folded_forward,
        "fold": lambda: bnfold.fold(model, x),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(runs + 1):
        for key, step in steps.items():
            start = clock()
            step()
            if i:  # the first round warms up
                times[key].append(clock() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    budget = t["traced"] + t["folded_forward"] + t["copy"]
    return {
        "model": name,
        "forward_ms": t["forward"] * 1e3,
        "seconds": t,
        "fold_in_forwards": t["fold"] / t["forward"],
        "traced_in_forwards": t["traced"] / t["forward"],
        "copy_in_forwards": t["copy"] / t["forward"],
        "fold_over_bound_budget": t["fold"] / budget,
    }


def main() -> None:
    warnings.simplefilter("ignore")
    args = sys.argv[1:]
    clock = time.perf_counter
    if "--cpu-time" in args:  # single-threaded CPU time: steady on a machine busy with other work
        args.remove("--cpu-time")
        torch.set_num_threads(1)
        clock = time.process_time
    names = args or [e.name for e in ZOO]
    print(
        "| model | forward (ms) | fold (forwards) | traced forward | copy | fold / (traced + folded forward + copy) |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for name in names:
        row = measure(name, clock=clock)
        rows.append(row)
        flag = "" if row["fold_over_bound_budget"] <= BOUND else " (over)"
        print(
            f"| {name} | {row['forward_ms']:.1f} | {row['fold_in_forwards']:.2f} | {row['traced_in_forwards']:.2f} | "
            f"{row['copy_in_forwards']:.2f} | {row['fold_over_bound_budget']:.2f}{flag} |",
            flush=True,
        )
    out = Path(__file__).resolve().parent.parent / "docs" / "cost.json"
    out.write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_time": clock is time.process_time, "rows": rows}, indent=1)
    )
    print(f"wrote {out}; python bench/run.py --report-only puts it into docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
