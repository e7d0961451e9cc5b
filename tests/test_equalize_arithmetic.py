"""Property tests of the equalization arithmetic: per-channel ranges against an oracle built from the fold
arithmetic's own channel mapping, the exactness of a scale moved across a ReLU, and the 8-bit measure."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.apply.equalize_arithmetic import (
    equalizing_scales,
    input_channel_ranges,
    output_channel_ranges,
    per_tensor_sqnr,
    range_spread,
)
from bnfold.apply.fold_arithmetic import scale_input_channels, scale_output_channels

LAYOUTS = st.sampled_from(["conv", "conv_transpose", "linear"])


def _weight(layout: str, groups: int, per_group_in: int, per_group_out: int, g: torch.Generator) -> torch.Tensor:
    if layout == "linear":
        return torch.randn(per_group_out, per_group_in * groups, generator=g, dtype=torch.float64)
    if layout == "conv":
        return torch.randn(per_group_out * groups, per_group_in, 3, 2, generator=g, dtype=torch.float64)
    return torch.randn(per_group_in * groups, per_group_out, 2, 3, generator=g, dtype=torch.float64)


def _oracle(weight: torch.Tensor, layout: str, groups: int, axis: str, count: int) -> list[float]:
    """Each channel's range as the largest |w| that a one-hot scale of that channel keeps (the fold
    arithmetic's own mapping of elements to channels)."""
    scaled = scale_output_channels if axis == "output" else scale_input_channels
    ranges = []
    for c in range(count):
        one_hot = torch.zeros(count, dtype=torch.float64)
        one_hot[c] = 1.0
        ranges.append(float(scaled(weight, one_hot, layout, groups).abs().max()))
    return ranges


@settings(max_examples=60, deadline=None)
@given(
    layout=LAYOUTS,
    groups=st.integers(1, 3),
    per_in=st.integers(1, 3),
    per_out=st.integers(1, 3),
    seed=st.integers(0, 999),
)
def test_ranges_follow_the_channel_mapping_of_the_fold_arithmetic(layout, groups, per_in, per_out, seed):
    if layout == "linear":
        groups = 1
    g = torch.Generator().manual_seed(seed)
    w = _weight(layout, groups, per_in, per_out, g)
    outs = per_out * groups if layout != "linear" else per_out
    ins = per_in * groups
    assert output_channel_ranges(w, layout, groups).tolist() == _oracle(w, layout, groups, "output", outs)
    assert input_channel_ranges(w, layout, groups).tolist() == _oracle(w, layout, groups, "input", ins)


def test_a_linear_reading_a_flattened_map_gives_each_channel_its_block():
    w = torch.arange(12.0).reshape(2, 6)  # 3 channels of 2 features each
    assert input_channel_ranges(w, "linear", channels=3).tolist() == [7.0, 9.0, 11.0]
    assert input_channel_ranges(w, "linear", channels=3).tolist() == _oracle(w.double(), "linear", 1, "input", 3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.0, 4.0))
def test_a_scale_moved_across_a_relu_changes_nothing_and_equalizes_both_ranges(seed, spread):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)
    w1 = w1 * torch.logspace(-spread, spread, 6, dtype=torch.float64).view(-1, 1, 1, 1)
    b1 = torch.randn(6, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 6, 1, 1, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
    r1, r2 = output_channel_ranges(w1, "conv"), input_channel_ranges(w2, "conv")
    s = equalizing_scales(r1, r2)
    inverse = 1 / s
    w1e, b1e = scale_output_channels(w1, inverse, "conv"), b1 * inverse
    w2e = scale_input_channels(w2, s, "conv")
    expected = F.conv2d(F.relu(F.conv2d(x, w1, b1)), w2)
    actual = F.conv2d(F.relu(F.conv2d(x, w1e, b1e)), w2e)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    after1, after2 = output_channel_ranges(w1e, "conv"), input_channel_ranges(w2e, "conv")
    torch.testing.assert_close(after1, after2, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(after1, torch.sqrt(r1 * r2), rtol=1e-12, atol=0.0)


def test_a_channel_without_range_keeps_its_scale():
    s = equalizing_scales(torch.tensor([0.0, 2.0, math.inf]), torch.tensor([1.0, 0.0, 1.0]))
    assert s.tolist() == [1.0, 1.0, 1.0]


def test_spread_and_sqnr():
    assert range_spread(torch.tensor([0.0, 0.0])) == math.inf
    assert range_spread(torch.tensor([3.0, 3.0])) == 1.0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g)
    # a constant factor changes nothing; more bits, less noise; spread channels lose the small ones
    assert math.isclose(per_tensor_sqnr(w * 8.0), per_tensor_sqnr(w), rel_tol=1e-12)  # a power of two: exact
    assert per_tensor_sqnr(w, bits=4) < per_tensor_sqnr(w) < per_tensor_sqnr(w, bits=12)
    spread = w * torch.logspace(-3, 0, 16).view(-1, 1)
    assert per_tensor_sqnr(spread) < per_tensor_sqnr(w)
    assert per_tensor_sqnr(torch.zeros(3)) == math.inf
