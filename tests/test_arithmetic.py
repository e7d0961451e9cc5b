"""Property tests of the fold arithmetic against an independent oracle: running the layers in float64.

Each test folds through ``bnfold.fold`` (the planner, then surgery's own arithmetic calls), so what is
tested is what production runs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.apply.fold_arithmetic import scale_output_channels

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _random_bn(bn: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) * 2 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))


def _assert_folds_exactly(model: nn.Module, x: torch.Tensor, kind: str) -> None:
    """Fold a float64 model through bnfold.fold: one fold of ``kind``, outputs equal to 1e-10."""
    model = model.double().eval()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x)
    assert [s.kind for s in result.report.plan.sites] == [kind], str(result.report.plan)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=120, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    bias=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_conv_fold_matches_conv_then_bn(dims, transposed, groups, per_group_in, per_group_out, bias, affine, eps, seed):
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * per_group_in, groups * per_group_out
    layer_type = (CONV_T if transposed else CONV)[dims]
    layer = layer_type(cin, cout, 2, groups=groups, bias=bias).double().eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
    bn = BN[dims](cout, eps=eps, affine=affine).double().eval()
    _random_bn(bn, g)
    x = torch.randn(2, cin, *([4] * dims), generator=g, dtype=torch.float64)
    _assert_folds_exactly(nn.Sequential(layer, bn), x, "backward")


@settings(max_examples=60, deadline=None)
@given(
    fin=st.integers(1, 6), fout=st.integers(1, 6), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**16)
)
def test_linear_fold_matches_linear_then_bn(fin, fout, bias, affine, seed):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(fin, fout, bias=bias).double()
    bn = nn.BatchNorm1d(fout, affine=affine).double().eval()
    _random_bn(bn, g)
    x = torch.randn(5, fin, generator=g, dtype=torch.float64)
    _assert_folds_exactly(nn.Sequential(linear, bn), x, "backward")


def test_fold_computes_in_float64_and_returns_the_layer_dtype():
    w = torch.randn(4, 3, dtype=torch.float16)
    scale = torch.full((4,), 1.0 / 3.0, dtype=torch.float32)
    new_w = scale_output_channels(w, scale, "linear")
    assert new_w.dtype == torch.float16
    # one rounding of the exact float64 product, not a float16 product of rounded factors
    exact = (w.double() * scale.double()[:, None]).half()
    assert torch.equal(new_w, exact)


def test_float16_model_folds_with_one_rounding():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    _random_bn(model[1], torch.Generator().manual_seed(0))
    model.half()
    bn = model[1]
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    exact = (model[0].weight.double() * scale[:, None]).half()
    folded = bnfold.fold(model, torch.randn(5, 3, dtype=torch.float16))
    assert folded[0].weight.dtype == torch.float16 and torch.equal(folded[0].weight, exact)


def test_unknown_layout_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown weight layout 'dense'"):
        scale_output_channels(torch.ones(2, 2), torch.ones(2), "dense")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_fold_matches_bn_then_unpadded_layer(dims, transposed, groups, per_group_in, per_group_out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * per_group_in, groups * per_group_out
    # a ConvTranspose folds forward exactly when every output sees all its taps: kernel 1, stride 1
    kernel = 1 if transposed else 2
    layer = (CONV_T if transposed else CONV)[dims](cin, cout, kernel, groups=groups, bias=bias).double().eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
    bn = BN[dims](cin).double().eval()
    _random_bn(bn, g)
    x = torch.randn(2, cin, *([4] * dims), generator=g, dtype=torch.float64)
    _assert_folds_exactly(nn.Sequential(bn, layer), x, "forward")


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 4), positions=st.integers(1, 5), fout=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_forward_fold_into_linear_over_flattened_channels(channels, positions, fout, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(channels).double().eval()
    _random_bn(bn, g)
    linear = nn.Linear(channels * positions, fout).double()
    x = torch.randn(3, channels, positions, generator=g, dtype=torch.float64)
    _assert_folds_exactly(nn.Sequential(bn, nn.Flatten(), linear), x, "forward")
