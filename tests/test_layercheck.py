"""verify="layers": each folded layer checked on the original's own inputs, for models whose outputs jump
with tiny rounding differences (detection models), and the diagnosis of a failed output check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.check.per_layer import probes_for

from cli_models import Amplifier
from helpers import Model, assert_same_state, max_rel_diff, randomize_norms, state_snapshot


def _wrong_rule():
    """A rule with a wrong affine map: what a bug in a fold would look like."""

    def doubled(norm):
        scale, shift = bnfold.rules.norms.norm_affine(norm)
        return 2 * scale, shift

    return bnfold.FoldRule(nn.Conv2d, nn.BatchNorm2d, affine=doubled)


def test_amplified_rounding_folds_under_the_default_check_through_a_float64_run():
    model = Amplifier().eval()
    x = torch.randn(2, 3, 10, 10)
    result = bnfold.fold_with_report(model, x)  # sin(1e6 x): float32 outputs differ by ~0.5 either way
    assert result.report.folded == 1
    assert result.report.checked == "float64"
    assert result.report.to_dict()["checked"] == "float64"
    assert "float64 run of the original" in str(result.report)
    assert result.report.max_abs_error > 1e-2  # the float32 outputs really differ: the float64 run decided
    # independently of bnfold's check: the folded layer gives the original's norm output
    with torch.no_grad():
        assert max_rel_diff(model.bn(model.conv(x)), result.model.bn(result.model.conv(x))) < 1e-5

    layers = bnfold.fold_with_report(model, x, verify="layers")  # still there, as an explicit choice
    assert layers.report.folded == 1
    assert layers.report.checked == "layers"
    assert "each folded layer" in str(layers.report)


def test_a_wrong_fold_is_caught_by_both_checks_and_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = randomize_norms(model.eval())
    before = state_snapshot(model)
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(bnfold.VerificationError) as caught:
        bnfold.fold(model, x, extra_rules=[_wrong_rule()])
    assert caught.value.layers_match is False
    assert "first folded region that differs on the original's own inputs: the output of '1'" in str(caught.value)
    assert "verify='layers'" not in str(caught.value)
    with pytest.raises(bnfold.VerificationError, match="the output of '1' differs .* on the same inputs"):
        bnfold.fold(model, x, extra_rules=[_wrong_rule()], verify="layers")
    for inplace in (False, True):
        with pytest.raises(bnfold.VerificationError):
            bnfold.fold(model, x, extra_rules=[_wrong_rule()], verify="layers", inplace=inplace)
        assert_same_state(model, before)
        assert isinstance(model[1], nn.BatchNorm2d)


def test_a_wrong_fold_in_place_is_diagnosed_and_undone():
    model = Amplifier().eval()
    before = state_snapshot(model)
    with pytest.raises(bnfold.VerificationError) as caught:
        bnfold.fold(model, torch.randn(1, 3, 8, 8), inplace=True, extra_rules=[_wrong_rule()])
    assert caught.value.layers_match is False
    assert_same_state(model, before)
    assert isinstance(model.bn, nn.BatchNorm2d)
    # the exact fold passes through the float64 run, which needs the original back for a moment
    x = torch.randn(1, 3, 8, 8)
    copied = bnfold.fold(model, x)
    result = bnfold.fold_with_report(model, x, inplace=True)
    assert result.model is model and isinstance(model.bn, nn.Identity)
    assert result.report.checked == "float64"
    assert torch.equal(model.conv.weight, copied.conv.weight) and torch.equal(model.conv.bias, copied.conv.bias)


def test_the_layer_check_feeds_each_region_the_originals_inputs():
    def reorder(m, x):
        # a discrete step (argsort of amplified values) between two folded pairs: the second pair's input
        # differs between the original and the folded model, unless the check feeds it the original's
        y = m.bn1(m.conv1(x))
        order = torch.sin(y * 1e6).argsort(dim=2)
        return m.bn2(m.conv2(torch.gather(y, 2, order)))

    torch.manual_seed(0)
    model = Model(
        reorder, conv1=nn.Conv1d(3, 6, 1), bn1=nn.BatchNorm1d(6), conv2=nn.Conv1d(6, 6, 1), bn2=nn.BatchNorm1d(6)
    )
    model = randomize_norms(model.eval())
    x = torch.randn(2, 3, 50)
    result = bnfold.fold_with_report(model, x, verify="layers")
    assert result.report.folded == 2
    assert result.report.max_rel_error < 1e-5
    # the default check sees the reordering in the outputs, and a float64 run shows it is rounding
    assert bnfold.fold_with_report(model, x).report.checked == "float64"


def test_integer_outputs_are_checked_through_the_floats_they_come_from():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)

        def forward(self, x):
            return self.bn(self.conv(x)).mean((2, 3)).argmax(1)  # class indices: nothing to compare closely

    model = randomize_norms(Classifier().eval())
    result = bnfold.fold_with_report(model, torch.randn(4, 3, 8, 8))
    assert result.report.checked == "outputs"
    assert result.report.folded == 1
    assert "float input #0" in result.report.worst_output  # the logits behind the indices
    with pytest.raises(bnfold.VerificationError, match="float input #0 of the ops that computed it"):
        bnfold.fold(model, torch.randn(4, 3, 8, 8), extra_rules=[_wrong_rule()])


def test_outputs_with_no_float_behind_them_are_checked_layer_by_layer():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)

        def forward(self, x):
            self.bn(self.conv(x))  # runs, but nothing of it reaches the outputs
            return torch.arange(3)

    model = randomize_norms(Constant().eval())
    result = bnfold.fold_with_report(model, torch.randn(4, 3, 8, 8))
    assert result.report.checked == "layers"
    with pytest.raises(bnfold.VerificationError):  # and the per-layer check is a real one
        bnfold.fold(model, torch.randn(4, 3, 8, 8), extra_rules=[_wrong_rule()])


def test_probes_follow_chains_of_folds_into_one_layer():
    def chains(m, x):
        # bn0 folds forward into conv1, bn1 backward into it, gamma after bn1 into it too; bn2 reads a
        # channel-wise cat of two convs; bn3 folds forward into two readers
        x = m.bn1(m.conv1(m.bn0(x))) * m.gamma
        x = torch.relu(m.bn2(torch.cat([m.conv_a(x), m.conv_b(x)], 1)))
        x = m.bn3(x)
        return m.read_a(x) + m.read_b(x)

    torch.manual_seed(0)
    model = Model(
        chains,
        bn0=nn.BatchNorm2d(3),
        conv1=nn.Conv2d(3, 4, 1),
        bn1=nn.BatchNorm2d(4),
        gamma=nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5),
        conv_a=nn.Conv2d(4, 2, 3),
        conv_b=nn.Conv2d(4, 3, 3),
        bn2=nn.BatchNorm2d(5),
        bn3=nn.BatchNorm2d(5),
        read_a=nn.Conv2d(5, 2, 1),
        read_b=nn.Conv2d(5, 2, 1),
    )
    model = randomize_norms(model.eval())

    x = torch.randn(2, 3, 9, 9)
    plan = bnfold.plan(model, x)
    assert {(s.norm, s.direction) for s in plan.sites} == {
        ("bn0", "forward"),
        ("bn1", "backward"),
        ("gamma", "backward"),
        ("bn2", "backward"),
        ("bn3", "forward"),
    }
    probes = probes_for(plan)
    # conv1 reads bn0's raw input once folded, so the region starts at bn0
    assert set(probes.entries) == {"bn0", "conv_a", "conv_b", "bn3"}
    exits = {(e.kind, e.name): set(e.sites) for e in probes.exits}
    assert exits == {
        ("constant", "gamma"): {"bn1", "gamma", "bn0"},
        ("module", "bn2"): {"bn2"},
        ("module", "read_a"): {"bn3"},
        ("module", "read_b"): {"bn3"},
    }
    result = bnfold.fold_with_report(model, x, verify="layers")
    assert result.report.folded == 5 and result.report.max_rel_error < 1e-5
    with torch.no_grad():
        assert max_rel_diff(model(x), result.model(x)) < 1e-5


def test_verify_must_be_outputs_or_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="verify must be 'outputs' or 'layers'"):
        bnfold.fold(model, torch.randn(1, 3, 8, 8), verify="both")


def test_torchvision_detection_model_folds_under_the_default_check():
    torch.manual_seed(0)
    torchvision = pytest.importorskip("torchvision", reason="the model is torchvision's ssdlite320")
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5
    ).eval()
    randomize_norms(model)
    images = ([torch.rand(3, 128, 128)],)
    result = bnfold.fold_with_report(model, images)  # detections reorder with 1e-7 differences
    assert (result.report.folded, result.report.kept) == (70, 0)
    assert result.report.checked == "float64"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    # independently: the backbone and head features (before the discrete post-processing) match
    batch = model.transform(images[0])[0].tensors
    with torch.no_grad():
        expected, actual = model.backbone(batch), result.model.backbone(batch)
        for key in expected:
            assert max_rel_diff(expected[key], actual[key]) < 1e-5
        features = list(expected.values())
        head_e, head_a = model.head(features), result.model.head(features)
        for key in head_e:
            assert max_rel_diff(head_e[key], head_a[key]) < 1e-5
    # a wrong fold is still refused, and named
    with pytest.raises(bnfold.VerificationError, match="first folded region that differs") as caught:
        bnfold.fold(model, images, extra_rules=[_wrong_rule()])
    assert caught.value.layers_match is False
    # the explicit per-layer check stays
    assert bnfold.fold_with_report(model, images, verify="layers").report.checked == "layers"
