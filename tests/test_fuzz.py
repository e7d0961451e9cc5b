"""The differential fuzzer (bench/fuzz.py) in CI: a few hundred random programs must each fold to equal
outputs or be refused with a reason; never a crash, a wrong output or a changed original. The long run is
``python bench/fuzz.py --programs 10000`` (docs/benchmarks.md)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fuzz  # noqa: E402
from bnfold.reparam.merge_recipe import MergeRecipe

# the programs draw layers and norms of timm and torchvision too
pytest.importorskip("timm", reason="the random programs use timm's layers")
pytest.importorskip("torchvision", reason="the random programs use torchvision's FrozenBatchNorm2d")

PROGRAMS = 600  # about 25 s on 2 cores


@pytest.mark.slow
@pytest.mark.parametrize("start", range(0, PROGRAMS, 100))
def test_random_programs_fold_equal_or_are_refused(start):
    result = fuzz.fuzz(range(start, start + 100))
    assert result["bad"] == [], "\n".join(
        f"python bench/fuzz.py --replay {b['seed']} --shrink  # {b['kind']}: {b['detail']}" for b in result["bad"]
    )
    counts = result["counts"]
    # the only refusals: programs folded without example inputs that torch.fx cannot trace
    assert set(result["refusals"]) <= {"TraceError"}, result["refusals"]
    assert counts.get("folded", 0) >= 80, counts  # the programs are not degenerate: most fold
    assert counts.get("invalid", 0) <= 3, counts


def test_programs_without_example_inputs_fold_by_their_plan_alone():
    """Some programs are folded without example inputs (torch.fx, no output check): those that trace fold
    backward and forward (constants need shapes), and the oracle judges them like the others."""
    import warnings

    import bnfold

    folded = Counter()
    for seed in range(500):
        case = fuzz.random_case(seed)
        if not case.options.symbolic:
            continue
        assert not case.options.reparameterize  # merging branches needs example inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                plan = bnfold.plan(fuzz.build(case))
            except bnfold.TraceError:
                folded["untraceable"] += 1
                continue
        assert plan.traced_with == "torch.fx"
        folded.update(s.kind for s in plan.sites)
    assert folded["backward"] >= 20 and folded["forward"] >= 5, folded


def test_programs_fold_many_kinds_of_sites():
    """The generator reaches what bnfold knows: backward and forward folds, channel-wise constants, folds
    through a torch.cat, merged branches, and merges of only some branches (the others kept running)."""
    import warnings

    import torch

    import bnfold

    kinds = set()
    for seed in range(150):
        case = fuzz.random_case(seed)
        program = fuzz.build(case)
        x = torch.randn(case.options.input_shape, generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = bnfold.plan(program, x, reparameterize=case.options.reparameterize)
        kinds |= {s.kind for s in plan.sites}
        kinds |= {"partial merge" for s in plan.sites if isinstance(s.payload, MergeRecipe) and s.payload.kept}
    assert {"backward", "forward", "constant", "merge", "partial merge"} <= kinds, kinds


def test_programs_set_aside_a_fold_that_breaks_the_forward():
    """Programs that read an attribute of a norm after it ran (invisible to a trace) fold with that norm kept,
    its reason the error, and the rest folded: their outcome is still judged by the oracle above."""
    import warnings

    import torch

    import bnfold

    set_aside = 0
    for seed in range(200):
        case = fuzz.random_case(seed)
        program = fuzz.build(case)
        if not any(name == "reads_module" for name, _ in fuzz.flat(program.steps)):
            continue
        x = torch.randn(case.options.input_shape, generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program(x.clone())
                report = bnfold.fold_with_report(program, x, reparameterize=case.options.reparameterize).report
            except Exception:  # an invalid program, or a refusal: the tests above judge those
                continue
        set_aside += any("made the folded model fail to run" in k.reason for k in report.plan.kept)
    assert set_aside >= 2, set_aside


def _refold(model, x):
    import bnfold

    return bnfold.fold(model, x)


def test_the_oracle_tells_amplified_rounding_from_a_wrong_fold():
    """Seed 4353 ends in a LayerNorm over two nearly equal values: the float32 rounding of the folded weights
    moves that output by 1e-3 even in float64, while the same fold made in float64 is exact. A fold that is
    wrong by a little is still caught."""
    import copy
    import warnings

    import torch

    import bnfold

    case = fuzz.random_case(4353)
    program = fuzz.build(case)
    x = torch.randn(case.options.input_shape, generator=torch.Generator().manual_seed(case.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program(x.clone())
        folded = bnfold.fold(program, x)
    assert fuzz.oracle(program, folded, x) is not None  # the plain float64 comparison sees the rounding
    assert fuzz.oracle(program, folded, x, _refold) is None
    wrong = copy.deepcopy(folded)
    layer = next(m for m in wrong.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    with torch.no_grad():
        layer.bias.add_(1e-3)
    assert fuzz.oracle(program, wrong, x, _refold) is not None


def test_a_seed_replays_the_same_program():
    first, second = fuzz.random_case(1234), fuzz.random_case(1234)
    assert first == second
    assert fuzz.listing(fuzz.build(first)) == fuzz.listing(fuzz.build(second))
    assert fuzz.classify(first) == fuzz.classify(second)


def test_shrinking_keeps_only_what_the_failure_needs():
    case = next(c for c in map(fuzz.random_case, range(100)) if sum(g.op == "conv_transpose" for g in c.genes) == 1)

    def judge(candidate):  # a stand-in bug: "crashes" whenever a ConvTranspose step is in the program
        program = fuzz.build(candidate)
        ops = [name for name, _ in fuzz.flat(program.steps)]
        return fuzz.Outcome("crash", "Stand-in: conv_transpose") if "conv_transpose" in ops else fuzz.Outcome("folded")

    assert judge(case).kind == "crash"
    small, outcome = fuzz.shrink(case, judge=judge)
    assert outcome.kind == "crash"
    assert [g.op for g in small.genes] == ["conv_transpose"]
