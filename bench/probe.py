"""Measure one tool folding one model in a fresh process: fold time and peak extra resident memory.

Usage: python bench/probe.py MODEL TOOL  ->  prints one JSON object.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def main() -> None:
    import torch

    from peers import LIMIT, peers
    from zoo import build, by_name, input_for

    warnings.simplefilter("ignore")
    model_name, tool = sys.argv[1], sys.argv[2]
    entry = by_name(model_name)
    model = build(entry)
    x = input_for(entry)
    peer = next(p for p in [*peers([tool]), LIMIT] if p.name == tool)
    with torch.no_grad():
        model(x)
    gc.collect()
    exact = _reset_peak()
    base = _status("VmRSS")
    start = time.perf_counter()
    try:
        folded = peer.fold(model, x)
        error = None
    except Exception as e:  # a peer failing on a model is a result, not a crash
        folded, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    del folded
    print(json.dumps({"fold_s": seconds, "peak_extra_mb": (peak - base) / 2**20 if exact else None, "error": error}))


if __name__ == "__main__":
    main()
