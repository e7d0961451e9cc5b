"""Channel-wise affine ops that are not norm modules: layer(x) * scale + shift with model constants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold

from helpers import check_fold


class ScaleShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


def test_conv_times_scale_plus_shift_folds_and_neutralizes_the_constants():
    model = ScaleShift().eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=2, kept=0)
    rows = {s.norm: (s.norm_type, s.partners) for s in result.report.plan.sites}
    assert rows == {"scale": ("channel-wise mul", ("conv",)), "shift": ("channel-wise add", ("conv",))}
    assert torch.equal(result.model.scale, torch.ones(4, 1, 1))
    assert torch.equal(result.model.shift, torch.zeros(1, 4, 1, 1))
    assert not torch.equal(model.scale, torch.ones(4, 1, 1))  # the original is untouched


def test_layer_scale_before_the_operand_and_reshaped_param():
    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 6)
            self.gamma = nn.Parameter(torch.rand(6) + 0.5)
            self.conv = nn.Conv2d(3, 6, 1)
            self.beta = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x, img):
            return self.gamma * self.fc(x), self.conv(img).div(self.beta.reshape(1, -1, 1, 1))

    result = check_fold(LayerScale().eval(), (torch.randn(3, 5), torch.randn(2, 3, 4, 4)), folded=2, kept=0)
    assert {s.norm_type for s in result.report.plan.sites} == {"channel-wise mul", "channel-wise div"}


def test_scale_computed_from_the_input_is_not_folded():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.conv(x)
            gate = torch.sigmoid(self.fc(y.mean((2, 3))))[:, :, None, None]
            return y * gate

    model = SqueezeExcite().eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=0)
    assert torch.equal(result.model.conv.weight, model.conv.weight)


def test_constant_used_twice_is_kept():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            return self.conv(x) * self.scale, self.scale.sum()

    result = check_fold(Twice().eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "also used elsewhere" in result.report.plan.kept[0].reason


def test_constant_along_the_wrong_axis_is_kept():
    class WrongAxis(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.rand(3, 1) + 0.5)  # varies along axis 1 of (N, 3, 4)

        def forward(self, x):
            return self.fc(x) * self.scale

    result = check_fold(WrongAxis().eval(), torch.randn(2, 3, 4), folded=0, kept=1)
    assert "varies along axis 1" in result.report.plan.kept[0].reason


def test_spatial_constant_is_not_a_channelwise_op():
    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.mask = nn.Parameter(torch.rand(1, 1, 5, 5))

        def forward(self, x):
            return self.conv(x) * self.mask

    check_fold(Spatial().eval(), torch.randn(2, 3, 5, 5), folded=0, kept=0)


def test_constant_minus_activation_is_kept():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.offset = nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x):
            return torch.sub(self.offset, self.conv(x))

    result = check_fold(Reversed().eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "constant sub x" in result.report.plan.kept[0].reason


def test_conv_output_read_elsewhere_is_kept():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            y = self.conv(x)
            return y * self.scale + y

    result = check_fold(Branch().eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "also read elsewhere" in result.report.plan.kept[0].reason


def test_norm_then_layer_scale_fold_into_the_same_conv():
    class NormThenScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return self.bn(self.conv(x)).mul_(self.gamma.view(1, -1, 1, 1))

    result = check_fold(NormThenScale().eval(), torch.randn(2, 3, 6, 6), folded=2, kept=0)
    assert [s.partners for s in result.report.plan.sites] == [("conv",), ("conv",)]


def test_through_a_permute():
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.gamma = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):  # x: (N, H, W, C)
            return self.fc(x).permute(0, 3, 1, 2) * self.gamma.reshape(1, -1, 1, 1)

    check_fold(ChannelsLast().eval(), torch.randn(2, 3, 3, 4), folded=1, kept=0)


def test_channelwise_ops_need_example_inputs():
    assert bnfold.plan(ScaleShift().eval()).sites == ()


@pytest.mark.parametrize("dtype", [torch.float64])
def test_double_precision_scale_shift(dtype):
    check_fold(ScaleShift().eval().to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype), folded=2, kept=0)


def test_folding_channelwise_constants_twice_is_a_no_op():
    once = bnfold.fold(ScaleShift().eval(), torch.randn(2, 3, 8, 8))
    weight = once.conv.weight.detach().clone()
    again = bnfold.fold_with_report(once, torch.randn(2, 3, 8, 8))
    assert again.report.folded == 0 and again.report.kept == 0
    assert torch.equal(again.model.conv.weight, weight)


@pytest.mark.parametrize(
    "view",
    [
        lambda g: g[:, None, None],
        lambda g: g.unsqueeze(-1).unsqueeze(-1),
        lambda g: g.reshape(1, -1, 1, 1),
        lambda g: g.view(-1, 1, 1),
    ],
    ids=["index-none", "unsqueeze-twice", "reshape", "view"],
)
def test_constant_reaches_the_op_through_reshapes(view):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return self.conv(x) * view(self.gamma)

    result = check_fold(Scaled().eval(), torch.randn(2, 3, 6, 6), folded=1, kept=0)
    assert result.report.plan.sites[0].kind == "constant" and result.report.plan.sites[0].op == "mul"
    assert torch.equal(result.model.gamma, torch.ones(4))


def test_constant_that_belongs_to_a_module_bnfold_does_not_look_into_is_kept():
    class M(nn.Module):  # the norm's own weight, read again by the model: resetting it would change the norm
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.d = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Parameter(torch.tensor([2.0]))

        def forward(self, x):
            return self.bn(self.conv(x) * self.bn.weight.view(-1, 1, 1) / self.d)

    model = M().eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=0, kept=3)
    kept = {k.norm: k.reason for k in result.report.plan.kept}
    assert "is also read by 'bn'" in kept["bn.weight"]
    assert torch.equal(result.model.bn.weight, model.bn.weight)
