"""The op table: one test per entry, each on the fold that reads it, and a check that no entry goes
untested. An op that is not in the table ends a fold's path."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnfold
from bnfold.discover.tracing import trace_execution
from bnfold.planning.channel_walk import walk_down, walk_up
from bnfold.rules.ops import (
    NORM_FOLD,
    POSITIVE_NORM_FOLD,
    POSITIVE_SCALE,
    memory_of,
    op_table,
    registry,
)

from helpers import Chain, check_fold, randomize_norms

X4 = torch.randn(2, 3, 6, 6)


def conv_op_bn(op):
    """Backward: the norm reads the conv's output through ``op``, which must keep the channels on axis 1."""
    return Chain(nn.Conv2d(3, 4, 1), op, nn.BatchNorm2d(4)), X4


def bn_op_linear(op, features=4):
    """Forward: a Linear reads the norm's output through ``op``."""
    return Chain(nn.BatchNorm2d(3), op, nn.Linear(features, 5)), X4[:, :, :4, :4] if features == 4 else X4


def bn_module_conv(module, x, channels):
    """Forward: a 1x1 conv of the right rank reads the norm's output through ``module``."""
    rank = x.dim() - 2
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank](channels)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank](channels, 2, 1)
    return Chain(norm, module, conv), x


def _unflatten(y):
    return y.unflatten(2, (6, 6))


# op -> (model, input, kind of the fold that goes through it)
FUNCTION_CASES = {
    "Tensor.contiguous": (*conv_op_bn(lambda y: y.transpose(2, 3).contiguous().transpose(2, 3)), "backward"),
    "Tensor.clone": (*conv_op_bn(lambda y: y.clone()), "backward"),
    "_VariableFunctionsClass.clone": (*conv_op_bn(torch.clone), "backward"),
    "Tensor.permute": (*conv_op_bn(lambda y: y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)), "backward"),
    "_VariableFunctionsClass.permute": (
        *conv_op_bn(lambda y: torch.permute(torch.permute(y, (0, 2, 3, 1)), (0, 3, 1, 2))),
        "backward",
    ),
    "Tensor.transpose": (*conv_op_bn(lambda y: y.transpose(1, 3).transpose(1, 3)), "backward"),
    "_VariableFunctionsClass.transpose": (
        *conv_op_bn(lambda y: torch.transpose(torch.transpose(y, 1, 2), 1, 2)),
        "backward",
    ),
    "Tensor.swapaxes": (*conv_op_bn(lambda y: y.swapaxes(1, 2).swapaxes(1, 2)), "backward"),
    "Tensor.swapdims": (*conv_op_bn(lambda y: y.swapdims(1, -1).swapdims(1, -1)), "backward"),
    "Tensor.movedim": (*conv_op_bn(lambda y: y.movedim(1, -1).movedim(-1, 1)), "backward"),
    "_VariableFunctionsClass.movedim": (*conv_op_bn(lambda y: torch.movedim(torch.movedim(y, 1, 3), 3, 1)), "backward"),
    "Tensor.roll": (*conv_op_bn(lambda y: y.roll(1, 2)), "backward"),
    "_VariableFunctionsClass.roll": (*conv_op_bn(lambda y: torch.roll(y, (1, 2), dims=(2, 3))), "backward"),
    "Tensor.reshape": (*conv_op_bn(lambda y: y.reshape(2, 4, 36).reshape(2, 4, 6, 6)), "backward"),
    "Tensor.view": (*conv_op_bn(lambda y: y.view(2, 4, -1).view(2, 4, 6, 6)), "backward"),
    "Tensor.flatten": (*conv_op_bn(lambda y: _unflatten(y.flatten(2))), "backward"),
    "Tensor.unflatten": (*conv_op_bn(lambda y: _unflatten(y.flatten(2))), "backward"),
    "Tensor.squeeze": (*conv_op_bn(lambda y: y.unsqueeze(0).squeeze(0)), "backward"),
    "Tensor.unsqueeze": (*conv_op_bn(lambda y: y.unsqueeze(2).squeeze(2)), "backward"),
    "Tensor.reshape_as": (*conv_op_bn(lambda y: y.flatten(2).reshape_as(y)), "backward"),
    "Tensor.view_as": (*conv_op_bn(lambda y: y.flatten(2).view_as(y)), "backward"),
    "_VariableFunctionsClass.reshape": (*conv_op_bn(lambda y: torch.reshape(y, (2, 4, 6, 6))), "backward"),
    "_VariableFunctionsClass.flatten": (*conv_op_bn(lambda y: _unflatten(torch.flatten(y, 2))), "backward"),
    "_VariableFunctionsClass.squeeze": (*conv_op_bn(lambda y: torch.squeeze(y.unsqueeze(0), 0)), "backward"),
    "_VariableFunctionsClass.unsqueeze": (*conv_op_bn(lambda y: torch.unsqueeze(y, 0).squeeze(0)), "backward"),
    "Tensor.__getitem__": (*conv_op_bn(lambda y: y[:, None][:, 0]), "backward"),
    "Tensor.mean": (*bn_op_linear(lambda y: y.mean((2, 3)), features=3), "forward"),
    "_VariableFunctionsClass.mean": (*bn_op_linear(lambda y: torch.mean(y, dim=(-1, -2)), features=3), "forward"),
}

X3, X5 = torch.randn(2, 4, 9), torch.randn(2, 4, 5, 5, 5)
X4C = torch.randn(2, 4, 6, 6)
MODULE_CASES = {
    "Identity": (*bn_module_conv(nn.Identity(), X4C, 4), "forward"),
    "Dropout": (*bn_module_conv(nn.Dropout(0.3), X4C, 4), "forward"),
    "Dropout1d": (*bn_module_conv(nn.Dropout1d(0.3), X3, 4), "forward"),
    "Dropout2d": (*bn_module_conv(nn.Dropout2d(0.3), X4C, 4), "forward"),
    "Dropout3d": (*bn_module_conv(nn.Dropout3d(0.3), X5, 4), "forward"),
    "AlphaDropout": (*bn_module_conv(nn.AlphaDropout(0.3), X4C, 4), "forward"),
    "FeatureAlphaDropout": (*bn_module_conv(nn.FeatureAlphaDropout(0.3), X4C, 4), "forward"),
    "Flatten": (Chain(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3)), X4C, "forward"),
    "Unflatten": (Chain(nn.Conv1d(4, 4, 1), nn.Unflatten(2, (3, 3)), nn.BatchNorm2d(4)), X3, "backward"),
    "AvgPool1d": (*bn_module_conv(nn.AvgPool1d(3), X3, 4), "forward"),
    "AvgPool2d": (*bn_module_conv(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), X4C, 4), "forward"),
    "AvgPool3d": (*bn_module_conv(nn.AvgPool3d(2), X5, 4), "forward"),
    "AdaptiveAvgPool1d": (*bn_module_conv(nn.AdaptiveAvgPool1d(2), X3, 4), "forward"),
    "AdaptiveAvgPool2d": (*bn_module_conv(nn.AdaptiveAvgPool2d(1), X4C, 4), "forward"),
    "AdaptiveAvgPool3d": (*bn_module_conv(nn.AdaptiveAvgPool3d(2), X5, 4), "forward"),
    # a maximum commutes with a norm only when every scale is positive (randomize_norms makes them so)
    "MaxPool1d": (*bn_module_conv(nn.MaxPool1d(2), X3, 4), "forward"),
    "MaxPool2d": (*bn_module_conv(nn.MaxPool2d(2), X4C, 4), "forward"),
    "MaxPool3d": (*bn_module_conv(nn.MaxPool3d(2), X5, 4), "forward"),
    "AdaptiveMaxPool1d": (*bn_module_conv(nn.AdaptiveMaxPool1d(3), X3, 4), "forward"),
    "AdaptiveMaxPool2d": (*bn_module_conv(nn.AdaptiveMaxPool2d(2), X4C, 4), "forward"),
    "AdaptiveMaxPool3d": (*bn_module_conv(nn.AdaptiveMaxPool3d(2), X5, 4), "forward"),
}
if importlib.util.find_spec("torchvision") is not None:  # the op table has torchvision's Permute when it is there
    from torchvision.ops.misc import Permute

    MODULE_CASES["Permute"] = (
        Chain(nn.Linear(6, 4), Permute([0, 3, 1, 2]), nn.BatchNorm2d(4)),
        torch.randn(2, 5, 5, 6),
        "backward",
    )


# ReLU and its kin: a positive per-channel scale passes, a shift and a sign do not. Every norm fold carries a
# shift, so none crosses them; the walker goes through them with a positive scale (cross-layer equalization).
RECTIFIER_FUNCTIONS = {
    "relu": lambda y: F.relu(y),
    "Tensor.relu": lambda y: y.relu(),
    "_VariableFunctionsClass.relu": torch.relu,
    "leaky_relu": lambda y: F.leaky_relu(y, 0.1),
    "Tensor.relu_": lambda y: y.relu_(),
    "_VariableFunctionsClass.relu_": torch.relu_,
    "leaky_relu_": lambda y: F.leaky_relu_(y, 0.2),
}
RECTIFIER_MODULES = {
    "ReLU": nn.ReLU(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "PReLU": nn.PReLU(4, init=0.3),
}


def test_every_entry_of_the_op_table_has_a_test():
    functions, modules = op_table()
    assert set(functions) == set(FUNCTION_CASES) | set(RECTIFIER_FUNCTIONS)
    assert {t.__name__ for t in modules} == set(MODULE_CASES) | set(RECTIFIER_MODULES)


def test_entries_that_share_a_last_name_agree_on_memory():
    """A ``torch.fx`` trace names a call by the last part of its name: entries sharing it must agree."""
    functions, _ = registry()
    by_last: dict[str, set[str]] = {}
    for name, entry in functions.items():
        by_last.setdefault(name.rpartition(".")[2], set()).add(entry.memory)
    assert {last: m for last, m in by_last.items() if len(m) > 1} == {}
    assert (memory_of("Tensor.permute"), memory_of("add"), memory_of("Tensor.relu_"), memory_of("flip_")) == (
        "view",
        "fresh",
        "writes",
        "writes",
    )


@pytest.mark.parametrize("op", sorted(FUNCTION_CASES))
def test_function_entry_lets_a_fold_through(op):
    model, x, kind = FUNCTION_CASES[op]
    result = check_fold(model.eval(), x, folded=1, kept=0)
    assert result.report.plan.sites[0].kind == kind


@pytest.mark.parametrize("module", sorted(MODULE_CASES))
def test_module_entry_lets_a_fold_through(module):
    model, x, kind = MODULE_CASES[module]
    result = check_fold(model.eval(), x, folded=1, kept=0)
    assert result.report.plan.sites[0].kind == kind


# -- what ends a path ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op",
    [
        lambda y: torch.roll(y, 1, dims=1),  # a roll of the channels
        lambda y: y.roll(1),  # no dims: the flattened tensor is rolled, across the channels
        lambda y: y.transpose(1, 2),  # the channels land on another axis
        lambda y: y.permute(0, 2, 1, 3).reshape(2, 4, 6, 6),  # channels interleaved with the rows
        lambda y: torch.sigmoid(y),  # not in the table
        lambda y: y.flip(1),  # not in the table
        lambda y: y[:, :3],  # a slice of the channels
    ],
    ids=["roll-channels", "roll-flat", "transpose", "interleave", "sigmoid", "flip", "slice"],
)
def test_ops_that_move_or_change_channels_end_a_path(op):
    channels = op(torch.randn(2, 4, 6, 6)).shape[1]  # the norm fits what the op gives it
    model = Chain(nn.Conv2d(3, 4, 1), op, nn.BatchNorm2d(channels)).eval()
    result = check_fold(model, X4, folded=0, kept=1)
    assert result.report.plan.kept[0].norm == "s2"


def test_roll_over_the_channels_keeps_the_norm_with_the_reason():
    model = Chain(nn.Conv2d(3, 4, 1), lambda y: torch.roll(y, 1, dims=1), nn.BatchNorm2d(4)).eval()
    result = check_fold(model, X4, folded=0, kept=1)
    assert "roll" in result.report.plan.kept[0].reason and "mixes the channels" in result.report.plan.kept[0].reason


def test_max_pool_needs_positive_scales_and_avg_pool_real_elements_only():
    bn = nn.BatchNorm2d(4)
    model = randomize_norms(Chain(bn, nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)).eval())
    with torch.no_grad():
        bn.weight[0] = -1.0
    result = bnfold.fold_with_report(model, X4C)
    assert result.report.kept == 1 and "not positive" in result.report.plan.kept[0].reason
    padded = Chain(nn.BatchNorm2d(4), nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(4, 2, 1)).eval()
    result = check_fold(padded, X4C, folded=0, kept=1)
    assert "count_include_pad=True" in result.report.plan.kept[0].reason


def test_backward_through_pooling_and_a_mean():
    pooled = Chain(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.BatchNorm2d(4)).eval()
    check_fold(pooled, X4, folded=1, kept=0)
    mean = Chain(nn.Conv2d(3, 4, 3), lambda y: y.mean((2, 3)), nn.BatchNorm1d(4)).eval()
    check_fold(mean, X4, folded=1, kept=0)


# -- ReLU, LeakyReLU, PReLU: a positive scale passes, a shift and a sign do not ---------------------------
def _walk_from_norm(model, x):
    """The trace of ``model`` and its norm's call (the last BatchNorm2d)."""
    graph = trace_execution(model, (x,), {nn.Conv2d, nn.BatchNorm2d}, {nn.Conv2d, nn.BatchNorm2d})
    norm = next(c for c in reversed(graph.calls) if isinstance(c.module, nn.BatchNorm2d))
    return graph, norm


def _check_rectifier(op, name):
    model = Chain(nn.Conv2d(3, 4, 1), op, nn.BatchNorm2d(4)).eval()
    result = check_fold(model, X4, folded=0, kept=1)
    kept = result.report.plan.kept[0]
    # the walk went through it to the conv, and says why the norm cannot follow
    assert kept.partner == "s0" and "a shift does not" in kept.reason, kept.reason
    graph, norm = _walk_from_norm(model, X4)
    scaled = walk_up(graph, norm.inputs[0], norm.index, POSITIVE_SCALE)
    assert scaled.source is not None and scaled.source.module is model.s0
    assert [s.call.target for s in scaled.steps] == [name] and scaled.blocked(POSITIVE_SCALE) is None
    shifted = walk_up(graph, norm.inputs[0], norm.index, POSITIVE_NORM_FOLD)
    assert shifted.source is not None and shifted.source.target == name and "a shift does not" in shifted.stop
    assert "a negative one does not" in (scaled.blocked(frozenset({"scale", "sign"})) or (None, ""))[1]


@pytest.mark.parametrize("op", sorted(RECTIFIER_FUNCTIONS))
def test_rectifier_function_lets_a_positive_scale_through_and_stops_a_norm(op):
    _check_rectifier(RECTIFIER_FUNCTIONS[op], op)


@pytest.mark.parametrize("module", sorted(RECTIFIER_MODULES))
def test_rectifier_module_lets_a_positive_scale_through_and_stops_a_norm(module):
    _check_rectifier(RECTIFIER_MODULES[module], "s1")


@pytest.mark.parametrize("inplace", [False, True])
def test_no_norm_folds_across_a_relu_either_way(inplace):
    backward = Chain(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=inplace), nn.BatchNorm2d(4)).eval()
    kept = check_fold(backward, X4, folded=0, kept=1).report.plan.kept[0]
    assert kept.reason.startswith(
        "'s1' between 's0' and it is a ReLU-like activation, not linear: a positive per-channel scale passes "
        "through it, a shift does not; forward: "
    )
    forward = Chain(nn.BatchNorm2d(3), nn.ReLU(inplace=inplace), nn.Conv2d(3, 4, 1)).eval()
    kept = check_fold(forward, X4, folded=0, kept=1).report.plan.kept[0]
    assert "a shift does not" in kept.reason
    # a scale of 1 and a shift of 0 are still a norm's map: no fold crosses it, whatever the values
    neutral = Chain(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=inplace), nn.BatchNorm2d(4, affine=False)).eval()
    check_fold(neutral, X4, folded=0, kept=1, randomize=False)


def test_no_norm_folds_across_a_relu_without_example_inputs():
    model = Chain(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    plan = bnfold.plan(model)
    assert len(plan.sites) == 0 and "a shift does not" in plan.kept[0].reason


class _ScaledAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(self.conv(x)) * self.gamma


def test_a_positive_channelwise_constant_does_not_cross_a_relu():
    """A channel-wise constant folds with a norm's arithmetic, so its walk carries a shift too."""
    result = check_fold(_ScaledAfterRelu().eval(), X4, folded=0, kept=1)
    kept = result.report.plan.kept[0]
    assert kept.norm == "gamma" and "a shift does not" in kept.reason, kept.reason


def test_a_prelu_with_a_slope_per_channel_stops_a_permutation():
    graph, norm = _walk_from_norm(Chain(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.BatchNorm2d(4)).eval(), X4)
    walk = walk_up(graph, norm.inputs[0], norm.index)
    assert walk.blocked(frozenset({"scale", "permutation"})) is not None
    graph, norm = _walk_from_norm(Chain(nn.Conv2d(3, 4, 1), nn.PReLU(1), nn.BatchNorm2d(4)).eval(), X4)
    assert walk_up(graph, norm.inputs[0], norm.index).blocked(frozenset({"scale", "permutation"})) is None


def test_the_walk_down_fans_out_through_relus_to_every_reader():
    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.a(y) + self.b(y.relu())

    model = Fan().eval()
    graph = trace_execution(model, (X4,), {nn.Conv2d}, {nn.Conv2d})
    conv = next(c for c in graph.calls if c.module is model.conv)
    reached = list(walk_down(graph, conv.outputs[0], POSITIVE_SCALE))
    assert [(r.call.module, r.stop, len(r.path)) for r in reached] == [(model.a, None, 1), (model.b, None, 2)]
    stopped = list(walk_down(graph, conv.outputs[0], NORM_FOLD))
    assert [(r.call.target, r.stop) for r in stopped] == [("_VariableFunctionsClass.relu", "blocked")]


# -- activations that are not in the registry end every walk, a positive scale's too -----------------------
@pytest.mark.parametrize(
    "op",
    [F.hardtanh, F.relu6, lambda y: y.clamp(0, 1), F.silu, F.gelu, torch.sigmoid, F.hardswish],
    ids=["hardtanh", "relu6", "clamp", "silu", "gelu", "sigmoid", "hardswish"],
)
def test_bounded_and_smooth_activations_stop_every_walk(op):
    model = Chain(nn.Conv2d(3, 4, 1), op, nn.BatchNorm2d(4)).eval()
    result = check_fold(model, X4, folded=0, kept=1)
    assert "not from a Conv/ConvTranspose/Linear layer" in result.report.plan.kept[0].reason
    graph, norm = _walk_from_norm(model, X4)
    walk = walk_up(graph, norm.inputs[0], norm.index, POSITIVE_SCALE)
    assert walk.steps == () and walk.source is not None and walk.source.module is None
    assert walk.stop == "is not an op the walk goes through"


def test_an_in_place_relu_passes_a_positive_scale_only_with_recorded_shapes():
    """An execution trace keys a tensor by its version, so it sees every reader around an in-place ReLU; a
    torch.fx trace cannot tell what else shares the memory it writes."""
    from bnfold.discover.tracing import trace_symbolic

    types = {nn.Conv2d, nn.BatchNorm2d}
    for inplace in (False, True):
        model = Chain(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=inplace), nn.BatchNorm2d(4)).eval()
        for graph in (trace_execution(model, (X4,), types, types), trace_symbolic(model, types, types)):
            norm = next(c for c in graph.calls if c.module is model.s2)
            walk = walk_up(graph, norm.inputs[0], norm.index, POSITIVE_SCALE)
            if inplace and not graph.has_shapes:
                assert walk.source is not None and walk.source.module is model.s1
                assert walk.stop.startswith("works in place"), walk.stop
            else:
                assert walk.source is not None and walk.source.module is model.s0, (inplace, graph.traced_with)
