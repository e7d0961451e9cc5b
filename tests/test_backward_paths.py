"""Backward folds that look through ops which move elements without mixing channels (reshape, flatten,
view, permute, transpose), and through norms already folded into the same layer (conv -> bn -> scale)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import bnfold
from bnfold.planning.fold_plan import ReadThrough

from helpers import Chain, Model, check_fold


def test_norm_through_a_flatten_of_the_leading_axes_and_reshape_as():
    def forward(m, x):  # LeViT's Linear + BatchNorm1d over the tokens
        x = m.linear(x)
        return m.bn(x.flatten(0, 1)).reshape_as(x)

    model = Model(forward, linear=nn.Linear(5, 6, bias=False), bn=nn.BatchNorm1d(6))
    result = check_fold(model.eval(), torch.randn(3, 7, 5), folded=1, kept=0)
    assert result.report.plan.sites[0].partners == ("linear",)


@pytest.mark.parametrize(
    "move", [lambda y: y.transpose(1, 2), lambda y: y.permute(0, 2, 1)], ids=["transpose", "permute"]
)
def test_norm_through_a_transpose_or_permute(move):
    # a point-cloud block: a Linear on (N, points, F), a BatchNorm1d on (N, F, points)
    model = Chain(nn.Linear(4, 6), move, nn.BatchNorm1d(6), torch.relu)
    check_fold(model.eval(), torch.randn(2, 9, 4), folded=1, kept=0)


def test_conv_through_flatten_to_batchnorm1d_on_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(2), nn.BatchNorm1d(4)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_a_reshape_that_mixes_channels_keeps_the_norm():
    def mix(y):  # (N, 4, 2, 2) -> (N, 4, 4): channels and rows interleave
        return y.reshape(y.shape[0], 2, 2, 4).transpose(1, 3).reshape(y.shape[0], 4, 2, 2)

    model = Model(lambda m, x: m.bn(mix(m.conv(x))), conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4))
    result = check_fold(model.eval(), torch.randn(2, 3, 2, 2), folded=0, kept=1)
    assert "mixes the channels" in result.report.plan.kept[0].reason


def test_transposes_that_land_on_another_axis_keep_the_norm():
    # (N, 6 tokens, 4) -> (N, 6 tokens, 6 channels), transposed twice
    model = Model(
        lambda m, x: m.bn(m.fc(x).transpose(1, 2).transpose(2, 1)),
        fc=nn.Linear(4, 6),
        bn=nn.BatchNorm1d(6),  # as many tokens as channels: only the axis tells them apart
    )
    result = check_fold(model.eval(), torch.randn(2, 6, 4), folded=0, kept=1)
    assert "axis 1 of the output of 'fc'" in result.report.plan.kept[0].reason


def test_a_reshape_read_elsewhere_keeps_the_norm():
    def forward(m, x):
        flat = m.linear(x).flatten(0, 1)
        return m.bn(flat), flat.sum()

    model = Model(forward, linear=nn.Linear(5, 6), bn=nn.BatchNorm1d(6))
    result = check_fold(model.eval(), torch.randn(3, 7, 5), folded=0, kept=1)
    assert "also read elsewhere" in result.report.plan.kept[0].reason


def conv_bn_scale(*order: str) -> Model:
    """conv -> bn -> LayerScale2d (EfficientFormer's MLP): both fold into the conv, in that order. The parts
    are registered in ``order``, by default the order they run in."""
    pytest.importorskip("timm", reason="the scale is timm's LayerScale2d")
    from timm.layers import LayerScale2d

    parts = {"conv": nn.Conv2d(3, 4, 3), "bn": nn.BatchNorm2d(4), "scale": LayerScale2d(4, init_values=0.5)}
    return Model(lambda m, x: m.scale(m.bn(m.conv(x))), **{name: parts[name] for name in order or parts})


def test_chain_of_norms_into_one_layer():
    result = check_fold(conv_bn_scale().eval(), torch.randn(2, 3, 8, 8), folded=2, kept=0)
    sites = {s.norm: s for s in result.report.plan.sites}
    assert sites["scale"].partners == ("conv",) and sites["scale"].payload == ReadThrough(("bn",))
    assert isinstance(result.model.bn, nn.Identity) and isinstance(result.model.scale, nn.Identity)
    # and the per-layer check follows the chain to its end
    checked = bnfold.fold_with_report(conv_bn_scale().eval(), torch.randn(2, 3, 8, 8), verify="layers")
    assert checked.report.folded == 2


def test_chain_registered_in_the_other_order_still_applies_in_run_order():
    model = conv_bn_scale("scale", "bn", "conv")  # scale registered first, runs last
    result = check_fold(model.eval(), torch.randn(2, 3, 8, 8), folded=2, kept=0)
    assert [s.norm for s in result.report.plan.rows] == ["scale", "bn"]  # the report keeps module order


def test_no_chain_through_a_norm_that_keeps_an_activation():
    pytest.importorskip("timm", reason="the norm and scale are timm's")
    from timm.layers import BatchNormAct2d, LayerScale2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), LayerScale2d(4, init_values=0.5)).eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=1, kept=1)
    assert result.report.plan.kept[0].norm == "2"


def test_no_chain_when_the_first_norm_is_kept():
    def forward(m, x):
        y = m.conv(x)
        return m.bn2(m.bn(y)) + y

    model = Model(forward, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), bn2=nn.BatchNorm2d(4))
    check_fold(model.eval(), torch.randn(2, 3, 8, 8), folded=0, kept=2)


def test_chain_without_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)).eval()
    plan = bnfold.plan(model)
    assert plan.traced_with == "torch.fx"
    assert [(s.norm, s.partners, s.payload.via) for s in plan.sites] == [("1", ("0",), ()), ("2", ("0",), ("1",))]


@pytest.mark.parametrize(("name", "folded", "kept"), [("levit_128s", 52, 0), ("efficientformer_l1", 49, 17)])
def test_timm_architectures_with_reshaped_or_chained_norms(name, folded, kept):
    timm = pytest.importorskip("timm", reason="the models are timm's")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    check_fold(model, torch.randn(2, 3, 224, 224), folded=folded, kept=kept)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
def test_every_permutation_folds_exactly_when_the_channels_reach_the_norm(perm):
    sizes = (2, 3, 4, 6)  # nn.Linear(5, 6) on (2, 3, 4, 5): every axis has its own size
    model = Chain(nn.Linear(5, 6), lambda y: y.permute(*perm).flatten(2), nn.BatchNorm1d(sizes[perm[1]]))
    channels_reach_the_norm = perm[1] == 3
    check_fold(
        model.eval(),
        torch.randn(2, 3, 4, 5),
        folded=int(channels_reach_the_norm),
        kept=int(not channels_reach_the_norm),
    )


def norm_act_then_constants(act: bool) -> Model:
    """conv -> timm BatchNormAct2d -> * gamma + beta: the constants chain through the norm only when its
    activation is the identity."""
    pytest.importorskip("timm", reason="the norm is timm's BatchNormAct2d")
    from timm.layers import BatchNormAct2d

    return Model(
        lambda m, x: m.bn(m.conv(x)) * m.gamma + m.beta,
        conv=nn.Conv2d(3, 4, 3),
        bn=BatchNormAct2d(4, act_layer=nn.ReLU, apply_act=act),
        gamma=nn.Parameter(torch.randn(1, 4, 1, 1)),  # negative entries too: relu(g x) != g relu(x)
        beta=nn.Parameter(torch.randn(1, 4, 1, 1)),
    )


def test_constants_after_a_norm_that_keeps_its_activation_stay():
    result = check_fold(norm_act_then_constants(act=True).eval(), torch.randn(2, 3, 8, 8), folded=1, kept=2)
    assert {k.norm for k in result.report.plan.kept} == {"gamma", "beta"}


def test_constants_after_a_norm_act_without_activation_fold():
    result = check_fold(norm_act_then_constants(act=False).eval(), torch.randn(2, 3, 8, 8), folded=3, kept=0)

    assert {s.norm: s.partners for s in result.report.plan.sites} == {
        "bn": ("conv",),
        "gamma": ("conv",),
        "beta": ("conv",),
    }
