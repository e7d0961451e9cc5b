"""Channel-wise affine ops that are not norm modules: layer(x) * scale + shift with model constants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.planning.fold_plan import AppliedBy

from helpers import Model, check_fold


def scale_shift() -> Model:
    """conv(x) * scale + shift, with the scale a parameter and the shift a buffer."""
    return Model(
        lambda m, x: m.conv(x) * m.scale + m.shift,
        conv=nn.Conv2d(3, 4, 3),
        scale=nn.Parameter(torch.rand(4, 1, 1) + 0.5),
        shift=torch.randn(1, 4, 1, 1),
    )


def test_conv_times_scale_plus_shift_folds_and_neutralizes_the_constants():
    model = scale_shift().eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=2, kept=0)
    rows = {s.norm: (s.norm_type, s.partners) for s in result.report.plan.sites}
    assert rows == {"scale": ("channel-wise mul", ("conv",)), "shift": ("channel-wise add", ("conv",))}
    assert torch.equal(result.model.scale, torch.ones(4, 1, 1))
    assert torch.equal(result.model.shift, torch.zeros(1, 4, 1, 1))
    assert not torch.equal(model.scale, torch.ones(4, 1, 1))  # the original is untouched


def test_layer_scale_before_the_operand_and_reshaped_param():
    model = Model(
        lambda m, x, img: (m.gamma * m.fc(x), m.conv(img).div(m.beta.reshape(1, -1, 1, 1))),
        fc=nn.Linear(5, 6),
        gamma=nn.Parameter(torch.rand(6) + 0.5),
        conv=nn.Conv2d(3, 6, 1),
        beta=nn.Parameter(torch.rand(6) + 0.5),
    )
    result = check_fold(model.eval(), (torch.randn(3, 5), torch.randn(2, 3, 4, 4)), folded=2, kept=0)
    assert {s.norm_type for s in result.report.plan.sites} == {"channel-wise mul", "channel-wise div"}


def test_scale_computed_from_the_input_is_not_folded():
    def squeeze_excite(m, x):
        y = m.conv(x)
        gate = torch.sigmoid(m.fc(y.mean((2, 3))))[:, :, None, None]
        return y * gate

    model = Model(squeeze_excite, conv=nn.Conv2d(3, 4, 3), fc=nn.Linear(4, 4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=0)
    assert torch.equal(result.model.conv.weight, model.conv.weight)


def test_constant_used_twice_is_kept():
    model = Model(
        lambda m, x: (m.conv(x) * m.scale, m.scale.sum()),
        conv=nn.Conv2d(3, 4, 1),
        scale=nn.Parameter(torch.rand(4, 1, 1) + 0.5),
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "also used elsewhere" in result.report.plan.kept[0].reason


def test_constant_along_the_wrong_axis_is_kept():
    model = Model(
        lambda m, x: m.fc(x) * m.scale,
        fc=nn.Linear(4, 4),
        scale=nn.Parameter(torch.rand(3, 1) + 0.5),  # varies along axis 1 of (N, 3, 4)
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 4), folded=0, kept=1)
    assert "varies along axis 1" in result.report.plan.kept[0].reason


def test_spatial_constant_is_not_a_channelwise_op():
    model = Model(lambda m, x: m.conv(x) * m.mask, conv=nn.Conv2d(3, 4, 1), mask=nn.Parameter(torch.rand(1, 1, 5, 5)))
    check_fold(model.eval(), torch.randn(2, 3, 5, 5), folded=0, kept=0)


def test_constant_minus_activation_is_kept():
    model = Model(
        lambda m, x: torch.sub(m.offset, m.conv(x)), conv=nn.Conv2d(3, 4, 1), offset=nn.Parameter(torch.randn(4, 1, 1))
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "constant sub x" in result.report.plan.kept[0].reason


def test_conv_output_read_elsewhere_is_kept():
    def forward(m, x):
        y = m.conv(x)
        return y * m.scale + y

    model = Model(forward, conv=nn.Conv2d(3, 4, 1), scale=nn.Parameter(torch.rand(4, 1, 1) + 0.5))
    result = check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "also read elsewhere" in result.report.plan.kept[0].reason


def test_norm_then_layer_scale_fold_into_the_same_conv():
    model = Model(
        lambda m, x: m.bn(m.conv(x)).mul_(m.gamma.view(1, -1, 1, 1)),
        conv=nn.Conv2d(3, 4, 3),
        bn=nn.BatchNorm2d(4),
        gamma=nn.Parameter(torch.rand(4) + 0.5),
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 6, 6), folded=2, kept=0)
    assert [s.partners for s in result.report.plan.sites] == [("conv",), ("conv",)]


def test_through_a_permute():
    model = Model(
        lambda m, x: m.fc(x).permute(0, 3, 1, 2) * m.gamma.reshape(1, -1, 1, 1),  # x: (N, H, W, C)
        fc=nn.Linear(4, 6),
        gamma=nn.Parameter(torch.rand(6) + 0.5),
    )
    check_fold(model.eval(), torch.randn(2, 3, 3, 4), folded=1, kept=0)


def test_channelwise_ops_need_example_inputs():
    assert bnfold.plan(scale_shift().eval()).sites == ()


@pytest.mark.parametrize("dtype", [torch.float64])
def test_double_precision_scale_shift(dtype):
    check_fold(scale_shift().eval().to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype), folded=2, kept=0)


def test_folding_channelwise_constants_twice_is_a_no_op():
    once = bnfold.fold(scale_shift().eval(), torch.randn(2, 3, 8, 8))
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
    model = Model(
        lambda m, x: m.conv(x) * view(m.gamma), conv=nn.Conv2d(3, 4, 3), gamma=nn.Parameter(torch.rand(4) + 0.5)
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 6, 6), folded=1, kept=0)
    assert result.report.plan.sites[0].kind == "constant" and result.report.plan.sites[0].payload == AppliedBy("mul")
    assert torch.equal(result.model.gamma, torch.ones(4))


def test_constant_that_belongs_to_a_module_bnfold_does_not_look_into_is_kept():
    model = Model(  # the norm's own weight, read again by the model: resetting it would change the norm
        lambda m, x: m.bn(m.conv(x) * m.bn.weight.view(-1, 1, 1) / m.d),
        conv=nn.Conv2d(3, 4, 3),
        bn=nn.BatchNorm2d(4),
        d=nn.Parameter(torch.tensor([2.0])),
    ).eval()

    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=0, kept=3)
    kept = {k.norm: k.reason for k in result.report.plan.kept}
    assert "is also read by 'bn'" in kept["bn.weight"]
    assert torch.equal(result.model.bn.weight, model.bn.weight)


class Scale(nn.Module):
    """A user's layer scale: a module of its own, without children, whose forward applies its constant."""

    def __init__(self, c, shape=lambda g: g.view(-1, 1, 1), again=None, buffer=False):
        super().__init__()
        value = torch.rand(c) + 0.5
        if buffer:
            self.register_buffer("gamma", value)
        else:
            self.gamma = nn.Parameter(value)
        self.shape, self.again = shape, again

    def forward(self, x):
        out = x * self.shape(self.gamma)
        if self.again == "returned":
            return out, self.gamma
        if self.again == "twice":
            return out * self.shape(self.gamma)
        if self.again == "sum":
            return out + self.gamma.sum()
        return out


def conv_scale(**kwargs) -> Model:
    return Model(lambda m, x: m.scale(m.conv(x)), conv=nn.Conv2d(3, 4, 3), scale=Scale(4, **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"shape": lambda g: g[:, None, None]}, {"shape": lambda g: g.reshape(1, -1, 1, 1)}, {"buffer": True}],
    ids=["view", "index-none", "reshape", "buffer"],
)
def test_constant_its_own_module_applies_folds(kwargs):
    model = conv_scale(**kwargs).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)
    site = result.report.plan.sites[0]
    assert (site.norm, site.kind, site.payload, site.partners) == (
        "scale.gamma",
        "constant",
        AppliedBy("mul"),
        ("conv",),
    )
    assert torch.equal(result.model.scale.gamma, torch.ones(4))
    assert not torch.equal(model.scale.gamma, torch.ones(4))  # the original is untouched


def test_norm_then_a_module_scale_fold_into_the_same_conv():
    model = Model(
        lambda m, x: m.scale(m.bn(m.conv(x))), conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), scale=Scale(4)
    ).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=2, kept=0)
    assert [s.partners for s in result.report.plan.sites] == [("conv",), ("conv",)]


@pytest.mark.parametrize("again", ["returned", "twice", "sum"])
def test_constant_its_own_module_also_reads_elsewhere_is_kept(again):
    model = conv_scale(again=again).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    kept = result.report.plan.kept[0]
    assert kept.norm == "scale.gamma" and "also used elsewhere" in kept.reason
    assert torch.equal(result.model.scale.gamma, model.scale.gamma)


def test_constant_of_a_module_that_another_op_also_reads_is_kept():
    model = Model(lambda m, x: (m.scale(m.conv(x)), m.scale.gamma * 2), conv=nn.Conv2d(3, 4, 3), scale=Scale(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "also used elsewhere" in result.report.plan.kept[0].reason


def test_a_torch_module_with_parameters_is_still_one_step():
    """PReLU is recorded as one call, as before: only a class defined outside torch is looked into."""
    from bnfold.discover.tracing import trace_execution

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4), conv_scale().scale).eval()
    graph = trace_execution(model, (torch.randn(1, 3, 4, 4),), {nn.Conv2d}, {nn.Conv2d})
    modules = [c.target for c in graph.calls if c.kind == "module"]
    assert modules == ["0", "1"]
    assert any(c.kind == "function" and "mul" in c.target for c in graph.calls)
