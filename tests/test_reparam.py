"""Structural re-parameterization: parallel branches merged into one convolution, with no per-class code.

Each block is written the way its authors write it; the model runs in float64 so that every merge is
shown exact to 1e-12, and the convolutions and norms that actually run in one forward pass are counted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.reparam.recipes import Layer, Source, Sum, structure

from helpers import assert_same_state, randomize_norms, state_snapshot

torch.set_default_dtype(torch.float32)


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, padding_mode="zeros"):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False, padding_mode=padding_mode),
        nn.BatchNorm2d(cout),
    )


def running(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(convolutions, norms) that run in one forward pass."""
    counts = [0, 0]

    def hook(module, args, output):
        if isinstance(module, nn.modules.conv._ConvNd):
            counts[0] += 1
        if isinstance(module, nn.modules.batchnorm._NormBase):
            counts[1] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return counts[0], counts[1]


def merge(block: nn.Module, x: torch.Tensor, *, merged: int, runs: tuple[int, int]):
    """Wrap ``block`` in a model, merge in float64; assert the merges, what runs, and 1e-12 agreement."""
    model = randomize_norms(nn.Sequential(block)).double().eval()
    x = x.double()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, reparameterize=True)
    assert result.report.merged == merged, str(result.report.plan)
    assert running(result.model, x) == runs, str(result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-12, atol=1e-12)
    return result


X = torch.randn(2, 8, 9, 9)


# -- blocks as their authors write them -----------------------------------------------------------------
class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al.): bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x), then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1):
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, dilation, groups, dilation)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


@pytest.mark.parametrize(
    "cin, cout, stride, groups, dilation",
    [(8, 8, 1, 1, 1), (8, 16, 1, 1, 1), (8, 16, 2, 1, 1), (8, 8, 1, 4, 1), (8, 8, 1, 8, 1), (8, 8, 1, 1, 2)],
    ids=["identity", "no-identity", "stride-2", "groups", "depthwise", "dilation"],
)
def test_repvgg(cin, cout, stride, groups, dilation):
    result = merge(RepVGGBlock(cin, cout, stride, groups, dilation), X, merged=1, runs=(1, 0))
    conv = result.model[0].merged_conv
    assert conv.groups == groups and conv.stride == (stride, stride)  # a depthwise conv stays depthwise
    assert isinstance(result.model[0], bnfold.MergedConv) and isinstance(result.model[0].nonlinearity, nn.ReLU)


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al.): k over-parameterized kxk conv+BN branches, a 1x1 conv+BN scale branch and an
    identity BN, summed."""

    def __init__(self, c, k=3, branches=3, groups=1):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(c)
        self.rbr_conv = nn.ModuleList(conv_bn(c, c, k, 1, k // 2, groups) for _ in range(branches))
        self.rbr_scale = conv_bn(c, c, 1, 1, 0, groups)
        self.act = nn.ReLU()

    def forward(self, x):
        identity_out = self.rbr_skip(x)
        scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return self.act(out)


def test_mobileone_dense_and_depthwise():
    merge(MobileOneBlock(8), X, merged=1, runs=(1, 0))
    result = merge(MobileOneBlock(8, groups=8), X, merged=1, runs=(1, 0))
    assert result.model[0].merged_conv.groups == 8


class ACBlock(nn.Module):
    """ACNet (Ding et al.): 3x3 + 3x1 + 1x3, each with its BN."""

    def __init__(self, c, padding_mode="zeros"):
        super().__init__()
        self.square = conv_bn(c, c, 3, 1, 1, padding_mode=padding_mode)
        self.ver = conv_bn(c, c, (3, 1), 1, (1, 0), padding_mode=padding_mode)
        self.hor = conv_bn(c, c, (1, 3), 1, (0, 1), padding_mode=padding_mode)

    def forward(self, x):
        return self.square(x) + self.ver(x) + self.hor(x)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_acnet(padding_mode):
    result = merge(ACBlock(8, padding_mode), X, merged=1, runs=(1, 0))
    assert result.model[0].merged_conv.padding_mode == padding_mode


class DiverseBranchBlock(nn.Module):
    """DBB (Ding et al.): kxk, 1x1, 1x1 -> kxk and 1x1 -> average pool branches."""

    def __init__(self, c, k=3):
        super().__init__()
        self.dbb_origin = conv_bn(c, c, k, 1, k // 2)
        self.dbb_1x1 = conv_bn(c, c, 1)
        # 1x1 without bias, then a zero-padded kxk: exact (no bias reaches the padded zeros)
        self.dbb_1x1_kxk = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), conv_bn(c, c, k, 1, k // 2))
        self.dbb_avg = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(k, 1, k // 2, count_include_pad=True), nn.BatchNorm2d(c)
        )

    def forward(self, inputs):
        return self.dbb_origin(inputs) + self.dbb_1x1(inputs) + self.dbb_1x1_kxk(inputs) + self.dbb_avg(inputs)


def test_diverse_branch_block():
    merge(DiverseBranchBlock(8), X, merged=1, runs=(1, 0))


class RepViTMixer(nn.Module):
    """RepViT's RepVGGDW: bn(dw3x3_bn(x) + dw1x1(x) + x)."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c, 3, 1, 1, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


def test_repvit_mixer():
    result = merge(RepViTMixer(8), X, merged=1, runs=(1, 0))
    assert result.model[0].merged_conv.groups == 8


class RepMixer(nn.Module):
    """FastViT's RepMixer: x + gamma * (mixer(x) - norm(x)), the mixer a depthwise conv+BN with an identity
    BN, the norm an identity BN."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.mixer_conv = conv_bn(c, c, 3, 1, 1, groups=c)
        self.mixer_skip = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer_conv(x) + self.mixer_skip(x) - self.norm(x))


def test_fastvit_repmixer():
    merge(RepMixer(8), X, merged=1, runs=(1, 0))


class PPYoloERepConv(nn.Module):
    """PP-YOLOE's RepVggBlock with a learnable alpha: act(conv3_bn(x) + alpha * conv1_bn(x))."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = conv_bn(c, c, 3, 1, 1)
        self.conv2 = conv_bn(c, c, 1)
        self.alpha = nn.Parameter(torch.tensor(0.7))
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv1(x) + self.alpha * self.conv2(x))


def test_ppyoloe_alpha():
    merge(PPYoloERepConv(8), X, merged=1, runs=(1, 0))


class YoloRepConv(nn.Module):
    """YOLOv6/v7 RepConv with groups: act(bn(conv3x3) + bn(conv1x1) + bn(x)) (YOLOv7's own fuse builds
    the identity kernel with fill_diagonal_, which is wrong for groups > 1)."""

    def __init__(self, c, groups):
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(c)
        self.rbr_dense = conv_bn(c, c, 3, 1, 1, groups)
        self.rbr_1x1 = conv_bn(c, c, 1, 1, 0, groups)
        self.act = nn.SiLU()

    def forward(self, inputs):
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + self.rbr_identity(inputs))


def test_yolo_repconv_with_groups():
    merge(YoloRepConv(8, 2), X, merged=1, runs=(1, 0))


class UltralyticsConv2(nn.Module):
    """ultralytics Conv2: act(bn(conv3x3(x) + conv1x1(x)))."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
        self.cv2 = nn.Conv2d(c1, c2, 1, 1, 0, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x) + self.cv2(x)))


def test_ultralytics_conv2():
    merge(UltralyticsConv2(8, 16), X, merged=1, runs=(1, 0))


def test_conv1d_and_conv3d_branches():
    class Block1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv1d(4, 4, 5, padding=2), nn.BatchNorm1d(4))
            self.b = nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4))

        def forward(self, x):
            return self.a(x) - self.b(x)

    merge(Block1d(), torch.randn(2, 4, 11), merged=1, runs=(1, 0))

    class Block3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4))
            self.b = nn.BatchNorm3d(4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    merge(Block3d(), torch.randn(2, 4, 5, 5, 5), merged=1, runs=(1, 0))


# -- what must not merge --------------------------------------------------------------------------------
def kept(block: nn.Module, x: torch.Tensor = X, *, reason: str):
    model = randomize_norms(nn.Sequential(block)).double().eval()
    x = x.double()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, reparameterize=True)
    assert result.report.merged == 0, str(result.report.plan)
    reasons = " | ".join(k.reason for k in result.report.plan.kept)
    assert reason in reasons, reasons
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-10, atol=1e-10)
    return result


def test_branch_read_elsewhere_is_not_merged():
    class Leak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            a = self.a(x)
            return a + self.b(x), a.mean()

    result = kept(Leak(), reason="")
    assert result.report.folded == 2  # each norm still folds into its own conv


def test_different_strides_are_not_merged():
    class Strides(nn.Module):  # 9x9 -> 5x5 both ways: a 3x3 with stride 2, a 5x5 with stride 1
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 2, 1), conv_bn(8, 8, 5)

        def forward(self, x):
            return self.a(x) + self.b(x)

    kept(Strides(), reason="different strides")


def test_activation_on_a_branch_is_not_merged():
    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return torch.relu(self.a(x)) + self.b(x)

    result = bnfold.fold_with_report(randomize_norms(nn.Sequential(Act())).eval(), X, reparameterize=True)
    assert result.report.merged == 0 and result.report.folded == 2  # the norms still fold into their convs


def test_mixed_padding_modes_are_not_merged():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(8, 8, 3, 1, 1, padding_mode="reflect")
            self.b = conv_bn(8, 8, (3, 1), 1, (1, 0))

        def forward(self, x):
            return self.a(x) + self.b(x)

    kept(Mixed(), reason="pad in different ways")


def test_average_pool_that_does_not_count_padding_is_not_merged():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(8, 8, 3, 1, 1)
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

        def forward(self, x):
            return self.a(x) + self.pool(x)

    result = bnfold.fold_with_report(randomize_norms(nn.Sequential(Pool())).eval(), X, reparameterize=True)
    assert result.report.merged == 0


def test_biased_1x1_before_zero_padded_kxk_is_not_merged():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(8, 8, 3, 1, 1)
            self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=True), conv_bn(8, 8, 3, 1, 1))

        def forward(self, x):
            return self.a(x) + self.b(x)

    kept(Biased(), reason="padded zeros would not carry the bias")


def test_block_that_does_more_than_the_branches_is_kept_with_the_reason():
    class More(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            y = self.a(x) + self.b(x)
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True))

    kept(More(), reason="also computes")


# -- partial merges: the branches that merge do, the others keep running -------------------------------
def partial(block: nn.Module, x: torch.Tensor = X, *, runs: tuple[int, int], kept: list[str]):
    """Merge ``block`` in float64 where only some branches merge: one merge, ``runs`` convolutions and norms
    running, one kept-branch row per reason in ``kept`` (in order), 1e-12 agreement, and the kept modules'
    state_dict keys where they were."""
    result = merge(block, x, merged=1, runs=runs)
    rows = [k for k in result.report.plan.kept if k.norm_type == "branch"]
    assert len(rows) == len(kept), str(result.report.plan)
    for row, reason in zip(rows, kept, strict=True):
        assert reason in row.reason and row.reason.startswith("runs beside the merged convolution of '0'"), row.reason
    (site,) = [s for s in result.report.plan.sites if s.kind == "merge"]
    count = len(kept)
    assert site.payload.result.endswith(f" + {count} kept branch{'es' if count > 1 else ''}"), site.payload.result
    merged = result.model[0]
    assert isinstance(merged, bnfold.MergedConv) and len(merged.kept_branches) == count
    plain = bnfold.fold(nn.Sequential(block).double().eval(), x.double()).state_dict()  # no merge: folds only
    for path, _ in merged.held:  # what a kept branch reads keeps its keys
        prefix = f"0.{path}"
        keys = {k for k in result.model.state_dict() if k == prefix or k.startswith(prefix + ".")}
        assert keys == {k for k in plain if k == prefix or k.startswith(prefix + ".")}, path
    return result


class RepVGGWithActivatedBranch(nn.Module):
    """RepVGG's three branches and a fourth with an activation on it: relu(bn(conv1x1(x)))."""

    def __init__(self, c=8):
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(c)
        self.rbr_dense = conv_bn(c, c, 3, 1, 1)
        self.rbr_1x1 = conv_bn(c, c, 1)
        self.rbr_act = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x) + self.rbr_act(x))


def test_partial_merge_keeps_a_branch_with_an_activation():
    # the 3x3, 1x1 and identity branches become one conv; the activated branch runs beside it (its norm folds)
    result = partial(RepVGGWithActivatedBranch(), runs=(2, 0), kept=["'0.rbr_act' (Sequential) is not linear"])
    (site,) = [s for s in result.report.plan.sites if s.kind == "merge"]
    assert "0.rbr_identity" in site.partners and not any(p.startswith("0.rbr_act") for p in site.partners)
    assert site.payload.result == "Conv2d(8 -> 8, 3x3) + 1 kept branch"
    text = str(result.report.plan)
    assert "=> Conv2d(8 -> 8, 3x3) + 1 kept branch" in text and "0.rbr_act (branch)" in text
    merged = result.model[0]
    assert isinstance(merged.rbr_act, nn.Sequential) and merged.post_names == ("nonlinearity",)
    assert "kept branches: 1" in repr(merged)
    (entry,) = result.report.to_dict()["merges"]
    assert entry["kept_branches"] == [{"modules": ["0.rbr_act"], "reason": "'0.rbr_act' (Sequential) is not linear"}]


def test_partial_merge_keeps_a_branch_with_another_stride():
    class Strided(nn.Module):  # 9x9 -> 5x5: RepVGG's stride-2 3x3 and 1x1, and a stride-1 5x5 without padding
        def __init__(self):
            super().__init__()
            self.dense, self.point, self.wide = conv_bn(8, 8, 3, 2, 1), conv_bn(8, 8, 1, 2), conv_bn(8, 8, 5)

        def forward(self, x):
            return self.wide(x) + self.dense(x) + self.point(x)

    result = partial(Strided(), runs=(2, 0), kept=["different strides"])
    assert result.model[0].merged_conv.stride == (2, 2) and result.model[0].wide[0].stride == (1, 1)


def test_partial_merge_keeps_an_average_pool_that_does_not_count_padding():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

        def forward(self, x):
            return self.a(x) + self.pool(x) + self.b(x)

    partial(Pool(), runs=(1, 0), kept=["count_include_pad=False"])


def test_partial_merge_keeps_a_norm_in_training_mode():
    block = RepVGGBlock(8, 8)
    model = randomize_norms(nn.Sequential(block)).double().eval()
    block.rbr_identity.train()  # it normalizes with the statistics of each batch: no affine map to merge
    x = X.double()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, reparameterize=True)
    assert result.report.merged == 1 and result.model[0].rbr_identity.training
    assert running(result.model, x) == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-12, atol=1e-12)


def test_partial_merge_keeps_a_conv_shared_with_code_outside_the_block():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepVGGBlock(8, 8)

        def forward(self, x):
            return self.block(x) + self.block.rbr_dense[0](x)

    model = randomize_norms(Outer()).double().eval()
    x = X.double()
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, reparameterize=True)
    assert result.report.merged == 1  # the 1x1 and identity branches; the 3x3 one is kept
    assert any("called 2 times" in k.reason for k in result.report.plan.kept), str(result.report.plan)
    assert isinstance(result.model.block.rbr_dense, nn.Sequential)  # still what the outer code indexes
    assert running(result.model, x) == (3, 1)  # merged 1x1, the kept 3x3 twice; its norm cannot fold
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-12, atol=1e-12)


class Coefficients(nn.Module):
    """A learned coefficient on a kept branch, a number on another, a subtraction."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)
        self.gated = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.alpha = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.a(x) + self.alpha * self.gated(x) + self.b(x) - 0.5 * self.pool(x))


def test_partial_merge_keeps_the_coefficients_of_kept_branches():
    result = partial(Coefficients(), runs=(2, 0), kept=["(Sequential) is not linear", "count_include_pad=False"])
    merged = result.model[0]
    assert [sign for sign, _ in merged.kept_branches] == [1.0, -1.0]
    assert merged.alpha is not None and dict(merged.held)["alpha"] == "parameter"


def test_partial_merge_under_a_norm_after_the_sum_keeps_the_norm():
    class PostNorm(nn.Module):  # the norm after the sum cannot merge when a branch stays: it applies to both
        def __init__(self):
            super().__init__()
            self.dense, self.point, self.wide = conv_bn(8, 8, 3, 2, 1), conv_bn(8, 8, 1, 2), conv_bn(8, 8, 5)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.dense(x) + self.point(x) + self.wide(x))

    result = partial(PostNorm(), runs=(2, 1), kept=["different strides"])
    assert result.model[0].post_names == ("bn",)


def test_a_branch_computed_by_code_in_forward_keeps_the_whole_sum_with_the_reason():
    class Code(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x) + torch.relu(self.c(x))

    result = kept(Code(), reason="in code, not in a module that can run on its own")
    assert result.report.folded == 3  # each norm still folds into its own conv


class GhostBottleneck(nn.Module):
    """RepGhost's bottleneck: a module whose own sum merges, then the block's input added to its output (a
    residual connection, not a branch of what the module reads)."""

    class Ghost(nn.Module):
        def __init__(self):
            super().__init__()
            self.cheap, self.fusion_bn, self.relu = conv_bn(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.Identity()

        def forward(self, x):
            return self.relu(self.cheap(x) + self.fusion_bn(x))

    def __init__(self):
        super().__init__()
        self.ghost1 = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.ghost2 = self.Ghost()

    def forward(self, x):
        shortcut = x
        x = self.ghost2(self.ghost1(x))
        x += shortcut
        return x


def test_a_residual_added_to_merged_branches_is_not_a_branch():
    result = merge(GhostBottleneck(), X, merged=1, runs=(2, 0))
    assert isinstance(result.model[0].ghost2, bnfold.MergedConv) and not result.model[0].ghost2.kept_branches
    assert not result.report.plan.kept, str(result.report.plan)


def test_a_sum_inside_a_module_merges_alone_when_a_branch_beside_it_is_code():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.c = Inner(), conv_bn(8, 8, 1)

        def forward(self, x):
            return self.inner(x) + torch.relu(self.c(x))

    result = merge(Outer(), X, merged=1, runs=(2, 0))
    assert isinstance(result.model[0].inner, bnfold.MergedConv) and not result.report.plan.kept


def test_a_branch_read_elsewhere_keeps_the_whole_sum_with_the_reason():
    class Leak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            c = self.c(x)
            return self.a(x) + self.b(x) + c, c.mean()

    kept(Leak(), reason="a branch's value is also read elsewhere")


def test_no_partial_merge_when_nothing_is_saved():
    class Residual(nn.Module):  # x + conv(x) + relu(...): merging x into the conv runs no fewer modules
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())

        def forward(self, x):
            return x + self.a(x) + self.b(x)

    result = bnfold.fold_with_report(randomize_norms(nn.Sequential(Residual())).eval(), X, reparameterize=True)
    assert result.report.merged == 0 and result.report.folded == 1


class OwnChildren(nn.Module):
    """A kept branch whose modules are the block's own children (its norm folds into its conv there)."""

    def __init__(self):
        super().__init__()
        self.dense, self.point = conv_bn(8, 8, 3, 2, 1), conv_bn(8, 8, 1, 2)
        self.wide, self.wide_bn = nn.Conv2d(8, 8, 5, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.dense(x) + self.point(x) + self.wide_bn(self.wide(x))


def test_partial_merge_keeps_the_blocks_own_children_and_folds_their_norms():
    result = partial(OwnChildren(), runs=(2, 0), kept=["different strides"])
    assert isinstance(result.model[0].wide_bn, nn.Identity)  # folded into 'wide', where the block runs it


class Nested(nn.Module):
    """A kept branch that holds a block of its own: act(RepVGG(x)); that block merges by itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.inner, self.act = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1), RepVGGBlock(8, 8), nn.SiLU()

    def forward(self, x):
        return self.a(x) + self.b(x) + self.act(self.inner(x))


def test_a_kept_branch_may_hold_a_merge_of_its_own():
    result = merge(Nested(), X, merged=2, runs=(2, 0))
    assert isinstance(result.model[0].inner, bnfold.MergedConv) and len(result.model[0].kept_branches) == 1


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_partial_merge_checkpoint_loads_in_one_call(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="a .safetensors checkpoint needs safetensors")

    def build():
        return nn.Sequential(RepVGGWithActivatedBranch(), Coefficients(), Nested(), OwnChildren()).eval()

    torch.manual_seed(0)
    model = randomize_norms(build())
    folded = bnfold.fold(model, X, reparameterize=True)
    path = tmp_path / f"deploy{suffix}"
    bnfold.save_folded(folded, path, original=model)
    fresh = bnfold.load_folded(build(), path)  # no example inputs, no tracing
    assert [type(m).__name__ for m in fresh] == ["MergedConv"] * 4
    assert isinstance(fresh[2].inner, bnfold.MergedConv) and isinstance(fresh[3].wide_bn, nn.Identity)
    assert fresh[1].kept_branches == folded[1].kept_branches and fresh[1].held == folded[1].held
    assert set(fresh.state_dict()) == set(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-4, atol=1e-5)


# -- the API --------------------------------------------------------------------------------------------
def test_hints_tell_blocks_built_alike_from_one_whose_branches_do_not_merge():
    """Hints are worked out once per structure of branches (module types and sizes, not weights): a block
    whose identity norm uses batch statistics gets no hint although it is otherwise alike."""
    model = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 8))
    model[2].rbr_identity = nn.BatchNorm2d(8, track_running_stats=False)
    model = randomize_norms(model).eval()
    plan = bnfold.plan(model, X)
    hinted = {k.norm for k in plan.kept if "reparameterize=True would merge it" in k.reason}
    assert hinted == {"0.rbr_identity", "1.rbr_identity", "3.rbr_identity"}
    assert "2.rbr_identity" in {k.norm for k in plan.kept}

    def branches(block: int) -> Sum:
        dense = Layer("norm", f"{block}.rbr_dense.1", Layer("conv", f"{block}.rbr_dense.0", Source()))
        return Sum(((1.0, dense), (1.0, Layer("norm", f"{block}.rbr_identity", Source()))))

    assert structure(branches(0), model) == structure(branches(1), model) != structure(branches(2), model)


def test_off_by_default_and_the_reason_says_what_it_would_do():
    model = randomize_norms(nn.Sequential(RepVGGBlock(8, 8))).eval()
    plan = bnfold.plan(model, X)
    assert not any(s.kind == "merge" for s in plan.sites)
    (identity,) = [k for k in plan.kept if k.norm == "0.rbr_identity"]
    assert "reparameterize=True would merge it" in identity.reason
    merged = bnfold.plan(model, X, reparameterize=True)
    (site,) = [s for s in merged.sites if s.kind == "merge"]
    assert site.norm == "0" and "0.rbr_identity" in site.partners and site.payload.result == "Conv2d(8 -> 8, 3x3)"
    assert "=> Conv2d(8 -> 8, 3x3)" in str(merged)
    # the fold's report says it too; fold() alone, whose kept rows nobody reads, skips that analysis
    report = bnfold.fold_with_report(model, X).report
    assert "reparameterize=True would merge it" in report.plan.kept[0].reason and report.plan.kept == plan.kept
    folded = bnfold.fold(model, X)
    assert_same_state(folded, state_snapshot(bnfold.fold_with_report(model, X).model))


def test_needs_example_inputs():
    with pytest.raises(ValueError, match="reparameterize=True needs example_inputs"):
        bnfold.fold(nn.Sequential(RepVGGBlock(8, 8)).eval(), reparameterize=True)


def test_same_structure_for_a_fresh_model_so_a_state_dict_loads():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2))).eval()
    folded = bnfold.fold(model, X, reparameterize=True)
    fresh = bnfold.fold(nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2)).eval(), X, reparameterize=True)
    fresh.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-4, atol=1e-5)


def test_in_place_and_twice():
    model = randomize_norms(nn.Sequential(RepVGGBlock(8, 8))).eval()
    with torch.no_grad():
        expected = model(X)
    same = bnfold.fold(model, X, inplace=True, reparameterize=True)
    assert same is model and isinstance(model[0], bnfold.MergedConv)
    again = bnfold.fold_with_report(model, X, reparameterize=True)
    assert again.report.merged == 0 and again.report.folded == 0
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=1e-4, atol=1e-5)


def test_layer_check_covers_merges():
    model = randomize_norms(nn.Sequential(RepVGGBlock(8, 8), MobileOneBlock(8))).eval()
    result = bnfold.fold_with_report(model, X, reparameterize=True, verify="layers")
    assert result.report.checked == "layers" and result.report.merged == 2


# -- real architectures ---------------------------------------------------------------------------------
TIMM_REPARAM = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1", "repghostnet_050"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_REPARAM)
def test_timm_no_more_convs_and_norms_run_than_after_its_own_reparameterize(name):
    import copy

    timm = pytest.importorskip("timm", reason="the models and their own reparameterize are timm's")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    timms = running(reparameterize_model(copy.deepcopy(model)), x)
    with torch.no_grad():
        expected = model(x)
    result = bnfold.fold_with_report(model, x, reparameterize=True)  # never calls reparameterize_model
    ours = running(result.model, x)
    assert ours[0] <= timms[0] and ours[1] <= timms[1], (ours, timms)
    assert result.report.merged > 0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_report_lists_each_merge_with_its_largest_weights():
    model = randomize_norms(nn.Sequential(RepVGGBlock(8, 8), MobileOneBlock(8))).eval()
    report = bnfold.fold_with_report(model, X, reparameterize=True).report
    data = report.to_dict()
    assert data["merged"] == 2 and [m["block"] for m in data["merges"]] == ["0", "1"]
    first = data["merges"][0]
    assert first["result"] == "Conv2d(8 -> 8, 3x3)" and "0.rbr_identity" in first["branches"]
    branches = max(
        float(model[0].rbr_dense[0].weight.detach().abs().max()), float(model[0].rbr_1x1[0].weight.detach().abs().max())
    )
    assert first["largest_weight_before"] == pytest.approx(branches)
    assert first["largest_weight_after"] > 0
    text = str(report)
    assert "2 blocks of parallel branches merged" in text and "largest |weight|" in text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_merged_checkpoint_loads_in_one_call(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="a .safetensors checkpoint needs safetensors")

    def build():
        return nn.Sequential(RepVGGBlock(8, 8), MobileOneBlock(8), RepGhostLike(8)).eval()

    torch.manual_seed(0)
    model = randomize_norms(build())
    folded = bnfold.fold(model, X, reparameterize=True)
    path = tmp_path / f"deploy{suffix}"
    bnfold.save_folded(folded, path, original=model)
    fresh = bnfold.load_folded(build(), path)  # no example inputs, no tracing
    assert [type(m).__name__ for m in fresh] == ["MergedConv"] * 3
    assert isinstance(fresh[2].primary, nn.Sequential)  # the modules before the branches, by their names
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-4, atol=1e-5)


class RepGhostLike(nn.Module):
    """RepGhost's module: a primary conv, then a depthwise conv+BN summed with a BN of the same tensor."""

    def __init__(self, c):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.cheap = conv_bn(c, c, 3, 1, 1, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        x1 = self.primary(x)
        return self.relu(self.cheap(x1) + self.fusion_bn(x1))


def test_modules_before_the_branches_stay_in_front_of_the_merged_conv():
    result = merge(RepGhostLike(8), X, merged=1, runs=(2, 0))  # the primary conv's norm folds into it
    assert result.model[0].pre_names == ("primary",) and result.model[0].post_names == ("relu",)


class Sequence(nn.Module):
    """Two convolutions with only a norm between them (a linear bottleneck)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.bn1, self.second, self.bn2 = (
            first,
            nn.BatchNorm2d(first.out_channels),
            second,
            nn.BatchNorm2d(second.out_channels),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.second(self.bn1(self.first(x)))))


def test_standalone_sequence_merges_when_one_conv_costs_no_more():
    # 3x3 (8 -> 16) then 1x1 (16 -> 4): one 3x3 (8 -> 4) costs 288 multiply-adds per position, the two 1216
    result = merge(Sequence(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)), X, merged=1, runs=(1, 0))
    assert result.model[0].merged_conv.kernel_size == (3, 3) and result.model[0].merged_conv.out_channels == 4


def test_standalone_bottleneck_stays_when_it_is_cheaper():
    # 1x1 (8 -> 2) then 3x3 (2 -> 8): one 3x3 (8 -> 8) would cost 576 per position, the two 160
    model = randomize_norms(nn.Sequential(Sequence(nn.Conv2d(8, 2, 1, bias=False), nn.Conv2d(2, 8, 3)))).eval()
    result = bnfold.fold_with_report(model, X, reparameterize=True)
    assert result.report.merged == 0 and not result.report.plan.kept  # nothing to report: it stays as it is
    assert running(result.model, X) == (2, 0)  # the norms still fold into the convolutions


def test_channels_last_scale_on_a_branch_is_not_a_channel_map():
    pytest.importorskip("timm", reason="the scale is timm's LayerScale")
    from timm.layers import LayerScale

    class LastAxis(nn.Module):  # LayerScale(9) scales the last axis (width 9), not the 8 channels
        def __init__(self):
            super().__init__()
            self.a, self.b, self.ls = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1), LayerScale(9, init_values=0.5)

        def forward(self, x):
            return self.a(x) + self.ls(self.b(x))

    result = bnfold.fold_with_report(randomize_norms(nn.Sequential(LastAxis())).eval(), X, reparameterize=True)
    assert result.report.merged == 0


def test_a_layer_scale_on_the_last_axis_is_not_a_channel_scale_to_merge():
    """Found by bench/fuzz.py (seeds 258, 559, 1519, ...): timm's LayerScale(dim) on an (N, C, H, W) value scales
    its last axis (W), so no convolution computes it; bnfold used to take it for a per-channel scale and crash."""
    pytest.importorskip("timm", reason="the scale is timm's LayerScale")
    from timm.layers import LayerScale

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.scale, self.conv2 = nn.Conv2d(5, 4, 1), LayerScale(6, 0.5), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            y = self.conv1(x)
            return self.conv2(y + self.scale(y))  # W = 6 here, C = 4

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 7, 6)
    folded = bnfold.fold(model, x, reparameterize=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


# -- ops on a branch that hand on their input unchanged ----------------------------------------------------
class RepVGGWithIdentity(nn.Module):
    """RepVGG whose identity branch is an ``nn.Identity()`` (and a Dropout, the identity in eval mode, after
    its 1x1 branch): the walk goes through both, so the three branches still merge into one convolution."""

    def __init__(self):
        super().__init__()
        self.rbr_identity = nn.Identity()
        self.rbr_dense = conv_bn(8, 8, 3, 1, 1)
        self.rbr_1x1 = nn.Sequential(conv_bn(8, 8, 1), nn.Dropout(0.2))
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


def test_an_identity_on_a_branch_merges():
    result = merge(RepVGGWithIdentity(), X, merged=1, runs=(1, 0))
    assert isinstance(result.model[0], bnfold.MergedConv)


def test_a_copy_on_a_branch_merges_and_a_hooked_identity_keeps_running():
    class Copied(nn.Module):  # clone() hands on a new tensor with the same values: the walk goes through it
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x.clone()).clone()

    merge(Copied(), X, merged=1, runs=(1, 0))
    block = RepVGGWithIdentity()
    block.rbr_identity.register_forward_hook(lambda module, args, output: output * 2)  # no longer the identity
    partial(block, runs=(1, 0), kept=["'0.rbr_identity' (Identity) is not linear"])


def test_a_reshape_on_a_branch_stops_it_with_the_reason():
    class Reshaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 3, 1, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x).flatten(2).view(x.shape)

    result = kept(Reshaped(), reason="")
    assert result.report.folded == 2  # each norm still folds into its own conv
