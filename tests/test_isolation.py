"""A folded norm gives what the norm gave (its memory layout too), and one fold that breaks the folded model
never blocks the others: it is kept with the reason, the rest folds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.rules.norms import Contiguous, FoldedNormAct

from helpers import Chain, Model, assert_same_state, check_fold, randomize_norms, state_snapshot

timm_layers = pytest.importorskip("timm.layers", reason="these cases use timm's layers")


# -- the layout a norm gave its output ------------------------------------------------------------------
def transposed_then_viewed() -> nn.Module:
    """``bn(fc(x).transpose(1, 2)).view(...)``: the norm's input is a transposed view, its output is
    contiguous, and ``.view`` needs that."""
    return Model(
        lambda m, x: m.bn(m.fc(x).transpose(1, 2)).view(x.shape[0], -1), fc=nn.Linear(4, 3), bn=nn.BatchNorm1d(3)
    )


def test_a_norm_that_made_its_output_contiguous_leaves_a_replacement_that_does_too():
    model = transposed_then_viewed().eval()
    result = check_fold(model, torch.randn(2, 5, 4), folded=1, kept=0)
    assert result.report.plan.sites[0].memory_format == "contiguous"
    assert isinstance(result.model.bn, Contiguous) and result.model.bn.inner is None
    assert "memory_format=contiguous" in repr(result.model.bn)


def test_a_norm_that_keeps_its_input_layout_leaves_nn_identity():
    model = Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last), folded=1, kept=0)
    assert result.report.plan.sites[0].memory_format is None
    assert type(result.model.s1) is nn.Identity


def norm_act_on_a_transpose() -> nn.Module:
    return Model(
        lambda m, x: m.bn(m.conv(x).transpose(2, 3)).view(x.shape[0], -1),
        conv=nn.Conv2d(3, 4, 3),
        bn=timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU),
    ).eval()


def test_a_norm_with_an_activation_keeps_the_activation_and_the_layout(tmp_path):
    x = torch.randn(2, 3, 7, 9)
    model = norm_act_on_a_transpose()
    result = check_fold(model, x, folded=1, kept=0)
    replacement = result.model.bn
    assert isinstance(replacement, Contiguous) and isinstance(replacement.inner, FoldedNormAct)
    assert isinstance(replacement.inner.act, nn.ReLU)
    bnfold.save_folded(result.model, tmp_path / "folded.pt", original=model)
    loaded = bnfold.load_folded(norm_act_on_a_transpose(), tmp_path / "folded.pt")
    assert isinstance(loaded.bn, Contiguous) and isinstance(loaded.bn.inner, FoldedNormAct)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_a_checkpoint_of_a_layout_replacement_loads_back(tmp_path):
    x = torch.randn(2, 5, 4)
    model = randomize_norms(transposed_then_viewed()).eval()
    folded = bnfold.fold(model, x)
    bnfold.save_folded(folded, tmp_path / "folded.pt", original=model)
    loaded = bnfold.load_folded(transposed_then_viewed().eval(), tmp_path / "folded.pt")
    assert isinstance(loaded.bn, Contiguous) and loaded.bn.memory_format == "contiguous"
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


def test_contiguous_names_the_formats_it_knows():
    with pytest.raises(ValueError, match=r"memory_format must be one of .*'channels_last'.*got 'rows'"):
        Contiguous("rows")


# -- one fold that breaks the model does not block the others ------------------------------------------
class ReadsTheNorm(nn.Module):
    """Reads a Python attribute of ``bn`` after calling it: gone once it is folded. ``bn2`` is unrelated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y = y.reshape(x.shape[0], self.bn.num_features, *y.shape[2:])
        return self.bn2(self.conv2(y))


@pytest.mark.parametrize("verify", ["outputs", "layers"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_fold_that_makes_the_model_fail_is_kept_and_the_rest_folds(verify, inplace):
    model = randomize_norms(ReadsTheNorm()).eval()
    x = torch.randn(2, 3, 8, 8)
    result = check_fold(model, x, folded=1, kept=1, randomize=False, verify=verify, inplace=inplace)
    (kept,) = result.report.plan.kept
    assert kept.norm == "bn"
    assert "folding it made the folded model fail to run (AttributeError:" in kept.reason
    assert "num_features" in kept.reason
    assert result.report.plan.sites[0].norm == "bn2"
    assert isinstance(result.model.bn, nn.BatchNorm2d) and isinstance(result.model.bn2, nn.Identity)
    assert (result.model is model) == inplace


@pytest.mark.parametrize("inplace", [False, True])
def test_without_example_inputs_a_fold_that_breaks_the_model_code_is_kept(inplace):
    """No run to fail: the folded copy is traced with torch.fx again, and reading ``bn.num_features``
    fails there."""

    def forward(m, x):
        y = m.bn(m.conv(x)) / m.bn.num_features
        return m.bn2(m.conv2(y))

    parts = {"conv": nn.Conv2d(3, 4, 3), "bn": nn.BatchNorm2d(4), "conv2": nn.Conv2d(4, 4, 3), "bn2": nn.BatchNorm2d(4)}
    model = randomize_norms(Model(forward, **parts)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    result = bnfold.fold_with_report(model, inplace=inplace)
    assert result.report.plan.traced_with == "torch.fx"
    (kept,) = result.report.plan.kept
    assert kept.norm == "bn" and "folding it made the folded model fail to run (AttributeError:" in kept.reason
    assert [s.norm for s in result.report.plan.sites] == ["bn2"]
    assert (result.model is model) == inplace
    torch.testing.assert_close(result.model(x), expected)


def test_a_fold_that_cannot_be_applied_is_kept_and_the_original_is_untouched():
    def broken_for_the_first(norm):
        if norm.num_features == 8:
            raise RuntimeError("cannot build the replacement")
        return nn.Identity()

    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    ).eval()
    before = state_snapshot(model)
    rule = bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, replacement=broken_for_the_first)
    result = bnfold.fold_with_report(model, torch.randn(2, 3, 10, 10), extra_rules=[rule])
    (kept,) = result.report.plan.kept
    assert kept.norm == "1" and kept.reason == "folding it failed (RuntimeError: cannot build the replacement)"
    assert isinstance(result.model[1], nn.BatchNorm2d) and isinstance(result.model[4], nn.Identity)
    assert_same_state(model, before)


def test_folds_that_all_fail_to_apply_leave_the_model_in_place_as_it_was():
    def broken(norm):
        raise RuntimeError("cannot build the replacement")

    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    ).eval()
    before = state_snapshot(model)
    norms = (model[1], model[4])
    rule = bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, replacement=broken)
    result = bnfold.fold_with_report(model, torch.randn(2, 3, 10, 10), inplace=True, extra_rules=[rule])
    assert [k.norm for k in result.report.plan.kept] == ["1", "4"] and not result.report.plan.sites
    assert (model[1], model[4]) == norms
    assert_same_state(model, before)


class RepBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))


class ReadsInsideTheBlock(nn.Module):
    """After the block, reads an attribute of a conv inside it: gone once the block is merged."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.head, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.block.conv3.kernel_size != (3, 3):
            raise ValueError("a 3x3 block was expected")
        return self.bn(self.head(torch.relu(y)))


def test_a_merge_that_makes_the_model_fail_is_kept_and_its_norms_still_fold():
    model = randomize_norms(ReadsInsideTheBlock()).eval()
    result = check_fold(model, torch.randn(2, 4, 6, 6), folded=3, kept=1, randomize=False, reparameterize=True)
    plan = result.report.plan
    (kept,) = plan.kept
    assert kept.norm == "block (branches)"
    assert "merging them made the folded model fail to run (AttributeError:" in kept.reason
    assert {s.norm: s.kind for s in plan.sites} == {"block.bn3": "backward", "block.bn1": "backward", "bn": "backward"}
    assert isinstance(result.model.block, RepBlock)


def test_the_fuzzers_transposed_norms_fold():
    """bench/fuzz.py found the layout failure as whole-model refusals: a norm on a transposed value, then a
    reshape with ``.view``, next to an unrelated fold."""
    model = Model(
        lambda m, x: (m.bn(m.fc(x).transpose(1, 2)).view(2, -1), m.bn2(m.conv(x.unsqueeze(1)))),
        fc=nn.Linear(4, 3),
        bn=nn.BatchNorm1d(3),
        conv=nn.Conv2d(1, 2, 3),
        bn2=nn.BatchNorm2d(2),
    ).eval()
    check_fold(model, torch.randn(2, 5, 4), folded=2, kept=0)


def test_each_fold_that_breaks_the_model_is_found_and_kept():
    def forward(m, x):
        y = m.bn1(m.conv1(x)) * (m.bn1.momentum is not None)  # reads bn1 after it ran
        y = m.bn2(m.conv2(y))
        y = m.bn3(m.conv3(y))
        return y.view(y.shape[0], m.bn3.num_features, -1)  # reads bn3 after it ran

    model = Model(
        forward,
        conv1=nn.Conv2d(3, 4, 3),
        bn1=nn.BatchNorm2d(4),
        conv2=nn.Conv2d(4, 4, 3),
        bn2=nn.BatchNorm2d(4),
        conv3=nn.Conv2d(4, 4, 3),
        bn3=nn.BatchNorm2d(4),
    ).eval()
    result = check_fold(model, torch.randn(2, 3, 10, 10), folded=1, kept=2)
    plan = result.report.plan
    assert [k.norm for k in plan.kept] == ["bn1", "bn3"] and [s.norm for s in plan.sites] == ["bn2"]
    assert all("made the folded model fail to run (AttributeError:" in k.reason for k in plan.kept)
