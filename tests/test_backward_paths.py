"""Backward folds that look through ops which move elements without mixing channels (reshape, flatten,
view, permute, transpose), and through norms already folded into the same layer (conv -> bn -> scale)."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from torch import nn

import bnfold

from helpers import check_fold


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over the tokens: bn(linear(x).flatten(0, 1)).reshape_as(linear(x))."""

    def __init__(self, c_in=5, c_out=6):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_norm_through_a_flatten_of_the_leading_axes_and_reshape_as():
    result = check_fold(LinearNorm().eval(), torch.randn(3, 7, 5), folded=1, kept=0)
    assert result.report.plan.sites[0].partners == ("linear",)


class PointNorm(nn.Module):
    """A point-cloud block: a Linear on (N, points, F), a BatchNorm1d on (N, F, points) through transposes."""

    def __init__(self, transpose):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.transpose = transpose

    def forward(self, x):
        y = self.fc(x)
        y = y.transpose(1, 2) if self.transpose else y.permute(0, 2, 1)
        return torch.relu(self.bn(y))


@pytest.mark.parametrize("transpose", [True, False])
def test_norm_through_a_transpose_or_permute(transpose):
    check_fold(PointNorm(transpose).eval(), torch.randn(2, 9, 4), folded=1, kept=0)


def test_conv_through_flatten_to_batchnorm1d_on_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(2), nn.BatchNorm1d(4)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_a_reshape_that_mixes_channels_keeps_the_norm():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)  # (N, 4, 2, 2) -> (N, 4, 4): channels and rows interleave
            return self.bn(y.reshape(y.shape[0], 2, 2, 4).transpose(1, 3).reshape(y.shape[0], 4, 2, 2))

    result = check_fold(Mixing().eval(), torch.randn(2, 3, 2, 2), folded=0, kept=1)
    assert "mixes the channels" in result.report.plan.kept[0].reason


def test_transposes_that_land_on_another_axis_keep_the_norm():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)  # as many tokens as channels: only the axis tells them apart

        def forward(self, x):  # (N, 6 tokens, 4) -> (N, 6 tokens, 6 channels), transposed twice
            return self.bn(self.fc(x).transpose(1, 2).transpose(2, 1))

    result = check_fold(Tokens().eval(), torch.randn(2, 6, 4), folded=0, kept=1)
    assert "axis 1 of the output of 'fc'" in result.report.plan.kept[0].reason


def test_a_reshape_read_elsewhere_keeps_the_norm():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            flat = self.linear(x).flatten(0, 1)
            return self.bn(flat), flat.sum()

    result = check_fold(Leaky().eval(), torch.randn(3, 7, 5), folded=0, kept=1)
    assert "also read elsewhere" in result.report.plan.kept[0].reason


class ConvBnScale(nn.Module):
    """conv -> bn -> LayerScale2d (EfficientFormer's MLP): both fold into the conv, in that order."""

    def __init__(self):
        super().__init__()
        from timm.layers import LayerScale2d

        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.scale = LayerScale2d(4, init_values=0.5)

    def forward(self, x):
        return self.scale(self.bn(self.conv(x)))


def test_chain_of_norms_into_one_layer():
    result = check_fold(ConvBnScale().eval(), torch.randn(2, 3, 8, 8), folded=2, kept=0)
    sites = {s.norm: s for s in result.report.plan.sites}
    assert sites["scale"].partners == ("conv",) and sites["scale"].via == ("bn",)
    assert isinstance(result.model.bn, nn.Identity) and isinstance(result.model.scale, nn.Identity)
    # and the per-layer check follows the chain to its end
    checked = bnfold.fold_with_report(ConvBnScale().eval(), torch.randn(2, 3, 8, 8), verify="layers")
    assert checked.report.folded == 2


def test_chain_registered_in_the_other_order_still_applies_in_run_order():
    class Reversed(ConvBnScale):
        def __init__(self):
            super().__init__()
            scale = self.scale
            del self.scale, self.bn, self.conv
            self.scale = scale  # registered first, runs last
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(3, 4, 3)

    result = check_fold(Reversed().eval(), torch.randn(2, 3, 8, 8), folded=2, kept=0)
    assert [s.norm for s in result.report.plan.rows] == ["scale", "bn"]  # the report keeps module order


def test_no_chain_through_a_norm_that_keeps_an_activation():
    from timm.layers import BatchNormAct2d, LayerScale2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), LayerScale2d(4, init_values=0.5)).eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=1, kept=1)
    assert result.report.plan.kept[0].norm == "2"


def test_no_chain_when_the_first_norm_is_kept():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn2(self.bn(y)) + y

    check_fold(Residual().eval(), torch.randn(2, 3, 8, 8), folded=0, kept=2)


def test_chain_without_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    plan = bnfold.plan(model)
    assert plan.traced_with == "torch.fx"
    assert [(s.norm, s.partners, s.via) for s in plan.sites] == [("1", ("0",), ()), ("2", ("0",), ("1",))]


@pytest.mark.parametrize(("name", "folded", "kept"), [("levit_128s", 52, 0), ("efficientformer_l1", 49, 17)])
def test_timm_architectures_with_reshaped_or_chained_norms(name, folded, kept):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    check_fold(model, torch.randn(2, 3, 224, 224), folded=folded, kept=kept)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
def test_every_permutation_folds_exactly_when_the_channels_reach_the_norm(perm):
    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 6)  # (2, 3, 4, 5) -> (2, 3, 4, 6): every axis has its own size
            sizes = (2, 3, 4, 6)
            self.bn = nn.BatchNorm1d(sizes[perm[1]])

        def forward(self, x):
            return self.bn(self.fc(x).permute(*perm).flatten(2))

    channels_reach_the_norm = perm[1] == 3
    check_fold(
        Permuted().eval(),
        torch.randn(2, 3, 4, 5),
        folded=int(channels_reach_the_norm),
        kept=int(not channels_reach_the_norm),
    )


class NormActThenConstants(nn.Module):
    """conv -> timm BatchNormAct2d -> * gamma + beta: the constants chain through the norm only when its
    activation is the identity."""

    def __init__(self, act):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = BatchNormAct2d(4, act_layer=nn.ReLU, apply_act=act)
        self.gamma = nn.Parameter(torch.randn(1, 4, 1, 1))  # negative entries too: relu(g x) != g relu(x)
        self.beta = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.gamma + self.beta


def test_constants_after_a_norm_that_keeps_its_activation_stay():
    result = check_fold(NormActThenConstants(act=True).eval(), torch.randn(2, 3, 8, 8), folded=1, kept=2)
    assert {k.norm for k in result.report.plan.kept} == {"gamma", "beta"}


def test_constants_after_a_norm_act_without_activation_fold():
    result = check_fold(NormActThenConstants(act=False).eval(), torch.randn(2, 3, 8, 8), folded=3, kept=0)
    assert {s.norm: s.partners for s in result.report.plan.sites} == {
        "bn": ("conv",),
        "gamma": ("conv",),
        "beta": ("conv",),
    }
