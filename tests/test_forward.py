"""Forward folding: a norm before the layer, folded into every layer that reads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold

from helpers import Chain, Model, check_fold, randomize_norms

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _directions(result) -> list[str]:
    return [s.direction for s in result.report.plan.sites]


def _plus_flip(y: torch.Tensor) -> torch.Tensor:
    """A residual-style sum: a norm after it has no layer to fold backward into."""
    return y + y.flip(-1)


def _bn_read_by_a_and_b(m, x):
    y = m.bn(x)
    return m.a(y), m.b(y)


@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm1d_into_linear(bias):
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3, bias=bias)).eval()
    result = check_fold(model, torch.randn(4, 6), folded=1, kept=0)
    assert _directions(result) == ["forward"]
    assert result.report.plan.sites[0].partners == ("1",)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_batchnorm_into_unpadded_conv(dims, groups):
    model = nn.Sequential(BN[dims](6), CONV[dims](6, 4 if groups != 6 else 6, 3, groups=groups)).eval()
    result = check_fold(model, torch.randn(2, 6, *([5] * dims)), folded=1, kept=0)
    assert _directions(result) == ["forward"]


def test_batchnorm_into_strided_dilated_conv():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, stride=2, dilation=2)).eval()
    check_fold(model, torch.randn(2, 4, 11, 11), folded=1, kept=0)


def test_zero_padded_conv_after_a_norm_is_kept_with_the_reason():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1)).eval()
    result = check_fold(model, torch.randn(2, 4, 6, 6), folded=0, kept=1)
    assert "pads its input with zeros" in result.report.plan.kept[0].reason


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_by_copying_values_folds_exactly(mode):
    # reflect/replicate/circular padding copies the norm's own outputs, and a per-channel affine map
    # commutes with copying: pad(s * x + t) == s * pad(x) + t, so the fold is exact (checked here).
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)).eval()
    check_fold(model, torch.randn(2, 4, 6, 6), folded=1, kept=0)


def test_convtranspose_forward_only_where_exact():
    pointwise = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 1, groups=2)).eval()
    check_fold(pointwise, torch.randn(2, 4, 5, 5), folded=1, kept=0)
    full_crop = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, padding=2)).eval()
    check_fold(full_crop, torch.randn(2, 4, 5, 5), folded=1, kept=0)
    upsampling = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 2, stride=2)).eval()
    result = check_fold(upsampling, torch.randn(2, 4, 5, 5), folded=0, kept=1)
    assert "ConvTranspose whose outputs see different numbers of inputs" in result.report.plan.kept[0].reason


def test_across_dropout_identity_and_flatten():
    model = nn.Sequential(
        nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Identity(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 3 * 3, 5)
    ).eval()
    result = check_fold(model, torch.randn(2, 4, 3, 3), folded=1, kept=0)
    assert result.report.plan.sites[0].partners == ("5",)
    # also without example inputs: torch.fx sees the same chain
    assert [s.partners for s in bnfold.plan(model).sites] == [("5",)]


def test_batchnorm2d_flatten_linear_on_a_1x1_map_and_batchnorm1d_flatten():
    on_1x1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3)).eval()
    check_fold(on_1x1, torch.randn(2, 4, 5, 5), folded=1, kept=0)
    seq = nn.Sequential(nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 7, 3)).eval()
    check_fold(seq, torch.randn(2, 4, 7), folded=1, kept=0)


def test_dropout_in_training_mode_is_not_the_identity():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)).eval()
    model[1].train()
    result = bnfold.fold_with_report(randomize_norms(model), torch.randn(8, 4))  # checked with a fixed seed
    assert (result.report.folded, result.report.kept) == (0, 1)
    assert "Dropout" in result.report.plan.kept[0].reason


def test_norm_read_by_several_layers_folds_into_all():
    model = Model(_bn_read_by_a_and_b, bn=nn.BatchNorm2d(4), a=nn.Conv2d(4, 3, 1), b=nn.Conv2d(4, 5, 3))
    result = check_fold(model.eval(), torch.randn(2, 4, 6, 6), folded=1, kept=0)
    assert result.report.plan.sites[0].partners == ("a", "b")
    assert "-> a, b" in str(result.report.plan)


def test_norm_read_by_a_layer_that_cannot_take_it_is_kept():
    mixed = Model(_bn_read_by_a_and_b, bn=nn.BatchNorm2d(4), a=nn.Conv2d(4, 3, 1), b=nn.Conv2d(4, 5, 3, padding=1))
    check_fold(mixed.eval(), torch.randn(2, 4, 6, 6), folded=0, kept=1)
    also_activation = Model(_bn_read_by_a_and_b, bn=nn.BatchNorm2d(4), a=nn.Conv2d(4, 3, 1), b=torch.relu)
    check_fold(also_activation.eval(), torch.randn(2, 4, 6, 6), folded=0, kept=1)


def test_shared_consumer_is_kept():
    model = Model(lambda m, x: m.conv(m.conv(m.bn(x))), bn=nn.BatchNorm2d(4), conv=nn.Conv2d(4, 4, 1))
    result = check_fold(model.eval(), torch.randn(2, 4, 5, 5), folded=0, kept=1)
    assert "called 2 times" in result.report.plan.kept[0].reason


def test_norm_input_changed_in_place_later_is_kept():
    def forward(m, x):
        h = torch.relu(m.pre(x))
        y = m.bn(h)
        h[:, 0].mul_(3.0)  # after folding, conv would read h itself, changed here through a view
        return m.conv(y) + h

    model = Model(forward, pre=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4), conv=nn.Conv2d(4, 4, 1))
    result = check_fold(model.eval(), torch.randn(2, 3, 5, 5), folded=0, kept=1)
    assert "changed in place" in result.report.plan.kept[0].reason


def _write_relu(m, h):
    h.relu_()


def _write_detached(m, h):
    h.detach().add_(1.0)


def _write_item(m, h):
    h[:, 0].mul_(3.0)


def _write_sum(m, h):
    g = h.view(h.shape)
    g += 1.0


def _write_functional(m, h):
    torch.nn.functional.relu(h, inplace=True)


def _write_module(m, h):
    m.act(h)


@pytest.mark.parametrize(
    "write", [_write_relu, _write_detached, _write_item, _write_sum, _write_functional, _write_module]
)
def test_without_example_inputs_a_write_through_another_view_of_the_input_keeps_the_norm(write):
    """torch.fx has no storage to compare: the norm reads a view of ``h``, and ``h`` (or another view of it)
    is written after the norm ran and before ``conv`` reads the norm's output."""

    def forward(m, x):
        h = m.pre(x)
        y = m.bn(h.permute(0, 2, 3, 1).permute(0, 3, 1, 2))
        write(m, h)
        return m.conv(y)

    parts = {"pre": nn.Conv2d(3, 4, 1), "bn": nn.BatchNorm2d(4), "conv": nn.Conv2d(4, 4, 1)}
    model = randomize_norms(Model(forward, **parts, act=nn.ReLU(inplace=True)).eval())
    model.pre.bias.data.fill_(-0.3)  # so the writes change values
    x = torch.randn(2, 3, 5, 5)
    plan = bnfold.plan(model)
    assert plan.traced_with == "torch.fx"
    assert not plan.sites and "changed in place" in plan.kept[0].reason
    torch.testing.assert_close(bnfold.fold(model)(x), model(x))


def test_without_example_inputs_a_write_before_the_norm_reads_its_input_is_no_obstacle():
    def forward(m, x):
        h = m.pre(x)
        h.relu_()
        y = m.bn(h.permute(0, 2, 3, 1).permute(0, 3, 1, 2))
        return m.conv(y)

    model = Model(forward, pre=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4), conv=nn.Conv2d(4, 4, 1))
    model = randomize_norms(model.eval())
    plan = bnfold.plan(model)
    assert [(s.norm, s.partners, s.direction) for s in plan.sites] == [("bn", ("conv",), "forward")]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(bnfold.fold(model)(x), model(x))


def test_conv_bn_conv_folds_backward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    result = check_fold(model, torch.randn(2, 3, 5, 5), folded=1, kept=0)
    assert _directions(result) == ["backward"]


def test_batchnorm_over_the_wrong_axis_of_a_linear_is_kept():
    # (N, C, L) -> BatchNorm1d(C) -> Linear(L): the norm scales C, the Linear mixes L
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    check_fold(model, torch.randn(2, 4, 4), folded=0, kept=1)


def test_without_example_inputs_batchnorm1d_linear_needs_them():
    model = randomize_norms(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))).eval()
    p = bnfold.plan(model)
    assert len(p.kept) == 1 and "pass example_inputs" in p.kept[0].reason
    conv = randomize_norms(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))).eval()
    assert len(bnfold.plan(conv).sites) == 1


def test_forward_into_pruned_and_parametrized_layers():
    from torch.nn.utils import parametrizations, prune

    pruned = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)).eval()
    prune.l1_unstructured(pruned[1], "weight", amount=0.4)
    zeros = int((pruned[1].weight == 0).sum())
    result = check_fold(pruned, torch.randn(2, 4, 6, 6), folded=1, kept=0)
    assert int((result.model[1].weight == 0).sum()) == zeros
    normed = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    parametrizations.weight_norm(normed[1])
    check_fold(normed, torch.randn(5, 4), folded=1, kept=0)


def test_fastai_style_head_folds_both_batchnorm1d():
    """fastai's classifier head: pool -> Flatten -> BN1d -> Dropout -> Linear -> ReLU -> BN1d -> Dropout -> Linear."""
    pytest.importorskip("fastai", reason="the head is fastai's")
    pytest.importorskip("torchvision", reason="the body is torchvision's resnet18")
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet18

    model = create_vision_model(resnet18, 10, pretrained=False).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 22
    result = check_fold(model, torch.randn(2, 3, 64, 64), folded=22, kept=0)
    head = [s for s in result.report.plan.sites if s.norm_type == "BatchNorm1d"]
    assert [(s.direction, s.partners) for s in head] == [("forward", ("1.4",)), ("forward", ("1.8",))]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())


def test_same_padding_conv_takes_norms_after_it_but_never_before():
    pytest.importorskip("timm", reason="the conv is timm's Conv2dSame")
    from timm.layers import create_conv2d

    conv = create_conv2d(4, 4, 3, padding="same", stride=2)  # timm's Conv2dSame: zero padding at run time
    assert type(conv).__name__ == "Conv2dSame"
    before = nn.Sequential(nn.BatchNorm2d(4), conv).eval()
    result = check_fold(before, torch.randn(2, 4, 7, 7), folded=0, kept=1)
    assert "pads its input with zeros at run time" in result.report.plan.kept[0].reason
    after = nn.Sequential(create_conv2d(4, 4, 3, padding="same", stride=2), nn.BatchNorm2d(4)).eval()
    check_fold(after, torch.randn(2, 4, 7, 7), folded=1, kept=0)


def global_mean(y: torch.Tensor) -> torch.Tensor:
    return y.mean((2, 3))


def width_mean(y: torch.Tensor) -> torch.Tensor:
    return y.mean(-1, keepdim=True)


def head(pool, then: nn.Module, flatten: bool = True) -> Model:
    """A norm after a residual sum (no layer before it to take it), then ``pool`` (a module or a function),
    then a layer."""
    return Model(
        lambda m, x: m.then(m.flatten(m.pool(m.bn(_plus_flip(m.conv(x)))))),
        conv=nn.Conv2d(3, 4, 3, padding=1),
        bn=nn.BatchNorm2d(4),
        pool=pool,
        flatten=nn.Flatten() if flatten else nn.Identity(),
        then=then,
    )


@pytest.mark.parametrize(
    ("pool", "then", "flatten"),
    [
        (nn.AdaptiveAvgPool2d(1), nn.Linear(4, 5), True),  # the classic head: bn -> global pool -> fc
        (nn.AdaptiveAvgPool2d(2), nn.Linear(16, 5), True),
        (nn.AvgPool2d(2), nn.Conv2d(4, 5, 1), False),
        (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.Conv2d(4, 5, 1), False),
        (global_mean, nn.Linear(4, 5), False),
        (width_mean, nn.Conv2d(4, 5, 1), False),
    ],
)
def test_forward_through_averages(pool, then, flatten):
    result = check_fold(head(pool, then, flatten).eval(), torch.randn(2, 3, 8, 8), folded=1, kept=0)
    assert result.report.plan.sites[0].direction == "forward"


def test_averages_of_padded_zeros_and_means_over_channels_keep_the_norm():
    padded = head(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(4, 5, 1), flatten=False).eval()
    result = check_fold(padded, torch.randn(2, 3, 8, 8), folded=0, kept=1)
    assert "count_include_pad=True" in result.report.plan.kept[0].reason

    model = Model(
        lambda m, x: m.then(m.bn(m.conv(x) * 2).mean(1, keepdim=True)),
        conv=nn.Conv2d(3, 4, 3, padding=1),
        bn=nn.BatchNorm2d(4),
        then=nn.Conv2d(1, 5, 1),
    ).eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=0, kept=1)
    assert "over its channels" in result.report.plan.kept[0].reason


@pytest.mark.parametrize("positive", [True, False])
def test_forward_through_max_pooling_only_with_positive_scales(positive):
    model = head(nn.MaxPool2d(2), nn.Conv2d(4, 5, 1), flatten=False).eval()
    randomize_norms(model)
    if not positive:
        with torch.no_grad():
            model.bn.weight[0] = -1.0  # a negative scale: the max would pick another element
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=int(positive), kept=int(not positive), randomize=False)
    if not positive:
        assert "some of the norm's scales are not positive" in result.report.plan.kept[0].reason


def test_forward_through_pooling_without_example_inputs():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval()
    plan = bnfold.plan(model)
    assert plan.traced_with == "torch.fx"
    assert [(s.norm, s.partners, s.direction) for s in plan.sites] == [("1", ("4",), "forward")]


def after_sum(norm: nn.Module, move, layer: nn.Module) -> Chain:
    """conv -> (+ itself, so the norm has no layer to fold backward into) -> norm -> ``move`` -> layer."""
    conv = nn.Conv1d(3, 4, 1) if isinstance(norm, nn.BatchNorm1d) else nn.Conv2d(3, 4, 1)
    return Chain(conv, _plus_flip, norm, move, layer)


@pytest.mark.parametrize(
    ("norm", "move", "layer", "shape"),
    [
        (nn.BatchNorm1d(4), lambda t: t.transpose(1, 2), nn.Linear(4, 5), (2, 3, 7)),  # point clouds
        (nn.BatchNorm2d(4), lambda t: t.permute(0, 2, 3, 1), nn.Linear(4, 5), (2, 3, 5, 6)),  # channels last
        (nn.BatchNorm2d(4), lambda t: torch.flatten(t, 1), nn.Linear(4 * 30, 5), (2, 3, 5, 6)),
        (nn.BatchNorm2d(4), lambda t: t.view(t.shape[0], -1), nn.Linear(4 * 30, 5), (2, 3, 5, 6)),
        (nn.BatchNorm2d(4), lambda t: t.mean((2, 3)).flatten(1), nn.Linear(4, 5), (2, 3, 5, 6)),
        (nn.BatchNorm2d(4), lambda t: t.flatten(2).unsqueeze(-1), nn.Conv2d(4, 5, 1), (2, 3, 5, 6)),
    ],
)
def test_forward_through_reshapes_and_permutes(norm, move, layer, shape):
    result = check_fold(after_sum(norm, move, layer).eval(), torch.randn(*shape), folded=1, kept=0)
    assert result.report.plan.sites[0].direction == "forward"


@pytest.mark.parametrize(
    ("move", "layer"),
    [
        (lambda t: t.reshape(t.shape[0], t.shape[2], 4, t.shape[3]), nn.Conv2d(5, 2, 1)),  # channels interleaved
        (lambda t: t.permute(0, 1, 3, 2), nn.Linear(5, 2)),  # the layer reads the rows, not the channels
    ],
)
def test_forward_through_moves_that_lose_the_channels_keeps_the_norm(move, layer):
    model = after_sum(nn.BatchNorm2d(4), move, layer).eval()

    check_fold(model, torch.randn(2, 3, 5, 5), folded=0, kept=1)
