"""Cross-layer equalization (``equalize=True``): exact (the function is unchanged, float64 to 1e-9), by data
flow through what lets a positive per-channel scale through, kept with a reason wherever it would not be
exact, and better for per-tensor 8-bit weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.apply.equalize_arithmetic import input_channel_ranges, output_channel_ranges

from helpers import Chain, max_rel_diff


def _spread_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics with gammas spread over [0.01, 10], as folding leaves real models' ranges."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(10 ** (torch.rand(n, generator=g) * 3 - 2))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _equalized(model: nn.Module, x: torch.Tensor, equalize: bool | str = "all", **kwargs) -> bnfold.FoldResult:
    """Fold and equalize a float64 copy (every chain it can, by default); the outputs must match the
    original's to 1e-9."""
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, equalize=equalize, **kwargs)
    with torch.no_grad():
        actual = result.model(x)
    for e, a in zip(*(o if isinstance(o, tuple) else (o,) for o in (expected, actual)), strict=True):
        assert max_rel_diff(e, a) < 1e-9
    return result


def _output_sqnr(model: nn.Module, x: torch.Tensor) -> float:
    """The SQNR in dB of ``model``'s output with every Conv/Linear weight quantized to 8 bits, one symmetric
    scale per tensor (activations in float), against its float output."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for m in quantized.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                step = m.weight.abs().max() / 127
                m.weight.copy_((m.weight / step).round() * step)
        reference, noisy = model(x), quantized(x)
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - noisy).pow(2).sum()))


def _pairs(result: bnfold.FoldResult) -> list[tuple[str, tuple[str, ...]]]:
    return [
        (pair.producer, pair.readers)
        for s in result.report.plan.sites
        if s.kind == "equalize"
        for pair in s.payload.pairs
    ]


def _kept(result: bnfold.FoldResult) -> dict[str, str]:
    return {k.norm: k.reason for k in result.report.plan.kept if k.kind == "equalize"}


def test_a_pair_across_a_relu_gets_equal_ranges_on_both_sides():
    torch.manual_seed(0)
    model = _spread_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    result = _equalized(model, torch.randn(2, 3, 12, 12))
    assert _pairs(result) == [("0", ("3",))]
    r1 = output_channel_ranges(result.model[0].weight, "conv")
    r2 = input_channel_ranges(result.model[3].weight, "conv")
    torch.testing.assert_close(r1, r2, rtol=1e-9, atol=0.0)
    layers = {q.layer: q for q in result.report.equalized_layers}
    assert layers["0"].spread_before > 50 and layers["0"].spread_after < layers["0"].spread_before / 5
    assert layers["0"].sqnr_after > layers["0"].sqnr_before
    assert "cross-layer equalization: 1 chain of layers equalized" in str(result.report.plan)


@pytest.mark.parametrize(
    "between",
    [nn.ReLU(), nn.LeakyReLU(0.1), nn.PReLU(8), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Dropout(0.3), nn.Identity()],
    ids=lambda m: type(m).__name__,
)
def test_every_op_that_lets_a_positive_scale_through(between):
    torch.manual_seed(0)
    model = _spread_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), between, nn.Conv2d(8, 4, 3)))
    result = _equalized(model, torch.randn(2, 3, 12, 12))
    assert _pairs(result) == [("0", ("3",))]


@pytest.mark.parametrize(
    "between, word",
    [
        (nn.ReLU6(), "does not let a per-channel scale through"),
        (nn.Hardtanh(), "does not let a per-channel scale through"),
        (nn.SiLU(), "does not let a per-channel scale through"),
        (nn.GELU(), "does not let a per-channel scale through"),
        (nn.Sigmoid(), "does not let a per-channel scale through"),
        (nn.Hardswish(), "does not let a per-channel scale through"),
        (nn.GroupNorm(2, 8), "does not let a per-channel scale through"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_nothing_crosses_what_does_not_commute_with_a_scale(between, word):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), between, nn.Conv2d(8, 4, 3))
    result = _equalized(model, torch.randn(2, 3, 12, 12))
    assert _pairs(result) == []
    assert word in _kept(result)["0"]


def test_a_chain_through_a_depthwise_conv_is_iterated_and_a_linear_after_a_flatten_takes_blocks():
    torch.manual_seed(0)
    model = _spread_norms(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 5),
        )
    )
    result = _equalized(model, torch.randn(2, 3, 12, 12))
    assert _pairs(result) == [("0", ("3",)), ("3", ("6",)), ("6", ("9",))]
    assert result.report.plan.equalized == 1  # one chain
    # converged: each pair's ranges are equal on both sides at once
    folded = result.model
    torch.testing.assert_close(
        output_channel_ranges(folded[0].weight, "conv"),
        input_channel_ranges(folded[3].weight, "conv", 8),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        output_channel_ranges(folded[3].weight, "conv", 8),
        input_channel_ranges(folded[6].weight, "conv"),
        rtol=1e-5,
        atol=0,
    )
    blocks = input_channel_ranges(folded[9].weight, "linear", channels=6)
    torch.testing.assert_close(output_channel_ranges(folded[6].weight, "conv"), blocks, rtol=1e-5, atol=0)


def test_fan_out_scales_every_reader_and_a_residual_add_or_a_concat_is_kept():
    class FanOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.a(y).mean() + self.b(y).mean()

    result = _equalized(FanOut(), torch.randn(2, 3, 10, 10))
    assert _pairs(result) == [("conv", ("a", "b"))]
    residual = Chain(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), lambda y: y + 1.0, nn.Conv2d(4, 2, 1))
    assert _pairs(_equalized(residual, torch.randn(2, 4, 6, 6))) == []
    concat = Chain(nn.Conv2d(4, 4, 1), lambda y: torch.cat([y, y], 1), nn.Conv2d(8, 2, 1))
    kept = _kept(_equalized(concat, torch.randn(2, 4, 6, 6)))
    assert "cat" in kept["s0"]


def test_a_shared_layer_or_a_returned_tensor_is_kept():
    conv = nn.Conv2d(4, 4, 1)
    shared = Chain(conv, nn.ReLU(), conv)
    assert "called 2 times" in _kept(_equalized(shared, torch.randn(2, 4, 5, 5)))["s0"]

    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y), y

    assert "model output" in _kept(_equalized(Returns(), torch.randn(2, 3, 5, 5)))["a"]


def test_without_equalize_nothing_is_equalized_and_verify_layers_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    plain = bnfold.fold_with_report(model, x)
    assert plain.report.plan.equalized == 0 and plain.report.equalized_layers == ()
    assert torch.equal(plain.model[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="verify='layers' cannot check equalize=True"):
        bnfold.fold(model, x, equalize=True, verify="layers")
    with pytest.raises(TypeError, match=r"equalize must be True or False \(or 'all'\)"):
        bnfold.fold(model, x, equalize="yes")  # type: ignore[arg-type]


def test_plan_lists_what_fold_would_equalize_and_changes_nothing():
    model = _spread_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = bnfold.plan(model, torch.randn(1, 3, 8, 8), equalize="all")
    assert plan.equalized == 1 and [s.kind for s in plan.sites] == ["backward", "equalize"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_in_place_and_without_example_inputs():
    model = _spread_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    model = model.double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    symbolic = bnfold.fold_with_report(model, equalize=True)  # torch.fx: nothing to measure, every chain
    assert symbolic.report.plan.equalized == 1
    with torch.no_grad():
        assert max_rel_diff(expected, symbolic.model(x)) < 1e-9
    folded = bnfold.fold(model, x, inplace=True, equalize="all")
    assert folded is model
    with torch.no_grad():
        assert max_rel_diff(expected, model(x)) < 1e-9


def test_a_wrong_equalization_is_caught_and_an_in_place_model_put_back(monkeypatch):
    from bnfold.apply import equalization

    model = _spread_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))).eval()
    x = torch.randn(2, 3, 9, 9)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forgets_the_readers(pair, s, surgery):  # divides the producer, never multiplies the readers
        producer = surgery.modules[pair.producer]
        surgery.log.scale_weight(producer, 1.0 / s, "conv", "output")

    monkeypatch.setattr(equalization, "_move", forgets_the_readers)
    with pytest.raises(bnfold.VerificationError):
        bnfold.fold(model, x, inplace=True, equalize="all")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_are_unchanged_and_gain_in_8_bit(name):
    torchvision = pytest.importorskip("torchvision", reason="torchvision builds the real architectures")
    torch.manual_seed(0)
    model = _spread_norms(getattr(torchvision.models, name)(weights=None))
    x = torch.randn(4, 3, 64, 64)
    every = _equalized(model, x)
    if name == "resnet18":  # each block's conv1 -> relu -> conv2; the residual streams are kept
        assert every.report.plan.equalized == 8
    else:  # the expanding convs end in ReLU6, which a scale does not commute with: kept, and said why
        assert every.report.plan.equalized >= 1
        assert any("ReLU6" in reason for reason in _kept(every).values())
    # by default only the chains that help 8-bit weights on the example inputs: never worse than folding alone
    measured = _equalized(model, x, equalize=True)
    folded = bnfold.fold(model.double(), x.double())
    assert _output_sqnr(measured.model, x.double()) >= _output_sqnr(folded, x.double())
    lowered = [r for r in _kept(measured).values() if r.startswith("equalizing it would lower the output SQNR")]
    assert measured.report.plan.equalized + len(lowered) == every.report.plan.equalized


def test_a_reparameterized_model_is_equalized_across_its_merged_blocks():
    timm = pytest.importorskip("timm", reason="timm builds RepVGG")
    torch.manual_seed(0)
    model = _spread_norms(timm.create_model("repvgg_a0", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    result = _equalized(model, x, equalize=True, reparameterize=True)
    assert result.report.plan.merged > 0 and result.report.plan.equalized >= 1
    layers = result.report.equalized_layers
    assert min(q.spread_after / q.spread_before for q in layers) < 0.5
    merged = bnfold.fold(model.double(), x.double(), reparameterize=True)
    gain = _output_sqnr(result.model, x.double()) - _output_sqnr(merged, x.double())
    assert gain > 3.0, gain  # merged kernels spread their channels widely: equalizing them pays most
