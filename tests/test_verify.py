"""The output check (verify.py, lineage.py): tolerances from the magnitudes entering an output, integer outputs
through the floats behind them, and the float64 run that tells amplified rounding from a wrong fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.check.verify import (
    FLOAT64_FACTOR,
    MAGNITUDE_CAP,
    Observed,
    Sources,
    compare_observed,
    judge_float64,
)
from bnfold.discover.graph import DataFlowGraph
from bnfold.discover.tracing import trace_execution

from helpers import randomize_norms


# -- tolerance --------------------------------------------------------------------------------------------
def test_the_magnitude_entering_an_output_widens_its_tolerance_up_to_a_cap():
    expected = torch.tensor([0.5, 0.0, 0.25])
    actual = expected + torch.tensor([3e-4, 0.0, 0.0])  # 6e-4 of the output's scale: beyond 1e-4 of it
    assert not compare_observed(Observed(expected), Observed(actual))[0].ok
    # a ReLU of values up to 5 made it: their rounding may reach it
    assert compare_observed(Observed(expected, magnitudes={"output": 5.0}), Observed(actual))[0].ok
    # but never more than MAGNITUDE_CAP times the output's own scale: a wrong fold could hide below that
    far = expected + torch.tensor([0.5 * MAGNITUDE_CAP * 2e-4, 0.0, 0.0])
    assert not compare_observed(Observed(expected, magnitudes={"output": 1e6}), Observed(far))[0].ok


def _trace(model: nn.Module, x: torch.Tensor) -> DataFlowGraph:
    types = {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.BatchNorm1d}
    return trace_execution(model, (x,), types, types)


def test_the_trace_records_the_magnitude_entering_each_output():
    class SmallAfterRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.identity = nn.Identity()  # a child: the model's own ops are traced one by one

        def forward(self, x):
            pre = self.identity(x) * 100.0 - 99.0  # mostly large and negative
            return torch.relu(pre), pre.exp()

    x = torch.rand(4, 8)
    graph = _trace(SmallAfterRelu(), x)
    pre = x * 100.0 - 99.0
    assert float(torch.relu(pre).max()) <= 1.0
    assert graph.output_magnitudes["output[0]"] == pytest.approx(float(pre.abs().max()))
    assert graph.output_magnitudes["output[1]"] == pytest.approx(float(pre.abs().max()))


# -- integer outputs -----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        logits = self.bn(self.fc(x))
        return logits.argmax(1), (logits > 0).sum(1)


def test_the_trace_records_the_floats_behind_integer_outputs():
    torch.manual_seed(0)
    model = randomize_norms(Classifier().eval())
    x = torch.randn(8, 6)
    graph = _trace(model, x)
    with torch.no_grad():
        logits = model.bn(model.fc(x))
    for path in ("output[0]", "output[1]"):
        sources = graph.output_sources[path]
        assert sources.complete and len(sources.tensors) == 1
        torch.testing.assert_close(sources.tensors[0], logits)


def test_integers_that_differ_where_their_floats_tie_within_rounding_are_not_a_wrong_fold():
    logits = torch.tensor([[1.0, 1.0 - 1e-7], [0.0, 2.0]])
    nudged = torch.tensor([[1.0 - 1e-7, 1.0], [0.0, 2.0]])
    expected = Observed(logits.argmax(1), {"output": Sources((logits,), True)})
    actual = Observed(nudged.argmax(1), {"output": Sources((nudged,), True)})
    assert not torch.equal(expected.outputs, actual.outputs)
    assert all(d.ok for d in compare_observed(expected, actual))
    # unless something else went into the integers too: then they must be equal
    partial = Observed(logits.argmax(1), {"output": Sources((logits,), False)})
    assert not all(d.ok for d in compare_observed(partial, actual))


def test_integers_that_agree_while_their_floats_do_not_are_a_wrong_fold():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expected = Observed(logits.argmax(1), {"output": Sources((logits,), True)})
    actual = Observed(logits.argmax(1), {"output": Sources((2 * logits,), True)})  # same argmax, other logits
    failed = [d for d in compare_observed(expected, actual) if not d.ok]
    assert [d.path for d in failed] == ["output (float input #0 of the ops that computed it)"]


def test_a_fold_that_keeps_the_argmax_but_changes_the_logits_is_refused():
    def doubled(norm):  # scale and shift doubled: every logit doubles, no argmax moves
        scale, shift = bnfold.rules.table.norm_affine(norm)
        return 2 * scale, 2 * shift

    torch.manual_seed(0)
    model = randomize_norms(Classifier().eval())
    x = torch.randn(8, 6)
    wrong = bnfold.FoldRule(nn.Linear, nn.BatchNorm1d, affine=doubled)
    with pytest.raises(bnfold.VerificationError, match="float input #0"):
        bnfold.fold(model, x, extra_rules=[wrong])
    result = bnfold.fold_with_report(model, x)
    assert result.report.checked == "outputs" and result.report.folded == 1


# -- the float64 run -----------------------------------------------------------------------------------------
def test_the_float64_judgement_compares_distances_to_the_float64_run():
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    reference = Observed(truth.float() + torch.tensor([0.1, 0.0, 0.0]))  # the original's own float32 error
    close = Observed(truth.float() + torch.tensor([0.0, -0.1 * FLOAT64_FACTOR, 0.0]))
    far = Observed(truth.float() + torch.tensor([0.0, -0.2 * FLOAT64_FACTOR, 0.0]))
    failed = [d for d in compare_observed(reference, close) if not d.ok]
    (judgement,) = judge_float64(failed, reference, close, Observed(truth))
    assert judgement.ok and judgement.unfolded == pytest.approx(0.1) and judgement.folded == pytest.approx(0.4)
    failed = [d for d in compare_observed(reference, far) if not d.ok]
    assert not judge_float64(failed, reference, far, Observed(truth))[0].ok


class WritesAfterTheNormRead(nn.Module):
    """Issue 10's bug 1: ``h`` changes in place (through ``.detach()``) after ``bn`` read it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.bn, self.fc1 = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 5)

    def forward(self, x):
        h = self.fc0(x)
        y = self.bn(h)
        h.detach().add_(1.0)
        return self.fc1(y).argmax(1)


def test_a_plan_that_misreads_the_data_flow_is_refused_although_every_folded_layer_matches(monkeypatch):
    torch.manual_seed(0)
    model = randomize_norms(WritesAfterTheNormRead().eval())
    x = torch.randn(64, 4)
    # make the tracer and the planner blind to the write, so the plan folds bn into fc1
    monkeypatch.setattr("bnfold.planning.forward.changed_later", lambda graph, key, reader: False)
    monkeypatch.setattr(bnfold.discover.tracing._ExecutionTracer, "attach_writes", lambda self, call, writes: None)
    assert [s.direction for s in bnfold.plan(model, x).sites] == ["forward"]
    with pytest.raises(bnfold.VerificationError, match="how they are connected") as caught:
        bnfold.fold(model, x)
    assert caught.value.layers_match is True  # each fold is right on its own inputs: the data flow is not
    assert "verify='layers'" not in str(caught.value)
