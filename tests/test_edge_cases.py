"""Hand-built models: each case states how many norms must fold and how many must stay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold

from helpers import Model, check_fold, randomize_norms

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _x(dims: int, channels: int = 6) -> torch.Tensor:
    return torch.randn(2, channels, *([5] * dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_every_conv_kind_folds(dims, transposed, groups, bias, affine):
    layer = (CONV_T if transposed else CONV)[dims](6, 6, 3, groups=groups, bias=bias)
    model = nn.Sequential(layer, BN[dims](6, affine=affine), nn.ReLU()).eval()
    result = check_fold(model, _x(dims), folded=1, kept=0)
    assert isinstance(result.model[1], nn.Identity)
    assert result.model[0].bias is not None


@pytest.mark.parametrize("bias", [False, True])
def test_linear_batchnorm1d_folds(bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7), nn.ReLU()).eval()
    check_fold(model, torch.randn(4, 5), folded=1, kept=0)


def test_linear_on_sequence_with_batchnorm_over_length_is_kept():
    # (N, L, F) with L == F: BatchNorm1d(L) normalizes axis 1 (L), not the Linear's features (axis 2)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    result = check_fold(model, torch.randn(3, 4, 4), folded=0, kept=1)
    assert "axis 1" in result.report.plan.kept[0].reason


def test_unbatched_conv1d_into_batchnorm1d_is_kept():
    # unbatched (C, L) conv output: BatchNorm1d treats C as the batch and L as channels
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)).eval()
    check_fold(model, torch.randn(3, 4), folded=0, kept=1)


def test_sync_batchnorm_folds_in_eval_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_lazy_batchnorm_folds_once_initialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_instance_norm_with_running_stats_folds_and_without_is_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.Conv2d(4, 4, 3),
        nn.InstanceNorm2d(4),
    ).eval()
    result = check_fold(model, torch.randn(2, 3, 9, 9), folded=1, kept=1)
    assert "its own statistics" in result.report.plan.kept[0].reason


def test_torchvision_frozen_batchnorm_folds():
    pytest.importorskip("torchvision", reason="the norm is torchvision's FrozenBatchNorm2d")
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU())
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_timm_batchnormact_keeps_its_activation_and_dropout():
    pytest.importorskip("timm", reason="the norm is timm's BatchNormAct2d")
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)
    rest = result.model[1]
    assert isinstance(rest.act, nn.SiLU) and isinstance(rest.drop, nn.Dropout)
    x = torch.randn(2, 3, 6, 6)
    assert (result.model(x) < 0).any()  # SiLU, not identity: negatives survive but are bounded
    assert result.model(x).min() >= -0.2785


def test_residual_use_of_conv_output_is_kept():
    def forward(m, x):
        y = m.conv(x)
        return m.bn(y) + y

    model = Model(forward, conv=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 4, 5, 5), folded=0, kept=1)
    assert "also feeds" in result.report.plan.kept[0].reason


def test_second_branch_and_returned_conv_output_are_kept():
    def forward(m, x):
        y = m.conv(x)
        z = m.conv2(x)
        return m.bn(y), m.other(y), m.bn2(z), z

    model = Model(
        forward,
        conv=nn.Conv2d(3, 4, 1),
        bn=nn.BatchNorm2d(4),
        conv2=nn.Conv2d(3, 4, 1),
        bn2=nn.BatchNorm2d(4),
        other=nn.Conv2d(4, 4, 1),
    )
    check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=2)


def test_inplace_op_on_conv_output_before_norm_is_kept():
    def forward(m, x):
        y = m.conv(x)
        y.add_(1.0)  # same tensor object, new version: the norm does not see the conv's output
        return m.bn(y)

    model = Model(forward, conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4)).eval()
    check_fold(model, torch.randn(2, 3, 4, 4), folded=0, kept=1)


def test_inplace_op_through_a_view_is_kept():
    def forward(m, x):
        y = m.conv(x)
        out = m.bn(y)
        y[:, :2].mul_(2.0)
        return out, y

    model = Model(forward, conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4)).eval()
    check_fold(model, torch.randn(2, 3, 4, 4), folded=0, kept=1)


def test_inplace_relu_after_the_norm_still_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_inplace_relu_between_conv_and_norm_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "ReLU" in result.report.plan.kept[0].reason


def test_shared_conv_is_kept():
    model = Model(
        lambda m, x: m.bn2(m.conv(m.bn1(m.conv(x)))),
        conv=nn.Conv2d(4, 4, 3, padding=1),
        bn1=nn.BatchNorm2d(4),
        bn2=nn.BatchNorm2d(4),
    )
    result = check_fold(model.eval(), torch.randn(2, 4, 5, 5), folded=0, kept=2)
    assert all("called 2 times" in k.reason for k in result.report.plan.kept)


def test_shared_norm_is_kept():
    model = Model(
        lambda m, x: m.bn(m.a(x)) + m.bn(m.b(x)), a=nn.Conv2d(4, 4, 1), b=nn.Conv2d(4, 4, 1), bn=nn.BatchNorm2d(4)
    )
    check_fold(model.eval(), torch.randn(2, 4, 3, 3), folded=0, kept=1)


def test_tied_weights_are_kept():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = Model(lambda m, x: (m.bn(m.a(x)), m.b(x)), a=a, b=b, bn=nn.BatchNorm1d(4))
    result = check_fold(model.eval(), torch.randn(3, 4), folded=0, kept=1)
    assert "shared with 'b'" in result.report.plan.kept[0].reason


def test_weight_used_functionally_elsewhere_is_kept():
    model = Model(
        lambda m, x: m.bn(m.conv(x)) + F.conv2d(x, m.conv.weight), conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4)
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)
    assert "also used outside" in result.report.plan.kept[0].reason


def test_batch_statistics_norms_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1, randomize=False)
    assert "track_running_stats=False" in result.report.plan.kept[0].reason


def test_norm_in_training_mode_is_kept_with_flag_and_buffers_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    randomize_norms(model)
    model.eval()
    model[1].train()
    mean_before = model[1].running_mean.clone()
    tracked_before = model[1].num_batches_tracked.clone()
    result = bnfold.fold_with_report(model, torch.randn(2, 3, 6, 6))
    assert (len(result.report.plan.sites), len(result.report.plan.kept)) == (1, 1)
    assert result.report.plan.kept[0].norm == "1"
    assert "training mode" in result.report.plan.kept[0].reason
    assert model[1].training and result.model[1].training
    assert torch.equal(model[1].running_mean, mean_before)
    assert torch.equal(model[1].num_batches_tracked, tracked_before)
    assert not result.model.training


def test_whole_model_in_training_mode_warns_once_and_folds_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"model.eval\(\)") as record:
        folded = bnfold.fold(model, torch.randn(2, 3, 6, 6))
    assert len([w for w in record if "training mode" in str(w.message)]) == 1
    assert record[0].filename == __file__
    assert isinstance(folded[1], nn.BatchNorm2d) and folded.training and model.training


def test_conv_relu_bn_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)


def test_bn_first_child_of_sequential_ending_in_conv_is_not_paired_by_wraparound():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "model input" in result.report.plan.kept[0].reason


def test_registration_order_differs_from_execution_order():
    model = Model(
        lambda m, x: m.bn_b(m.conv_b(torch.relu(m.bn_a(m.conv_a(x))))),
        bn_b=nn.BatchNorm2d(8),  # registered first, runs after conv_b
        conv_a=nn.Conv2d(3, 4, 3),
        bn_a=nn.BatchNorm2d(4),
        conv_b=nn.Conv2d(4, 8, 3),
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 9, 9), folded=2, kept=0)
    assert {(s.norm, s.partner) for s in result.report.plan.sites} == {("bn_a", "conv_a"), ("bn_b", "conv_b")}


def test_identity_and_eval_dropout_between_conv_and_norm_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.3), nn.BatchNorm2d(4)).eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)


def test_python_control_flow_model_folds_with_example_inputs_only():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if y.sum() > 0:  # data-dependent: torch.fx cannot trace this
                return y * 2
            return y - 1

    model = Branchy().eval()
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0)
    with pytest.raises(
        bnfold.TraceError, match=r"^could not trace Branchy without example inputs \(torch.fx: .*pass example_inputs"
    ):
        bnfold.fold(model)


def test_several_inputs():
    model = Model(
        lambda m, x, y, scale=1.0: m.bn_a(m.a(x)) * scale + m.bn_b(m.b(y)),
        a=nn.Conv2d(3, 4, 3),
        bn_a=nn.BatchNorm2d(4),
        b=nn.Conv2d(5, 4, 3),
        bn_b=nn.BatchNorm2d(4),
    )
    check_fold(model.eval(), (torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6), 0.5), folded=2, kept=0)


def test_nested_output_structures_are_checked():
    def forward(m, x):
        y = m.bn(m.conv(x))
        return {"feat": [y, y.mean()], "shape": tuple(y.shape), "argmax": y.flatten(1).argmax(1)}

    model = Model(forward, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0, randomize=True)
    assert result.report.worst_output.startswith("output['feat']")


def test_layer_norm_and_group_norm_are_listed_as_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6)
    ).eval()
    result = check_fold(model, torch.randn(2, 3, 4, 4), folded=0, kept=2)
    assert all("own statistics" in k.reason for k in result.report.plan.kept)


def test_subclass_that_only_changes_construction_folds_like_its_base():
    class MyConv(nn.Conv2d):  # like torchvision's Conv3DSimple: its own __init__, the base's forward
        def __init__(self, c_in, c_out):
            super().__init__(c_in, c_out, 3, bias=False)

        @staticmethod
        def helper():  # a name the base does not have cannot change the base's code
            return 1

    class MyBN(nn.BatchNorm2d):
        def extra_repr(self):
            return "mine"

    model = nn.Sequential(MyConv(3, 4), MyBN(4), MyConv(4, 4), nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 8, 8), folded=2, kept=0)
    assert [s.norm_type for s in result.report.plan.sites] == ["MyBN", "BatchNorm2d"]
    assert [s.partner_types for s in result.report.plan.sites] == [("MyConv",), ("MyConv",)]
    assert bnfold.rules.classes.type_chain(model[0]) == (MyConv, nn.Conv2d)


def test_subclass_that_changes_computation_needs_its_own_rule_and_extra_rules_teach_it():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "no fold rule for ScaledBN" in result.report.plan.kept[0].reason

    def doubled(norm):
        scale, shift = bnfold.rules.norms.norm_affine(norm)
        return 2 * scale, 2 * shift

    rule = bnfold.FoldRule(nn.Conv2d, ScaledBN, affine=doubled)
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0, extra_rules=[rule])


def test_custom_producer_rule():
    class MyConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):  # same result, but bnfold cannot know that
            return super()._conv_forward(x, weight, bias)

    model = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "no backward fold rule for MyConv -> BatchNorm2d" in result.report.plan.kept[0].reason
    check_fold(model, torch.randn(2, 3, 6, 6), folded=1, kept=0, extra_rules=[bnfold.FoldRule(MyConv, nn.BatchNorm2d)])


def test_a_rule_for_the_declared_subclass_wins_over_its_bases_rule():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    refuse = bnfold.FoldRule(MyConv, nn.BatchNorm2d, check=lambda norm: "MyConv never folds")
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1, extra_rules=[refuse])
    assert "MyConv never folds" in result.report.plan.kept[0].reason


def test_norm_with_user_hooks_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    result = check_fold(model, torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "hooks" in result.report.plan.kept[0].reason


def test_modules_in_module_list_and_dict_fold():
    def forward(m, x):
        x = m.norms["first"](m.convs[0](x))
        return m.norms["second"](m.convs[1](x))

    model = Model(
        forward,
        convs=nn.ModuleList([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)]),
        norms=nn.ModuleDict({"first": nn.BatchNorm2d(4), "second": nn.BatchNorm2d(4)}),
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 8, 8), folded=2, kept=0)
    assert isinstance(result.model.norms["first"], nn.Identity)


def test_model_that_changes_its_input_in_place_leaves_the_callers_tensor_alone():
    def forward(m, x):
        x.mul_(2.0)
        return m.bn(m.conv(x))

    x = torch.randn(2, 3, 6, 6)
    before = x.clone()
    model = randomize_norms(Model(forward, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))).eval()
    result = bnfold.fold_with_report(model, x)
    assert torch.equal(x, before)
    assert result.report.folded == 1


def test_norm_parameters_used_outside_the_norm_are_kept():
    def reads_norm_weight():
        return Model(lambda m, x: m.bn(m.conv(x)) * m.bn.weight.mean(), conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))

    result = check_fold(reads_norm_weight().eval(), torch.randn(2, 3, 6, 6), folded=0, kept=1)
    assert "parameters are also used outside it" in result.report.plan.kept[0].reason
    assert len(bnfold.plan(reads_norm_weight().eval()).kept) == 1  # torch.fx sees it too (get_attr)


class MixedConv(nn.Module):
    """Channels split over convs of different kernels, concatenated, then normalized (MixNet)."""

    def __init__(self, extra_use: bool = False, with_input: bool = False):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 1), nn.Conv2d(2, 5, 3, padding=1, bias=False)])
        self.bn = nn.BatchNorm2d(12 if with_input else 8)
        self.extra_use, self.with_input = extra_use, with_input

    def forward(self, x):
        a, b = torch.split(x, 2, dim=1)
        outs = [self.convs[0](a), self.convs[1](b)]
        if self.with_input:
            outs.append(x)
        y = self.bn(torch.cat(outs, dim=1))
        return (y, outs[0]) if self.extra_use else y


def test_norm_after_a_channel_concat_of_layers_folds_into_each_slice():
    result = check_fold(MixedConv().eval(), torch.randn(2, 4, 5, 5), folded=1, kept=0)
    assert result.report.plan.sites[0].partners == ("convs.0", "convs.1")


def test_norm_after_a_concat_with_a_non_layer_or_a_shared_part_is_kept():
    result = check_fold(MixedConv(with_input=True).eval(), torch.randn(2, 4, 5, 5), folded=0, kept=1)
    assert "model input" in result.report.plan.kept[0].reason
    result = check_fold(MixedConv(extra_use=True).eval(), torch.randn(2, 4, 5, 5), folded=0, kept=1)
    assert "the output of 'convs.0' is also read elsewhere" in result.report.plan.kept[0].reason


def test_concat_along_another_axis_is_kept():
    model = Model(
        lambda m, x: m.bn(torch.cat([m.a(x), m.b(x)], dim=2)),
        a=nn.Conv2d(3, 4, 1),
        b=nn.Conv2d(3, 4, 1),
        bn=nn.BatchNorm2d(4),
    )
    result = check_fold(model.eval(), torch.randn(2, 3, 4, 4), folded=0, kept=1)

    assert "along axis 2" in result.report.plan.kept[0].reason


def test_custom_affine_module_taught_with_a_rule_as_in_the_guide():
    class MyScale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(n) + 0.5)
            self.shift = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.scale + self.shift

    model = nn.Sequential(nn.Linear(4, 5), MyScale(5)).eval()
    # an unknown module is no norm, but the constants its own forward applies fold as channel-wise constants
    plain = check_fold(model, torch.randn(3, 4), folded=2, kept=0)
    assert [(s.norm, s.kind, s.payload.op) for s in plain.report.plan.sites] == [
        ("1.scale", "constant", "mul"),
        ("1.shift", "constant", "add"),
    ]
    rule = bnfold.FoldRule(
        nn.Linear, MyScale, affine=lambda m: (m.scale.double(), m.shift.double()), check=lambda m: None
    )
    result = check_fold(model, torch.randn(3, 4), folded=1, kept=0, extra_rules=[rule])
    assert isinstance(result.model[1], nn.Identity)


class _NormInAList(nn.Module):
    """The forward calls the norm through a plain list attribute, not through its registered name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.norms = [self.bn]  # not a registered child: folding in place cannot reach it there

    def forward(self, x):
        return self.norms[0](self.conv(x))


def test_a_norm_also_held_outside_the_module_tree():
    """A folded copy is made with the norm's replacement wherever the model holds the norm, so it folds; folding
    in place can replace only registered children, so the norm in the list would still run after its fold: the
    check sees it and refuses, and the model is left as it was."""
    torch.manual_seed(0)
    model = _NormInAList().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 8, 8)
    result = check_fold(model, x, folded=1, kept=0, randomize=False)
    assert type(result.model.norms[0]) is nn.Identity and result.model.norms[0] is result.model.bn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(bnfold.VerificationError, match="'bn'"):
        bnfold.fold(model, x, inplace=True)
    assert type(model.bn) is nn.BatchNorm2d and model.norms[0] is model.bn
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
