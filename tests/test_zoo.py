"""Real architectures from torchvision, timm and Hugging Face transformers (random weights, randomized norm statistics): outputs match
and the exact numbers of folded and kept norm layers are asserted."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import bnfold

from helpers import check_fold, max_rel_diff, randomize_norms

timm = pytest.importorskip("timm", reason="the zoo holds timm models")
torchvision = pytest.importorskip("torchvision", reason="the zoo holds torchvision models")

# name: (folded, kept, input size). Kept norms, where any, are explained in the comment.
TORCHVISION = {
    "resnet18": (20, 0, 64),
    "resnet50": (53, 0, 64),
    "mobilenet_v2": (52, 0, 64),
    "mobilenet_v3_small": (34, 0, 64),
    "efficientnet_b0": (49, 0, 64),
    "regnet_x_400mf": (71, 0, 64),
    # norm1 of each dense layer and the transition/final norms read a torch.cat of several layers
    "densenet121": (59, 62, 64),
    # the auxiliary heads are not run in eval mode
    "googlenet": (57, 2, 64),
    "inception_v3": (94, 2, 75),
    "shufflenet_v2_x0_5": (56, 0, 64),
    "vgg11_bn": (8, 0, 32),
    # the 18 layer scales (layer_scale * block(x)) fold into each block's last Linear; the LayerNorms stay
    "convnext_tiny": (18, 23, 32),
    # Conv3DSimple / Conv3DNoTemporal are Conv3d subclasses that only change __init__
    "r3d_18": (20, 0, 32),
}

TIMM = {
    "efficientnet_b0": (49, 0, 64),  # BatchNormAct2d throughout
    "tf_efficientnet_b0": (49, 0, 64),  # Conv2dSame ('same' padding computed at run time); not fx-traceable
    "mobilenetv3_small_050": (34, 0, 64),
    "resnet18": (20, 0, 64),
    "cspresnet50": (55, 0, 64),
    "regnetx_002": (44, 0, 64),
    "rexnet_100": (62, 0, 64),
    "dla34": (37, 0, 64),
    "ghostnet_050": (80, 0, 64),
    # the identity-branch BatchNorm of each RepVGG block reads the previous block's ReLU output
    "repvgg_a0": (44, 17, 64),
    # mixed depthwise convs are split and concatenated before their norm: each takes its slice
    "mixnet_s": (49, 0, 64),
    # the 12 layer scales (x.mul(gamma)) fold into each block's fc2; the 17 LayerNorms stay
    "convnext_atto": (12, 17, 64),
    # the final norm reads a residual sum: it folds forward through the spatial mean into both timm Linear heads;
    # the 24 layer scales (SwiftFormer's own LayerScale2d module, x * self.gamma) fold into the conv or Linear
    # before each
    "swiftformer_xs": (50, 0, 64),
}


def _torchvision(name: str) -> nn.Module:
    extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra)


def _fold_zoo_model(library: str, name: str) -> tuple[nn.Module, bnfold.FoldResult]:
    """Build one model of the zoo, fold it, and check its counts and outputs (the original stays as it was)."""
    folded, kept, size = (TORCHVISION if library == "torchvision" else TIMM)[name]
    torch.manual_seed(0)
    if library == "torchvision":
        model = _torchvision(name).eval()
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    shape = (2, 3, 4, size, size) if name == "r3d_18" else (2, 3, size, size)
    return model, check_fold(model, torch.randn(*shape), folded=folded, kept=kept)


# The folds that the tests after the sweep read more of: made once (the others are not kept, to spare memory).
READ_AGAIN = {("torchvision", "googlenet"), ("timm", "efficientnet_b0"), ("timm", "swiftformer_xs")}
_fold_read_again = functools.cache(_fold_zoo_model)


def _zoo_fold(library: str, name: str) -> tuple[nn.Module, bnfold.FoldResult]:
    return (_fold_read_again if (library, name) in READ_AGAIN else _fold_zoo_model)(library, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision(name):
    _zoo_fold("torchvision", name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm(name):
    _zoo_fold("timm", name)


def test_norm_act_without_activation_folds_forward():
    """coatnet's pre_norm is a BatchNormAct2d whose act and drop are Identity: a plain norm, so it folds
    forward into the next 1x1 conv (the 15 LayerNorm2d stay)."""
    torch.manual_seed(0)
    model = timm.create_model("coatnet_pico_rw_224", pretrained=False, num_classes=10).eval()
    result = check_fold(model, torch.randn(1, 3, 224, 224), folded=16, kept=15)
    forward = [s for s in result.report.plan.sites if s.kind == "forward"]
    assert [s.norm.rpartition(".")[2] for s in forward] == ["pre_norm"] * 5
    assert all(s.partners[0].endswith("conv1_1x1") for s in forward)


def test_norms_of_auxiliary_heads_are_kept_and_say_why():
    _, result = _zoo_fold("torchvision", "googlenet")  # aux1 and aux2 run only in training mode
    plan = result.report.plan
    kept = {k.norm: k.reason for k in plan.kept}
    assert set(kept) == {"aux1.conv.bn", "aux2.conv.bn"}
    assert all(r.startswith("it does not run on the example inputs") for r in kept.values())


def test_timm_zoo_covers_batchnormact2d():
    from timm.layers import BatchNormAct2d

    model, result = _zoo_fold("timm", "efficientnet_b0")
    norm_acts = [m for m in model.modules() if type(m) is BatchNormAct2d]
    assert len(norm_acts) == 49
    folded = result.model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, bnfold.rules.norms.FoldedNormAct) for m in folded.modules()) == 49


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_symbolic_tracing_matches_execution_tracing(name):
    model = _torchvision(name).eval()
    with_inputs = bnfold.plan(model, torch.randn(1, 3, 64, 64))
    without = bnfold.plan(model)
    assert without.traced_with == "torch.fx"
    assert [(s.norm, s.partner) for s in without.sites] == [(s.norm, s.partner) for s in with_inputs.sites]


def test_timm_vision_transformer_layer_scales_fold():
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=10, init_values=1e-5, img_size=32, patch_size=8
    ).eval()
    # 12 blocks x (ls1 into attn.proj, ls2 into mlp.fc2); 25 LayerNorms stay
    result = check_fold(model, torch.randn(2, 3, 32, 32), folded=24, kept=25)
    assert {s.norm_type for s in result.report.plan.sites} == {"LayerScale"}
    assert all(isinstance(m, nn.Identity) for n, m in result.model.named_modules() if n.endswith((".ls1", ".ls2")))


def _hf(name: str) -> nn.Module:
    hf = pytest.importorskip("transformers", reason="the models are Hugging Face transformers'")

    small = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1], "num_labels": 10}
    if name == "resnet":
        return hf.ResNetForImageClassification(hf.ResNetConfig(embedding_size=16, **small))
    if name == "convnext":
        return hf.ConvNextForImageClassification(hf.ConvNextConfig(layer_scale_init_value=0.3, **small))
    if name == "regnet":
        return hf.RegNetForImageClassification(hf.RegNetConfig(groups_width=8, **{**small, "depths": [1, 1, 1, 1]}))
    if name == "mobilenet_v2":
        return hf.MobileNetV2ForImageClassification(hf.MobileNetV2Config(depth_multiplier=0.35, num_labels=10))
    config = hf.LevitConfig(
        hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10
    )
    return hf.LevitForImageClassification(config)


# Hugging Face transformers vision models (small configurations, random weights); their outputs are
# ModelOutput objects, which are compared field by field.
TRANSFORMERS = {
    "resnet": (19, 0, 64),
    # the 5 layer scales (layer_scale_parameter * x) fold into each block's pwconv2; the LayerNorms stay
    "convnext": (5, 10, 64),
    "regnet": (17, 0, 64),
    "mobilenet_v2": (52, 0, 64),
    # Linear + BatchNorm1d over flatten(0, 1) of the tokens, reshaped back
    "levit": (27, 0, 224),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers(name):
    folded, kept, size = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = _hf(name).eval()
    result = check_fold(model, torch.randn(2, 3, size, size), folded=folded, kept=kept)
    assert result.report.worst_output.startswith("output['logits']")


def test_swiftformer_final_norm_folds_forward_into_both_heads():
    plan = _zoo_fold("timm", "swiftformer_xs")[1].report.plan
    final = next(s for s in plan.sites if s.norm == "norm")
    assert (final.direction, final.partners) == ("forward", ("head", "head_dist"))


# In float64 a correct fold differs from the original by rounding only (~1e-15): any wrong scale, shift or
# pairing, however small its effect, stands far above that.
# LeViT's attention is built for one input size: 112 x 112 (a quarter of the work of 224) where the size is not
# what a test is about
LEVIT_112 = {"img_size": 112}
FLOAT64 = [
    ("torchvision", "resnet18", 64),
    ("torchvision", "r3d_18", 32),
    ("timm", "mixnet_s", 64),
    ("timm", "levit_128s", 112),
    ("timm", "efficientformer_l1", 224),
    ("timm", "swiftformer_xs", 64),
    ("timm", "convnext_atto", 64),
]


@pytest.mark.slow
@pytest.mark.parametrize(("library", "name", "size"), FLOAT64, ids=[f"{lib}-{n}" for lib, n, _ in FLOAT64])
def test_float64_folds_are_exact_to_rounding(library, name, size):
    torch.manual_seed(0)
    if library == "torchvision":
        model = _torchvision(name)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10, **(LEVIT_112 if name == "levit_128s" else {}))
    model = randomize_norms(model.eval()).double()
    shape = (2, 3, 4, size, size) if name == "r3d_18" else (2, 3, size, size)
    x = torch.randn(*shape, dtype=torch.float64)
    result = bnfold.fold_with_report(model, x)
    assert result.report.folded > 0
    with torch.no_grad():
        expected, actual = model(x), result.model(x)
    assert max_rel_diff(expected, actual) < 1e-12


class _WeightKinds(nn.Module):
    """Layers whose weights a fold writes in every way: a plain weight taking one fold, two norms into one
    conv, a channels-last weight, a pruned weight, a parametrized weight, a concat and a forward fold."""

    def __init__(self) -> None:
        super().__init__()
        self.plain, self.bn_plain = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.twice, self.bn_a, self.bn_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.last, self.bn_last = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.last.weight.data = self.last.weight.data.to(memory_format=torch.channels_last)
        self.pruned, self.bn_pruned = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        torch.nn.utils.prune.l1_unstructured(self.pruned, "weight", amount=0.3)
        self.param, self.bn_param = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        torch.nn.utils.parametrizations.weight_norm(self.param)
        self.left, self.right, self.bn_cat = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(8)
        self.bn_fwd, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.bn_plain(self.plain(x))
        x = self.bn_b(self.bn_a(self.twice(x)))
        x = self.bn_last(self.last(x))
        x = self.bn_pruned(self.pruned(x))
        x = self.bn_param(self.param(x))
        x = self.bn_cat(torch.cat([self.left(x), self.right(x)], 1))
        return self.head(self.bn_fwd(x.relu()))


class _NormActOnATranspose(nn.Module):
    """A timm norm+activation whose replacement keeps its activation and gives a contiguous output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU)

    def forward(self, x):
        return self.bn(self.conv(x).transpose(2, 3)).view(x.shape[0], -1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, size",
    [
        pytest.param(lambda: _torchvision("resnet18"), 32, id="tv-resnet18"),
        pytest.param(lambda: _torchvision("mobilenet_v3_small"), 32, id="tv-mobilenet_v3_small"),
        pytest.param(lambda: timm.create_model("levit_128s", num_classes=10, **LEVIT_112), 112, id="timm-levit_128s"),
        pytest.param(lambda: timm.create_model("efficientnet_b0", num_classes=10), 32, id="timm-efficientnet_b0"),
        pytest.param(_WeightKinds, 32, id="weight-kinds"),
        pytest.param(_NormActOnATranspose, 9, id="norm-act-on-a-transpose"),
    ],
)
def test_folded_copy_is_copying_then_folding_bit_for_bit(build, size):
    """A folded copy does not copy what folding throws away: it puts each folded norm's replacement in its
    place as it copies. The result must be exactly what copying, then folding, gives."""
    from bnfold.apply.surgery import _replacements, apply_plan, clone_model, folded_copy
    from bnfold.discover.tracing import trace_execution
    from bnfold.kinds import build_kinds
    from bnfold.planning.planner import make_plan
    from bnfold.rules.table import build_rules

    torch.manual_seed(0)
    model = build().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, size, size)
    rules = build_rules(None)
    recorded = rules.layer_types() | rules.norm_types()
    plan = make_plan(model, trace_execution(model, (x,), recorded, recorded), rules, build_kinds())
    assert plan.sites and not plan.kept, str(plan)
    replaced = _replacements(model, plan, rules, {})
    assert set(replaced) == {s.norm for s in plan.sites if plan.kind(s).residue == "rule"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = clone_model(model)
    apply_plan(expected, plan, rules, undoable=False)
    actual = folded_copy(model, plan, rules)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    structure = [(name, type(m), m.training) for name, m in expected.named_modules(remove_duplicate=False)]
    assert structure == [(name, type(m), m.training) for name, m in actual.named_modules(remove_duplicate=False)]
    want, got = expected.state_dict(keep_vars=True), actual.state_dict(keep_vars=True)
    assert list(want) == list(got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
        assert value.stride() == got[key].stride(), key
        assert type(value) is type(got[key]) and value.requires_grad == got[key].requires_grad, key
    with torch.no_grad():
        assert torch.equal(expected(x), actual(x))
